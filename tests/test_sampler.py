"""Sampler: the masking functions on crafted logits, penalties, greedy, seeded reproducibility
independent of the batch, sampling frequencies, min_tokens and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from qwen3coder.engine.sampler import (Sampler, SamplingMetadata, apply_min_p, apply_penalties,
                                       apply_top_k_top_p)
from qwen3coder.engine.sampling_params import SamplingParams
from qwen3coder.engine.sequence import Request

V = 8
NEG = float("-inf")


def seqs_for(params: list[SamplingParams], prompts=None, outputs=None):
    seqs = []
    for i, p in enumerate(params):
        prompt = (prompts or [[1, 2]] * len(params))[i]
        req = Request(f"r{i}", None, prompt, p)
        seq = req.seqs[0]
        seq.token_ids.extend((outputs or [[]] * len(params))[i])
        seqs.append(seq)
    return seqs


def md_for(params, vocab=V, **kw):
    return SamplingMetadata.from_sequences(seqs_for(params, **kw), vocab, torch.device("cpu"))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0, -1.0, 0.5]])
    out = apply_top_k_top_p(logits, torch.tensor([3]), None)
    kept = (out > NEG).nonzero()[:, 1].tolist()
    assert sorted(kept) == [1, 3, 5]
    assert torch.equal(out[0, [1, 3, 5]], logits[0, [1, 3, 5]])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125, 0.0, 0.0]]) + 1e-12
    logits = probs.log()
    for p, expect in ((0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1, 2]), (1.0, list(range(8)))):
        out = apply_top_k_top_p(logits, None, torch.tensor([p]))
        assert sorted((out > NEG).nonzero()[:, 1].tolist()) == expect, p
    # the most likely token survives even a tiny p
    out = apply_top_k_top_p(logits, None, torch.tensor([1e-6]))
    assert (out > NEG).nonzero()[:, 1].tolist() == [0]


def test_top_k_then_top_p_per_row():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0],
                                     [0.1, 0.2, 0.3, 0.4, 0, 0, 0, 0]]) + 1e-9)
    out = apply_top_k_top_p(logits, torch.tensor([2, 8]), torch.tensor([1.0, 0.65]))
    assert sorted((out[0] > NEG).nonzero()[:, 0].tolist()) == [0, 1]
    assert sorted((out[1] > NEG).nonzero()[:, 0].tolist()) == [2, 3]


def test_min_p():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0, 0, 0]]) + 1e-9
    out = apply_min_p(probs.log(), torch.tensor([0.19]))  # threshold 0.095: keeps 0.1, drops 0.05
    assert sorted((out > NEG).nonzero()[:, 1].tolist()) == [0, 1, 2]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0]])
    prompt = torch.tensor([[0, 1, V]])  # V = padding
    output = torch.tensor([[2, 2, 4, V]])
    out = apply_penalties(logits, prompt, output, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    expect = torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, 1.0, 0.25 - 0.5 - 0.25, 0.0, 0.0, 0.0]])
    assert torch.allclose(out, expect)


def test_greedy_argmax_with_repetition_penalty():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0, 0, 0, 0, 0]])
    md = md_for([SamplingParams(temperature=0, repetition_penalty=1.5)], prompts=[[0]])
    assert Sampler()(logits, md).token_ids.tolist() == [1]  # 3.0/1.5 < 2.9
    md = md_for([SamplingParams(temperature=0)], prompts=[[0]])
    assert Sampler()(logits, md).token_ids.tolist() == [0]


def test_seeded_samples_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 64)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    other = SamplingParams(temperature=1.3)

    def draw(batch_params, row, steps=20):
        seqs = seqs_for(batch_params)
        sampler = Sampler(torch.Generator().manual_seed(len(batch_params)))
        got = []
        for _ in range(steps):
            md = SamplingMetadata.from_sequences(seqs, 64, torch.device("cpu"))
            batch_logits = logits[:len(seqs)].clone()
            batch_logits[batch_params.index(target)] = logits[row]
            got.append(sampler(batch_logits, md).token_ids[batch_params.index(target)].item())
        return got

    alone = draw([target], 0)
    mixed = draw([other, other, target, other], 0)
    assert alone == mixed
    assert len(set(alone)) > 1  # it does sample


@pytest.mark.parametrize("params,allowed", [
    (SamplingParams(temperature=1.0, top_k=3), {0, 1, 2}),
    (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),
    (SamplingParams(temperature=1.0, min_p=0.3), {0, 1, 2}),
])
def test_sampling_frequencies(params, allowed):
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]) + 1e-12
    n = 20000
    logits = probs.log().expand(n, V).clone()
    md = md_for([params] * n)
    toks = Sampler(torch.Generator().manual_seed(0))(logits, md).token_ids
    counts = torch.bincount(toks, minlength=V).double() / n
    assert set(toks.unique().tolist()) <= allowed
    kept = torch.tensor(sorted(allowed))
    expect = probs[kept] / probs[kept].sum()
    for tok, e in zip(kept.tolist(), expect.tolist()):
        tol = 4 * math.sqrt(e * (1 - e) / n) + 1e-3
        assert abs(counts[tok].item() - e) < tol, (tok, counts[tok].item(), e)


def test_temperature_sharpens():
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0]) + 1e-12
    n = 20000
    logits = probs.log().expand(n, V).clone()
    toks = Sampler(torch.Generator().manual_seed(1))(logits, md_for([SamplingParams(temperature=0.5)] * n)).token_ids
    freq0 = (toks == 0).double().mean().item()
    expect = 0.25 / (0.25 + 0.09 + 0.04)  # p^(1/T) normalised
    assert abs(freq0 - expect) < 0.02


def test_min_tokens_bans_stop_tokens():
    logits = torch.tensor([[0.0, 9.0, 1.0, 0, 0, 0, 0, 0]] * 2)
    p = SamplingParams(temperature=0, min_tokens=2)
    p.all_stop_token_ids = {1}
    md = md_for([p, p], outputs=[[3], [3, 3]])
    assert Sampler()(logits, md).token_ids.tolist() == [2, 1]


def test_logprobs_are_raw_and_ranked():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0, 0, 0, 0, 0]])
    md = md_for([SamplingParams(temperature=0, logprobs=2, repetition_penalty=2.0)], prompts=[[1]])
    out = Sampler()(logits, md)
    lsm = logits.log_softmax(-1)
    assert out.token_ids.tolist() == [2]  # penalty moved the argmax
    assert torch.allclose(out.logprobs, lsm[0, [2]]) and out.ranks.tolist() == [2]
    assert out.top_ids[0].tolist() == [1, 2]
