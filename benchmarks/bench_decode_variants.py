"""Decode speed under engine launch variants, in one process (one model build for all of them).

    python benchmarks/bench_decode_variants.py --preset 30b-a3b                 # every variant
    python benchmarks/bench_decode_variants.py --variants baseline,fused_router_off --batches 1

Each variant sets module-level launch choices for its run and restores them afterwards: programmatic
dependent launch off or wait-first (`kernels.pdl`), the fused post-attention norm + router + routing
(`models.layers.moe.FUSED_NORM_ROUTER`, on by default; its router rows per program at every batch,
`kernels.norm_router.ROUTER_TILE` and `ROUTER_TILE_SMALL`), batch-1 fused-MoE tiles
(`kernels.fused_moe._DECODE_TINY`), qkv_proj on the skinny GEMM (`kernels.skinny_gemm.TUNED`), the
register-tile GEMV's shapes and tiles (`kernels.gemv.TUNED`), the decode-row MoE GEMVs' shapes and tiles
(`kernels.moe_gemv.TUNED`), decode attention's splits merged by the last to arrive
(`kernels.paged_attention.LAST_SPLIT_MERGE`) and its launch (`NUM_STAGES`, `PROGRAMS_PER_SM`, the merge kernel's
splits per step `merge_chunk`), the
routing's expert-sorted layout built even for the MoE GEMVs (`models.layers.moe.SKIP_ALIGN_FOR_GEMV`), the
routing's top-k form by rows (`kernels.moe_routing.PACKED_TOPK_MAX_ROWS`), QK-norm/RoPE in decode
attention or in a kernel of its own (`models.layers.attention.FOLD_DECODE_PROLOGUE`); `a+b` runs two
variants together. `sol_no_attention` / `sol_no_experts` are speed-of-light probes, not candidates: the
decode attention or the routed experts replaced by no work (wrong tokens), to bound what a faster kernel
there could give. The decode CUDA graphs bake such choices in, so they are recaptured per variant; then
decode tokens/s at each batch (`qwen3coder.bench.decode`'s measure: a 256-token run minus a 1-token run,
`--prompt-len` prompts). A variant is only as good as its timing noise: run-to-run differences of ~1%
were seen on an H200, so the baseline runs first and last (a variant named twice is run twice). JSON
under benchmarks/results/ (`decode_variants_<preset>-*.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from qwen3coder.bench.decode import decode_tok_s
from qwen3coder.bench.results import write_result
from qwen3coder.config import ModelConfig
from qwen3coder.engine import LLM
from qwen3coder.kernels import fused_moe as fm
from qwen3coder.kernels import gemv as gv
from qwen3coder.kernels import moe_gemv as mg
from qwen3coder.kernels import moe_routing as mr
from qwen3coder.kernels import norm_router as nr
from qwen3coder.kernels import paged_attention as pa
from qwen3coder.kernels import pdl
from qwen3coder.kernels import skinny_gemm as sg
from qwen3coder.loader import build_dummy_model
from qwen3coder.models.layers import attention as attn_mod
from qwen3coder.models.layers import moe as moe_mod


def _qkv_skinny(block_n: int) -> dict:
    """TUNED with qkv_proj's shape (30B-A3B: 2048 -> 5120) on the skinny kernel instead of cuBLAS."""
    table = dict(sg.TUNED)
    for rows in (1, 2, 4, 8, 16):
        table[(rows, 5120, 2048)] = sg.SkinnyConfig(block_n=block_n, split_k=1)
    return table


def _moe_gemv(rows: tuple[int, ...], gu_tile: int, gu_warps: int, down_tile: int, down_warps: int) -> dict:
    """moe_gemv.TUNED listing the 30B-A3B MoE shape (hidden 2048, intermediate 768) for `rows`."""
    cfg = mg.MoEGemvConfig(gv.GemvConfig(gu_tile, gu_warps), gv.GemvConfig(down_tile, down_warps))
    return {(r, 2048, 768): cfg for r in rows}


def _no_attention(q, *args, **kwargs):
    """Speed-of-light probe: decode attention replaced by its query (no kernel; wrong outputs)."""
    return q


def _no_experts(x, w13, w2, topk_weights, topk_ids, *args, reduce: bool = True, **kwargs):
    """Speed-of-light probe: the experts replaced by zeros (one memset; wrong outputs)."""
    n, k = topk_ids.shape
    return x.new_zeros(n, x.shape[1]) if reduce else x.new_zeros(n, k, x.shape[1])


