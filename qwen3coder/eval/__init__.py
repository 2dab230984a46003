"""Evaluation of a checkpoint: HumanEval pass@k (sandboxed), held-out loss, FIM exact match and
tool-call well-formedness, run together by ``run_all`` and written to one ``eval.json``.

See docs/EVAL.md. ``qwen3coder eval --model DIR [--profile cpu-smoke|gpu] [--out eval.json]``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwen3coder.eval.heldout import fim_exact_match, heldout_loss, load_texts, make_fim_examples
from qwen3coder.eval.humaneval import HumanEvalConfig, load_problems, pass_at_k, run_humaneval
from qwen3coder.eval.tools import default_cases, tool_call_wellformed_rate

__all__ = ["EvalProfile", "PROFILES", "run_all", "read_train_meta", "pass_at_k"]

logger = logging.getLogger("qwen3coder.eval")


@dataclass(frozen=True)
class EvalProfile:
    """Sizes of every eval; ``PROFILES`` holds the named ones."""

    name: str
    humaneval: HumanEvalConfig
    max_model_len: int
    max_num_seqs: int
    heldout_window: int  # tokens per scored window
    heldout_max_windows: int | None
    heldout_max_texts: int | None  # of the default held-out set (HumanEval solutions)
    fim_examples: int
    fim_max_tokens: int
    tool_cases: int | None
    tool_max_tokens: int


PROFILES: dict[str, EvalProfile] = {
    # seconds on 2 CPU cores with a tiny model: the CI smoke test
    "cpu-smoke": EvalProfile(
        "cpu-smoke", HumanEvalConfig(num_problems=5, n_samples=2, max_tokens=16, timeout_s=3.0, workers=2),
        max_model_len=1024, max_num_seqs=32, heldout_window=128, heldout_max_windows=8, heldout_max_texts=8,
        fim_examples=4, fim_max_tokens=12, tool_cases=2, tool_max_tokens=24),
    # the full run on one GPU: all 164 problems, n=10, large engine batches
    "gpu": EvalProfile(
        "gpu", HumanEvalConfig(num_problems=None, n_samples=10, max_tokens=384, timeout_s=3.0, workers=None),
        max_model_len=2048, max_num_seqs=256, heldout_window=1024, heldout_max_windows=512, heldout_max_texts=None,
        fim_examples=200, fim_max_tokens=64, tool_cases=None, tool_max_tokens=256),
}


def read_train_meta(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``train_meta.json`` of the model directory (written by the training pipeline), if present."""
    path = Path(model_dir) / "train_meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return meta


def _timed(name: str, fn: Callable[[], Any], timings: dict[str, float], errors: dict[str, str]) -> Any:
    """Run one eval; a failure is recorded (and logged) instead of losing the other results."""
    start = time.perf_counter()
    print(f"[eval] {name} ...", file=sys.stderr, flush=True)  # progress: a time-limited run shows where it was
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in eval.json under "errors"
        errors[name] = f"{type(exc).__name__}: {exc}"
        logger.error("eval %s failed: %s\n%s", name, exc, traceback.format_exc())
        return None
    finally:
        timings[name] = round(time.perf_counter() - start, 3)
        print(f"[eval] {name} done in {timings[name]:.1f}s", file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_all(model_dir: str | os.PathLike[str], out_json: str | os.PathLike[str] = "eval.json",
            profile: str | EvalProfile = "cpu-smoke",
            heldout_texts: Sequence[str | os.PathLike[str]] | None = None, *,
            device: str | None = None, dtype: Any = None) -> dict[str, Any]:
    """Run every eval on the checkpoint in ``model_dir``; write and return the results.

    ``heldout_texts``: file paths and/or texts for held-out loss and FIM (default: the HumanEval
    prompts with their canonical solutions). HumanEval per-problem records go to
    ``<out_json stem>.humaneval.jsonl`` beside ``out_json``. A failing eval leaves its metric null
    and its message under ``errors``.
    """
    from qwen3coder.engine import LLM
    from qwen3coder.train.sandbox import probe_isolation

    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if isinstance(profile, str) and profile not in PROFILES:
        raise ValueError(f"unknown eval profile {profile!r}; choose from {sorted(PROFILES)}")
    out_path = Path(out_json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    samples_path = out_path.with_name(out_path.stem + ".humaneval.jsonl")
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    start = time.perf_counter()
    meta = read_train_meta(model_dir)
    llm = _timed("load", lambda: LLM(str(model_dir), device=device, dtype=dtype, max_model_len=prof.max_model_len,
                                      max_num_seqs=prof.max_num_seqs), timings, errors)
    if llm is None:
        raise RuntimeError(f"could not load {model_dir}: {errors['load']}")
    engine = llm.llm_engine
    total, active = engine.model_config.num_params()

    if heldout_texts is None:
        problems = load_problems()
        texts = [p.prompt + p.canonical_solution for p in problems][: prof.heldout_max_texts]
        heldout_source = "humaneval prompts + canonical solutions"
    else:
        texts = load_texts(heldout_texts)
        heldout_source = f"{len(texts)} given texts"

    isolation = _timed("sandbox_probe", probe_isolation, timings, errors)
    he = _timed("humaneval", lambda: run_humaneval(llm, prof.humaneval, samples_path=samples_path), timings, errors)
    loss = _timed("heldout_loss", lambda: heldout_loss(llm, texts, prof.heldout_window, prof.heldout_max_windows),
                  timings, errors)
    fim = _timed("fim", lambda: fim_exact_match(llm, make_fim_examples(texts, prof.fim_examples),
                                                prof.fim_max_tokens), timings, errors)
    tools = _timed("tool_calls", lambda: tool_call_wellformed_rate(llm, default_cases(prof.tool_cases),
                                                                    prof.tool_max_tokens), timings, errors)
    timings["total"] = round(time.perf_counter() - start, 3)
    result: dict[str, Any] = {
        "model_dir": str(Path(model_dir).resolve()),
        "profile": prof.name,
        "humaneval_pass@1": he["pass@1"] if he else None,
        "humaneval_pass@10": he["pass@10"] if he else None,
        "humaneval_sampled": he["sampled"] if he else None,
        "humaneval_num_problems": he["num_problems"] if he else None,
        "humaneval_n_samples": he["n_samples"] if he else None,
        "humaneval_statuses": he["statuses"] if he else None,
        "humaneval_samples_file": str(samples_path) if he else None,
        "params_total": total,
        "params_active": active,
        "train_tokens": (meta or {}).get("train_tokens"),
        "train_meta": meta,
        "heldout_loss": loss["loss"] if loss else None,
        "heldout_perplexity": loss["perplexity"] if loss else None,
        "heldout_tokens": loss["tokens"] if loss else None,
        "heldout_source": heldout_source,
        "fim_exact_match": fim["exact_match"] if fim else None,
        "fim_examples": fim["examples"] if fim else None,
        "tool_call_wellformed_rate": tools["rate"] if tools else None,
        "tool_call_cases": tools["cases"] if tools else None,
        "tool_call_outcomes": tools["outcomes"] if tools else None,
        "timing_s": timings,
        "device": str(engine.config.device),
        "device_name": _device_name(engine.config.device),
        "dtype": str(engine.config.dtype).replace("torch.", ""),
        "sandbox": isolation,
        "profile_config": asdict(prof),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "errors": errors,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(out_path, result)
    return result


def _device_name(device: Any) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
