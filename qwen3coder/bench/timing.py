"""Timing of GPU work for the kernel benchmarks: calls captured in a CUDA graph and replayed, so
launch overhead (which a decode step's graph also removes) does not count."""

from __future__ import annotations

from typing import Callable

import torch


def cuda_graph_us(fn: Callable[[], object], reps: int, iters: int = 50) -> float:
    """µs per `fn` call: `reps` calls captured in one CUDA graph (after two warm-up calls on a side
    stream), replayed `iters` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return replay_ms(g, iters, warmup=5) * 1000 / reps


def replay_ms(graph: "torch.cuda.CUDAGraph", iters: int, warmup: int = 3) -> float:
    """ms per replay of a captured graph (CUDA events around `iters` replays, after `warmup`)."""
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
