"""L2 prefetch of the next GEMM's weights (`qwen3coder.kernels.l2_prefetch`).

CPU (Triton's interpreter): the runs that a launch's (program, thread)s ask for tile the tensor's
bytes exactly, 16-byte aligned and in bounds, for sizes and grids that do and do not divide; the
policy (`prefetch_target`) says no off the GPU. GPU (`-m gpu`, compute capability >= 9.0): the
compiled kernels hold the bulk-prefetch instruction, and the prefetch changes no output bit — the
input add+RMSNorm and decode attention kernels with and without it, and a 30B-A3B-shaped model's
greedy tokens and logprobs through CUDA graphs, replayed many times.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen3coder.kernels import l2_prefetch as l2p  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_hopper = pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9,
                                  reason="bulk L2 prefetch needs a CUDA GPU of compute capability >= 9.0")


@triton.jit
def _runs_kernel(starts_ptr, sizes_ptr, pf_bytes, THREADS: tl.constexpr):
    part = tl.program_id(0)
    start, size = l2p.prefetch_runs(pf_bytes, part, tl.num_programs(0), THREADS)
    offs = part * THREADS + tl.arange(0, THREADS)
    tl.store(starts_ptr + offs, start)
    tl.store(sizes_ptr + offs, size)


@pytest.mark.parametrize("pf_bytes,parts,threads", [(16, 1, 4), (160, 3, 4), (4096, 4, 8), (16 * 1001, 7, 32),
                                                    (2048 * 4096 * 2, 5, 128)])
def test_runs_tile_the_bytes(pf_bytes, parts, threads):
    starts = torch.empty(parts * threads, dtype=torch.int64, device=DEV)
    sizes = torch.empty(parts * threads, dtype=torch.int32, device=DEV)
    _runs_kernel[(parts,)](starts, sizes, pf_bytes, THREADS=threads)
    starts, sizes = starts.cpu(), sizes.cpu().long()
    assert (sizes >= 0).all() and (sizes % 16 == 0).all() and (starts % 16 == 0).all()
    assert (starts >= 0).all() and (starts + sizes <= pf_bytes).all() and (starts < pf_bytes).all()
    live = sizes > 0
    s, z = starts[live], sizes[live]
    assert s[0] == 0 and torch.equal(s[1:], (s + z)[:-1]) and int((s + z)[-1]) == pf_bytes  # in order, no gap


def test_policy_off_the_gpu():
    w = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert l2p.prefetch_target("attention", w) is None  # not a CUDA tensor
    assert l2p.prefetch_target("input_norm", None) is None
    with pytest.raises(AssertionError):
        l2p.prefetch_target("nowhere", w)
    assert l2p.prefetch_launch(None, w) == {"pf_ptr": w, "pf_bytes": 0, "PREFETCH": False}
    launch = l2p.prefetch_launch(w, w)
    assert launch["PREFETCH"] and launch["pf_bytes"] == 64 * 64 * 2


@pytest.fixture
def restore():
    enabled, sites = l2p._ENABLED, l2p.SITES
    yield
    l2p.set_l2_prefetch_enabled(enabled)
    l2p.SITES = sites


@pytest.mark.gpu
@needs_hopper
def test_policy_on_hopper(restore):
    w = torch.zeros(5120, 2048, dtype=torch.bfloat16, device="cuda")
    l2p.set_l2_prefetch_enabled(True)
    assert l2p.prefetch_target("input_norm", w) is w
    assert l2p.prefetch_target("attention", w[:, :100]) is None  # not contiguous
    assert l2p.prefetch_target("attention", w.view(-1)[1:]) is None  # start not 16-byte aligned
    l2p.SITES = frozenset({"attention"})
    assert l2p.prefetch_target("input_norm", w) is None
    l2p.set_l2_prefetch_enabled(False)
    assert l2p.prefetch_target("attention", w) is None


def _ptx_of(kernel) -> list[str]:
    """The PTX of every compiled variant of a @triton.jit function (Triton 3.x's per-device caches)."""
    return [compiled.asm.get("ptx", "") for cache in kernel.device_caches.values() for compiled in cache[0].values()]


@pytest.mark.gpu
@needs_hopper
def test_kernels_bitwise_equal_with_prefetch():
    from qwen3coder.kernels.paged_attention import _paged_decode_kernel, paged_attention_decode
    from qwen3coder.kernels.rmsnorm import _add_rmsnorm_kernel, fused_add_rmsnorm

    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(5120, 2048, device="cuda", generator=g).to(torch.bfloat16)  # the "next GEMM"
    norm_w = torch.rand(2048, device="cuda", generator=g).to(torch.bfloat16)
    res = torch.randn(3, 2048, device="cuda", generator=g).to(torch.bfloat16)
    for x in (torch.randn(3, 2048, device="cuda", generator=g).to(torch.bfloat16),
              torch.randn(3, 8, 2048, device="cuda", generator=g).to(torch.bfloat16)):  # MoE partials
        plain = fused_add_rmsnorm(x, res, norm_w, 1e-6)
        pf = fused_add_rmsnorm(x, res, norm_w, 1e-6, l2_prefetch=weight)
        assert all(torch.equal(a, b) for a, b in zip(plain, pf))
    assert any("cp.async.bulk.prefetch.L2" in ptx for ptx in _ptx_of(_add_rmsnorm_kernel))

    blocks, block_size, hk, d = 64, 16, 4, 128
    k_cache = torch.randn(blocks, block_size, hk, d, device="cuda", generator=g).to(torch.bfloat16)
    v_cache = torch.randn(blocks, block_size, hk, d, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(2, 32, d, device="cuda", generator=g).to(torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda", generator=g).to(torch.int32).view(2, 32)
    lens = torch.tensor([150, 467], dtype=torch.int32, device="cuda")
    plain = paged_attention_decode(q, k_cache, v_cache, tables, lens, d ** -0.5, max_seq_len=512)
    pf = paged_attention_decode(q, k_cache, v_cache, tables, lens, d ** -0.5, max_seq_len=512, l2_prefetch=weight)
    assert torch.equal(plain, pf)
    assert any("cp.async.bulk.prefetch.L2" in ptx for ptx in _ptx_of(_paged_decode_kernel))


@pytest.mark.gpu
@needs_hopper
def test_engine_bitwise_equal_with_and_without_prefetch(restore):
    from qwen3coder.config import ModelConfig
    from qwen3coder.engine import LLM, SamplingParams
    from qwen3coder.loader import build_dummy_model

    torch.manual_seed(0)
    cfg = ModelConfig.preset("30b-a3b").replace(num_hidden_layers=2, layer_types=None)
    model = build_dummy_model(cfg, device="cuda", dtype="bfloat16")
    prompts = [{"prompt_token_ids": [(7 * i + 3 * k) % 5000 + 1 for i in range(n)]}
               for k, n in enumerate([5, 40, 129])]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    results = {}
    for enabled in (True, False):
        l2p.set_l2_prefetch_enabled(enabled)
        llm = LLM(model, device="cuda", skip_tokenizer_init=True, max_model_len=1024, max_num_seqs=4,
                  gpu_memory_utilization=0.5, enable_prefix_caching=False)
        for run in range(2):  # many replays of the same graphs
            outs = llm.generate(prompts, params, use_tqdm=False)
            got = [(o.outputs[0].token_ids, [sorted(x.items()) for x in o.outputs[0].logprobs]) for o in outs]
            assert results.setdefault(enabled, got) == got
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert results[True] == results[False]
