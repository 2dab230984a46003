"""Tile sweep of the fused-MoE grouped GEMMs at a Qwen3-Coder MoE shape (CUDA; default the 30B-A3B's).

For each batch (tokens) it routes random router logits (the preset's top-k of its experts), aligns the pairs with
`moe_align`, and times `_gate_up_swiglu_kernel` and `_down_proj_kernel` separately for each launch
configuration (BLOCK_N, BLOCK_K, num_warps, num_stages; BLOCK_M candidates for prefill-size batches;
the program order `group_m`: the default tiles with each of `--group-m`, the other tiles with
each of `--sweep-group-m`; TMA descriptor loads: the other prefill-size tiles with each of `--sweep-tma`):
`--layers` distinct weight sets (so the L2 cache does not hold the weights) are called in turn
inside one CUDA graph, replayed; µs per call and the achieved bandwidth over the touched experts'
weights are reported against the default configuration (`qwen3coder.kernels.fused_moe.moe_tiles`).

    python benchmarks/bench_moe_tiles.py [--batches 1,16,8192,64,4] [--layers 8] [--time-budget 240]
        [--group-m 0] [--sweep-group-m 0] [--sweep-tma 0,1] [--preset 30b-a3b] [--tiers]

`--preset` takes the MoE shape (hidden, experts, top-k, expert width) of a named preset (480b-a35b:
6144 / 160 / 8 / 2560; next-80b-a3b: 2048 / 512 / 10 / 512); `--layers` is capped so the weight sets stay
under 40 GB. `--tiers` times only the tiles of the three BLOCK_M tiers (`moe_tiles`: 16, 64, 128 rows) at
every batch, which checks where the tiers switch on a shape they were not swept at.

Writes benchmarks/results/moe_tiles_<preset>-*.json (or --out-dir): per batch, the default and the best
configuration of each kernel. The table in `moe_tiles` is taken from this sweep.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from qwen3coder.bench.results import write_result
from qwen3coder.bench.timing import cuda_graph_us
from qwen3coder.config import ModelConfig
from qwen3coder.kernels import fused_moe as fm
from qwen3coder.models.layers.moe import route

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768


def configs(prefill: bool) -> list[tuple[int, int, int, int]]:
    """(block_n, block_k, num_warps, num_stages) candidates."""
    if prefill:
        return list(itertools.product((64, 128), (32, 64, 128), (4, 8), (3, 4)))
    out = list(itertools.product((16, 32, 64, 128), (64, 128, 256), (4,), (3, 5)))
    out += list(itertools.product((64, 128), (128, 256), (8,), (3, 5)))
    return out


def prefill_configs(kernel: str) -> list[tuple[int, int, int, int]]:
    """The prefill candidates plus 256-wide down tiles (`configs(True)` holds gate_up's widest)."""
    extra = [(256, 64, 8, 3), (256, 64, 8, 4)] if kernel == "down" else []
    return configs(True) + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,8192,64,4")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds; the sweep stops after it")
    ap.add_argument("--group-m", default="0", help="program orders tried with the default tiles (0: rows first)")
    ap.add_argument("--sweep-group-m", default="0", help="program orders tried with the other tiles")
    ap.add_argument("--sweep-tma", default="0,1", help="TMA loads (0/1) tried with the other prefill tiles")
    ap.add_argument("--preset", default="30b-a3b", help="the MoE shape of this preset")
    ap.add_argument("--tiers", action="store_true", help="only the three tiers' tiles, at every batch")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    global HIDDEN, EXPERTS, TOP_K, INTER
    cfg = ModelConfig.preset(args.preset)
    HIDDEN, EXPERTS, TOP_K, INTER = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    layer_bytes = 3 * HIDDEN * INTER * EXPERTS * 2
    args.layers = max(2, min(args.layers, int(40e9 // layer_bytes)))
    t_start = time.time()
    torch.manual_seed(0)
    dev = "cuda"
    w13 = [torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02
           for _ in range(args.layers)]
    w2 = [torch.randn(EXPERTS, HIDDEN, INTER, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(args.layers)]
    expert_bytes = 3 * HIDDEN * INTER * 2
    results: dict[str, object] = {}
    out_of_time = False
    for n in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(n, HIDDEN, device=dev, dtype=torch.bfloat16)
        weights, ids = route(torch.randn(n, EXPERTS, device=dev), TOP_K, True, torch.bfloat16)
        pairs = n * TOP_K
        touched = int(torch.unique(ids).numel())
        # BLOCK_M 64 / 128 candidates from 2,048 pairs (the tiers switch at `fm.DECODE_MAX_ROWS` rows an expert)
        prefill = pairs >= 2048
        rows: dict[str, object] = {"pairs": pairs, "experts_touched": touched}
        default = fm.moe_tiles(pairs, EXPERTS)
        default_bm = fm.moe_block_m(pairs, EXPERTS)
        for kernel in ("gate_up", "down"):
            share = 2 / 3 if kernel == "gate_up" else 1 / 3
            bytes_per_call = touched * expert_bytes * share
            flops_per_call = 2 * pairs * HIDDEN * INTER * (2 if kernel == "gate_up" else 1)
            found: list[dict[str, object]] = []
            base = getattr(default, kernel)
            cands = [(default_bm, *_as_tuple(base), base.group_m, base.tma)]
            if args.tiers:  # the tiles of each tier (decode: the batch-2+ ones) with that tier's BLOCK_M
                cands += [(bm, *_as_tuple(getattr(t, kernel)), getattr(t, kernel).group_m, getattr(t, kernel).tma)
                          for bm, t in ((16, fm._DECODE), (64, fm._MID), (128, fm._PREFILL))]
            else:
                cands += [(default_bm, *_as_tuple(base), int(g), base.tma) for g in args.group_m.split(",")]
            for bm in ((16, 64, 128) if prefill else (16,)) if not args.tiers else ():
                big = prefill and bm > 16
                cands += [(bm, *c, int(g), bool(int(tm))) for c in (prefill_configs(kernel) if big else configs(False))
                          for g in args.sweep_group_m.split(",") for tm in (args.sweep_tma.split(",") if big else "0")]
            seen = set()
            for bm, bn, bk, nw, ns, gm, tma in cands:
                if (bm, bn, bk, nw, ns, gm, tma) in seen:
                    continue
                seen.add((bm, bn, bk, nw, ns, gm, tma))
                if time.time() - t_start > args.time_budget:
                    out_of_time = True
                    break
                sorted_ids, block_expert = fm.moe_align(ids, EXPERTS, bm)
                act = torch.randn(sorted_ids.numel(), INTER, device=dev, dtype=torch.bfloat16)  # aligned order
                out = torch.empty(pairs, HIDDEN, device=dev, dtype=torch.bfloat16)
                wflat = weights.flatten().contiguous()
                tiles = fm.GemmTiles(bn, bk, nw, ns, gm, tma)
                n_out, k_in = (INTER, HIDDEN) if kernel == "gate_up" else (HIDDEN, INTER)
                if fm.fit_tiles(tiles, n_out, k_in, bm, torch.bfloat16, 2 if kernel == "gate_up" else 1,
                                x.device) != tiles:
                    print(f"[moe-tiles] n={n} {kernel} bm={bm} bn={bn} bk={bk} s={ns}: exceeds shared memory",
                          flush=True)
                    continue
                if kernel == "gate_up":
                    def call(li: int, bm=bm, tiles=tiles, si=sorted_ids, be=block_expert, act=act):
                        fm.launch_gate_up(x, w13[li], act, si, be, TOP_K, bm, tiles, pairs)
                else:
                    def call(li: int, bm=bm, tiles=tiles, si=sorted_ids, be=block_expert, act=act, out=out,
                             wflat=wflat):
                        fm.launch_down(act, w2[li], out, si, be, wflat, bm, tiles)
                try:
                    # one graph replay calls every layer's weights in turn (L2 cannot hold them)
                    us = cuda_graph_us(lambda: [call(li) for li in range(args.layers)], 1, 20) / args.layers
                except Exception as e:  # e.g. out of shared memory for this tile: skip the config
                    print(f"[moe-tiles] n={n} {kernel} bm={bm} bn={bn} bk={bk} w={nw} s={ns} g={gm}: "
                          f"{type(e).__name__}", flush=True)
                    torch.cuda.synchronize()
                    continue
                found.append({"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns,
                              "group_m": gm, "tma": tma, "us": round(us, 2),
                              "GBps": round(bytes_per_call / us / 1e3, 1),
                              "TFLOPs": round(flops_per_call / us / 1e6, 1)})
            if not found:
                continue
            best = min(found, key=lambda r: r["us"])
            rows[kernel] = {"default": found[0], "best": best,
                            "top5": sorted(found, key=lambda r: r["us"])[:5], "tried": len(found),
                            "default_tiles_by_group_m": [r for r in found if (r["block_m"], r["block_n"], r["block_k"],
                                                         r["num_warps"], r["num_stages"]) == cands[0][:5]]}
            print(f"[moe-tiles] n={n} {kernel}: default {found[0]['us']} us, best {best}", flush=True)
        results[f"n{n}"] = rows
        if out_of_time:
            print("[moe-tiles] time budget spent; remaining batches skipped", flush=True)
            break
    write_result(f"moe_tiles_{args.preset}", results,
                 extra={"shape": {"hidden": HIDDEN, "experts": EXPERTS, "top_k": TOP_K, "inter": INTER},
                        "layers": args.layers, "out_of_time": out_of_time}, out_dir=args.out_dir)


def _as_tuple(t: fm.GemmTiles) -> tuple[int, int, int, int]:
    return t.block_n, t.block_k, t.num_warps, t.num_stages


if __name__ == "__main__":
    main()
