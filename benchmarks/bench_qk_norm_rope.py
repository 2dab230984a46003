"""Fused attention prologue (QK RMSNorm + RoPE + paged KV store, `qwen3coder.kernels.qk_norm_rope`)
against the unfused sequence, at the Qwen3-Coder-30B-A3B attention shape (32 query / 4 KV heads,
head_dim 128, full rotary, bf16, cache block 16).

    python benchmarks/bench_qk_norm_rope.py [--tokens 1,16,64,1024,8192] [--no-sweep] [--out-dir DIR]
    python benchmarks/bench_qk_norm_rope.py --device cpu --quick    # smoke run: Triton's interpreter

For each token count N, µs per call (one layer's prologue) of
* `fused_us`: `fused_qk_norm_rope_store` with the tile `launch_config` picks;
* `fused_per_row_us`: the same kernel launched a program per (token, head), 4 warps (the launch
  before the kernel was tiled);
* `unfused_us`: the path of `Qwen3Attention.forward` without the kernel: q/k/v views of the packed
  projection, `q_norm`/`k_norm` (the Triton RMSNorm on CUDA), `RotaryEmbedding`, `store_kv`. Its store
  takes `all_valid=True` (index_copy, as decode does): the layer's general path checks the slots for
  -1 on the host, which a CUDA graph cannot hold.
Each is `--reps` calls captured in a CUDA graph and replayed (`qwen3coder.bench.timing.cuda_graph_us`);
the step's cos/sin are prepared once, outside the timing, for both paths (the decoder does that once
per step for all layers). GB/s counts the bytes either path must move at least: q, k and v read, q
written, k and v written to the cache, cos/sin and the slots read. With the sweep (GPU, N >= 1024) a
few other tiles are timed too, to check `launch_config`'s choice. Every configuration is also checked
against the unfused result (`max_abs_diff_*`, expected ~1 bf16 ulp at most). Writes
benchmarks/results/qk_norm_rope_30b-a3b-*.json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK, EPS, THETA = 32, 4, 128, 16, 1e-6, 1e7
# tiles timed by the sweep: (block_t, q_heads, kv_heads, num_warps)
SWEEP = [(16, 1, 1, 4), (32, 1, 1, 8), (64, 1, 1, 8), (8, 2, 2, 4), (16, 2, 2, 8), (4, 4, 4, 4),
         (8, 4, 4, 8), (16, 4, 4, 8), (2, 8, 4, 8), (4, 8, 4, 8)]


def tile_name(cfg: tuple[int, int, int, int]) -> str:
    """`t8h4k4w8`: 8 tokens × 4 query heads (4 KV heads) per program, 8 warps."""
    return "t{}h{}k{}w{}".format(*cfg)


def min_bytes(n: int, elt: int, rot_dim: int = HEAD_DIM) -> int:
    """Bytes one prologue call must move: q/k/v in, q/k/v out, cos/sin rows, int64 slots, weights."""
    return 2 * n * (HEADS + 2 * KV_HEADS) * HEAD_DIM * elt + 2 * n * rot_dim * elt + 8 * n + 2 * HEAD_DIM * elt


def wall_us(fn: Callable[[], object], reps: int) -> float:
    """µs per call by wall clock (the CPU smoke run; meaningless as a speed)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e6 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,16,64,1024,8192")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="two small token counts, one rep (smoke run)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if cpu:  # before triton is imported (qwen3coder.kernels imports it)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from qwen3coder.bench.results import write_result
    from qwen3coder.bench.timing import cuda_graph_us
    from qwen3coder.config import RopeConfig
    from qwen3coder.kernels.qk_norm_rope import QKRopeLaunch, fused_qk_norm_rope_store, launch_config
    from qwen3coder.models.layers.attention import store_kv
    from qwen3coder.models.layers.norms import RMSNorm
    from qwen3coder.models.layers.rotary import RotaryEmbedding

    tokens = [1, 3] if args.quick else [int(x) for x in args.tokens.split(",")]
    dev, dtype = ("cpu", torch.float16) if cpu else ("cuda", torch.bfloat16)  # numpy has no bfloat16
    elt = torch.finfo(dtype).bits // 8
    sweep = [] if args.no_sweep else (SWEEP[6:8] if cpu else SWEEP)
    torch.manual_seed(0)
    q_norm, k_norm = RMSNorm(HEAD_DIM, EPS), RMSNorm(HEAD_DIM, EPS)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    q_norm, k_norm = q_norm.to(dev, dtype), k_norm.to(dev, dtype)
    rotary = RotaryEmbedding(RopeConfig(theta=THETA), HEAD_DIM)
    metrics: dict[str, object] = {}
    for n in tokens:
        q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        qkv = torch.randn(n, q_size + 2 * kv_size, device=dev, dtype=dtype)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k, v = q.view(n, HEADS, HEAD_DIM), k.view(n, KV_HEADS, HEAD_DIM), v.view(n, KV_HEADS, HEAD_DIM)
        positions = torch.randint(0, 32768, (n,), device=dev)
        rotary.prepare(positions, dtype)
        cos, sin = rotary.step_cos_sin(positions, dtype)
        num_blocks = -(-n // BLOCK) + 1
        k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * BLOCK, device=dev)[:n]

        def fused(launch: QKRopeLaunch | None = None) -> torch.Tensor:
            return fused_qk_norm_rope_store(q, k, v, q_norm.weight, k_norm.weight, EPS, cos, sin, k_cache,
                                            v_cache, slots, launch=launch)

        def unfused() -> torch.Tensor:
            qr, kr = rotary(positions, q_norm(q.reshape(n, HEADS, HEAD_DIM)),
                            k_norm(k.reshape(n, KV_HEADS, HEAD_DIM)))
            store_kv(kr, v.reshape(n, KV_HEADS, HEAD_DIM), k_ref, v_ref, slots, all_valid=True)
            return qr

        def timed(fn: Callable[[], object]) -> float:
            if cpu:
                return wall_us(fn, 1)
            return cuda_graph_us(fn, reps=48 if n <= 64 else 10, iters=20)

        def check(launch: QKRopeLaunch | None = None) -> tuple[float, float]:
            """Max |fused - unfused| over q and over the caches (both written from zero)."""
            k_cache.zero_()
            v_cache.zero_()
            got = fused(launch)
            dq = (got.float() - expected.float()).abs().max().item()
            dk = max((k_cache.float() - k_ref.float()).abs().max().item(),
                     (v_cache.float() - v_ref.float()).abs().max().item())
            return dq, dk

        with torch.no_grad():
            expected = unfused()
            auto = launch_config(n, HEADS, KV_HEADS, HEAD_DIM)
            per_row = QKRopeLaunch(1, 1, 1, 4)
            dq, dk = check()
            row = {"launch": tile_name(auto), "max_abs_diff_q": dq, "max_abs_diff_kv": dk,
                   "fused_us": timed(fused), "fused_per_row_us": timed(lambda: fused(per_row)),
                   "unfused_us": timed(unfused)}
            nbytes = min_bytes(n, elt)
            for key in ("fused", "fused_per_row", "unfused"):
                row[f"{key}_us"] = round(row[f"{key}_us"], 2)
                row[f"{key}_gbps"] = round(nbytes / row[f"{key}_us"] / 1e3, 1)
            row["speedup_vs_unfused"] = round(row["unfused_us"] / row["fused_us"], 2)
            row["speedup_vs_per_row"] = round(row["fused_per_row_us"] / row["fused_us"], 2)
            if sweep and (cpu or n >= 1024):
                tiles = {}
                for cfg in sweep:
                    launch = QKRopeLaunch(*cfg)
                    dq_s, dk_s = check(launch)
                    row["max_abs_diff_q"] = max(row["max_abs_diff_q"], dq_s)
                    row["max_abs_diff_kv"] = max(row["max_abs_diff_kv"], dk_s)
                    tiles[tile_name(cfg)] = round(timed(lambda: fused(launch)), 2)
                row["sweep_us"] = tiles
                best = min(tiles, key=tiles.get)
                row["sweep_best"] = best if tiles[best] < row["fused_us"] else row["launch"]
        metrics[f"n{n}"] = row
        print(f"[qk-norm-rope] N={n}: {row}", flush=True)
        del qkv, k_cache, v_cache, k_ref, v_ref
        if not cpu:
            torch.cuda.empty_cache()
    write_result("qk_norm_rope_30b-a3b", metrics,
                 extra={"shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK,
                                  "dtype": str(dtype).removeprefix("torch.")},
                        "timing": "wall clock, Triton interpreter (smoke run)" if cpu else "CUDA graph replay"},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()
