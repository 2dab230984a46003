"""L2 prefetch of the next GEMM's weights by a latency-bound kernel of a decode step.

A batch-1 decode step alternates bandwidth-bound kernels (the projections and the MoE, which read
weights) with latency-bound ones (the norms, QK-norm/RoPE, attention over a short context, its merge)
during which HBM is nearly idle. Weights are never written, so a kernel may ask L2 for the *next*
projection's weights before its own programmatic-dependent-launch wait (`kernels.pdl`): the bytes
move while the latency-bound work (and its predecessor's tail) runs, and the projection then reads
them from L2. Two sites do this:

* `"attention"`: decode attention (`kernels.paged_attention`) prefetches the attention output
  projection `o_proj` (4096 -> 2048: 16.8 MB at the 30B-A3B shape) while it and its merge run;
* `"input_norm"`: a decoder layer's input add+RMSNorm (`kernels.rmsnorm`) prefetches the layer's
  `qkv_proj` (2048 -> 5120: 21 MB); the norm's grid gets `PREFETCH_PROGRAMS` extra programs that only
  prefetch (one norm row per program leaves the GPU nearly empty at batch 1).

The prefetch is Hopper's bulk form, `cp.async.bulk.prefetch.L2.global [addr], size`: one instruction
per thread covers a contiguous run of bytes (a multiple of 16), issued without a result register, so
a program does not wait for it. Every (program, thread) of the launch takes its run of the tensor's
bytes (`prefetch_share`). It changes no arithmetic: outputs are bitwise those without it
(tests/test_kernel_l2_prefetch.py on the GPU). It needs compute capability >= 9.0 and is off under
Triton's CPU interpreter (no inline PTX there). `QWEN3CODER_L2_PREFETCH=0` turns it off; `SITES`
lists the sites in use (benchmarks/bench_decode_variants.py compares them).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

ALL_SITES = frozenset({"attention", "input_norm"})
SITES: frozenset[str] = ALL_SITES
PREFETCH_PROGRAMS = 128  # prefetch-only programs added to a norm launch
_ENABLED = os.environ.get("QWEN3CODER_L2_PREFETCH", "1") != "0"  # read once: hot path
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def set_l2_prefetch_enabled(enabled: bool) -> None:
    """Switch the prefetches on or off for the whole process (benchmarks compare the two)."""
    global _ENABLED
    _ENABLED = bool(enabled)


@functools.lru_cache(maxsize=None)
def _supports_bulk_prefetch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def prefetch_target(site: str, weight: torch.Tensor | None) -> torch.Tensor | None:
    """`weight` when `site` should prefetch it: the switch on, `site` in `SITES`, a CUDA device of
    compute capability >= 9.0 (not the interpreter), a contiguous tensor whose start and size are
    multiples of 16 bytes; else None."""
    assert site in ALL_SITES, site
    if weight is None or not _ENABLED or site not in SITES or _INTERPRET or weight.device.type != "cuda":
        return None
    if not weight.is_contiguous() or weight.data_ptr() % 16 or weight.numel() * weight.element_size() % 16:
        return None
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    return weight if _supports_bulk_prefetch(index) else None


def prefetch_launch(target: torch.Tensor | None, fallback: torch.Tensor) -> dict:
    """Keyword arguments of a launch whose kernel takes (pf_ptr, pf_bytes, PREFETCH): the target's
    pointer and byte count, or `fallback` (any tensor; never read) and PREFETCH off."""
    if target is None:
        return {"pf_ptr": fallback, "pf_bytes": 0, "PREFETCH": False}
    return {"pf_ptr": target, "pf_bytes": target.numel() * target.element_size(), "PREFETCH": True}


if triton is not None:

    @triton.jit
    def _bulk_prefetch_l2(ptrs, sizes):
        """`cp.async.bulk.prefetch.L2.global [ptr], size` per element where size > 0 (bytes, a multiple of 16)."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, sizes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def prefetch_runs(pf_bytes, part, num_parts, THREADS: tl.constexpr):
        """Program `part` of `num_parts`: (start, size) of its THREADS runs of `pf_bytes` bytes, one per
        thread: runs of the bytes over num_parts * THREADS rounded up to 16, in order, so they tile
        [0, pf_bytes) (runs past the end have size 0; their start is clamped in bounds)."""
        run = (tl.cdiv(pf_bytes, num_parts * THREADS * 16) * 16).to(tl.int64)
        start = (part * THREADS + tl.arange(0, THREADS)).to(tl.int64) * run
        size = tl.minimum(tl.maximum(pf_bytes - start, 0), run).to(tl.int32)
        return tl.minimum(start, pf_bytes - 16), size

    @triton.jit
    def prefetch_share(pf_ptr, pf_bytes, part, num_parts, THREADS: tl.constexpr):
        """Ask L2 for program `part`'s share (`prefetch_runs`) of the `pf_bytes` bytes at `pf_ptr`."""
        start, size = prefetch_runs(pf_bytes, part, num_parts, THREADS)
        _bulk_prefetch_l2(pf_ptr.to(tl.pointer_type(tl.int8)) + start, size)
