"""End to end: the cpu-smoke training pipeline, then the exported model in qwen3coder and transformers."""

from __future__ import annotations

import json
import time

import pytest
import torch

from qwen3coder.chat.fim import build_fim_prompt
from qwen3coder.chat.template import render_chat
from qwen3coder.train.chat_template import TEMPLATE

PROMPTS = [
    None,  # the chat prompt, rendered below
    "def fibonacci(n):\n    ",
    build_fim_prompt("def add(a, b):\n    ", "\n    return result\n"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from qwen3coder.train.pipeline import run_pipeline
    from qwen3coder.train.profiles import get_profile

    out = tmp_path_factory.mktemp("train")
    t0 = time.time()
    summary = run_pipeline(get_profile("cpu-smoke"), out, run_eval=False)
    summary["wall_s"] = time.time() - t0
    return out, summary


def _prompts(tok) -> list[list[int]]:
    chat = render_chat(TEMPLATE, [{"role": "user", "content": "Write a function that adds two numbers."}])
    return [tok.encode(chat if p is None else p) for p in PROMPTS]


def _greedy(forward, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        logits = forward(torch.tensor([out]))
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def test_pipeline_runs_every_stage(run):
    out, summary = run
    for stage in ("data", "tokenizer", "pretrain", "sft", "export"):
        assert (out / f".done_{stage}").exists()
    assert summary["wall_s"] < 180, summary["seconds"]  # ~50 s on 2 idle cores; generous for shared CI
    report = json.loads((out / "reports" / "data_report.json").read_text())
    assert report["train_files"] > 0 and report["languages"]["Python"]["tokens"] > 0
    assert report["tokenizer"]["train_tokens"] > 0
    metrics = json.loads((out / "reports" / "pretrain_metrics.json").read_text())
    assert metrics["history"] and metrics["evals"]
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert json.loads((out / "reports" / "sft_metrics.json").read_text())["history"]
    assert (out / "reports" / "data_report.md").exists() and (out / "reports" / "train_log.txt").exists()


def test_exported_files(run):
    out, _ = run
    model_dir = out / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= names
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["tie_word_embeddings"] is True
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE == (model_dir / "chat_template.jinja").read_text()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and len(gen["eos_token_id"]) == 2
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert "lm_head.weight" not in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys


def test_exported_model_same_in_qwen3coder_and_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen3coder.chat.tokenizer import load_tokenizer
    from qwen3coder.loader import load_model

    model_dir = str(run[0] / "model")
    ours = load_model(model_dir, dtype=torch.float32).eval()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok, hf_tok = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        for ids in _prompts(tok):
            assert hf_tok.encode(tok.decode(ids), add_special_tokens=False) == ids
            x = torch.tensor([ids])
            torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)
            a = _greedy(ours, ids, 12)
            b = _greedy(lambda t: hf(t).logits, ids, 12)
            assert a == b


def test_exported_model_serves_with_the_engine(run):
    from qwen3coder import LLM, SamplingParams
    from qwen3coder.loader import load_model

    model_dir = str(run[0] / "model")
    llm = LLM(model_dir, device="cpu", dtype=torch.float32)
    tok = llm.get_tokenizer()
    ref_model = load_model(model_dir, dtype=torch.float32).eval()
    eos = set(json.loads((run[0] / "model" / "generation_config.json").read_text())["eos_token_id"])
    for ids in _prompts(tok)[1:]:
        got = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8))
        out = got[0].outputs[0].token_ids
        with torch.no_grad():
            ref = _greedy(ref_model, ids, 8)
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        assert out == ref[:cut]


def test_resume_skips_finished_stages(run, tmp_path):
    from qwen3coder.train.pipeline import run_pipeline
    from qwen3coder.train.profiles import get_profile

    out, _ = run
    with pytest.raises(FileExistsError, match="--resume"):
        run_pipeline(get_profile("cpu-smoke"), out, run_eval=False)
    t0 = time.time()
    summary = run_pipeline(get_profile("cpu-smoke"), out, resume=True, run_eval=False)
    assert time.time() - t0 < 30 and summary["params_total"] > 0
