"""Fused MoE routing + alignment vs the multi-kernel path, at the Qwen3-30B-A3B MoE shape (CUDA).

For each batch: kernels per SparseMoeBlock forward (torch.profiler, eager) and µs per forward replayed
from a CUDA graph that holds `--layers` block forwards (as a decode step does), with the fused routing
and with `route` + `moe_align` (the path larger batches take). Also routing alone (48 calls per graph).

    python benchmarks/bench_moe_routing.py [--batches 1,8,32,64] [--layers 48]
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

import qwen3coder.kernels.moe_routing as routing
from qwen3coder.bench.timing import cuda_graph_us
from qwen3coder.kernels.fused_moe import moe_align, moe_block_m
from qwen3coder.models.layers.moe import SparseMoeBlock, route

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768


@contextmanager
def multi_kernel_routing() -> Iterator[None]:
    """The block takes `route` + `moe_align` whatever the batch."""
    fits = routing.fused_routing_fits
    routing.fused_routing_fits = lambda *a: False
    try:
        yield
    finally:
        routing.fused_routing_fits = fits


def kernels_per_call(fn: Callable[[], object]) -> tuple[int, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(names), names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--layers", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    block = SparseMoeBlock(HIDDEN, EXPERTS, TOP_K, INTER, norm_topk_prob=True).cuda().bfloat16()
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0, HIDDEN ** -0.5)
        block.experts.down_proj.normal_(0, INTER ** -0.5)
    results = []
    with torch.no_grad():
        for n in map(int, args.batches.split(",")):
            x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
            logits = block.gate(x)
            bm = moe_block_m(n * TOP_K)

            def old_routing() -> object:
                w, ids = route(logits, TOP_K, True, torch.bfloat16)
                return moe_align(ids, EXPERTS, bm)

            row = {"batch": n, "fused_path": routing.fused_routing_fits(n, EXPERTS, TOP_K)}
            row["kernels_block_fused"], names = kernels_per_call(lambda: block(x))
            row["block_fused_us"] = round(cuda_graph_us(lambda: block(x), args.layers), 2)
            with multi_kernel_routing():
                row["kernels_block_multi"], names_multi = kernels_per_call(lambda: block(x))
                row["block_multi_us"] = round(cuda_graph_us(lambda: block(x), args.layers), 2)
            row["routing_fused_us"] = round(cuda_graph_us(
                lambda: routing.fused_route_align(logits, TOP_K, True, bm, torch.bfloat16), 48), 2)
            row["routing_multi_us"] = round(cuda_graph_us(old_routing, 48), 2)
            row["kernels_routing_multi"] = kernels_per_call(old_routing)[0]
            results.append(row)
            print(json.dumps(row), flush=True)
            if n == 1:
                print("fused:", names, "\nmulti:", names_multi, flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "results": results}))


if __name__ == "__main__":
    main()