def _tiles(gate_up: tuple[int, int, int, int], down: tuple[int, int, int, int]) -> fm.MoETiles:
    return fm.MoETiles(fm.GemmTiles(*gate_up), fm.GemmTiles(*down))


# name -> [(module, attribute, value)]; values are built lazily (only for the variants that run)
VARIANTS: dict[str, Any] = {
    "baseline": lambda: [],
    "pdl_off": lambda: [(pdl, "_ENABLED", False)],
    "pdl_wait_first": lambda: [(pdl, "_MODE", 1)],
    "fused_router_off": lambda: [(moe_mod, "FUSED_NORM_ROUTER", False)],
    "qkv_skinny_bn32": lambda: [(sg, "TUNED", _qkv_skinny(32))],
    "qkv_skinny_bn64": lambda: [(sg, "TUNED", _qkv_skinny(64))],
    "moe_tiles_gu64x128w4": lambda: [(fm, "_DECODE_TINY", _tiles((64, 128, 4, 5), (64, 256, 4, 3)))],
    "moe_tiles_gu32x256w4": lambda: [(fm, "_DECODE_TINY", _tiles((32, 256, 4, 3), (64, 256, 4, 3)))],
    "moe_tiles_gu32x128w4s5": lambda: [(fm, "_DECODE_TINY", _tiles((32, 128, 4, 5), (64, 256, 4, 3)))],
    "moe_tiles_down128": lambda: [(fm, "_DECODE_TINY", _tiles((64, 128, 8, 5), (128, 128, 4, 3)))],
    "moe_tiles_down32x256w4": lambda: [(fm, "_DECODE_TINY", _tiles((64, 128, 8, 5), (32, 256, 4, 3)))],
    "moe_tiles_down32x256w8": lambda: [(fm, "_DECODE_TINY", _tiles((64, 128, 8, 5), (32, 256, 8, 3)))],
    **{f"router_tile_{t // 1024}k": (lambda t=t: [(nr, "ROUTER_TILE", t), (nr, "ROUTER_TILE_SMALL", t)])
       for t in (2048, 4096, 8192, 16384)},
    "attn_last_split_merge": lambda: [(pa, "LAST_SPLIT_MERGE", True)],
    "attn_stages5": lambda: [(pa, "NUM_STAGES", 5)],
    "attn_merge_tile64": lambda: [(pa, "merge_chunk", lambda s: 64)],  # one 64-split tile: the merge before
    "attn_merge_chunk4": lambda: [(pa, "MERGE_LOOP_CHUNK", 4)],
    "attn_pps4": lambda: [(pa, "PROGRAMS_PER_SM", 4)],
    "no_gemv": lambda: [(gv, "TUNED", {})],
    "gemv_oproj_4k_w4": lambda: [(gv, "TUNED", {(1, 2048, 4096): gv.GemvConfig(4096, 4)})],
    "gemv_oproj_16k_w4": lambda: [(gv, "TUNED", {(1, 2048, 4096): gv.GemvConfig(16384, 4)})],
    "gemv_oproj_bs2": lambda: [(gv, "TUNED", {**gv.TUNED, (2, 2048, 4096): gv.GemvConfig(8192, 4)})],
    "gemv_qkv": lambda: [(gv, "TUNED", {**gv.TUNED, (1, 5120, 2048): gv.GemvConfig(8192, 4)})],
    "gemv_qkv_4k": lambda: [(gv, "TUNED", {**gv.TUNED, (1, 5120, 2048): gv.GemvConfig(4096, 4)})],
    "gemv_qkv_16k": lambda: [(gv, "TUNED", {**gv.TUNED, (1, 5120, 2048): gv.GemvConfig(16384, 4)})],
    "moe_gemv_off": lambda: [(mg, "TUNED", {})],
    "qk_rope_unfolded": lambda: [(attn_mod, "FOLD_DECODE_PROLOGUE", False)],
    "qk_rope_folded": lambda: [(attn_mod, "FOLD_DECODE_PROLOGUE", True)],
    "topk_two_reductions": lambda: [(mr, "PACKED_TOPK_MAX_ROWS", 0)],
    "topk_packed_all": lambda: [(mr, "PACKED_TOPK_MAX_ROWS", 1 << 30)],
    "router_align_always": lambda: [(moe_mod, "SKIP_ALIGN_FOR_GEMV", False)],
    "routing_tiled_above_16": lambda: [(mr, "MAX_TILE", 16 * 128)],  # 30B-A3B: > 16 tokens take 3 launches
    "routing_tiled_above_32": lambda: [(mr, "MAX_TILE", 32 * 128)],
    "routing_warps16_large": lambda: [(mr, "FUSED_ROUTING_WARPS", ((4096, 4), (mr.MAX_TILE, 16)))],
    "routing_warps8_from2k": lambda: [(mr, "FUSED_ROUTING_WARPS", ((2048, 4), (mr.MAX_TILE, 8)))],
    "routing_warps16_from2k": lambda: [(mr, "FUSED_ROUTING_WARPS", ((2048, 4), (4096, 8), (mr.MAX_TILE, 16)))],
    # speed-of-light probes (timing only, the tokens are garbage): what the step costs without a part
    "sol_no_attention": lambda: [(pa, "paged_attention_decode", _no_attention)],
    "sol_no_experts": lambda: [(fm, "fused_moe", _no_experts)],
}


