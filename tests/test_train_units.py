"""Unit tests of the training pipeline: tokenizer tokens, FIM, SFT mask, aux loss, MoE dispatch,
resume, dedup and filters."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from qwen3coder.chat.fim import build_fim_prompt
from qwen3coder.chat.template import render_chat
from qwen3coder.train.chat_template import TEMPLATE
from qwen3coder.train.data import Document, filter_reason
from qwen3coder.train.dedup import NearDupIndex, minhash
from qwen3coder.train.fim import ENDOFTEXT, chunk_lines, document_segments, fim_split, segments_to_string
from qwen3coder.train.profiles import DataConfig, TokenizerConfig, get_profile

CODE = '''def add(a, b):
    """Return a + b.

    >>> add(1, 2)
    3
    """
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(x)
'''


def _docs(n: int = 60) -> list[Document]:
    rng = random.Random(0)
    docs = []
    for i in range(n):
        name = "".join(rng.choice("abcdefghij") for _ in range(6))
        body = CODE.replace("add", f"add_{name}").replace("Stack", f"Stack{i}")
        docs.append(Document(f"lib/m{i}.py", "Python", body * rng.randint(1, 3)))
    return docs


@pytest.fixture(scope="module")
def tok():
    from qwen3coder.train.tokenizer import train_tokenizer

    return train_tokenizer(_docs(), TokenizerConfig(vocab_size=600, sample_bytes=10 ** 6), log=lambda *_: None)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    from qwen3coder.train.tokenizer import save_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, d, TEMPLATE)
    return d


# ----------------------------------------------------------------------------- tokenizer
def test_special_tokens_ids_and_flags(tok_dir):
    from qwen3coder.chat.tokenizer import load_tokenizer
    from qwen3coder.train.tokenizer import ADDED_TOKENS

    tok = load_tokenizer(tok_dir)
    n = tok.vocab_size
    assert 256 + len(ADDED_TOKENS) < n <= 600  # a tiny corpus may not yield every merge
    added = tok.added_tokens
    first = n - len(ADDED_TOKENS)
    for k, (content, special) in enumerate(ADDED_TOKENS):
        assert added[first + k] == content and tok.token_to_id(content) == first + k
        assert ((first + k) in tok.special_token_ids) == special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.chat_template == TEMPLATE and tok.config["chat_template"] == TEMPLATE
    text = "<|im_start|>user\n<tool_call>x</tool_call><|fim_prefix|>a<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<tool_call>x</tool_call><|fim_prefix|>a"


def test_tokenizer_loads_in_transformers(tok_dir):
    from transformers import AutoTokenizer

    from qwen3coder.chat.tokenizer import load_tokenizer

    ours, hf = load_tokenizer(tok_dir), AutoTokenizer.from_pretrained(str(tok_dir))
    for text in [CODE, "<|im_start|>system\nhi<|im_end|>\n<tool_response>\nok\n</tool_response>",
                 build_fim_prompt("def f(x):\n    ", "\n    return y\n"), "héllo\u0301 wörld  \t\n\n"]:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.eos_token_id == ours.token_to_id("<|im_end|>")
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        render_chat(TEMPLATE, msgs)


# ----------------------------------------------------------------------------- FIM
@pytest.mark.parametrize("seed", range(20))
def test_fim_split_partitions_text(seed):
    rng = random.Random(seed)
    text = CODE * (seed % 3 + 1)
    s = fim_split(text, rng)
    assert s.prefix + s.middle + s.suffix == text
    assert s.psm() == build_fim_prompt(s.prefix, s.suffix) + s.middle


def test_document_segments_structure():
    text = CODE * 6
    chunks = chunk_lines(text, 300)
    assert "".join(chunks) == text and all(len(c) <= 300 or "\n" not in c[:-1] for c in chunks)
    segs = document_segments(text, random.Random(1), 1.0, 300)
    assert segs[-1] == ("token", ENDOFTEXT)
    # every chunk: prefix token, text, suffix token, text, middle token, text, end of text
    assert len(segs) == 7 * len(chunks)
    for k, chunk in enumerate(chunks):
        kinds = [s for s, _ in segs[7 * k:7 * k + 7]]
        assert kinds == ["token", "text", "token", "text", "token", "text", "token"]
        _, pre, _, suf, _, mid, _ = (v for _, v in segs[7 * k:7 * k + 7])
        assert pre + mid + suf == chunk
    plain = document_segments(text, random.Random(1), 0.0, 300)
    assert segments_to_string(plain) == text + ENDOFTEXT


def test_encoded_stream_is_the_fim_string(tok):
    from qwen3coder.train.tokenizer import _doc_rng, encode_documents

    docs = _docs(5)
    stream = encode_documents(tok, docs, 0.5, 200, seed=3)
    expected = "".join(segments_to_string(document_segments(d.text, _doc_rng(d, 3), 0.5, 200)) for d in docs)
    assert tok.decode(stream.tokens.tolist()) == expected
    assert sum(stream.tokens_per_lang.values()) == stream.tokens.size
    assert int((stream.tokens == tok.token_to_id(ENDOFTEXT)).sum()) >= len(docs)


# ----------------------------------------------------------------------------- SFT mask
def test_sft_mask_covers_exactly_the_assistant_tokens(tok):
    from qwen3coder.train.sft import encode_conversation
    from qwen3coder.train.sft_data import TOOLS, _call

    conv = {"kind": "t", "tools": [TOOLS["read_file"]], "messages": [
        {"role": "user", "content": "What is in a.py?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("read_file", path="a.py")]},
        {"role": "tool", "content": "x = 1"},
        {"role": "assistant", "content": "It sets `x`."},
        {"role": "user", "content": "\nthanks"},
        {"role": "assistant", "content": "You're welcome.\n\nBye."}]}
    ex = encode_conversation(tok, conv, 10 ** 6)
    text = render_chat(TEMPLATE, conv["messages"], tools=conv["tools"], add_generation_prompt=False)
    assert tok.decode(ex.ids) == text
    trained = [i for i, lab in zip(ex.ids, ex.labels) if lab != -100]
    assert all(lab in (-100, i) for i, lab in zip(ex.ids, ex.labels))
    expected = ("<tool_call>\n<function=read_file>\n<parameter=path>\na.py\n</parameter>\n</function>\n"
                "</tool_call><|im_end|>" + "It sets `x`.<|im_end|>" + "You're welcome.\n\nBye.<|im_end|>")
    assert tok.decode(trained) == expected
    # the trained tokens form three contiguous runs, one per assistant turn
    runs = sum(1 for j, lab in enumerate(ex.labels) if lab != -100 and (j == 0 or ex.labels[j - 1] == -100))
    assert runs == 3


def test_sft_mask_boundary_token_belongs_to_the_prompt(tok):
    """A token straddling the prompt/answer boundary ("\n" + a leading "\n" of the answer, merged)
    starts in the prompt, so it is not trained on; the rest of the answer is."""
    from qwen3coder.train.sft import encode_conversation

    conv = {"kind": "t", "tools": None, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nhello"}]}
    ex = encode_conversation(tok, conv, 10 ** 6)
    trained = tok.decode([i for i, lab in zip(ex.ids, ex.labels) if lab != -100])
    assert trained.endswith("hello<|im_end|>") and len(trained) <= len("\n\nhello<|im_end|>")


# ----------------------------------------------------------------------------- aux loss, dispatch
@pytest.mark.parametrize("with_mask", [False, True])
def test_aux_loss_matches_transformers(with_mask):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from qwen3coder.train.model_utils import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    b, t, e, k = 3, 7, 8, 2
    logits = [torch.randn(b * t, e, generator=g) * 2 for _ in range(4)]
    mask = (torch.rand(b, t, generator=g) > 0.3).long() if with_mask else None
    ref = load_balancing_loss_func(tuple(logits), e, k, mask)
    ours = load_balancing_loss(logits, e, k, None if mask is None else mask.reshape(-1))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)


def test_moe_dispatch_same_math():
    from qwen3coder.models.layers.moe import moe_forward_reference, route
    from qwen3coder.train.model_utils import moe_dense, moe_grouped

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 32, generator=g)
    gu, dn = torch.randn(6, 2 * 24, 32, generator=g) * 0.2, torch.randn(6, 32, 24, generator=g) * 0.2
    logits = torch.randn(37, 6, generator=g)
    logits[:, 5] = -1e4  # an expert without tokens
    w, ids = route(logits, 2, True, x.dtype)
    ref = moe_forward_reference(x, gu, dn, w, ids)
    torch.testing.assert_close(moe_dense(x, gu, dn, w, ids), ref, rtol=1e-5, atol=1e-5)
    grouped = moe_grouped(x, gu, dn, w, ids)  # bf16 matmuls
    assert (grouped - ref).abs().max() < 0.03 * ref.abs().max()


def test_model_with_training_dispatch_is_the_serving_model():
    from qwen3coder.train.model_utils import install_moe_dispatch
    from qwen3coder.train.pretrain import new_model

    cfg = get_profile("cpu-smoke").model_config(256)
    model = new_model(cfg, 0, torch.device("cpu"))
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        ref = model(ids)
        install_moe_dispatch(model, "dense", torch.device("cpu"), log=lambda *_: None)
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
    assert not any("forward" in k for k in model.state_dict())


# ----------------------------------------------------------------------------- resume
def _pretrain(tmp, stop_after=None, resume=False):
    from qwen3coder.train.pretrain import run_pretrain

    p = get_profile("cpu-smoke", **{"pretrain.time_budget_s": None, "pretrain.max_steps": 6,
                                    "pretrain.log_every": 1, "pretrain.eval_every": 1000,
                                    "pretrain.warmup_steps": 2, "pretrain.seq_len": 32,
                                    "pretrain.micro_batch": 4, "pretrain.grad_accum": 2})
    toks = np.random.default_rng(0).integers(0, 256, 20000).astype(np.uint16)
    _, state = run_pretrain(p.model_config(256), p.pretrain, toks, toks[:3000], tmp, resume=resume,
                            stop_after=stop_after, log=lambda *_: None)
    return state


def test_resume_continues_identically(tmp_path):
    full = _pretrain(tmp_path / "full")
    first = _pretrain(tmp_path / "cut", stop_after=3)
    assert first.step == 3
    resumed = _pretrain(tmp_path / "cut", resume=True)
    assert resumed.step == 6
    a = {h["step"]: h["loss"] for h in full.history}
    b = {h["step"]: h["loss"] for h in resumed.history}
    for step in (1, 2, 3, 4, 5, 6):
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_lr_schedule():
    from qwen3coder.train.loop import LoopConfig, lr_at

    c = LoopConfig(name="x", lr=1.0, warmup_steps=10, max_steps=110, time_budget_s=None, min_lr_ratio=0.1)
    assert lr_at(c, 0, 110) == pytest.approx(0.1) and lr_at(c, 9, 110) == pytest.approx(1.0)
    assert lr_at(c, 10, 110) == pytest.approx(1.0) and lr_at(c, 110, 110) == pytest.approx(0.1)
    assert lr_at(c, 60, 110) == pytest.approx(0.55)
    c.schedule = "linear"
    assert lr_at(c, 110, 110) == 0.0


# ----------------------------------------------------------------------------- data
def test_near_duplicates_found_and_distinct_files_kept():
    base = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(60))
    edited = base.replace("return x * 7 +", "return x * 70 +")
    other = "\n".join(f"class C{i}:\n    value = '{i}' * {i}" for i in range(60))
    index = NearDupIndex(64, 16, 0.8)
    assert index.add(minhash(base)) is None
    assert index.add(minhash(other)) is None
    assert index.add(minhash(edited)) == 0


@pytest.mark.parametrize("text,reason", [
    ("# This file is automatically generated. Do not edit.\n" + "x = 1\n" * 50, "generated"),
    ("x = [" + "1, " * 600 + "]\n" + "y = 2\n" * 5, "long-lines"),
    ("# Copyright 2020 Someone\n# Licensed under the Apache License\n" * 10 + "import os\n", "licence-only"),
    ("x = '<|im_start|>'\n" * 30, "control-token-text"),
    ("short = 1\n", "too-small"),
    (CODE * 2, None),
])
def test_filters(text, reason):
    assert filter_reason(text, "Python", DataConfig()) == reason
