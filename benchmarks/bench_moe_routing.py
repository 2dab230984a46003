"""Triton MoE routing + alignment vs `route` + `moe_align` (torch ops), at the Qwen3-30B-A3B MoE shape (CUDA).

Decode batches (`--batches`): the one-launch kernel (`fused_route_align`) is what the block takes; the
tiled kernels are timed too. Prefill batches (`--prefill-batches`): the tiled path (three launches,
`tiled_route_align`). For each batch: kernels per call (torch.profiler, eager) and µs per call
replayed from a CUDA graph — routing alone (48 calls per graph, one per layer of a step) and the whole
SparseMoeBlock forward (`--layers` forwards per graph for decode, `--prefill-layers` for prefill),
with the Triton routing and with `route` + `moe_align` (`SparseMoeBlock.fused_routing = False`).
Sized to finish within a minute on an H200 (Triton compiles included).

    python benchmarks/bench_moe_routing.py [--batches 1,8,32,64] [--prefill-batches 1024,8192]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

import qwen3coder.kernels.moe_routing as routing
from qwen3coder.bench.timing import cuda_graph_us
from qwen3coder.kernels.fused_moe import moe_align, moe_block_m
from qwen3coder.models.layers.moe import SparseMoeBlock, route

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768
ROUTING_REPS = 48  # routing calls per graph: the 48 MoE layers of a 30B-A3B step


def kernels_per_call(fn: Callable[[], object]) -> tuple[int, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(names), names


def bench_batch(block: SparseMoeBlock, n: int, block_reps: int) -> tuple[dict, list[str], list[str]]:
    """One row: routing alone (Triton paths and torch) and the block forward (Triton routing and torch)."""
    w = block.gate.weight
    x = torch.randn(n, w.shape[1], device=w.device, dtype=w.dtype)
    logits = block.gate(x)
    experts, top_k = logits.shape[1], block.top_k
    bm = moe_block_m(n * top_k, experts)
    fits = routing.fused_routing_fits(n, experts, top_k)

    def torch_routing() -> object:
        _, ids = route(logits, top_k, True, x.dtype)
        return moe_align(ids, experts, bm)

    def tiled_routing() -> object:
        return routing.tiled_route_align(logits, top_k, True, bm, x.dtype)

    row: dict = {"batch": n, "pairs": n * top_k, "block_m": bm, "path": "one-launch" if fits else "tiled"}
    if fits:
        row["routing_fused_us"] = round(cuda_graph_us(
            lambda: routing.fused_route_align(logits, top_k, True, bm, x.dtype), ROUTING_REPS), 2)
    row["routing_tiled_us"] = round(cuda_graph_us(tiled_routing, ROUTING_REPS), 2)
    row["routing_torch_us"] = round(cuda_graph_us(torch_routing, ROUTING_REPS), 2)
    row["kernels_routing_tiled"] = kernels_per_call(tiled_routing)[0]
    row["kernels_routing_torch"] = kernels_per_call(torch_routing)[0]

    block.fused_routing = True
    row["kernels_block_triton"], names = kernels_per_call(lambda: block(x))
    row["block_triton_us"] = round(cuda_graph_us(lambda: block(x), block_reps), 2)
    block.fused_routing = False
    try:
        row["kernels_block_torch"], names_torch = kernels_per_call(lambda: block(x))
        row["block_torch_us"] = round(cuda_graph_us(lambda: block(x), block_reps), 2)
    finally:
        block.fused_routing = True
    return row, names, names_torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64", help="decode batches (tokens per step)")
    ap.add_argument("--prefill-batches", default="1024,8192", help="prefill batches (tokens per step)")
    ap.add_argument("--layers", type=int, default=48, help="block forwards per graph, decode batches")
    ap.add_argument("--prefill-layers", type=int, default=4, help="block forwards per graph, prefill")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args()
    torch.manual_seed(0)
    block = SparseMoeBlock(HIDDEN, EXPERTS, TOP_K, INTER, norm_topk_prob=True).cuda().bfloat16()
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0, HIDDEN ** -0.5)
        block.experts.down_proj.normal_(0, INTER ** -0.5)
    batches = [(int(b), args.layers) for b in args.batches.split(",") if b]
    batches += [(int(b), args.prefill_layers) for b in args.prefill_batches.split(",") if b]
    results = []
    with torch.no_grad():
        for n, reps in batches:
            row, names, names_torch = bench_batch(block, n, reps)
            results.append(row)
            print(json.dumps(row), flush=True)
            if n == 1 or n == max(b for b, _ in batches):
                print(f"batch {n} kernels, Triton routing:", names, "\ntorch routing:", names_torch, flush=True)
    from qwen3coder.bench.results import write_result

    write_result("moe_routing_30b-a3b", {"results": results}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
