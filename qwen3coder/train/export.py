"""Export the trained model as a Hugging Face checkpoint directory.

Files: `config.json` (`ModelConfig.to_hf()`, model_type qwen3_moe), `model.safetensors` (bf16, the
tensor names of the released Qwen3-Coder checkpoints: separate q/k/v and gate/up projections,
per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`; no `lm_head.weight` with tied embeddings),
`tokenizer.json`, `tokenizer_config.json` (chat template inline), `chat_template.jinja`,
`generation_config.json`, a short `README.md` and `train_meta.json` (training figures, read by
`qwen3coder.eval`). The directory loads with
`qwen3coder.load_model` / `qwen3coder.LLM` and with transformers' `AutoModelForCausalLM` /
`AutoTokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen3coder.chat.tokenizer import Tokenizer
from qwen3coder.models import CausalLM
from qwen3coder.models.layers.moe import Experts
from qwen3coder.train.chat_template import TEMPLATE
from qwen3coder.train.tokenizer import save_tokenizer

GENERATION_DEFAULTS: dict[str, Any] = {
    "do_sample": True, "temperature": 0.3, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
}


def hf_state_dict(model: CausalLM, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names, the packed parameters split back."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, param in model.named_parameters():
        t = param.detach().to("cpu", dtype)
        owner_name, _, leaf = name.rpartition(".")
        owner: nn.Module | None = modules.get(owner_name)
        if isinstance(owner, Experts):
            i = owner.intermediate_size
            for e in range(owner.num_experts):
                base = f"{owner_name}.{e}"
                if leaf == "gate_up_proj":
                    out[f"{base}.gate_proj.weight"] = t[e, :i].contiguous()
                    out[f"{base}.up_proj.weight"] = t[e, i:].contiguous()
                else:
                    out[f"{base}.down_proj.weight"] = t[e].contiguous()
            continue
        if owner is not None and owner_name.rpartition(".")[2] in ("qkv_proj", "gate_up_proj"):
            parent = modules[owner_name.rpartition(".")[0]]
            prefix = owner_name.rpartition(".")[0]
            for shard_name, idx in parent.packed_shards.items():
                out[f"{prefix}.{shard_name}.{leaf}"] = t[parent.shard_slices()[idx]].contiguous()
            continue
        if name == "lm_head.weight" and tied:
            continue
        out[name] = t.contiguous()
    return out


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": tok.pad_token_id, **GENERATION_DEFAULTS}


def export_model(model: CausalLM, tok: Tokenizer, out_dir: str | os.PathLike,
                 summary: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint directory (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(
        eos_token_id=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        pad_token_id=tok.pad_token_id, bos_token_id=None, torch_dtype="bfloat16")
    config.save(out)
    tensors = hf_state_dict(model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tok, out, TEMPLATE)
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok), indent=2) + "\n",
                                                encoding="utf-8")
    (out / "README.md").write_text(model_card(config, summary or {}), encoding="utf-8")
    (out / "train_meta.json").write_text(json.dumps(train_meta(config, summary or {}), indent=2) + "\n",
                                         encoding="utf-8")
    return out


def train_meta(config: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """`train_meta.json`: what `qwen3coder.eval` reports beside its scores (train_tokens & co.)."""
    total, active = config.num_params()
    keys = ("profile", "device", "pretrain_steps", "pretrain_tokens", "pretrain_loss", "pretrain_val_loss",
            "pretrain_tok_per_s", "sft_steps", "sft_loss", "sft_val_loss", "seconds", "data")
    meta = {k: summary[k] for k in keys if k in summary}
    meta.update(train_tokens=summary.get("pretrain_tokens"), params_total=total, params_active=active)
    return meta


def model_card(config: Any, summary: dict[str, Any]) -> str:
    total, active = config.num_params()
    lines = [
        "# qwen3coder-tiny", "",
        "The small default model bundled with qwen3coder: the Qwen3-Coder (Qwen3-MoE) architecture at "
        f"{total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active per token), trained from scratch by "
        "`qwen3coder train --profile gpu` on source code found on the training machine (Python stdlib, "
        "site-packages, system headers), then instruction-tuned on conversations generated from that code.",
        "", "It speaks ChatML with the Qwen3-Coder tool-call format and fill-in-the-middle tokens, but it is "
        "tiny: expect plausible-looking code, not correct programs.", "",
        f"* layers {config.num_hidden_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads} "
        f"(KV {config.num_key_value_heads}), experts {config.num_experts} (top-{config.num_experts_per_tok}, "
        f"intermediate {config.moe_intermediate_size}), vocab {config.vocab_size}, tied embeddings",
    ]
    for key in ("pretrain_tokens", "pretrain_val_loss", "sft_val_loss", "device"):
        if key in summary:
            lines.append(f"* {key.replace('_', ' ')}: {summary[key]}")
    lines += ["", "See docs/TRAINING.md in the qwen3coder repository for how it was made.", ""]
    return "\n".join(lines)
