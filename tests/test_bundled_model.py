"""The bundled default model (qwen3coder/assets/qwen3coder-tiny): its files, its eval.json, and the same
greedy output from our engine (`LLM()` with no model given) and from transformers' AutoModelForCausalLM
with AutoTokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

import qwen3coder
from qwen3coder.chat.fim import build_fim_prompt

ASSETS = os.path.join(os.path.dirname(qwen3coder.__file__), "assets", "qwen3coder-tiny")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "model.safetensors")),
                                reason="the bundled model's weights are not in this checkout")

MESSAGES = [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]
RAW_PROMPTS = ["def fibonacci(n):\n    ", build_fim_prompt("def add(a, b):\n    ", "\n    return result\n")]


def _hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    """Plain argmax decoding with transformers' forward (its `generate` would apply the checkpoint's
    repetition penalty and, with `min_new_tokens`, mask the EOS tokens that `ignore_eos` keeps)."""
    out: list[int] = []
    past = None
    step = ids
    with torch.no_grad():
        for _ in range(n):
            res = hf(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out


def test_default_model_path_and_files():
    path = qwen3coder.default_model_path()
    assert os.path.samefile(path, ASSETS)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "eval.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen3_moe"
    assert os.path.getsize(os.path.join(path, "model.safetensors")) <= 64 * 2**20
    with open(os.path.join(path, "eval.json")) as f:
        ev = json.load(f)
    for key in ("humaneval_pass@1", "humaneval_pass@10", "params_total", "params_active", "train_tokens"):
        assert key in ev and ev[key] is not None, key
    assert ev["params_total"] <= 32_000_000 and ev["errors"] == {}
    assert ev["humaneval_num_problems"] == 164


def test_bundled_model_same_greedy_output_in_engine_and_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen3coder import LLM, SamplingParams

    hf_tok = AutoTokenizer.from_pretrained(ASSETS)
    hf = AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32).eval()
    llm = LLM(device="cpu", dtype=torch.float32)  # no model: the bundled one
    chat = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompts = [chat, *RAW_PROMPTS]
    n = 24
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()  # the two tokenizers agree
        ref = _hf_greedy(hf, ids, n)
        assert out.outputs[0].token_ids == ref, prompt
        assert out.outputs[0].text == hf_tok.decode(ref, skip_special_tokens=True)


def test_bundled_model_answers_in_chatml():
    """The chat template renders the Qwen3-Coder format and generation stops at <|im_end|>."""
    from qwen3coder import LLM, SamplingParams

    llm = LLM(device="cpu", dtype=torch.float32)
    out = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=200))
    assert out[0].outputs[0].text.strip()
    assert out[0].outputs[0].finish_reason in ("stop", "length")