# moe_gemv_gu<A>kw<B>_d<C>kw<D>[_bs<rows>]: moe_gemv.TUNED with gate/up tiles of A K elements and B warps,
# down tiles of C K elements and D warps, for the listed rows (digits; default 1), e.g. moe_gemv_gu8kw4_d4kw4_bs12
_MOE_GEMV = re.compile(r"moe_gemv_gu(\d+)kw(\d+)_d(\d+)kw(\d+)(?:_bs(\d+))?$")


def _known(part: str) -> bool:
    return part in VARIANTS or _MOE_GEMV.match(part) is not None


def _part(part: str) -> list[tuple[Any, str, Any]]:
    m = _MOE_GEMV.match(part)
    if m is None:
        return VARIANTS[part]()
    a, b, c, d = (int(g) for g in m.groups()[:4])
    rows = tuple(int(r) for r in (m.group(5) or "1"))
    return [(mg, "TUNED", _moe_gemv(rows, a * 1024, b, c * 1024, d))]


def patches_of(name: str) -> list[tuple[Any, str, Any]]:
    """A variant's patches; `a+b` combines variants (a later one wins where both set an attribute)."""
    return [p for part in name.split("+") for p in _part(part)]


@contextlib.contextmanager
def applied(patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set the attributes for the body, then put the old values back."""
    old = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in reversed(old):
            setattr(mod, name, value)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="30b-a3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="all", help=f"comma-separated from {', '.join(VARIANTS)}, or all")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of every sequence")
    ap.add_argument("--max-model-len", type=int, default=32768 + 64)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if not all(_known(part) for part in n.split("+"))]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if names[0] != "baseline":
        names.insert(0, "baseline")
    if len(names) > 1:
        names.append("baseline")  # again at the end: the drift of the measure
    cfg = ModelConfig.preset(args.preset)
    dev = args.device
    batches = [int(b) for b in args.batches.split(",")]
    model = build_dummy_model(cfg, device=dev, dtype="bfloat16" if dev == "cuda" else "float32")
    llm = LLM(model, device=dev, skip_tokenizer_init=True, max_model_len=args.max_model_len,
              max_num_seqs=max(batches), enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    results: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for i, name in enumerate(names):
        repeat = sum(n == name for n in names[:i])  # earlier runs of the same variant
        key = name if not repeat else f"{name}_end" if i == len(names) - 1 else f"{name}_{repeat + 1}"
        t0 = time.perf_counter()
        try:
            with applied(patches_of(name)):
                if hasattr(runner, "recapture_graphs"):
                    runner.recapture_graphs()
                results[key] = {
                    f"decode_bs{b}_tok_s": round(decode_tok_s(llm, b, cfg.vocab_size, args.out_len, dev,
                                                              args.prompt_len), 2) for b in batches}
        except Exception as e:  # one broken variant must not lose the others
            errors[key] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"[variants] {key}: {results.get(key, errors.get(key))} ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    if hasattr(runner, "recapture_graphs"):
        runner.recapture_graphs()  # the defaults again (nothing else runs after, but leave it clean)
    return write_result(f"decode_variants_{args.preset}", results,
                        extra={"preset": args.preset, "batches": batches, "out_len": args.out_len,
                               "prompt_len": args.prompt_len,
                               "errors": errors}, out_dir=args.out_dir)


if __name__ == "__main__":
    print("results:", main())
