"""One command, every stage: data → tokenizer → pretrain → SFT → export (→ evaluation).

Layout of the output directory:

    data/        train.jsonl, val.jsonl (the filtered corpus), sft.jsonl (generated conversations)
    tokenizer/   the trained tokenizer
    tokens/      train.npy, val.npy (uint16 token streams)
    checkpoints/ pretrain_checkpoint.pt, sft_checkpoint.pt (model + optimizer + RNG, for --resume)
    reports/     data_report.{json,md}, {pretrain,sft}_metrics.json, *_loss.png, train_log.txt,
                 summary.json, eval.json (when qwen3coder.eval is importable)
    model/       the exported Hugging Face checkpoint

Each finished stage leaves `.done_<stage>`; `resume=True` skips finished stages and continues an
interrupted training stage from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from qwen3coder.train import data as data_mod
from qwen3coder.train import tokenizer as tok_mod
from qwen3coder.train.export import export_model
from qwen3coder.train.loop import load_checkpoint
from qwen3coder.train.model_utils import install_moe_dispatch
from qwen3coder.train.pretrain import load_tokens, new_model, pick_device, run_pretrain, save_tokens
from qwen3coder.train.profiles import Profile, profile_to_dict
from qwen3coder.train.sft import run_sft
from qwen3coder.train.sft_data import generate_conversations

STAGES = ("data", "tokenizer", "pretrain", "sft", "export")


class Logger:
    """print + append to reports/train_log.txt."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _model_config(profile: Profile, vocab: int) -> Any:
    return profile.model_config(((vocab + 63) // 64) * 64)


def run_pipeline(profile: Profile, out_dir: str | os.PathLike, resume: bool = False,
                 run_eval: bool | None = None) -> dict[str, Any]:
    """Run every stage of `profile` into `out_dir`; returns the summary (also in reports/summary.json)."""
    threads = torch.get_num_threads()
    if profile.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(profile.cpu_threads)
    try:
        return _run(profile, Path(out_dir), resume, run_eval)
    finally:
        torch.set_num_threads(threads)


def _fit_budget(stage_budget: float | None, profile: Profile, t_start: float, after: float, log: Any,
                name: str) -> float | None:
    """The stage's time budget, shortened so that `after` seconds (+ reserve) fit in the total budget."""
    if profile.total_budget_s is None or stage_budget is None:
        return stage_budget
    left = profile.total_budget_s - (time.time() - t_start) - after - profile.reserve_s
    if left < stage_budget:
        log(f"[pipeline] {name} budget cut from {stage_budget:.0f}s to {max(left, 10.0):.0f}s to finish within "
            f"{profile.total_budget_s:.0f}s")
        return max(left, 10.0)
    return stage_budget


def _run(profile: Profile, out: Path, resume: bool, run_eval: bool | None) -> dict[str, Any]:
    t_start = time.time()
    done = {s for s in STAGES if (out / f".done_{s}").exists()}
    if done and not resume:
        raise FileExistsError(f"{out} already holds a run (finished stages: {', '.join(sorted(done))}); "
                              "pass --resume to continue it or choose an empty directory")
    reports = out / "reports"
    log = Logger(reports / "train_log.txt")
    summary_path = reports / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
    summary.update(profile=profile.name, settings=profile_to_dict(profile))
    timings: dict[str, float] = summary.setdefault("seconds", {})
    device = pick_device()
    workers = profile.data.workers or os.cpu_count() or 1
    log(f"[pipeline] profile {profile.name}, output {out}, device {device}"
        + (f", resuming after {', '.join(s for s in STAGES if s in done)}" if done else ""))

    def finish(stage: str, t0: float) -> None:
        timings[stage] = round(time.time() - t0, 2)
        (out / f".done_{stage}").touch()
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        log(f"[pipeline] stage {stage} done in {timings[stage]:.1f}s")

    # ---------------------------------------------------------------- data
    t0 = time.time()
    if "data" in done:
        corpus = data_mod.load_corpus(out / "data", json.loads((reports / "data_report.json").read_text()))
        convs = [json.loads(line) for line in open(out / "data" / "sft.jsonl", encoding="utf-8")]
    else:
        corpus = data_mod.build_corpus(profile.data, log)
        convs = generate_conversations(corpus.train, profile.sft.max_source_files, profile.sft.max_examples,
                                       profile.sft.seed, workers)
        data_mod.save_corpus(corpus, out / "data")
        with open(out / "data" / "sft.jsonl", "w", encoding="utf-8") as f:
            for c in convs:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        corpus.report["sft_conversations"] = _count_kinds(convs)
        summary["data"] = {k: corpus.report[k] for k in ("train_files", "val_files", "train_bytes", "val_bytes")}
        data_mod.write_report(corpus.report, reports)
        log(f"[data] {len(convs)} SFT conversations: {corpus.report['sft_conversations']}")
        finish("data", t0)

    # ---------------------------------------------------------------- tokenizer
    t0 = time.time()
    if "tokenizer" in done:
        tok = tok_mod.load(out / "tokenizer")
    else:
        tcfg = profile.tokenizer
        tok = tok_mod.train_tokenizer(corpus.train, tcfg, log)
        tok_mod.save_tokenizer(tok, out / "tokenizer")
        import random

        train_docs = list(corpus.train)
        random.Random(tcfg.seed).shuffle(train_docs)
        enc_workers = tcfg.workers or os.cpu_count() or 1
        val = tok_mod.encode_documents(tok, corpus.val, 0.0, tcfg.fim_chunk_chars, tcfg.seed, workers=1)
        train = tok_mod.encode_documents(tok, train_docs, tcfg.fim_rate, tcfg.fim_chunk_chars, tcfg.seed,
                                         workers=enc_workers, time_budget_s=tcfg.encode_time_budget_s, log=log)
        save_tokens(out / "tokens" / "train.npy", train.tokens)
        save_tokens(out / "tokens" / "val.npy", val.tokens)
        report = corpus.report
        for lang, n in train.tokens_per_lang.items():
            report["languages"].setdefault(lang, {"files": 0, "bytes": 0, "val_files": 0, "val_bytes": 0})["tokens"] = n
        for lang, n in val.tokens_per_lang.items():
            report["languages"].setdefault(lang, {"files": 0, "bytes": 0, "val_files": 0, "val_bytes": 0})["val_tokens"] = n
        train_bytes = sum(v.get("bytes", 0) for v in report["languages"].values())
        report["tokenizer"] = {"vocab_size": tok.vocab_size, "train_tokens": int(train.tokens.size),
                               "val_tokens": int(val.tokens.size), "fim_rate": tcfg.fim_rate,
                               "bytes_per_token": round(train_bytes / max(1, train.tokens.size), 3),
                               "seconds": round(time.time() - t0, 1)}
        data_mod.write_report(report, reports)
        log(f"[tokenizer] {train.tokens.size:,} train tokens, {val.tokens.size:,} held-out tokens")
        finish("tokenizer", t0)
    config = _model_config(profile, tok.vocab_size)
    # asked only now: CUDA must not be initialised before the data and tokenizer stages fork workers
    summary["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"

    # ---------------------------------------------------------------- pretrain
    t0 = time.time()
    ckpts = out / "checkpoints"
    if "pretrain" in done:
        model = new_model(config, profile.pretrain.seed, device)
        load_checkpoint(ckpts / "pretrain_checkpoint.pt", model, None)
    else:
        profile.pretrain.time_budget_s = _fit_budget(profile.pretrain.time_budget_s, profile, t_start,
                                                     (profile.sft.time_budget_s or 0) + 10, log, "pretrain")
        model, state = run_pretrain(config, profile.pretrain, load_tokens(out / "tokens" / "train.npy"),
                                    load_tokens(out / "tokens" / "val.npy"), ckpts, resume=resume,
                                    device=device, log=log)
        _move_reports(ckpts, reports, "pretrain")
        summary.update(pretrain_steps=state.step, pretrain_tokens=state.tokens,
                       pretrain_loss=state.history[-1]["loss"] if state.history else None,
                       pretrain_val_loss=state.evals[-1]["val_loss"] if state.evals else None,
                       pretrain_tok_per_s=round(state.tokens / max(1e-9, state.train_seconds)))
        finish("pretrain", t0)

    # ---------------------------------------------------------------- sft
    t0 = time.time()
    dtype = profile.pretrain.dtype if device.type == "cuda" else "float32"
    if "sft" in done:
        load_checkpoint(ckpts / "sft_checkpoint.pt", model, None)
    else:
        profile.sft.time_budget_s = _fit_budget(profile.sft.time_budget_s, profile, t_start, 0, log, "sft")
        install_moe_dispatch(model, profile.pretrain.moe_dispatch, device, log)
        state = run_sft(model, tok, convs, profile.sft, ckpts, device, dtype, profile.pretrain.aux_loss_coef,
                        resume=resume, log=log)
        _move_reports(ckpts, reports, "sft")
        summary.update(sft_steps=state.step, sft_loss=state.history[-1]["loss"] if state.history else None,
                       sft_val_loss=state.evals[-1]["val_loss"] if state.evals else None)
        finish("sft", t0)

    # ---------------------------------------------------------------- export
    t0 = time.time()
    total, active = config.num_params()
    summary.update(params_total=total, params_active=active)
    model_dir = export_model(model.cpu(), tok, out / "model", summary)
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    summary["model_dir_bytes"] = size
    log(f"[export] {model_dir} ({size / 2 ** 20:.1f} MiB)")
    finish("export", t0)

    # ---------------------------------------------------------------- evaluation
    if profile.run_eval if run_eval is None else run_eval:
        run_evaluation(model_dir, reports / "eval.json", profile.eval_profile, log)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"[pipeline] finished: {json.dumps(timings)}")
    log.close()
    return summary


def run_evaluation(model_dir: Path, out_json: Path, eval_profile: str, log: Any = print) -> bool:
    """`qwen3coder.eval.run_all(model_dir, out_json, profile)` when that module is importable."""
    try:
        from qwen3coder.eval import run_all  # provided by the evaluation work, if present
    except ImportError as e:
        log(f"[eval] skipped: qwen3coder.eval.run_all is not importable ({e})")
        return False
    t0 = time.time()
    try:
        run_all(str(model_dir), str(out_json), eval_profile)
    except Exception as e:  # the model is exported already; report, don't lose it
        log(f"[eval] failed after {time.time() - t0:.0f}s: {type(e).__name__}: {e}")
        return False
    log(f"[eval] wrote {out_json} in {time.time() - t0:.0f}s")
    return True


def _count_kinds(convs: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in convs:
        counts[c["kind"]] = counts.get(c["kind"], 0) + 1
    return dict(sorted(counts.items()))


def _move_reports(src: Path, dst: Path, name: str) -> None:
    for suffix in ("_metrics.json", "_loss.png"):
        f = src / f"{name}{suffix}"
        if f.exists():
            os.replace(f, dst / f.name)
