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
