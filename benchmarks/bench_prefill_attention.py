"""Prefill attention over the paged KV cache at the Qwen3-30B-A3B attention shape (CUDA): the varlen
Triton kernel (`qwen3coder.kernels.paged_prefill`) against the per-sequence SDPA loop of
`paged_attention_reference`, for the step shapes the engine produces.

    python benchmarks/bench_prefill_attention.py [--sweep] [--out-dir DIR]

Scenarios (query lengths / sequence lengths of one step): 8 fresh 1,024-token prompts; one fresh
8,192-token prompt; the last 8,192-token chunk of a 32K prompt (24,576 cached); a mixed step of 7
prompts, a 1,016-token chunk and 56 decode rows (what offline batches look like while prompts are
admitted); agent turns: 16 / 128 new tokens after 8K / 32K cached ones (few query tiles: the kernel
splits their keys, `max_seq_len`; `kernel_no_splits_ms` is the same launch without). ms per call of one
layer's attention (32 query / 4 KV heads, head_dim 128, bf16, block 16), and the kernel's TFLOP/s over
the causal work. `--sweep`: each scenario also under every num_warps x num_stages x split count (the
chosen one, half and double it, none), and with 128-row query tiles also on 128-key tiles, µs per call
(`sweep`); the launch defaults (`paged_prefill.prefill_launch`, `prefill_block_n`,
`PREFILL_PROGRAMS_PER_SM`) come from it.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from qwen3coder.bench.results import write_result
from qwen3coder.bench.timing import cuda_graph_us
from qwen3coder.kernels.paged_prefill import choose_prefill_splits, paged_attention_varlen, prefill_block_m
from qwen3coder.models.context import ForwardContext
from qwen3coder.models.layers.attention import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 4, 128, 16

SCENARIOS = {
    "8x1024_fresh": ([1024] * 8, [1024] * 8),
    "1x8192_fresh": ([8192], [8192]),
    "chunk_8192_after_24576": ([8192], [32768]),
    "mixed_7x1024_chunk1016_56dec": ([1024] * 7 + [1016] + [1] * 56, [1024] * 7 + [1016] + [200] * 56),
    "turn_16_after_8192": ([16], [8208]),
    "turn_128_after_8192": ([128], [8320]),
    "turn_16_after_32768": ([16], [32784]),
    "turn_128_after_32768": ([128], [32896]),
    "turn_1024_after_8192": ([1024], [9216]),
    "fresh_16": ([16], [16]),
    "fresh_128": ([128], [128]),
}


def _time_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / iters


def _sweep(q, k_cache, v_cache, ctx, q_lens, s_lens, iters: int) -> dict[str, float | None]:
    """µs per call under each launch setting `w{warps}_s{stages}_sp{splits}` (64-key tiles) and
    `bn128_w{warps}_s{stages}_sp{splits}` (128-key tiles, 128-row query tiles only)."""
    block_m = prefill_block_m(max(q_lens))
    out: dict[str, float | None] = {}
    for block_n in ((64, 128) if block_m == 128 else (64,)):
        auto = choose_prefill_splits(sum(q_lens), HEADS, block_m, block_n, max(s_lens), q.device)
        for warps, stages, splits in itertools.product((2, 4, 8), (2, 3, 4), sorted({1, auto, max(1, auto // 2),
                                                                                     min(16, 2 * auto)})):
            if block_m == 128 and warps == 2:
                continue
            key = f"{'bn128_' if block_n == 128 else ''}w{warps}_s{stages}_sp{splits}"
            try:
                us = cuda_graph_us(lambda: paged_attention_varlen(
                    q, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens, HEAD_DIM ** -0.5,
                    max(q_lens), num_splits=splits, num_warps=warps, num_stages=stages, block_n=block_n), 3, iters)
                out[key] = round(us, 1)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                print(f"[prefill-attn] {key}: {type(e).__name__}", flush=True)
                out[key] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="also every warps x stages x splits setting")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    metrics: dict[str, object] = {}
    for name, (q_lens, s_lens) in SCENARIOS.items():
        tables, nxt = [], 0
        for n in s_lens:
            blocks = -(-n // BLOCK)
            tables.append(list(range(nxt, nxt + blocks)))
            nxt += blocks
        k_cache = torch.randn(nxt, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        ctx = ForwardContext.build(q_lens, s_lens, tables, BLOCK, device="cuda")
        scale = HEAD_DIM ** -0.5
        def varlen(bound):
            return paged_attention_varlen(q, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens,
                                          scale, max(q_lens), max_seq_len=bound)

        # both in CUDA graphs (the engine's prefill graphs replay a turn's launches): no launch overhead
        kernel = cuda_graph_us(lambda: varlen(max(s_lens)), 3, args.iters) / 1000
        no_splits = cuda_graph_us(lambda: varlen(None), 3, args.iters) / 1000
        ref = _time_ms(lambda: paged_attention_reference(q, k_cache, v_cache, ctx, scale), args.iters)
        # causal work: each query row attends to (context + its index + 1) keys; QK^T and PV
        flops = sum(4 * HEADS * HEAD_DIM * sum(s - ql + i + 1 for i in range(ql)) for ql, s in zip(q_lens, s_lens))
        if args.sweep:
            sweep = _sweep(q, k_cache, v_cache, ctx, q_lens, s_lens, args.iters)
            best = sorted((t, k) for k, t in sweep.items() if t is not None)[:3]
            print(f"[prefill-attn] {name}: best {best}", flush=True)
            metrics.setdefault("sweep", {})[name] = sweep
        metrics[name] = {"varlen_kernel_ms": round(kernel, 3), "kernel_no_splits_ms": round(no_splits, 3),
                         "sdpa_loop_ms": round(ref, 3),
                         "kernel_tflops": round(flops / kernel / 1e9, 1), "speedup": round(ref / kernel, 2)}
        print(f"[prefill-attn] {name}: {metrics[name]}", flush=True)
        del k_cache, v_cache, q
        torch.cuda.empty_cache()
    write_result("prefill_attention_30b-a3b", metrics,
                 extra={"shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK}},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()
