"""Checkpoint loading: the real 30B weight index, FP8 block scales, mtp.* tensors, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3coder.config import ModelConfig
from qwen3coder.loader import CheckpointError, build_dummy_model, dequantize_fp8_block, load_model, quantize_fp8_block
from qwen3coder.models import build_model
from qwen3coder.models.weights import WeightLoader
from tests.conftest import reference_dir


def test_every_tensor_of_the_real_30b_index_maps():
    index = json.loads((reference_dir() / "qwen3-coder-30b-a3b-instruct" / "model.safetensors.index.json").read_text())
    names = list(index["weight_map"])
    assert len(names) == 18867
    cfg = ModelConfig.preset("30b-a3b")
    with torch.device("meta"):
        model = build_model(cfg)
    loader = WeightLoader(model)
    # feed meta tensors of the shape each name must have: the shape of its target slice
    for name in names:
        target = loader.target(name)
        assert target is not None, name
        param = loader.params[target.param]
        shape = param[target.index].shape if target.index else param.shape
        loader.load(name, torch.empty(shape, device="meta"))
    loader.check_complete()  # every parameter filled exactly once
    assert len(loader.used_names) == len(names)


def _tiny_checkpoint(tmp_path, model_type="qwen3_moe"):
    from tests.hf_models import hf_model, save_hf

    ref = hf_model(model_type)
    path = str(tmp_path / "ckpt")
    save_hf(ref, path, shard=False)
    return path, ref


def test_fp8_block_checkpoint(tmp_path):
    path, ref = _tiny_checkpoint(tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    fp8, deq = {}, {}
    block = (16, 16)
    for name, t in tensors.items():
        if name.endswith("proj.weight") and t.dim() == 2:
            q, s = quantize_fp8_block(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = dequantize_fp8_block(q, s, block)
        else:
            fp8[name] = deq[name] = t
    q_dir, d_dir = tmp_path / "fp8", tmp_path / "deq"
    for d, ts in ((q_dir, fp8), (d_dir, deq)):
        shutil.copytree(path, d)
        save_file(ts, str(d / "model.safetensors"))
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block), "fmt": "e4m3"}
    (q_dir / "config.json").write_text(json.dumps(cfg))
    m_fp8, m_deq = load_model(q_dir, progress=False), load_model(d_dir, progress=False)
    x = torch.randint(0, 256, (1, 24))
    assert torch.equal(m_fp8(x), m_deq(x))
    # scales stay reachable for FP8 kernels
    assert "model.layers.0.self_attn.q_proj.weight" in m_fp8.fp8_weight_scales
    # dequantized weights are within e4m3 rounding of the originals: half an ulp (2^-4 relative)
    # for normal values, half the smallest subnormal step (scale * 2^-10) near zero
    for name, t in tensors.items():
        if name in deq and name + "_scale_inv" in fp8:
            s = fp8[name + "_scale_inv"].repeat_interleave(16, 0).repeat_interleave(16, 1)
            bound = t.abs() * 2 ** -4 + s * 2 ** -10 + 1e-7
            assert ((deq[name] - t).abs() <= bound).all(), name


def test_mtp_tensors_are_skipped(tmp_path, caplog):
    path, ref = _tiny_checkpoint(tmp_path, "qwen3_next")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with caplog.at_level("INFO", logger="qwen3coder.loader"):
        model = load_model(path, progress=False)
    assert "mtp" in caplog.text
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


def _mutate(tmp_path, fn):
    path, _ = _tiny_checkpoint(tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)
    return path


def test_missing_tensor_is_named(tmp_path):
    path = _mutate(tmp_path, lambda t: t.pop("model.layers.1.mlp.gate.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.mlp\.gate\.weight"):
        load_model(path, progress=False)


def test_missing_expert_is_named(tmp_path):
    path = _mutate(tmp_path, lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        load_model(path, progress=False)


def test_unexpected_tensor_is_named(tmp_path):
    path = _mutate(tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rotary\.weight'"):
        load_model(path, progress=False)


def test_misshaped_tensor_is_named(tmp_path):
    path = _mutate(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[7\].*\[64\]"):
        load_model(path, progress=False)


def test_unsupported_dtype_is_named(tmp_path):
    path = _mutate(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has unsupported dtype torch\.int8"):
        load_model(path, progress=False)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty", progress=False)
    from tests.hf_models import hf_model, save_hf

    path = save_hf(hf_model("qwen3_moe"), str(tmp_path / "sharded"), shard=True)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"shard {shard}.*missing"):
        load_model(path, progress=False)


def test_dummy_model_has_real_shapes_and_runs():
    cfg = ModelConfig.preset("tiny-next")
    model = build_dummy_model(cfg, dtype=torch.float32)
    assert model.model.layers[0].linear_attn.in_proj_qkvz.weight.shape == (2 * 2 * 16 + 2 * 4 * 16, 64)
    out = model(torch.randint(0, cfg.vocab_size, (1, 9)))
    assert torch.isfinite(out).all()
