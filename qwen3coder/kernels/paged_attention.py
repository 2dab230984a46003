"""Triton decode attention over the paged KV cache (one new query token per sequence).

Design (flash-decoding with a split count fixed on the host, token ranges chosen on the device):

* Grid `(sequences, KV heads, S)`. One program handles a KV head's whole GQA group: the group's
  queries form the rows of a `[GROUP_PAD, head_dim]` tile, padded to at least 16 rows so that QK^T
  and PV run as `tl.dot` on tensor cores (fp32 accumulation).
* The split count `S` comes from the host: enough programs to fill the GPU (about two per SM),
  capped by the number of tiles under the host-side length bound `max_seq_len` and by
  `MAX_SPLITS`. It depends only on (batch size, bound), so a CUDA graph captured with the
  `max_model_len` bound keeps its grid; no host sync, lengths are read on the device only.
* Each program derives its own token range from the REAL `seq_lens[seq]` loaded in the kernel:
  the sequence's `cdiv(seq_len, tile)` tiles are dealt out in runs of
  `per_split = max(cdiv(tiles, S), min_tiles)` tiles, so `used = cdiv(tiles, per_split)` splits do
  work. The floor `min_tiles` (a runtime argument, default `MIN_TILES_PER_SPLIT`) could keep a short
  context from being spread one tile per split (with a graph's S = 64, a 160-token context becomes 3
  one-tile partials and a merge); measured, a floor only made things slower (see the constant), so
  the default is 1. Programs of splits at or past `used` return at once, writing nothing.
* The merge kernel reads the length before its PDL wait (`kernels.pdl`: the host wrote it). Loading the
  split kernel's first tile of earlier tokens' keys/values before its wait (the step's own token after
  it) was measured and dropped: on an H200 it saved ~1 µs per call at short contexts alone, but cost up
  to 35% at batch 16 from 2K tokens (the tile held in registers beside the pipelined loop) and was slower
  in the model at batch 1, 2, 10 (2K context) and 16 (`decode_variants_30b-a3b-20261130T120159.json`).
* The inner loop walks `TILE`-token tiles (the `tile` argument: another power of two, for sweeps); a
  tile's key/value rows are gathered through the block table
  (`block = token // block_size`, any power-of-two block size). Softmax is online, in base 2 with
  `scale * log2(e)` folded into the scores; tokens at or past `seq_len` are masked (and their block
  table entries never read). p is cast to the value dtype before the PV dot.
* With `S == 1`, or when a sequence's real length gives `used == 1`, the (only) working program
  normalises and writes the output directly. Otherwise a merge kernel (one program per (sequence,
  query head)) combines the partials of the `used` splits, `merge_chunk(S)` at a time (a running max
  across chunks; one chunk, no rescaling, up to 8 splits); its programs for `used == 1` sequences
  return at once (their output is already written). Both kernels compute per_split/used from the
  same (seq_len, S, min_tiles), so they agree on which path each sequence takes. The direct write
  equals what the merge would give for one partial (its weight is exp2(0) = 1): same bits.
* Opt-in (`LAST_SPLIT_MERGE`, `QWEN3CODER_LAST_SPLIT_MERGE=1`; measured slower, see below): no merge
  launch. A split program that wrote partials counts itself on its (sequence, KV head)'s arrival
  counter (a CTA barrier, then an acquire-release atomic); the last of the `used` splits to arrive
  resets the counter and merges the group's heads with the merge kernel's arithmetic, `CHUNK` splits
  at a time (fp32 sums in another order: equal to the merge kernel's output to fp32 rounding).

fp32 caches use IEEE dots (tf32 would break fp32 parity with the CPU path); bf16/fp16 use tensor
cores natively. `paged_attention_reference` in `qwen3coder.models.layers.attention` is the
plain-PyTorch reference that tests compare against.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_launch_dependents, pdl_prologue, pdl_wait
    from qwen3coder.kernels.qk_norm_rope import _norm_rope_tile
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

TILE = 64  # tokens per inner-loop step (the N of QK^T, the K of PV)
MAX_SPLITS = 64  # most partials per (sequence, KV head)
MIN_ROWS = 16  # query rows of a dot: the GQA group is padded up to this
# Floor of 64-token tiles per split (a runtime kernel argument: other values need no recompile).
# 1 = no floor: benchmarks/bench_decode_attention.py on an H200 (30B-A3B heads, graph split counts,
# benchmarks/results/decode_attention_30b-a3b-20261130T073759.json) found a tile walked in sequence
# costs ~1.9 µs, about the merge kernel's price, so fewer splits never paid: at batch 1, 160 tokens,
# split + merge took 5.8 µs with floor 1, 8.3 with 4, 7.2 with one split; at 2,048 tokens 7.9 / 11.9 / 58.
MIN_TILES_PER_SPLIT = 1
# Merge the splits in the attention kernel (the last split of a (sequence, KV head) to arrive on an
# arrival counter merges them) instead of a merge launch. Opt-in (QWEN3CODER_LAST_SPLIT_MERGE=1): on an
# H200 at 30B-A3B decode it was slower at batch 1 (340-344 vs 355-359 tok/s) and even at 2/4/16
# (`attn_last_split_merge` of benchmarks/bench_decode_variants.py, decode_variants_30b-a3b-20261130T094324.json):
# the atomics and L2 reads of the last split cost more than a merge launch that PDL overlaps.
LAST_SPLIT_MERGE = os.environ.get("QWEN3CODER_LAST_SPLIT_MERGE", "0") == "1"
MERGE_CHUNK = 4  # splits whose partial outputs the merging program holds at once
# ... and the merge kernel's. It once loaded one [MAX_SPLITS, HEAD_DIM] tile, mostly masked, whatever the
# split count: 11.5 µs per layer at batch 64 (2 splits) on an H200 (30B-A3B decode); sized by the split
# count, batch-64 decode went from 3,700 to 3,787 tok/s (decode_variants_30b-a3b-20261130T141602.json, its
# variant then named `attn_merge_pad64`), and in these chunks from 3,813 to 3,923 (`attn_merge_tile64` of
# bench_decode_variants.py, decode_variants_30b-a3b-20261130T142354.json; chunks of 4: 3,930), batch 1 and
# 16 even.
MERGE_LOOP_CHUNK = 8
PROGRAMS_PER_SM = 2  # split programs `choose_num_splits` aims at per SM
NUM_WARPS = 4  # warps of a split program
NUM_STAGES = 3  # software-pipelining depth of the tile loop (Triton's default on CUDA)
# One launch for every batch: 128-token tiles and other stages / warps chosen per batch bucket were 10-55%
# faster per call in isolation but no faster in the decode graphs (docs/PERFORMANCE.md, twelfth session).
_CPU_SMS = 8  # stand-in SM count off the GPU (Triton's interpreter)
_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit(do_not_specialize=["min_tiles"])
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, m_ptr,
                             l_ptr, acc_ptr, counter_ptr, qk_scale, stride_qn, stride_qh, stride_kb, stride_ks,
                             stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, stride_on, stride_oh,
                             num_splits, num_heads, min_tiles, k_new_ptr, v_new_ptr, q_w_ptr, k_w_ptr, cos_ptr,
                             sin_ptr, slot_ptr, eps, stride_kn, stride_knh, stride_vn, stride_vnh, stride_cos,
                             stride_sin, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                             SPLIT: tl.constexpr, MERGE: tl.constexpr, SPLITS_PAD: tl.constexpr,
                             CHUNK: tl.constexpr, IEEE: tl.constexpr, PROLOGUE: tl.constexpr,
                             ROT_DIM: tl.constexpr, HALF_ALIGN: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                             PDL: tl.constexpr):
        """One (sequence, KV head, split): online softmax over the split's tiles of the real length.
        Without SPLIT, or when the sequence's length leaves a single split in use, the output is
        written directly; otherwise the partial max (base 2), sum and unnormalised output go to
        m/l/acc, laid out [seq, head, split(, HEAD_DIM)]. Splits past the used ones return at once.
        PROLOGUE: q, k, v are the raw projections of the step's token; every program normalises and
        rotates its group's queries, and the program whose split holds the last token also the key, and
        stores key and value in the cache before its tile loop reads them (see `DecodePrologue`)."""
        pdl_prologue(PDL)
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        num_tiles = tl.cdiv(seq_len, TILE_N)
        per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), min_tiles)
        used = tl.cdiv(num_tiles, per_split)
        # splits past the used ones hold no tile and no partial that the merge reads (used >= 1 for
        # seq_len >= 1; a zero length still runs split 0 and gives NaN, as before)
        if split >= tl.maximum(used, 1):
            return
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, TILE_N)
        heads = kvh * GROUP + g
        g_mask = g < GROUP
        if PROLOGUE:
            q = _prologue(q_ptr, k_new_ptr, v_new_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr,
                          v_cache_ptr, eps, seq, kvh, heads, g_mask, split == (num_tiles - 1) // per_split,
                          stride_qn, stride_qh, stride_kn, stride_knh, stride_vn, stride_vnh, stride_cos,
                          stride_sin, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                          GROUP_PAD, HEAD_DIM, BLOCK_SIZE, ROT_DIM, HALF_ALIGN, ZERO_CENTERED)
        else:
            q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                        mask=g_mask[:, None], other=0.0).to(k_cache_ptr.dtype.element_ty)  # [G, D]; pad rows 0
        m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        first = split * per_split
        last = tl.minimum(first + per_split, num_tiles)
        bt_row = block_tables_ptr + seq * stride_bt
        k_head = k_cache_ptr + kvh * stride_kh
        v_head = v_cache_ptr + kvh * stride_vh
        for t in range(first, last):
            tok = t * TILE_N + n
            valid = tok < seq_len
            block = tl.load(bt_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            slot = tok % BLOCK_SIZE
            k_off = block * stride_kb + slot * stride_ks
            v_off = block * stride_vb + slot * stride_vs
            kt = tl.load(k_head + k_off[None, :] + d[:, None], mask=valid[None, :], other=0.0)  # [D, N]
            v = tl.load(v_head + v_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
            if IEEE:
                qk = tl.dot(q, kt, input_precision="ieee")
            else:
                qk = tl.dot(q, kt)
            qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))  # [G, N], base-2 logits
            # every tile in [first, last) holds a valid token, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if SPLIT:
            if used > 1:  # partials for the merge kernel
                row = (seq * num_heads + heads) * num_splits + split
                tl.store(m_ptr + row, m_i, mask=g_mask)
                tl.store(l_ptr + row, l_i, mask=g_mask)
                tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
                if MERGE:  # the last split of this (sequence, KV head) to arrive merges the group's heads
                    tl.debug_barrier()  # every thread's partial stores before the one thread's release
                    count = counter_ptr + seq * tl.num_programs(1) + kvh
                    arrived = tl.atomic_add(count, 1, sem="acq_rel")
                    if arrived == used - 1:
                        tl.atomic_xchg(count, 0)  # ready for the next launch
                        _merge_group(m_ptr, l_ptr, acc_ptr, out_ptr, seq, heads, g_mask, used, num_splits,
                                     num_heads, stride_on, stride_oh, GROUP_PAD, HEAD_DIM, SPLITS_PAD, CHUNK)
            else:  # the only split in use: the final output (the merge skips this sequence)
                out = acc / l_i[:, None]
                tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])

    @triton.jit
    def _prologue(q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, eps,
                  seq, kvh, heads, g_mask, holds_last, stride_qn, stride_qh, stride_kn, stride_kh, stride_vn,
                  stride_vh, stride_cos, stride_sin, stride_cb, stride_cs, stride_ch, stride_vcb, stride_vcs,
                  stride_vch, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  ROT_DIM: tl.constexpr, HALF_ALIGN: tl.constexpr, ZERO_CENTERED: tl.constexpr):
        """The group's queries `[GROUP_PAD, HEAD_DIM]` in the cache dtype (pad rows 0), QK-normed and rotated
        with `qk_norm_rope`'s own tile code; when `holds_last`, the key is normed and rotated too and the
        key and value rows are stored at the token's slot, visible to the whole program (CTA barrier)."""
        d = tl.arange(0, HEAD_DIM)
        rot = d < ROT_DIM
        cos = tl.load(cos_ptr + seq * stride_cos + d, mask=rot, other=0.0).to(tl.float32)[None, None, :]
        sin = tl.load(sin_ptr + seq * stride_sin + d, mask=rot, other=0.0).to(tl.float32)[None, None, :]
        rows = q_ptr + (seq * stride_qn + heads * stride_qh)[None, :, None]  # [1, G, 1]
        q = _norm_rope_tile(rows, g_mask[None, :, None], q_w_ptr, cos, sin, eps, HEAD_DIM, ROT_DIM, HEAD_DIM,
                            HALF_ALIGN, ZERO_CENTERED)
        q = tl.where(g_mask[:, None], tl.reshape(q, (GROUP_PAD, HEAD_DIM)), 0.0).to(k_cache_ptr.dtype.element_ty)
        if holds_last:
            one = tl.full((1, 1, 1), True, tl.int1)
            k_rows = k_ptr + (seq * stride_kn + kvh * stride_kh) + tl.zeros((1, 1, 1), tl.int64)
            k = tl.reshape(_norm_rope_tile(k_rows, one, k_w_ptr, cos, sin, eps, HEAD_DIM, ROT_DIM, HEAD_DIM,
                                           HALF_ALIGN, ZERO_CENTERED), (HEAD_DIM,))
            v = tl.load(v_ptr + seq * stride_vn + kvh * stride_vh + d)
            slot = tl.load(slot_ptr + seq).to(tl.int64)  # decode: every slot >= 0
            block, pos = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            tl.store(k_cache_ptr + block * stride_cb + pos * stride_cs + kvh * stride_ch + d,
                     k.to(k_cache_ptr.dtype.element_ty))
            tl.store(v_cache_ptr + block * stride_vcb + pos * stride_vcs + kvh * stride_vch + d,
                     v.to(v_cache_ptr.dtype.element_ty))
            tl.debug_barrier()  # the stores before any thread's tile loads
        return q

    @triton.jit
    def _merge_group(m_ptr, l_ptr, acc_ptr, out_ptr, seq, heads, g_mask, used, num_splits, num_heads, stride_on,
                     stride_oh, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
                     CHUNK: tl.constexpr):
        """The merge kernel's arithmetic for the heads `heads` ([GROUP_PAD], `g_mask`) of one sequence:
        weights exp2(m - max m) over the `used` splits; the weighted partial outputs are summed
        CHUNK splits at a time ([GROUP_PAD, CHUNK, HEAD_DIM] in registers). Loads bypass
        L1 (`.cg`): other programs wrote the partials."""
        sp = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        base = (seq * num_heads + heads) * num_splits  # [G]
        ok = g_mask[:, None] & (sp[None, :] < used)
        m = tl.load(m_ptr + base[:, None] + sp[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + base[:, None] + sp[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        m_max = tl.where(g_mask, tl.max(m, axis=1), 0.0)  # padded rows: 0, not -inf - -inf
        den = tl.sum(l * tl.where(ok, tl.math.exp2(m - m_max[:, None]), 0.0), axis=1)
        c = tl.arange(0, CHUNK)
        num = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        for s0 in range(0, used, CHUNK):
            okc = g_mask[:, None] & (s0 + c[None, :] < used)  # [G, C]
            rows = base[:, None] + s0 + c[None, :]
            mc = tl.load(m_ptr + rows, mask=okc, other=float("-inf"), cache_modifier=".cg")
            wc = tl.where(okc, tl.math.exp2(mc - m_max[:, None]), 0.0)
            accc = tl.load(acc_ptr + rows[:, :, None] * HEAD_DIM + d[None, None, :], mask=okc[:, :, None],
                           other=0.0, cache_modifier=".cg")  # [G, C, D]
            num += tl.sum(accc * wc[:, :, None], axis=1)
        out = num / tl.where(g_mask, den, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])

    @triton.jit(do_not_specialize=["min_tiles"])
    def _paged_decode_merge_kernel(m_ptr, l_ptr, acc_ptr, seq_lens_ptr, out_ptr, num_splits, num_heads,
                                   min_tiles, stride_on, stride_oh, HEAD_DIM: tl.constexpr,
                                   CHUNK: tl.constexpr, TILE_N: tl.constexpr, PDL: tl.constexpr):
        """One (sequence, query head): combine the partials of the splits that the sequence's real
        length reaches (the same tile arithmetic as the split kernel), CHUNK at a time with a running
        max (online softmax across chunks); the others are never read. With a single split in use the
        split kernel already wrote the output: return at once."""
        pdl_launch_dependents(PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)  # written by the host: read before the wait
        num_tiles = tl.cdiv(seq_len, TILE_N)
        per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), min_tiles)
        used = tl.cdiv(num_tiles, per_split)
        pdl_wait(PDL)
        if used == 1:
            return
        c = tl.arange(0, CHUNK)
        d = tl.arange(0, HEAD_DIM)
        base = (seq * num_heads + head) * num_splits
        m_run = tl.max(tl.full((CHUNK,), float("-inf"), tl.float32), axis=0)
        l_run = tl.sum(tl.zeros((CHUNK,), tl.float32), axis=0)
        acc_run = tl.zeros((HEAD_DIM,), tl.float32)
        for s0 in range(0, used, CHUNK):  # used <= CHUNK (the common case): one pass, no rescaling
            ok = s0 + c < used
            row = base + s0 + c
            m = tl.load(m_ptr + row, mask=ok, other=float("-inf"))
            l = tl.load(l_ptr + row, mask=ok, other=0.0)
            acc = tl.load(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, axis=0))  # finite: each chunk holds a used split
            alpha = tl.math.exp2(m_run - m_new)  # 0 on the first chunk
            w = tl.where(ok, tl.math.exp2(m - m_new), 0.0)
            l_run = l_run * alpha + tl.sum(l * w, axis=0)
            acc_run = acc_run * alpha + tl.sum(acc * w[:, None], axis=0)
            m_run = m_new
        tl.store(out_ptr + seq * stride_on + head * stride_oh + d, (acc_run / l_run).to(out_ptr.dtype.element_ty))


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` zeroed int32 counters per device, one per (sequence, KV head); every launch leaves
    them at 0 again. Grown only outside CUDA-graph capture (graphs are captured largest batch first,
    after an eager warm-up of the same shapes)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "the merge counters must be allocated before CUDA-graph capture (run the step once eagerly)"
        if counters is not None:
            _RETIRED.append(counters)  # graphs captured earlier may still use it: never freed
        counters = _COUNTERS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return counters


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); a fixed stand-in elsewhere."""
    if device.type != "cuda":
        return _CPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, bound: int, device: torch.device,
                      programs_per_sm: int | None = None, tile: int = TILE) -> int:
    """Splits per (sequence, KV head): about `programs_per_sm` (None: `PROGRAMS_PER_SM`) programs per SM,
    at most one per `tile` tokens of the host-side length `bound` and at most `MAX_SPLITS`. Host
    integers only (graph-safe)."""
    per_sm = programs_per_sm or PROGRAMS_PER_SM
    fill = triton.next_power_of_2(triton.cdiv(per_sm * _num_sms(device), max(1, num_seqs * num_kv_heads)))
    return max(1, min(MAX_SPLITS, triton.cdiv(max(1, bound), tile), fill))


def merge_chunk(num_splits: int) -> int:
    """Partials the merge kernel combines per loop step: `num_splits` rounded up to a power of two, at
    most `MERGE_LOOP_CHUNK` (three variants at most; graphs compile theirs at capture)."""
    return min(MERGE_LOOP_CHUNK, max(2, triton.next_power_of_2(num_splits)))


def splits_used(seq_len: int, num_splits: int, min_tiles: int = MIN_TILES_PER_SPLIT, tile: int = TILE) -> int:
    """Splits that do work for a sequence of `seq_len` tokens (>= 1) under `num_splits` splits, a floor of
    `min_tiles` tiles per split and `tile` tokens per tile: the kernels' device-side arithmetic, on host
    integers."""
    num_tiles = -(-seq_len // tile)
    per_split = max(-(-num_tiles // max(1, num_splits)), max(1, min_tiles))
    return -(-num_tiles // per_split)


class DecodePrologue(NamedTuple):
    """The attention prologue of `kernels.qk_norm_rope`, folded into the decode kernel: the step's raw
    keys and values `[N, Hk, D]` (any token/head strides, unit channel stride), the `q_norm`/`k_norm`
    weights `[D]` and eps, the step's cos/sin rows `[N, rotary_dim]`, each token's cache slot, and the
    norm form (zero-centred for Qwen3-Next)."""

    k: torch.Tensor
    v: torch.Tensor
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    zero_centered: bool = False


def _prologue_args(prologue: DecodePrologue | None, q: torch.Tensor) -> dict:
    """The kernel arguments of a prologue (dummies and PROLOGUE off without one)."""
    if prologue is None:
        return dict(k_new_ptr=q, v_new_ptr=q, q_w_ptr=q, k_w_ptr=q, cos_ptr=q, sin_ptr=q, slot_ptr=q, eps=0.0,
                    stride_kn=0, stride_knh=0, stride_vn=0, stride_vnh=0, stride_cos=0, stride_sin=0,
                    PROLOGUE=False, ROT_DIM=2, HALF_ALIGN=1, ZERO_CENTERED=False)
    p = prologue
    n, num_kv_heads, head_dim = p.k.shape[0], p.k.shape[1], q.shape[2]
    rot_dim = p.cos.shape[-1]
    assert p.k.shape == p.v.shape == (n, num_kv_heads, head_dim) and q.shape[0] == n, (q.shape, p.k.shape)
    assert q.stride(2) == p.k.stride(2) == p.v.stride(2) == 1, "channels must be contiguous"
    assert rot_dim % 2 == 0 and 0 < rot_dim <= head_dim and p.sin.shape == p.cos.shape == (n, rot_dim)
    assert p.cos.stride(1) == p.sin.stride(1) == 1 and p.q_weight.is_contiguous() and p.k_weight.is_contiguous()
    assert p.slot_mapping.shape == (n,)
    half = rot_dim // 2
    return dict(k_new_ptr=p.k, v_new_ptr=p.v, q_w_ptr=p.q_weight, k_w_ptr=p.k_weight, cos_ptr=p.cos, sin_ptr=p.sin,
                slot_ptr=p.slot_mapping, eps=p.eps, stride_kn=p.k.stride(0), stride_knh=p.k.stride(1),
                stride_vn=p.v.stride(0), stride_vnh=p.v.stride(1), stride_cos=p.cos.stride(0),
                stride_sin=p.sin.stride(0), PROLOGUE=True, ROT_DIM=rot_dim, HALF_ALIGN=min(16, half & -half),
                ZERO_CENTERED=bool(p.zero_centered))


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int | None = None, num_splits: int | None = None,
                           min_tiles_per_split: int | None = None, last_split_merge: bool | None = None,
                           prologue: DecodePrologue | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, tile: int | None = None) -> torch.Tensor:
    """Decode attention: q [N, Hq, D] (one token per sequence) -> [N, Hq, D].

    Caches are `[blocks, block_size, Hk, D]`; `block_tables` [N, width] int32 (entries past a
    sequence's blocks are never read); `seq_lens` [N] int32 on the device, each >= 1.
    `max_seq_len` is a host-side upper bound of `seq_lens` (default: the table's capacity); with
    `num_splits` unset it picks the split count (`choose_num_splits`), so the grid depends only on
    (batch size, bound) and the call can be captured in a CUDA graph. `min_tiles_per_split` is the
    floor of 64-token tiles per split (None: `MIN_TILES_PER_SPLIT`; 1: no floor); it is a runtime
    kernel argument, so changing it compiles nothing. `last_split_merge` (None: `LAST_SPLIT_MERGE`):
    merge the splits in the attention kernel, no merge launch. `prologue`: q (then any token/head
    strides) and the prologue's k/v are the step's raw projections; the kernel norms and rotates them
    and stores k/v in the cache first, with the same arithmetic as `fused_qk_norm_rope_store` (same bits).
    `tile` / `num_warps` / `num_stages` (None: `TILE` / `NUM_WARPS` / `NUM_STAGES`) are the split kernel's
    tokens per tile-loop step and launch options; the split arithmetic counts tiles of `tile` tokens."""
    assert triton is not None, "triton is not installed"
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert num_heads == group * num_kv_heads and v_cache.shape == k_cache.shape
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0, \
        "head_dim (>= 16) and block_size must be powers of two"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and q.stride(2) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    tile = tile or TILE
    assert tile >= 16 and tile & (tile - 1) == 0, f"tile must be a power of two >= 16, got {tile}"
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, bound, q.device, tile=tile)
    num_splits = max(1, int(num_splits))
    min_tiles = max(1, int(min_tiles_per_split if min_tiles_per_split is not None else MIN_TILES_PER_SPLIT))
    split = num_splits > 1
    merge_here = split and (LAST_SPLIT_MERGE if last_split_merge is None else bool(last_split_merge))
    if split:
        m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # unused
    counters = _arrival_counters(q.device, num_seqs * num_kv_heads) if merge_here else seq_lens
    splits_pad = triton.next_power_of_2(max(num_splits, MAX_SPLITS))  # the in-kernel merge's (opt-in) tile
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m, l, acc, counters, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_splits, num_heads, min_tiles, **_prologue_args(prologue, q),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), MIN_ROWS), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=tile, SPLIT=split, MERGE=merge_here, SPLITS_PAD=splits_pad,
        CHUNK=MERGE_CHUNK, IEEE=k_cache.dtype == torch.float32, num_warps=num_warps or NUM_WARPS,
        num_stages=num_stages or NUM_STAGES, **pdl_launch(q.device))
    if split and not merge_here:
        _paged_decode_merge_kernel[(num_seqs, num_heads)](
            m, l, acc, seq_lens, out, num_splits, num_heads, min_tiles, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, CHUNK=merge_chunk(num_splits), TILE_N=tile, num_warps=4, **pdl_launch(q.device))
    return out
