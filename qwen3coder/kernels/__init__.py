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
