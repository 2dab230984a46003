"""Training on the GPU takes the differentiable path: every parameter receives a gradient.

(The Triton kernels have no backward; a forward with autograd on must not use them.)
"""

from __future__ import annotations

import pytest
import torch

from qwen3coder.config import ModelConfig
from qwen3coder.loader import build_dummy_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
def test_every_parameter_gets_a_gradient_on_cuda(preset):
    cfg = ModelConfig.preset(preset)
    model = build_dummy_model(cfg, device="cuda", dtype=torch.float32).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device="cuda")
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
