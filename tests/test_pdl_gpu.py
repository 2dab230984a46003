"""Programmatic dependent launch (`qwen3coder.kernels.pdl`) changes when kernels start, never what they
compute: a 30B-A3B-shaped model (two layers, dummy weights, bf16; every decode kernel of the real
model: skinny GEMMs at their tuned shapes, routing, fused MoE, attention, norms) gives bitwise the same
logits and greedy tokens with PDL on as with it off — eagerly and through CUDA graphs, replayed many
times (a missing wait would show up as a race). Needs a GPU of compute capability >= 9.0."""

from __future__ import annotations

import gc

import pytest
import torch

from qwen3coder.config import ModelConfig
from qwen3coder.engine import LLM, SamplingParams
from qwen3coder.kernels import pdl
from qwen3coder.loader import build_dummy_model

pytestmark = pytest.mark.gpu

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs a CUDA GPU of compute capability >= 9.0")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("30b-a3b").replace(num_hidden_layers=2, layer_types=None)
    return build_dummy_model(cfg, device="cuda", dtype="bfloat16")


@pytest.fixture
def restore_pdl():
    before = pdl.pdl_enabled()
    yield
    pdl.set_pdl_enabled(before)


@needs_hopper
def test_pdl_is_on_by_default_on_hopper():
    assert pdl.use_pdl(torch.device("cuda")) == pdl.pdl_enabled()
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": 0}


@needs_hopper
def test_engine_outputs_bitwise_equal_with_and_without_pdl(model, restore_pdl):
    prompts = [{"prompt_token_ids": [(7 * i + 3 * k) % 5000 + 1 for i in range(n)]}
               for k, n in enumerate([5, 40, 129])]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    results = {}
    for enabled in (True, False):
        pdl.set_pdl_enabled(enabled)
        for eager in (False, True):
            # no prefix caching: the second run must take the same steps (a cached prefix would change
            # how the prompts' last tokens are computed, hence their logits' rounding)
            llm = LLM(model, device="cuda", skip_tokenizer_init=True, max_model_len=1024, max_num_seqs=4,
                      gpu_memory_utilization=0.5, enforce_eager=eager, enable_prefix_caching=False)
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[(enabled, eager)] = [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs])
                                         for o in outs]
            if not eager:  # many replays of the same graphs: a missing wait would make them differ
                again = [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs])
                         for o in llm.generate(prompts, params, use_tqdm=False)]
                assert again == results[(enabled, eager)]
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    assert results[(True, False)] == results[(False, False)]  # graphs: PDL on == off
    assert results[(True, True)] == results[(False, True)]  # eager: PDL on == off
