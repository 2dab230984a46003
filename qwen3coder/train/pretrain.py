"""Pretraining: next-token prediction on packed sequences of the tokenized corpus.

The token stream (documents joined by `<|endoftext|>`, FIM chunks already in PSM form) is cut into
windows of `seq_len + 1` tokens; each epoch visits the windows in a seeded random order with a seeded
offset, so batch `(step, micro)` is a pure function of the seed — what makes resuming exact. Attention
runs across document boundaries inside a window, as in GPT-style packed pretraining; the separator
tells the model where a document ends.

The model is `qwen3coder.models.build_model(config)` with `init_weights` and the training MoE
dispatch (`qwen3coder.train.model_utils`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen3coder.config import ModelConfig
from qwen3coder.models import CausalLM, build_model
from qwen3coder.train.loop import LoopConfig, LoopState, lm_loss, train_loop
from qwen3coder.train.model_utils import init_weights, install_moe_dispatch
from qwen3coder.train.profiles import PretrainConfig


class TokenWindows:
    """Seeded random windows of `seq_len + 1` tokens over a 1-D token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int) -> None:
        if tokens.size < seq_len + 2:
            raise ValueError(f"the token stream has {tokens.size} tokens, fewer than one window of {seq_len + 1}; "
                             "collect more data or lower seq_len")
        self.tokens, self.seq_len, self.batch, self.seed = tokens, seq_len, batch, seed
        self.n_windows = (tokens.size - 1) // seq_len
        self._epoch: tuple[int, np.ndarray, int] | None = None

    def _perm(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            span = self.tokens.size - 1 - self.n_windows * self.seq_len
            offset = int(rng.integers(0, span + 1)) if span > 0 else 0
            self._epoch = (epoch, rng.permutation(self.n_windows), offset)
        return self._epoch[1], self._epoch[2]

    def sample(self, index: int) -> np.ndarray:
        """Window number `index` of the infinite sequence of epochs: [seq_len + 1] int64."""
        epoch, k = divmod(index, self.n_windows)
        perm, offset = self._perm(epoch)
        start = offset + int(perm[k]) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1].astype(np.int64)

    def batch_at(self, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.sample(batch_index * self.batch + i) for i in range(self.batch)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def epochs(self, batches: int) -> float:
        return batches * self.batch / self.n_windows


def loop_config(cfg: PretrainConfig) -> LoopConfig:
    return LoopConfig(
        name="pretrain", lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
        time_budget_s=cfg.time_budget_s, schedule="cosine", min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, betas=cfg.betas, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum,
        aux_loss_coef=cfg.aux_loss_coef, replan_until=cfg.replan_until, log_every=cfg.log_every,
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, dtype=cfg.dtype)


def new_model(config: ModelConfig, seed: int, device: torch.device) -> CausalLM:
    torch.manual_seed(seed)
    model = build_model(config)
    init_weights(model, config.initializer_range)
    return model.to(device)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def evaluate_windows(model: CausalLM, windows: TokenWindows, batches: int, device: torch.device,
                     dtype: str) -> float:
    """Mean cross-entropy over the first `batches` held-out batches (always the same ones)."""
    model.eval()
    losses = []
    for b in range(batches):
        inputs, targets = windows.batch_at(b)
        _, ce, _ = lm_loss(model, inputs.to(device), targets.to(device), 0.0, device, dtype)
        losses.append(ce.item())
    return float(np.mean(losses))


def run_pretrain(config: ModelConfig, cfg: PretrainConfig, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 out_dir: str | os.PathLike, resume: bool = False, stop_after: int | None = None,
                 device: torch.device | None = None, log: Any = print) -> tuple[CausalLM, LoopState]:
    """Build, train and return the model (and the loop state) — checkpoints go to `out_dir`."""
    device = device or pick_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype if device.type == "cuda" else "float32"
    model = new_model(config, cfg.seed, device)
    mode = install_moe_dispatch(model, cfg.moe_dispatch, device, log)
    total, active = config.num_params()
    log(f"[pretrain] Qwen3-MoE {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), MoE dispatch "
        f"{mode}, device {device}, {dtype}; {train_tokens.size:,} train / {val_tokens.size:,} held-out tokens")
    train = TokenWindows(train_tokens, cfg.seq_len, cfg.micro_batch, cfg.seed)
    val = TokenWindows(val_tokens if val_tokens.size > cfg.seq_len + 1 else train_tokens, cfg.seq_len,
                       cfg.micro_batch, cfg.seed + 1)
    if cfg.compile and device.type == "cuda":
        model.forward = torch.compile(model.forward)  # type: ignore[method-assign]
        log("[pretrain] torch.compile enabled")
    lc = loop_config(cfg)
    lc.dtype = dtype

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return train.batch_at(step * cfg.grad_accum + micro)

    state = train_loop(model, lc, get_batch, device, out_dir, cfg.micro_batch * cfg.grad_accum * cfg.seq_len,
                       cfg.seq_len, evaluate=lambda: evaluate_windows(model, val, cfg.eval_batches, device, dtype),
                       resume=resume, stop_after=stop_after, log=log)
    log(f"[pretrain] done: {state.step} steps, {state.tokens:,} tokens "
        f"({train.epochs(state.step * cfg.grad_accum):.2f} epochs) in {state.train_seconds:.0f}s")
    if cfg.compile and "forward" in model.__dict__:
        del model.forward
    return model, state


def save_tokens(path: str | os.PathLike, tokens: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tokens)


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path} is missing; rerun the tokenizer stage")
    return np.load(path, mmap_mode="r")
