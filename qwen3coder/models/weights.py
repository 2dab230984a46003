"""Map Hugging Face checkpoint tensor names onto qwen3coder's (packed) parameters.

Checkpoints name tensors the transformers way; qwen3coder packs some of them for speed:

| checkpoint tensor                                   | parameter (slice)                                   |
|-----------------------------------------------------|-----------------------------------------------------|
| `…self_attn.{q,k,v}_proj.{weight,bias}`             | `…self_attn.qkv_proj.*` rows of q / k / v           |
| `…mlp.{gate,up}_proj.weight` (dense, shared expert) | `…gate_up_proj.weight` rows of gate / up            |
| `…mlp.experts.{e}.{gate,up}_proj.weight`            | `…mlp.experts.gate_up_proj[e]` rows of gate / up    |
| `…mlp.experts.{e}.down_proj.weight`                 | `…mlp.experts.down_proj[e]`                         |
| `…mlp.experts.gate_up_proj` / `down_proj` (tf 5)    | the same packed parameter, whole                    |
| `mtp.*` (Qwen3-Next multi-token prediction)         | skipped, with a log line                            |

Everything else maps by identical name. `WeightLoader` copies each tensor into its slice, checks the
shape, and at the end that every parameter was filled exactly once; errors name the tensor (and the
file, which the caller adds).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger("qwen3coder.loader")

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


class WeightError(ValueError):
    """A checkpoint tensor that does not fit the model: unknown, mis-shaped, duplicated or missing."""


@dataclass
class Target:
    param: str  # qwen3coder parameter name
    index: tuple  # indexing into the parameter (() = whole)
    key: str  # identifies the filled region, to catch duplicates


def resolve(model: nn.Module, name: str, params: dict[str, nn.Parameter]) -> Target | None:
    """Where checkpoint tensor `name` goes; None for tensors deliberately skipped (mtp.*)."""
    if name.startswith("mtp."):
        return None
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return None  # tied to embed_tokens, which is loaded under its own name
    if name in params:
        return Target(name, (), name)
    m = _EXPERT.match(name)
    if m:
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        experts = model.get_submodule(prefix)
        if expert >= experts.num_experts:
            raise WeightError(f"tensor {name}: expert {expert} but the model has {experts.num_experts} experts")
        if proj == "down_proj":
            return Target(f"{prefix}.down_proj", (expert,), name)
        i = experts.intermediate_size
        rows = slice(0, i) if proj == "gate_proj" else slice(i, 2 * i)
        return Target(f"{prefix}.gate_up_proj", (expert, rows), name)
    m = _PACKED.match(name)
    if m:
        prefix, proj, kind = m.groups()
        packed = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}[proj]
        try:
            owner = model.get_submodule(prefix)
        except AttributeError:
            owner = None
        if owner is not None and f"{prefix}.{packed}.{kind}" in params:
            shard = owner.packed_shards[proj]
            return Target(f"{prefix}.{packed}.{kind}", (owner.shard_slices()[shard],), name)
    raise WeightError(f"unexpected tensor {name!r}: the model has no parameter for it")


class WeightLoader:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.filled: dict[str, int] = {n: 0 for n in self.params}
        self.seen: set[str] = set()
        self.used_names: set[str] = set()
        self.skipped: list[str] = []

    def target(self, name: str) -> Target | None:
        return resolve(self.model, name, self.params)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        target = self.target(name)
        if target is None:
            self.skipped.append(name)
            return
        if target.key in self.seen:
            raise WeightError(f"tensor {name!r} appears twice")
        param = self.params[target.param]
        dest = param.data[target.index] if target.index else param.data
        if tuple(dest.shape) != tuple(tensor.shape):
            raise WeightError(f"tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                              f"{list(dest.shape)} (parameter {target.param})")
        with torch.no_grad():
            dest.copy_(tensor)
        self.seen.add(target.key)
        self.used_names.add(name)
        self.filled[target.param] += tensor.numel()

    def check_complete(self) -> None:
        if self.skipped:
            mtp = [n for n in self.skipped if n.startswith("mtp.")]
            if mtp:
                logger.info("skipped %d multi-token-prediction tensors (mtp.*): not used for inference", len(mtp))
        missing = [n for n, p in self.params.items() if self.filled[n] != p.numel()]
        if missing:
            partial = [n for n in missing if self.filled[n]]
            shown = ", ".join(missing[:8]) + (f" … ({len(missing)} in all)" if len(missing) > 8 else "")
            detail = f"; partially filled: {', '.join(partial[:4])}" if partial else ""
            raise WeightError(f"checkpoint is missing tensors for parameters: {shown}{detail}")
