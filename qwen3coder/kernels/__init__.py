"""Compute kernels. Each fast (Triton) kernel sits beside the plain-PyTorch reference it is tested against.

The model layers call `use_triton(tensor)`: Triton kernels run for CUDA tensors when triton is
installed and autograd is off (they are inference kernels: no backward), unless
`QWEN3CODER_KERNELS=torch` asks for the reference path everywhere. Training therefore always takes
the differentiable PyTorch path.

On Hopper and later every Triton kernel here is launched with programmatic dependent launch
(`kernels.pdl`: a kernel's launch overlaps its predecessor's run; `QWEN3CODER_PDL=0` turns it off).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    _TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    _TRITON = False


_ENABLED = _TRITON and os.environ.get("QWEN3CODER_KERNELS", "triton") != "torch"  # read once: hot path


def triton_enabled() -> bool:
    return _ENABLED


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and not torch.is_grad_enabled() and triton_enabled()


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` zeroed int32 counters per device for kernels whose last program to arrive finishes a
    reduction (`kernels.moe_gemv`, `kernels.paged_attention`); every launch leaves them at 0 again, and
    launches of one stream never overlap in their use (PDL kernels touch them only after their wait).
    Grown only outside CUDA-graph capture (graphs are captured after an eager warm-up of the same shapes)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "arrival counters must be allocated before CUDA-graph capture (run the step once eagerly)"
        if counters is not None:
            _RETIRED.append(counters)  # graphs captured earlier may still use it: never freed
        counters = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return counters
