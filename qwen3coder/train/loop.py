"""The optimisation loop shared by pretraining and SFT.

AdamW (fused on CUDA; weight decay on matrices only), linear warm-up then cosine decay to
`min_lr_ratio` (pretraining) or linear decay to 0 (SFT), bf16 autocast on CUDA, gradient accumulation,
clipping, cross-entropy plus `coef ×` Qwen3's load-balancing loss, a wall-clock budget, checkpoints
that resume bit-for-bit (model, optimizer, schedule, RNG, step), and metrics as JSON (+ PNG when
matplotlib is installed).

With a time budget the planned number of steps — what the schedule is defined over — is re-estimated
from the measured step time until `replan_until` of the run is done, then frozen; the loop ends at
the planned step or when the budget is spent, whichever comes first.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from qwen3coder.train.model_utils import flops_per_token, load_balancing_loss, peak_flops, router_logits

# inputs [B, T], targets [B, T] (-100 = no loss), optionally a token mask [B, T] (False = padding)
Batch = tuple[torch.Tensor, ...]


@dataclass
class LoopConfig:
    name: str
    lr: float
    warmup_steps: int
    max_steps: int
    time_budget_s: float | None
    schedule: str = "cosine"  # cosine | linear
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    aux_loss_coef: float = 0.01
    replan_until: float = 0.3
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 500
    dtype: str = "bfloat16"


@dataclass
class LoopState:
    step: int = 0
    planned_steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def lr_at(cfg: LoopConfig, step: int, planned: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `planned`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, planned - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=device.type == "cuda")


def autocast(device: torch.device, dtype: str) -> Any:
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return torch.autocast(device.type, enabled=False)


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, aux_coef: float,
            device: torch.device, dtype: str, token_mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, cross-entropy, aux) for one micro-batch; -100 targets carry no loss, tokens where
    `token_mask` is False (padding) are left out of the load-balancing statistics."""
    cfg = model.config
    with autocast(device, dtype):
        logits = model(inputs)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    logits_r = router_logits(model)
    if not logits_r or aux_coef == 0:
        aux = torch.zeros((), device=device)
    else:
        aux = load_balancing_loss(logits_r, cfg.num_experts, cfg.num_experts_per_tok, token_mask)
    return ce + aux_coef * aux, ce, aux


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    state: LoopState, extra: dict[str, Any] | None = None) -> None:
    tmp = f"{path}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": asdict(state),
                "rng": rng_state(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer | None
                    ) -> tuple[LoopState, dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    if opt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return LoopState(**ckpt["state"]), ckpt.get("extra", {})


def train_loop(model: torch.nn.Module, cfg: LoopConfig, get_batch: Callable[[int, int], Batch],
               device: torch.device, out_dir: str | os.PathLike, tokens_per_step: int, seq_len: int,
               evaluate: Callable[[], float] | None = None, resume: bool = False,
               stop_after: int | None = None, log: Any = print) -> LoopState:
    """Train until the planned step or the time budget; `get_batch(step, micro)` gives micro-batches.

    `stop_after` ends the run after that many steps with a checkpoint, as an interruption would
    (tests use it to check that resuming continues identically).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / f"{cfg.name}_checkpoint.pt"
    opt = make_optimizer(model, cfg, device)
    state = LoopState(planned_steps=cfg.max_steps)
    if resume and ckpt_path.is_file():
        state, _ = load_checkpoint(ckpt_path, model, opt)
        log(f"[{cfg.name}] resumed from {ckpt_path} at step {state.step}/{state.planned_steps}")
    fpt = flops_per_token(model.config, seq_len)
    peak = peak_flops(device)
    model.train()
    t_start = time.time() - state.train_seconds
    t_last, tok_last, step_last = time.time(), state.tokens, state.step
    replan_times: list[float] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    while state.step < state.planned_steps:
        lr = lr_at(cfg, state.step, state.planned_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = [t.to(device, non_blocking=True) for t in get_batch(state.step, micro)]
            mask = batch[2] if len(batch) > 2 else None
            loss, ce, aux = lm_loss(model, batch[0], batch[1], cfg.aux_loss_coef, device, cfg.dtype, mask)
            (loss / cfg.grad_accum).backward()
            pending.append((ce.detach(), aux.detach()))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step
        elapsed = time.time() - t_start
        state.train_seconds = elapsed
        last = state.step >= state.planned_steps or (cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s)
        if state.step % cfg.log_every == 0 or last or state.step == stop_after:
            vals = torch.stack([torch.stack(p) for p in pending]).float().mean(0).tolist()
            pending.clear()
            if not math.isfinite(vals[0]):
                raise FloatingPointError(f"[{cfg.name}] loss is {vals[0]} at step {state.step}; lower the learning rate")
            now = time.time()
            dt = max(1e-9, now - t_last)
            tps = (state.tokens - tok_last) / dt
            rec = {"step": state.step, "loss": round(vals[0], 5), "aux": round(vals[1], 5), "lr": lr,
                   "tokens": state.tokens, "tok_per_s": round(tps, 1), "elapsed_s": round(elapsed, 2),
                   "mfu": round(tps * fpt / peak, 4) if peak else None}
            state.history.append(rec)
            log(f"[{cfg.name}] step {state.step}/{state.planned_steps} loss {vals[0]:.4f} aux {vals[1]:.4f} "
                f"lr {lr:.2e} {tps:,.0f} tok/s" + (f" mfu {rec['mfu']:.1%}" if peak else "")
                + f" {elapsed:.0f}s")
            if len(state.history) > 1:  # the first interval includes start-up and warm-up costs
                replan_times.append(dt / (state.step - step_last))
            t_last, tok_last, step_last = now, state.tokens, state.step
            if cfg.time_budget_s is not None and replan_times and \
                    state.step < cfg.replan_until * state.planned_steps:
                per_step = sum(replan_times[-3:]) / len(replan_times[-3:])
                state.planned_steps = min(cfg.max_steps, state.step + max(1, int((cfg.time_budget_s - elapsed) / per_step)))
        if evaluate is not None and (state.step % cfg.eval_every == 0 or last):
            val = evaluate()
            model.train()
            state.evals.append({"step": state.step, "val_loss": round(val, 5)})
            log(f"[{cfg.name}] step {state.step} val loss {val:.4f}")
            t_last = time.time()  # evaluation time is not training throughput
        if state.step % cfg.checkpoint_every == 0 or state.step == stop_after:
            save_checkpoint(ckpt_path, model, opt, state)
        if state.step == stop_after or (cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s):
            break
    save_checkpoint(ckpt_path, model, opt, state)
    write_metrics(state, out, cfg.name, log)
    return state


def write_metrics(state: LoopState, out: Path, name: str, log: Any = print) -> None:
    """`{name}_metrics.json` and, with matplotlib, `{name}_loss.png`."""
    (out / f"{name}_metrics.json").write_text(json.dumps(
        {"step": state.step, "planned_steps": state.planned_steps, "tokens": state.tokens,
         "train_seconds": round(state.train_seconds, 2), "history": state.history, "evals": state.evals},
        indent=1) + "\n", encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"[{name}] matplotlib is not installed: skipping the loss plot ({name}_metrics.json has the curve)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in state.history], [h["loss"] for h in state.history], label="train")
    if state.evals:
        ax.plot([e["step"] for e in state.evals], [e["val_loss"] for e in state.evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"qwen3coder-tiny {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}_loss.png", dpi=100)
    plt.close(fig)
