"""Load Hugging Face checkpoints (safetensors, single or sharded, FP8 block-quantized) or dummy weights.

`load_model(path)` reads config.json, builds the model on the meta device, materialises it on the
target device and streams every tensor from the memory-mapped safetensors files into its (packed)
parameter — no full copy of the checkpoint in host memory. FP8 checkpoints (`weight` in
float8_e4m3fn + `weight_scale_inv` [out/B, in/B]) are dequantized at load time; their scales stay
reachable in `model.fp8_weight_scales` for FP8 kernels. `build_dummy_model(config)` makes random
weights at the real shapes directly on the device, for benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator

import torch
from torch import nn

from qwen3coder.config import ModelConfig
from qwen3coder.models import CausalLM, build_model
from qwen3coder.models.weights import WeightError, WeightLoader

logger = logging.getLogger("qwen3coder.loader")

_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_FP8_DTYPES = {torch.float8_e4m3fn}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded via the index, or one file)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"shard {name} listed in {index} is missing")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def iter_checkpoint(path: str, block_size: tuple[int, int] | None = None,
                    scales_out: dict[str, torch.Tensor] | None = None,
                    progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every shard, memory-mapped; FP8 weights come out dequantized (fp32)."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    handles = {}
    location: dict[str, str] = {}
    for file in files:
        try:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot open as safetensors ({e})") from e
        for name in handles[file].keys():
            location[name] = file
    names = [n for n in location if not n.endswith("_scale_inv")]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc="Loading weights", unit="tensor", leave=False,
                   disable=None)  # disable=None: off when not a terminal
    try:
        for name in names:
            file = location[name]
            try:
                tensor = handles[file].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from e
            if tensor.dtype in _FP8_DTYPES:
                scale_name = name + "_scale_inv"
                if scale_name not in location:
                    raise CheckpointError(f"{file}: FP8 tensor {name} has no {scale_name}")
                scale = handles[location[scale_name]].get_tensor(scale_name)
                tensor = dequantize_fp8_block(tensor, scale, block_size or (128, 128), name)
                if scales_out is not None:
                    scales_out[name] = scale
            elif tensor.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {tensor.dtype}")
            yield name, tensor
            if bar is not None:
                bar.update(1)
        unused = [n for n in location if n.endswith("_scale_inv") and n[: -len("_scale_inv")] not in location]
        if unused:
            raise CheckpointError(f"{location[unused[0]]}: scale tensor {unused[0]} has no weight")
    finally:
        if bar is not None:
            bar.close()


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         name: str = "") -> torch.Tensor:
    """fp8 [out, in] x scale_inv [ceil(out/bo), ceil(in/bi)] -> fp32 [out, in]."""
    bo, bi = block
    out_dim, in_dim = weight.shape[-2:]
    expect = ((out_dim + bo - 1) // bo, (in_dim + bi - 1) // bi)
    if tuple(scale_inv.shape[-2:]) != expect:
        raise CheckpointError(f"tensor {name}_scale_inv has shape {list(scale_inv.shape)}, expected "
                              f"{list(expect)} for weight {list(weight.shape)} with block {list(block)}")
    s = scale_inv.float().repeat_interleave(bo, dim=-2)[..., :out_dim, :]
    s = s.repeat_interleave(bi, dim=-1)[..., :in_dim]
    return weight.float() * s


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing FP8 test checkpoints: (fp8 weight, scale_inv) with max|w|/448 per block."""
    bo, bi = block
    out_dim, in_dim = weight.shape
    nb_o, nb_i = (out_dim + bo - 1) // bo, (in_dim + bi - 1) // bi
    padded = torch.zeros(nb_o * bo, nb_i * bi, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(nb_o, bo, nb_i, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(nb_o * bo, nb_i * bi)[:out_dim, :in_dim].contiguous(), scale_inv


def _materialize(config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> CausalLM:
    """Build on the meta device in `dtype`, then allocate (uninitialised) storage on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
               dtype: str | torch.dtype | None = torch.float32, progress: bool = True) -> CausalLM:
    """Load a Hugging Face checkpoint directory into a qwen3coder model (eval mode)."""
    if path is None:
        from qwen3coder import default_model_path

        path = default_model_path()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    config = ModelConfig.from_hf(path)
    torch_dtype = parse_dtype(dtype)
    files = checkpoint_files(path)  # fail on a missing shard before allocating anything
    model = _materialize(config, device, torch_dtype)
    loader = WeightLoader(model)
    block = tuple(config.quantization.weight_block_size) if config.quantization else None
    try:
        for name, tensor in iter_checkpoint(path, block, model.fp8_weight_scales, progress):
            loader.load(name, tensor)
        loader.check_complete()
    except WeightError as e:
        raise CheckpointError(f"{path}: {e}") from e
    for k, v in model.fp8_weight_scales.items():
        model.fp8_weight_scales[k] = v.to(device)
    logger.info("loaded %d tensors from %d file(s) in %s", len(loader.used_names), len(files), path)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Random weights at the real shapes, generated on the parameters' own device."""
    from qwen3coder.models.layers.deltanet import GatedDeltaNet
    from qwen3coder.models.layers.norms import RMSNorm, RMSNormGated

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    special: set[int] = set()
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.fill_(0.0 if m.zero_centered else 1.0)
            special.add(id(m.weight))
        elif isinstance(m, RMSNormGated):
            m.weight.fill_(1.0)
            special.add(id(m.weight))
        elif isinstance(m, GatedDeltaNet):
            m.A_log.uniform_(0.0, 2.7, generator=gen)  # A = exp(A_log) in [1, 15)
            m.dt_bias.fill_(1.0)
            special.update((id(m.A_log), id(m.dt_bias)))
    for p in model.parameters():
        if id(p) not in special:
            p.uniform_(-scale * 1.732, scale * 1.732, generator=gen)  # std = scale


def build_dummy_model(config: ModelConfig, device: torch.device | str = "cpu",
                      dtype: str | torch.dtype | None = torch.bfloat16, seed: int = 0) -> CausalLM:
    """A model with random weights at `config`'s shapes, allocated directly on `device`."""
    model = _materialize(config, device, parse_dtype(dtype))
    init_dummy_weights(model, seed)
    return model.eval()


def build_dummy_model_for(preset: str | None, model_path: str | None, device: torch.device | str,
                          dtype: str | torch.dtype | None = None, seed: int = 0) -> CausalLM:
    """`--load-format dummy`: random weights at a preset's shapes, or at a checkpoint's config.json."""
    if preset:
        config = ModelConfig.preset(preset)
    elif model_path:
        config = ModelConfig.from_hf(model_path)
    else:
        raise ValueError("--load-format dummy needs --preset NAME or --model PATH (for its config.json)")
    default = "bfloat16" if str(device).startswith("cuda") else "float32"
    return build_dummy_model(config, device=device, dtype=dtype or default, seed=seed)
