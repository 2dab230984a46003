"""Training-side helpers for the serving model: init, MoE dispatch for training, aux loss, FLOPs.

The model is `qwen3coder.models.build_model(config)` — the code that serves. Its MoE reference path
loops over experts with a host sync per layer (`bincount(...).tolist()`), which is fine for
inference tests and slow for training, so `install_moe_dispatch` swaps the `forward` of each
`Experts` module (parameters untouched, same math) for one of:

* `grouped` — tokens sorted by expert, both expert matmuls as one `torch._grouped_mm` each (bf16,
  CUDA sm90 and the CPU fallback), no host sync; what torchtitan trains MoEs with;
* `dense` — every expert on every token, combined with the (mostly zero) routing weights: E/k times
  the expert FLOPs but static shapes and plain batched matmuls; the safe fallback;
* `reference` — the serving path unchanged.

`auto` picks `grouped` on CUDA when a probe on the device matches `dense` (forward and gradients),
else `dense`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwen3coder.models.layers.moe import Experts, SparseMoeBlock, moe_forward_reference

MoeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def moe_dense(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · Expert_{id_k}(x) computed as Σ_e combine[:, e] · Expert_e(x) over all experts."""
    num_experts = gate_up.shape[0]
    combine = torch.zeros(x.shape[0], num_experts, dtype=topk_weights.dtype, device=x.device)
    combine = combine.scatter(1, topk_ids, topk_weights)
    h = torch.matmul(x.unsqueeze(0), gate_up.transpose(1, 2))  # [E, N, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch.matmul(F.silu(gate) * up, down.transpose(1, 2))  # [E, N, H]
    out = torch.einsum("enh,ne->nh", y, combine.to(y.dtype))
    return out.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else out


def moe_grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    """The same sum with tokens sorted by expert and `torch._grouped_mm` (bf16) per projection."""
    n, k = topk_ids.shape
    num_experts = gate_up.shape[0]
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    offs = _counts(flat, num_experts).cumsum(0).to(torch.int32)
    dt = torch.bfloat16
    xs = x[token].to(dt)
    h = torch._grouped_mm(xs, gate_up.to(dt).transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = (F.silu(gate) * up).contiguous()
    y = torch._grouped_mm(a, down.to(dt).transpose(1, 2), offs=offs)
    y = y.float() * topk_weights.reshape(-1)[order, None].float()
    out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, token, y)
    return out.to(x.dtype)


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """`bincount(ids, minlength=n)` without the host sync CUDA's bincount does."""
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


DISPATCH: dict[str, MoeFn] = {"dense": moe_dense, "grouped": moe_grouped, "reference": moe_forward_reference}


