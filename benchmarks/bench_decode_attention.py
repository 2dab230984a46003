"""Decode attention launch configurations swept at the 30B-A3B shape (CUDA graphs).

`paged_attention_decode` (`qwen3coder.kernels.paged_attention`) at the Qwen3-Coder-30B-A3B shape, timed
for every combination of a split policy, a pipelining depth, a warp count and a floor of tiles per split.

    python benchmarks/bench_decode_attention.py [--batches 1,4,16] [--contexts 160,300,600,2048,8192]
        [--extra 10x2048] [--splits graph,pps4,pps8,1] [--stages 3] [--warps 4] [--min-tiles 1]
        [--bound 32832] [--layouts token] [--block-sizes 16] [--tiles 64] [--time-budget 50] [--out-dir DIR]

Shape: 32 query / 4 KV heads, head_dim 128, bf16, cache block 16 (the engine's default). All sequences of
a (batch, context) case have that context. Split policies: `graph` is the count a CUDA graph captured with
the `--bound` (max_model_len) upper bound gets, `choose_num_splits(batch, 4, bound)`; `ppsK` the same with
`PROGRAMS_PER_SM = K` (the default is 2); an integer is a fixed count (`1`: one program per (sequence, KV
head), no merge kernel). `--stages` is the tile loop's `num_stages` (1 = not pipelined), `--warps` the
split kernel's `num_warps`, `--min-tiles` the floor of 64-token tiles per split (1 = none). `used` is the
number of splits that do work per sequence (`splits_used`). `--layouts` times cache layouts: `token` is the
engine's `[blocks, block_size, Hk, D]`; `head` stores `[blocks, Hk, block_size, D]` (each KV head's block
contiguous) and passes the kernel a permuted view, whose strides it takes as they come; `--block-sizes`
times other cache block sizes (tokens per block), `--tiles` tokens per tile-loop step (which also set the
split arithmetic). Caution: these isolated timings did not carry over to the engine's decode graphs for
every choice (128-token tiles: docs/PERFORMANCE.md); check a candidate with bench_decode_variants.py.

Timing: enough distinct KV caches (> 3x the L2, at least 2 — one per "layer") called in turn inside one
CUDA graph and replayed (`qwen3coder.bench.timing.cuda_graph_us`), so the keys and values stream from
HBM as in a decode step over 48 layers; µs per call, split and merge kernels together (PDL as the
engine launches them). Every configuration is checked against `paged_attention_reference` (fp32 query,
bf16 caches; `max_abs_diff`, expected <~ 1e-2). Prints a table, the best configuration per (batch,
context) and the configuration with the smallest worst-case slowdown against the per-case best, and
writes benchmarks/results/decode_attention_30b-a3b-*.json. Needs CUDA; `--help` runs anywhere.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 4, 128, 16
BOUND = 32832  # max_model_len of the decode graphs
MAX_COPIES = 512  # distinct KV caches per case at most


def parse_cases(batches: str, contexts: str, extra: str) -> list[tuple[int, int]]:
    """(batch, context) pairs: the grid `batches` x `contexts`, then `extra` ("BxC,BxC")."""
    cases = [(int(b), int(c)) for b in batches.split(",") if b for c in contexts.split(",") if c]
    for item in (x for x in extra.split(",") if x):
        b, c = item.lower().split("x")
        cases.append((int(b), int(c)))
    seen: set[tuple[int, int]] = set()
    return [c for c in cases if not (c in seen or seen.add(c))]


def kv_bytes(batch: int, ctx: int, elt: int = 2) -> int:
    """Key and value bytes one call reads."""
    return 2 * batch * ctx * KV_HEADS * HEAD_DIM * elt


def _rotating(calls: int, fn: Callable[[int], object]) -> Callable[[], object]:
    """A no-argument function calling fn(0), fn(1), ... fn(calls - 1), fn(0), ..."""
    state = [0]

    def step() -> object:
        i = state[0] % calls
        state[0] += 1
        return fn(i)
    return step


def parse_configs(splits: str, stages: str, warps: str, min_tiles: str) -> list[tuple[str, int, int, int]]:
    """(split policy, num_stages, num_warps, min_tiles) combinations, in that nesting order."""
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]
    policies = [x for x in splits.split(",") if x]
    for pol in policies:
        if not (pol == "graph" or pol.isdigit() or (pol.startswith("pps") and pol[3:].isdigit())):
            raise SystemExit(f"--splits: {pol!r} is not 'graph', 'ppsK' or an integer")
    return [(pol, st, w, mt) for pol in policies for st in ints(stages) for w in ints(warps) for mt in ints(min_tiles)]


def config_label(config: tuple[str, int, int, int]) -> str:
    """A short name: policy/stages/warps, with the floor when it is not 1."""
    pol, st, w, mt = config
    return f"{pol}/st{st}/w{w}" + (f"/mt{mt}" if mt != 1 else "")


def split_count(policy: str, batch: int, bound: int, dev: torch.device, tile: int = 64) -> int:
    """The split count a policy gives for `batch` sequences under the length bound."""
    from qwen3coder.kernels.paged_attention import choose_num_splits
    if policy.isdigit():
        return int(policy)
    pps = int(policy[3:]) if policy.startswith("pps") else None
    return choose_num_splits(batch, KV_HEADS, bound, dev, programs_per_sm=pps, tile=tile)


def cache_tensor(num_blocks: int, block: int, layout: str, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A random cache `[blocks, block, Hk, D]`: contiguous (`token`), or a view of `[blocks, Hk, block, D]`
    storage (`head`)."""
    if layout == "token":
        return torch.randn(num_blocks, block, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    assert layout == "head", layout
    return torch.randn(num_blocks, KV_HEADS, block, HEAD_DIM, device=dev, dtype=dtype).permute(0, 2, 1, 3)


def bench_case(batch: int, ctx: int, configs: list[tuple[str, int, int, int]], bound: int, l2: int,
               layout: str = "token", block: int = BLOCK, tile: int = 64) -> dict:
    """One (batch, context): µs per call and splits used for each configuration, the largest error."""
    from qwen3coder.bench.timing import cuda_graph_us
    from qwen3coder.kernels.paged_attention import paged_attention_decode, splits_used
    from qwen3coder.models.context import ForwardContext
    from qwen3coder.models.layers.attention import paged_attention_reference

    dev, dtype = torch.device("cuda"), torch.bfloat16
    copies = max(2, min(MAX_COPIES, -(-3 * l2 // kv_bytes(batch, ctx))))
    blocks_per_seq = -(-ctx // block)
    num_blocks = batch * blocks_per_seq + 1
    width = -(-bound // block)
    perm = torch.randperm(num_blocks - 1)[:batch * blocks_per_seq] + 1  # scattered blocks, 0 unused
    table = torch.zeros(batch, width, dtype=torch.int32)
    table[:, :blocks_per_seq] = perm.view(batch, blocks_per_seq).to(torch.int32)
    table = table.to(dev)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    caches = [(cache_tensor(num_blocks, block, layout, dev, dtype), cache_tensor(num_blocks, block, layout, dev, dtype))
              for _ in range(copies)]
    qs = [torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=dtype) for _ in range(min(copies, 8))]
    scale = HEAD_DIM ** -0.5
    ctx_obj = ForwardContext.build([1] * batch, [ctx] * batch, table[:, :blocks_per_seq].tolist(), block,
                                   device="cuda")
    expected = paged_attention_reference(qs[0].float(), caches[0][0], caches[0][1], ctx_obj, scale)
    reps = copies * -(-48 // copies)
    iters = 10 if reps >= 256 else 20

    def run(splits: int, stages: int, warps: int, mt: int) -> tuple[float, float]:
        def call(i: int) -> torch.Tensor:
            k, v = caches[i]
            return paged_attention_decode(qs[i % len(qs)], k, v, table, lens, scale, num_splits=splits,
                                          min_tiles_per_split=mt, num_warps=warps, num_stages=stages,
                                          tile=tile)
        err = (call(0).float() - expected).abs().max().item()
        return cuda_graph_us(_rotating(copies, call), reps, iters=iters), err

    row: dict = {"batch": batch, "ctx": ctx, "layout": layout, "block": block, "tile": tile,
                 "graph_splits": split_count("graph", batch, bound, dev, tile),
                 "copies": copies, "kv_mb_per_call": round(kv_bytes(batch, ctx) / 2 ** 20, 2), "us": {},
                 "splits": {}, "used": {}, "max_abs_diff": 0.0}
    for config in configs:
        pol, st, w, mt = config
        splits = split_count(pol, batch, bound, dev, tile)
        us, err = run(splits, st, w, mt)
        label = config_label(config)
        row["us"][label] = round(us, 2)
        row["splits"][label] = splits
        row["used"][label] = splits_used(ctx, splits, mt, tile)
        row["max_abs_diff"] = max(row["max_abs_diff"], err)
    row["max_abs_diff"] = round(row["max_abs_diff"], 5)
    row["best"] = min(row["us"], key=row["us"].get)
    row["tbps_best"] = round(kv_bytes(batch, ctx) / row["us"][row["best"]] / 1e6, 2)
    del caches
    torch.cuda.empty_cache()
    return row


def suggest(rows: list[dict], labels: list[str]) -> tuple[str, dict[str, float]]:
    """The configuration whose worst slowdown against each case's best is smallest, and every one's worst."""
    worst = {lb: max(r["us"][lb] / r["us"][r["best"]] for r in rows) for lb in labels}
    return min(worst, key=worst.get), {lb: round(w, 3) for lb, w in worst.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--contexts", default="160,300,600,2048,8192")
    ap.add_argument("--extra", default="10x2048", help='more (batch, context) cases, "BxC,BxC"')
    ap.add_argument("--splits", default="graph,pps4,pps8,1", help="split policies: graph, ppsK or a count")
    ap.add_argument("--stages", default="3", help="num_stages of the tile loop to time (1 = not pipelined)")
    ap.add_argument("--warps", default="4", help="num_warps of the split kernel to time")
    ap.add_argument("--min-tiles", default="1", help="floors of tiles per split to time (1 = none)")
    ap.add_argument("--bound", type=int, default=BOUND, help="max_model_len the graph's split count is for")
    ap.add_argument("--layouts", default="token", help="cache layouts to time: token (the engine's), head")
    ap.add_argument("--block-sizes", default=str(BLOCK), help="cache block sizes (tokens) to time")
    ap.add_argument("--tiles", default="64", help="tokens per tile-loop step to time (64: the kernel's TILE)")
    ap.add_argument("--time-budget", type=float, default=50.0, help="seconds; later cases are skipped")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    configs = parse_configs(args.splits, args.stages, args.warps, args.min_tiles)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA device")
    from qwen3coder.bench.results import write_result
    from qwen3coder.kernels import paged_attention as pa
    from qwen3coder.kernels.pdl import use_pdl

    t0 = time.time()
    torch.manual_seed(0)
    cases = parse_cases(args.batches, args.contexts, args.extra)
    labels = [config_label(c) for c in configs]
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20)
    width = max(9, *(len(lb) for lb in labels))
    variants = [(lay, int(b), int(t)) for lay in args.layouts.split(",") for b in args.block_sizes.split(",")
                for t in args.tiles.split(",")]
    head = f"{'batch':>5} {'ctx':>5} {'layout':>12} | " + " ".join(f"{lb:>{width}}" for lb in labels) + " | best"
    print(head + "\n" + "-" * len(head), flush=True)
    rows: list[dict] = []
    skipped: list[tuple[int, int]] = []
    with torch.no_grad():
        for batch, ctx in cases:
            for layout, block, tile in variants:
                if time.time() - t0 > args.time_budget:
                    skipped.append((batch, ctx, layout, block, tile))
                    continue
                r = bench_case(batch, ctx, configs, args.bound, l2, layout, block, tile)
                rows.append(r)
                timings = " ".join(f"{r['us'][lb]:>{width - 5}.2f} S{r['splits'][lb]:<3}" for lb in labels)
                error = f"  ERROR {r['max_abs_diff']:.3g}" if r["max_abs_diff"] > 2e-2 else ""
                print(f"{batch:>5} {ctx:>5} {layout[:5] + str(block) + '/' + str(tile):>12} | {timings} | {r['best']} "
                      f"{r['tbps_best']} TB/s{error}", flush=True)
    if skipped:
        print(f"[decode-attn] out of time, skipped {skipped}", flush=True)
    best, worst = suggest(rows, labels) if rows else (None, {})
    print("\nbest configuration per (batch, ctx): "
          + ", ".join(f"({r['batch']}, {r['ctx']}): {r['best']}" for r in rows), flush=True)
    print(f"worst slowdown vs per-case best: {worst}; best overall: {best} (current: graph/st{pa.NUM_STAGES}/"
          f"w{pa.NUM_WARPS}, PROGRAMS_PER_SM = {pa.PROGRAMS_PER_SM})", flush=True)
    print(f"[decode-attn] {time.time() - t0:.0f} s", flush=True)
    def key(r: dict) -> str:  # the engine's layout keeps the keys of earlier JSONs
        tail = "" if (r["layout"], r["block"]) == ("token", BLOCK) else f"_{r['layout']}{r['block']}"
        tail += "" if r["tile"] == 64 else f"_tile{r['tile']}"
        return f"bs{r['batch']}_ctx{r['ctx']}{tail}"

    metrics = {key(r): r for r in rows}
    metrics["best"] = {key(r): r["best"] for r in rows}
    metrics["worst_slowdown"] = worst
    metrics["best_overall"] = best
    write_result("decode_attention_30b-a3b", metrics,
                 extra={"shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                  "block_size": BLOCK, "dtype": "bfloat16"}, "layouts": args.layouts,
                        "block_sizes": args.block_sizes, "tiles": args.tiles,
                        "bound": args.bound, "configs": labels,
                        "defaults": {"programs_per_sm": pa.PROGRAMS_PER_SM, "num_stages": pa.NUM_STAGES,
                                     "num_warps": pa.NUM_WARPS, "min_tiles": pa.MIN_TILES_PER_SPLIT},
                        "pdl": use_pdl(torch.device("cuda")), "skipped": skipped,
                        "timing": "CUDA graph replay over distinct KV caches (> 3x L2)",
                        "seconds": round(time.time() - t0, 1)}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
