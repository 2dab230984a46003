"""Skinny GEMM (`qwen3coder.kernels.skinny_gemm`) vs cuBLAS (`F.linear`) at the decode shapes (CUDA).

Shapes of Qwen3-Coder-30B-A3B in bf16: qkv_proj 2048->5120, o_proj 4096->2048, the MoE router
2048->128 and the LM head 2048->151936, each for M = 1, 2, 4, 8, 16, 32, 64 rows. For every (shape, M)
it times F.linear and `skinny_linear` with each candidate launch configuration (`candidates`: the
current choice first, then a sweep of tiles, split-K counts and both inner products), every
candidate first checked against the fp32 product. Timing: enough distinct weight copies (> 3x the L2 cache)
called in turn inside one CUDA graph, replayed (`qwen3coder.bench.timing.cuda_graph_us`), so the
weights stream from HBM as in a decode step over 48 layers. Reports µs and TB/s (weight + x + out
bytes), the winner per (shape, M), and prints `TUNED` entries for `qwen3coder/kernels/skinny_gemm.py`
(None where cuBLAS stays ahead).

    python benchmarks/bench_skinny_gemm.py [--rows 1,2,4,8,16,32] [--shapes qkv,o_proj,router,lm_head]
                                           [--time-budget 100] [--out-dir DIR]

Writes benchmarks/results/skinny_gemm_30b-a3b-*.json. Importable without a GPU (`candidates`,
`tuned_entries` are plain functions; tests check them on the CPU).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from qwen3coder.kernels import skinny_gemm as sg

SHAPES: dict[str, tuple[int, int]] = {  # name -> (N, K): W [N, K], x [M, K]
    "qkv": (5120, 2048), "o_proj": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)}
ROWS = (1, 2, 4, 8, 16, 32, 64)
# (block_n, block_k, num_warps, num_stages) of the tensor-core dot ...
DOT_GRID = [(16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4),
            (64, 256, 4, 3), (128, 128, 8, 4)]
# ... and (block_n, block_k, num_warps) of the broadcast FMA (rows <= sg.FMA_MAX_M)
FMA_GRID = [(4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 128, 4), (16, 256, 4), (16, 512, 4), (32, 256, 8)]
FMA_MAX_ACC = 64  # fp32 accumulator registers per thread (block_n * block_m * block_k / threads)
WIN_MARGIN = 0.97  # the skinny kernel must beat cuBLAS by 3% for a TUNED entry


def candidates(m: int, n: int, k: int) -> list[sg.SkinnyConfig]:
    """Launch configurations to time for x [m, k] · W [n, k]^T: `skinny_config`'s current choice
    first, then the grids, each with one split-K and (when the rule splits) the default split count."""
    out = [sg.skinny_config(m, n, k)]
    for bn, bk, nw, ns in DOT_GRID:
        for split in sorted({1, sg.default_split(n, k, bn, bk)}):
            out.append(sg.SkinnyConfig(bn, bk, split, nw, ns, dot=True))
    if m <= sg.FMA_MAX_M:
        bm = sg.SkinnyConfig(dot=False).block_m(m)
        for bn, bk, nw in FMA_GRID:
            if bn * bm * bk > FMA_MAX_ACC * 32 * nw:
                continue
            for split in sorted({1, sg.default_split(n, k, bn, bk)}):
                out.append(sg.SkinnyConfig(bn, bk, split, nw, 1, dot=False))
    seen: set[sg.SkinnyConfig] = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def traffic_bytes(m: int, n: int, k: int, elem: int = 2) -> int:
    """Bytes a call must move: the weight, x and the output."""
    return (n * k + m * k + m * n) * elem


def tuned_entries(rows: list[dict]) -> dict[tuple[int, int, int], sg.SkinnyConfig | None]:
    """`TUNED` entries from measured rows: per (rows rounded up to a power of two, N, K) the best
    configuration, or None where cuBLAS is not beaten by `WIN_MARGIN`. Rows over SKINNY_MAX_M are
    left out (the policy never takes them); of several M in one bucket the largest decides."""
    out: dict[tuple[int, int, int], sg.SkinnyConfig | None] = {}
    for r in sorted(rows, key=lambda r: r["m"]):
        if r["m"] > sg.SKINNY_MAX_M or r.get("best") is None:
            continue
        key = (sg.row_bucket(r["m"]), r["n"], r["k"])
        best = r["best"]
        out[key] = sg.SkinnyConfig(**best["config"]) if best["us"] < WIN_MARGIN * r["cublas"]["us"] else None
    return out


def format_tuned(entries: dict[tuple[int, int, int], sg.SkinnyConfig | None], rows: list[dict]) -> str:
    """Python text of the entries, to paste into skinny_gemm.TUNED, with the timings as comments."""
    us = {(sg.row_bucket(r["m"]), r["n"], r["k"]): r for r in rows if r.get("best")}
    lines = ["TUNED: dict[tuple[int, int, int], SkinnyConfig | None] = {"]
    for key, cfg in entries.items():
        r = us[key]
        lines.append(f"    {key}: {cfg!r},  # {r['shape']} M={r['m']}: best {r['best']['us']} us, "
                     f"cuBLAS {r['cublas']['us']} us")
    return "\n".join(lines + ["}"])


def _rotating(calls: int) -> Callable[[Callable[[int], object]], Callable[[], object]]:
    """fn(i) -> a no-argument function calling fn(0), fn(1), ... fn(calls - 1), fn(0), ..."""
    def wrap(fn: Callable[[int], object]) -> Callable[[], object]:
        state = [0]

        def step() -> object:
            i = state[0] % calls
            state[0] += 1
            return fn(i)
        return step
    return wrap


def _time(fn: Callable[[int], object], copies: int) -> float:
    from qwen3coder.bench.timing import cuda_graph_us

    reps = max(copies, 4)
    return cuda_graph_us(_rotating(copies)(fn), reps, iters=10 if copies < 8 else 20)


def _close_to(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """Rounded once from an fp32 sum: within half a bf16 ulp (<= 2^-8 relative) of the fp32 product
    `exact`, plus slack for the summation order (outputs are ~N(0, 1) here)."""
    return bool(((got.float() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-3).all())


def bench_shape(name: str, n: int, k: int, rows: list[int], deadline: float, device: str = "cuda",
                timer: Callable[[Callable[[int], object], int], float] | None = None) -> list[dict]:
    """One result row per M: cuBLAS and every candidate (µs, TB/s), the current and the best choice.
    `device`/`timer` let tests run it on the CPU (interpreter) with a stand-in timer."""
    dev, dtype, timer = device, torch.bfloat16, timer or _time
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20) if dev == "cuda" else 0
    copies = max(1, min(512, -(-3 * l2 // (n * k * 2))))
    weights = [torch.randn(n, k, device=dev, dtype=dtype) * k ** -0.5 for _ in range(copies)]
    results = []
    for m in rows:
        xs = [torch.randn(m, k, device=dev, dtype=dtype) for _ in range(min(copies, 8))]
        nbytes = traffic_bytes(m, n, k)
        row: dict = {"shape": name, "m": m, "n": n, "k": k, "copies": copies}
        us = timer(lambda i: F.linear(xs[i % len(xs)], weights[i]), copies)
        row["cublas"] = {"us": round(us, 2), "TBps": round(nbytes / us / 1e6, 2)}
        exact = xs[0].float() @ weights[0].float().t()
        found, failed = [], []
        for cfg in candidates(m, n, k):
            if time.time() > deadline:
                row["out_of_time"] = True
                break
            try:
                if not _close_to(sg.skinny_linear(xs[0], weights[0], config=cfg), exact):
                    failed.append(repr(cfg))
                    print(f"[skinny] {name} M={m} {cfg}: WRONG RESULT", flush=True)
                    continue
                us = timer(lambda i, cfg=cfg: sg.skinny_linear(xs[i % len(xs)], weights[i], config=cfg), copies)
            except Exception as e:  # e.g. out of shared memory for this tile: skip the config
                print(f"[skinny] {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                if dev == "cuda":
                    torch.cuda.synchronize()
                continue
            found.append({"config": vars(cfg).copy(), "us": round(us, 2), "TBps": round(nbytes / us / 1e6, 2)})
        row["failed"] = failed
        if found:
            row["current"] = found[0]
            row["best"] = min(found, key=lambda f: f["us"])
            row["top3"] = sorted(found, key=lambda f: f["us"])[:3]
            row["tried"] = len(found)
            b, c = row["best"], row["cublas"]
            print(f"[skinny] {name:8s} M={m:2d}  cuBLAS {c['us']:7.2f} us {c['TBps']:5.2f} TB/s | current "
                  f"{found[0]['us']:7.2f} us | best {b['us']:7.2f} us {b['TBps']:5.2f} TB/s "
                  f"x{c['us'] / b['us']:.2f} {sg.SkinnyConfig(**b['config'])}", flush=True)
        results.append(row)
    del weights
    if dev == "cuda":
        torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--time-budget", type=float, default=100.0, help="seconds; the sweep stops after it")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_skinny_gemm needs a CUDA device")
    from qwen3coder.bench.results import write_result

    t0 = time.time()
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    results: list[dict] = []
    with torch.no_grad():
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            results += bench_shape(name, n, k, rows, t0 + args.time_budget)
    entries = tuned_entries(results)
    print("\n# winners -> qwen3coder/kernels/skinny_gemm.py\n" + format_tuned(entries, results), flush=True)
    print(f"[skinny] {time.time() - t0:.0f} s", flush=True)
    write_result("skinny_gemm_30b-a3b", {"cases": results, "tuned": {str(k): repr(v) for k, v in entries.items()}},
                 extra={"shapes": SHAPES, "rows": rows, "seconds": round(time.time() - t0, 1),
                        "out_of_time": any(r.get("out_of_time") for r in results)}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