def probe_grouped(device: torch.device, hidden: int, inter: int, experts: int, top_k: int) -> str | None:
    """None if `moe_grouped` works on `device` and matches `moe_dense`; else why not."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(203, hidden, generator=g).to(device).requires_grad_(True)
        gu = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.05).to(device).requires_grad_(True)
        dn = (torch.randn(experts, hidden, inter, generator=g) * 0.05).to(device).requires_grad_(True)
        logits = torch.randn(203, experts, generator=g).to(device)
        logits[:, -1] = -1e4  # one expert gets no tokens: an empty group must work too
        w, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
        outs, grads = [], []
        for fn in (moe_grouped, moe_dense):
            xb = x.to(torch.bfloat16).float()
            out = fn(xb, gu.to(torch.bfloat16).float(), dn.to(torch.bfloat16).float(), w, ids)
            gx, ggu = torch.autograd.grad(out.float().square().sum(), (x, gu))
            outs.append(out.float())
            grads.append((gx.float(), ggu.float()))
        scale = outs[1].abs().max().item() + 1e-6
        err = (outs[0] - outs[1]).abs().max().item() / scale
        gerr = max(((a - b).abs().max() / (b.abs().max() + 1e-6)).item() for a, b in zip(grads[0], grads[1]))
        if not (err < 3e-2 and gerr < 3e-2):
            return f"grouped MoE disagrees with dense (rel err {err:.3g}, grad {gerr:.3g})"
        return None
    except Exception as e:  # any failure of the experimental op means: use the dense path
        return f"{type(e).__name__}: {e}"


def install_moe_dispatch(model: nn.Module, mode: str, device: torch.device, log: Any = print) -> str:
    """Set every `Experts.forward` to the `mode` dispatch and keep router logits; returns the mode used."""
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if mode not in ("auto", *DISPATCH):
        raise ValueError(f"unknown moe_dispatch {mode!r}; choose auto, {', '.join(DISPATCH)}")
    if experts and mode == "auto":
        mode = "dense"
        if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
            e = experts[0]
            why = probe_grouped(device, e.gate_up_proj.shape[2], e.intermediate_size, e.num_experts,
                                _top_k(model))
            mode = "grouped" if why is None else "dense"
            log(f"[moe] grouped-mm probe: {'ok' if why is None else why}")
    for e in experts:
        fn = DISPATCH[mode]
        e.forward = functools.partial(_experts_forward, e, fn)  # instance attribute: weights untouched
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            m.keep_router_logits = True
    return mode


def _top_k(model: nn.Module) -> int:
    return next(m.top_k for m in model.modules() if isinstance(m, SparseMoeBlock))


def _experts_forward(module: Experts, fn: MoeFn, x: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, align: tuple[torch.Tensor, torch.Tensor] | None = None,
                     reduce: bool = True) -> torch.Tensor:
    """`Experts.forward` through `fn`; a precomputed alignment (fused routing, int32 ids) is not used.
    `reduce=False` (asked on the Triton path, e.g. evaluation under no_grad) returns the sum as one
    partial [N, 1, H], as `Experts.forward` does off the fused kernel."""
    out = fn(x, module.gate_up_proj, module.down_proj, topk_weights, topk_ids.long())
    return out if reduce else out.unsqueeze(1)


def router_logits(model: nn.Module) -> list[torch.Tensor]:
    """The router logits of the last forward, one [N, E] tensor per MoE layer (then cleared)."""
    out = []
    for m in model.modules():
        if isinstance(m, SparseMoeBlock) and m.router_logits is not None:
            out.append(m.router_logits)
            m.router_logits = None
    return out


def load_balancing_loss(logits: list[torch.Tensor], num_experts: int, top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer aux loss exactly as transformers' `load_balancing_loss_func` (Qwen3-MoE):
    E · Σ_e f_e · P_e with f_e the share of top-k assignments (summed over k) and P_e the mean router
    probability, both over all layers' tokens; `mask` [N] (1 = real token) leaves out padding."""
    if not logits:
        raise ValueError("no router logits recorded; was install_moe_dispatch called?")
    cat = torch.cat([lg.float() for lg in logits], dim=0)
    probs = torch.softmax(cat, dim=-1)
    selected = probs.topk(top_k, dim=-1).indices
    if mask is None:
        counts = _counts(selected.reshape(-1), num_experts).float()
        rows = float(cat.shape[0])
        prob_sum = probs.sum(0)
    else:
        m = mask.reshape(-1).float().repeat(len(logits))
        counts = torch.zeros(num_experts, device=cat.device).scatter_add_(
            0, selected.reshape(-1), m.repeat_interleave(top_k))
        rows = m.sum()
        prob_sum = (probs * m[:, None]).sum(0)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) matrices, output projections scaled by 1/sqrt(2·layers), norms at 1."""
    layers = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            p.normal_(0.0, std / math.sqrt(2 * layers))
        else:
            p.normal_(0.0, std)


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 × active matmul parameters + causal attention scores."""
    _, active = config.num_params()
    if not config.tie_word_embeddings:
        active -= config.vocab_size * config.hidden_size  # the input embedding is a lookup
    attn = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * active + attn


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known accelerators (for MFU); None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
                       ("L40S", 362e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None
