import os
from pathlib import Path

import pytest
import torch

# Triton kernels run through Triton's interpreter where there is no GPU (must be set before the
# kernel modules are imported, i.e. here).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_triton_interpreter() -> None:
    """Triton 3.6's interpreter converts scalars for `range(0, n)` with `int()` on a size-1 1-d numpy
    array, which numpy >= 2.4 refuses; convert through the single element instead."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    _fix_interpreter_bfloat16(interp)


def _fix_interpreter_bfloat16(interp) -> None:
    """Triton 3.6's interpreter keeps bfloat16 as raw uint16 bits; make it compute as the GPU does.

    * fp32 -> bf16 casts truncate (the default mode) or, asked for round-to-nearest, drop the carry
      out of the significand; the GPU rounds to nearest even: do that on the bits.
    * `tl.dot` hands the uint16 bits to `np.matmul` as integers; convert bf16 operands to fp32 first
      (exact) — the GPU multiplies bf16 exactly and accumulates in fp32.
    """
    import numpy as np
    import triton.language as tl

    convert = interp._convert_float
    rtz = getattr(interp._ir.ROUNDING_MODE, "RTZ", None)

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and (rounding_mode is None
                                                                          or rounding_mode != rtz):
            bits = np.frombuffer(input.tobytes(), dtype=np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(np.frombuffer(input.tobytes(), dtype=np.float32))
            rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # stays a (quiet) NaN
            return rounded.reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    interp._convert_float = convert_float
    create_dot = interp.InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(t):
            if t.dtype != tl.bfloat16:
                return t
            return interp.TensorHandle(convert(t.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                       tl.float32)

        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter()

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def reference_dir() -> Path:
    """../shared/reference beside the repository, or skip (a user's clone has no such folder)."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference material not found at {REFERENCE} (only present in the project's workspace)")
    return REFERENCE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run through the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
