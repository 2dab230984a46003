"""Model configuration: one dataclass for every Qwen3-Coder architecture.

`ModelConfig.from_hf` reads a Hugging Face `config.json` (a path to a checkpoint directory, to the file
itself, or an already-parsed dict) for model types `qwen3` (dense), `qwen3_moe` (Qwen3-Coder 30B-A3B /
480B-A35B) and `qwen3_next` (Qwen3-Coder-Next). Both spellings of the file are accepted: the
transformers-4.5x one that real checkpoints ship (`num_experts`, `rope_theta`, `rope_scaling`,
`partial_rotary_factor`) and the transformers-5 one (`num_local_experts`, `rope_parameters`).

`PRESETS` holds the exact shapes of the released models (see docs/ARCHITECTURE.md) plus tiny ones for
tests; `ModelConfig.preset(name)` returns a fresh copy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_next")
_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model; the message names the field."""


@dataclass
class RopeConfig:
    """Rotary embedding parameters (transformers' `rope_parameters`)."""

    rope_type: str = "default"  # "default" or "yarn"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None  # yarn
    original_max_position_embeddings: int | None = None  # yarn
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class QuantConfig:
    """FP8 block quantization as in Qwen's `-FP8` releases (`quantization_config`)."""

    quant_method: str = "fp8"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    model_type: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 6144  # dense MLP layers (mlp_only_layers / qwen3 dense)
    # mixture of experts (num_experts == 0 -> every layer dense)
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0  # qwen3_next: sigmoid-gated shared expert
    router_aux_loss_coef: float = 0.001
    # attention
    attention_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # qwen3_next: hybrid layout and Gated DeltaNet dims
    layer_types: list[str] | None = None  # "full_attention" | "linear_attention"
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # tokens and dtype
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization: QuantConfig | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.layer_types is None:
            if self.model_type == "qwen3_next":
                self.layer_types = [
                    "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                    for i in range(self.num_hidden_layers)
                ]
            else:
                self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def attention_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_params(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, embeddings and head included."""
        from qwen3coder.models import build_model  # local import: config must not need torch

        import torch

        with torch.device("meta"):
            model = build_model(self)
        total = sum(p.numel() for p in model.parameters())
        inactive = 0
        for name, p in model.named_parameters():
            if ".experts." in name:
                inactive += p.numel() * (self.num_experts - self.num_experts_per_tok) // self.num_experts
        return total, total - inactive

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, field_name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{field_name}': {msg}")

        need(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
             f"unsupported model type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = [t for t in self.layer_types if t not in ("full_attention", "linear_attention")]
        need(not bad, "layer_types", f"unknown layer type(s) {sorted(set(bad))}")
        if self.model_type != "qwen3_next":
            need(all(t == "full_attention" for t in self.layer_types), "layer_types",
                 f"linear_attention layers need model_type qwen3_next, not {self.model_type}")
        if self.num_experts > 0:
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"must be in 1..num_experts ({self.num_experts}), got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.decoder_sparse_step >= 1, "decoder_sparse_step", "must be >= 1")
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        need(not bad_layers, "mlp_only_layers", f"layer indices {bad_layers} out of range")
        rd = self.head_dim * self.rope.partial_rotary_factor
        need(0 < rd <= self.head_dim and int(rd) % 2 == 0 and rd == int(rd), "partial_rotary_factor",
             f"head_dim*partial_rotary_factor must be an even integer, got {rd}")
        need(self.rope.rope_type in ("default", "yarn"), "rope_scaling.rope_type",
             f"unsupported RoPE type {self.rope.rope_type!r} (supported: default, yarn)")
        if self.rope.rope_type == "yarn":
            need(self.rope.factor is not None and self.rope.factor >= 1.0, "rope_scaling.factor",
                 f"YaRN needs factor >= 1, got {self.rope.factor}")
        if self.model_type == "qwen3_next" and self.linear_layer_ids:
            need(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
                 "must be a multiple of linear_num_key_heads")
        if self.quantization is not None:
            q = self.quantization
            need(q.quant_method == "fp8", "quantization_config.quant_method",
                 f"unsupported quantization {q.quant_method!r} (supported: fp8 block-wise)")
            need(len(q.weight_block_size) == 2, "quantization_config.weight_block_size",
                 "must be [block_out, block_in]")
            need(q.activation_scheme in ("dynamic",), "quantization_config.activation_scheme",
                 f"unsupported activation scheme {q.activation_scheme!r}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config (checkpoint dir, config.json path, or dict)."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return _from_hf_dict(hf)

    def to_hf(self) -> dict[str, Any]:
        """The config as a transformers-5 style config.json dict."""
        rope: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.partial_rotary_factor != 1.0 or self.model_type == "qwen3_next":
            rope["partial_rotary_factor"] = self.rope.partial_rotary_factor
        if self.rope.rope_type == "yarn":
            for k in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
                      "beta_slow", "mscale", "mscale_all_dim"):
                v = getattr(self.rope, k)
                if v is not None:
                    rope[k] = v
            if not self.rope.truncate:
                rope["truncate"] = False
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.torch_dtype,
            "initializer_range": self.initializer_range,
        }
        if self.model_type != "qwen3":
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        if self.model_type == "qwen3_next":
            d.update(
                layer_types=list(self.layer_types),
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                linear_num_key_heads=self.linear_num_key_heads,
                linear_num_value_heads=self.linear_num_value_heads,
                linear_key_head_dim=self.linear_key_head_dim,
                linear_value_head_dim=self.linear_value_head_dim,
                linear_conv_kernel_dim=self.linear_conv_kernel_dim,
            )
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {
                "quant_method": q.quant_method, "activation_scheme": q.activation_scheme,
                "weight_block_size": list(q.weight_block_size), "fmt": "e4m3",
                "modules_to_not_convert": list(q.modules_to_not_convert),
            }
        return d

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf(), f, indent=2)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        from qwen3coder.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return copy.deepcopy(PRESETS[name])


def _from_hf_dict(hf: dict[str, Any]) -> ModelConfig:
    def typed(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in hf or hf[key] is None:
            return default
        value = hf[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind in (int, float):
            raise ConfigError(f"config field '{key}': expected {kind.__name__}, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(f"config field '{key}': expected {names}, got {value!r}")
        return value

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config field 'model_type': unsupported model type {model_type!r}; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    is_next = model_type == "qwen3_next"
    hidden = typed("hidden_size", int)
    heads = typed("num_attention_heads", int)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if hf.get(key) is None:
            raise ConfigError(f"config field '{key}' is missing")
    head_dim = typed("head_dim", int) or (hidden // heads)

    # experts: 4.5x `num_experts`, 5.x `num_local_experts`; both must agree when both present
    n_exp = typed("num_experts", int)
    n_local = typed("num_local_experts", int)
    if n_exp is not None and n_local is not None and n_exp != n_local:
        raise ConfigError(f"config fields 'num_experts' ({n_exp}) and 'num_local_experts' ({n_local}) disagree")
    num_experts = n_exp if n_exp is not None else (n_local or 0)
    if model_type == "qwen3":
        num_experts = 0

    # rope: 5.x `rope_parameters`, 4.5x `rope_theta` + `rope_scaling` + `partial_rotary_factor`
    rp = typed("rope_parameters", dict) or {}
    rs = typed("rope_scaling", dict) or {}
    merged = {**rs, **rp}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    if "rope_theta" in hf and "rope_theta" in rp and float(hf["rope_theta"]) != float(rp["rope_theta"]):
        raise ConfigError("config fields 'rope_theta' and 'rope_parameters.rope_theta' disagree")
    prf = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25 if is_next else 1.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    rope = RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        partial_rotary_factor=float(prf),
        factor=_opt_float(merged.get("factor")),
        original_max_position_embeddings=merged.get("original_max_position_embeddings",
                                                    hf.get("original_max_position_embeddings")),
        attention_factor=_opt_float(merged.get("attention_factor")),
        beta_fast=_opt_float(merged.get("beta_fast")),
        beta_slow=_opt_float(merged.get("beta_slow")),
        mscale=_opt_float(merged.get("mscale")),
        mscale_all_dim=_opt_float(merged.get("mscale_all_dim")),
        truncate=bool(merged.get("truncate", True)),
    )
    max_pos = typed("max_position_embeddings", int, 32768)
    if rope.rope_type == "yarn" and rope.original_max_position_embeddings is None:
        rope.original_max_position_embeddings = max_pos

    quant = None
    qc = typed("quantization_config", dict)
    if qc is not None:
        quant = QuantConfig(
            quant_method=str(qc.get("quant_method", "")),
            weight_block_size=tuple(qc.get("weight_block_size") or (128, 128)),
            activation_scheme=str(qc.get("activation_scheme", "dynamic")),
            modules_to_not_convert=list(qc.get("modules_to_not_convert") or []),
        )

    num_layers = typed("num_hidden_layers", int)
    layer_types = typed("layer_types", list)
    if is_next and layer_types is None:
        interval = typed("full_attention_interval", int, 4)
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]

    return ModelConfig(
        model_type=model_type,
        vocab_size=typed("vocab_size", int),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=typed("num_key_value_heads", int, heads),
        head_dim=head_dim,
        intermediate_size=typed("intermediate_size", int, 4 * hidden),
        num_experts=num_experts,
        num_experts_per_tok=typed("num_experts_per_tok", int, 8 if num_experts else 0),
        moe_intermediate_size=typed("moe_intermediate_size", int, 768 if num_experts else 0),
        norm_topk_prob=typed("norm_topk_prob", bool, model_type == "qwen3_next"),
        decoder_sparse_step=typed("decoder_sparse_step", int, 1),
        mlp_only_layers=list(typed("mlp_only_layers", list, [])),
        shared_expert_intermediate_size=typed("shared_expert_intermediate_size", int, 0) if is_next else 0,
        router_aux_loss_coef=typed("router_aux_loss_coef", float, 0.001),
        attention_bias=typed("attention_bias", bool, bool(hf.get("qkv_bias", False))),
        rope=rope,
        max_position_embeddings=max_pos,
        rms_norm_eps=typed("rms_norm_eps", float, 1e-6),
        hidden_act=typed("hidden_act", str, "silu"),
        tie_word_embeddings=typed("tie_word_embeddings", bool, False),
        layer_types=layer_types,
        linear_num_key_heads=typed("linear_num_key_heads", int, 16),
        linear_num_value_heads=typed("linear_num_value_heads", int, 32),
        linear_key_head_dim=typed("linear_key_head_dim", int, 128),
        linear_value_head_dim=typed("linear_value_head_dim", int, 128),
        linear_conv_kernel_dim=typed("linear_conv_kernel_dim", int, 4),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
        quantization=quant,
        initializer_range=typed("initializer_range", float, 0.02),
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
