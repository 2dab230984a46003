"""ModelConfig: parsing both config.json spellings, presets, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from qwen3coder.config import ConfigError, ModelConfig
from tests.conftest import reference_dir


def test_real_30b_config_equals_preset():
    cfg = ModelConfig.from_hf(reference_dir() / "qwen3-coder-30b-a3b-instruct")
    preset = ModelConfig.preset("30b-a3b")
    for field in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                  "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope", "eos_token_id"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.rope.theta == 1e7 and cfg.rope.rope_type == "default"
    assert all(cfg.is_moe_layer(i) for i in range(48))


def test_presets_shapes():
    p480 = ModelConfig.preset("480b-a35b")
    assert (p480.hidden_size, p480.num_hidden_layers, p480.num_experts, p480.num_attention_heads) == (6144, 62, 160, 96)
    nxt = ModelConfig.preset("next-80b-a3b")
    assert nxt.attention_layer_ids == list(range(3, 48, 4)) and len(nxt.linear_layer_ids) == 36
    assert nxt.rotary_dim == 64 and nxt.rope.theta == 5e6
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("nope")


def test_param_counts_match_published():
    total, active = ModelConfig.preset("30b-a3b").num_params()
    assert abs(total / 1e9 - 30.5) < 0.2 and abs(active / 1e9 - 3.3) < 0.2
    total, active = ModelConfig.preset("next-80b-a3b").num_params()
    assert total == 79_674_391_296  # the published parameter count of Qwen3-Coder-Next


def test_roundtrip_to_hf():
    for name in ("30b-a3b", "next-80b-a3b", "tiny"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_yarn_from_both_spellings():
    base = ModelConfig.preset("30b-a3b").to_hf()
    old = dict(base)
    old.pop("rope_parameters")
    old.update(rope_theta=1e7, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 262144})
    new = dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e7, "factor": 4.0,
                                      "original_max_position_embeddings": 262144})
    assert ModelConfig.from_hf(old).rope == ModelConfig.from_hf(new).rope
    assert ModelConfig.from_hf(old).rope.factor == 4.0


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_tok": 999}, "num_experts_per_tok"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_local_experts": 64}, "num_experts"),  # disagrees with num_experts=128
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope_type"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
    ({"mlp_only_layers": [99]}, "mlp_only_layers"),
])
def test_bad_fields_are_named(change, field):
    cfg = json.loads((reference_dir() / "qwen3-coder-30b-a3b-instruct" / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
