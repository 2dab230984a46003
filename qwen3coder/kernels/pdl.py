"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step.

A batch-1 decode step of Qwen3-30B-A3B is ~500 small kernels of 2-15 µs: every kernel boundary costs
the next grid's launch and ramp-up (its CTAs being placed, their prologue) on top of the kernels' own
time. On Hopper and later, a kernel launched with the attribute "programmatic stream serialization"
(Triton: `launch_pdl=True`) may start while its predecessor in the stream still runs, as soon as every
CTA of the predecessor has executed `griddepcontrol.launch_dependents`; it must then execute
`griddepcontrol.wait` — which returns once the predecessor has completed and its memory writes are
visible — before it touches anything the predecessor may write or read. CUDA-graph capture keeps these
programmatic edges, so the decode graphs overlap each kernel's launch with the previous one's run.

The protocol every PDL kernel here follows (`pdl_prologue`, first statement of the kernel, before any
load, store or early return):

1. `gdc_launch_dependents()`: once every CTA of this kernel has executed it (i.e. all are resident),
   the next kernel may launch. Its CTAs execute the same prologue, so the following grids become
   resident one after the other, as SM resources allow, while earlier ones still run: launch and
   CTA placement are off the critical path. A grid launches only once all CTAs of its predecessor are
   resident, so a waiting grid never keeps the grid it waits for from being scheduled (no deadlock).
2. `gdc_wait()`: nothing of this kernel touches memory before its predecessor has completed and its
   writes are visible. Completion is therefore transitive — a completed kernel implies every earlier
   kernel in the stream completed — so a kernel sees everything written before it in stream order,
   and the caching allocator's reuse of a buffer that an earlier kernel still reads is safe, as
   without PDL. (Weights, which no kernel writes, may be read before the wait: `kernels.norm_router`
   loads its router rows first. So may what only the host wrote before the step: the decode attention's
   merge kernel in `kernels.paged_attention` loads the sequence lengths between `pdl_launch_dependents`
   and `pdl_wait`, the two halves of `pdl_prologue`.)

`QWEN3CODER_PDL=wait-first` swaps the two (wait, then let the next grid launch: at most two grids
resident). Measured on an H200 at batch-1 decode of the 30B-A3B (decode graphs, dummy weights): no PDL
~299 tok/s, wait-first ~313, launch-first ~317 (docs/ENGINE.md). Prefetching a skinny GEMM's weights
into L2 before its wait was tried and measured no faster (312.6 vs 314.3 tok/s), so it is not done.

Kernels of other libraries (cuBLAS, PyTorch) in between are fine: they neither trigger early nor wait,
so the stream serialises them as usual. The switch is `QWEN3CODER_PDL` (default on; `0` turns it off)
or `set_pdl_enabled`; it applies on CUDA devices of compute capability >= 9.0 only — the Triton
interpreter and older GPUs launch without it, and `pdl_prologue(0)` compiles to nothing. PDL changes
no arithmetic: outputs are bitwise those of a launch without it (`tests/test_pdl_gpu.py`).
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
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # pragma: no cover - triton without grid dependency control (< 3.3)
    _HAS_GDC = False

_ENABLED = os.environ.get("QWEN3CODER_PDL", "1") != "0"  # read once: hot path
# pdl_prologue's order: 2 = launch the dependents, then wait (default); 1 = wait first ("wait-first")
_MODE = 1 if os.environ.get("QWEN3CODER_PDL", "1") == "wait-first" else 2
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def set_pdl_enabled(enabled: bool) -> None:
    """Switch programmatic dependent launch on or off for the whole process (benchmarks compare the
    two). Kernels compiled for the other setting stay cached; new launches follow the switch."""
    global _ENABLED
    _ENABLED = bool(enabled)


def pdl_enabled() -> bool:
    return _ENABLED


@functools.lru_cache(maxsize=None)
def _supports_pdl(device_index: int) -> bool:
    """NVIDIA Hopper or later (ROCm's capability numbers mean other GPUs, without grid dependency control)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels launched for tensors on `device` use PDL: the switch is on, triton has grid
    dependency control, and `device` is a CUDA device of compute capability >= 9.0 (not the
    interpreter)."""
    if not _ENABLED or not _HAS_GDC or _INTERPRET or device.type != "cuda":
        return False
    return _supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch whose kernel takes the `PDL` constexpr:
    `kernel[grid](..., **pdl_launch(x.device))`."""
    if use_pdl(device):
        return {"PDL": _MODE, "launch_pdl": True}
    return {"PDL": 0}


if _HAS_GDC:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        """First statement of a PDL kernel: let the next grid launch and wait for the predecessor (PDL 2),
        or the other way round (PDL 1); nothing for PDL 0."""
        if PDL == 1:
            gdc_wait()
            gdc_launch_dependents()
        elif PDL == 2:
            gdc_launch_dependents()
            gdc_wait()

    @triton.jit
    def pdl_launch_dependents(PDL: tl.constexpr):
        """The first half of `pdl_prologue`, for a kernel that loads something before its wait (PDL 2:
        let the next grid launch; nothing for PDL 1 or 0). `pdl_wait` must follow before the kernel
        touches anything a kernel in flight may write, and before any return."""
        if PDL == 2:
            gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """The second half of `pdl_prologue`: wait for the predecessor (PDL 2), or wait and then let the
        next grid launch (PDL 1); nothing for PDL 0."""
        if PDL == 1:
            gdc_wait()
            gdc_launch_dependents()
        elif PDL == 2:
            gdc_wait()

elif triton is not None:  # pragma: no cover

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        """No grid dependency control in this triton: `use_pdl` is always False, nothing to do."""
        pass

    @triton.jit
    def pdl_launch_dependents(PDL: tl.constexpr):
        pass

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        pass
