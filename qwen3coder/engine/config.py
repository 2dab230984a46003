"""Engine configuration dataclasses: `CacheConfig`, `SchedulerConfig` and `EngineConfig`.

`EngineConfig.create` turns `LLM(...)` keyword arguments into these, resolving "auto" values
(device, dtype, max_model_len, token budget) against the model config; `finalize` fills the cache
size once the model runner knows it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen3coder.config import ModelConfig

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# the default token budget of prefill graphs: on an H200 (30B-A3B, one prompt) an eager 2,048-token prefill
# is 20% slower than its graph (41 vs 34 ms), a 1,024-token one 3.5x (62 vs 18 ms)
DEFAULT_PREFILL_GRAPH_TOKENS = 2048


@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized by the runner (free memory / CPU budget)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 4 << 30  # CPU: most the default pool may take
    enable_prefix_caching: bool = True
    num_state_snapshots: int | None = None  # hybrid prefix-cache snapshot slots (None: auto)

    def validate(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size: must be a positive integer, got {self.block_size!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.num_state_snapshots is not None and self.num_state_snapshots < 0:
            raise ValueError(f"num_state_snapshots: must be >= 0, got {self.num_state_snapshots!r}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill)
    max_model_len: int = 4096
    max_waiting_requests: int | None = None  # AsyncLLMEngine: queue bound (None: unbounded)
    admission_watermark: float = 0.01  # keep this fraction of blocks free when admitting

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests: must be >= 0, got {self.max_waiting_requests!r}")


@dataclass
class EngineConfig:
    model_config: ModelConfig
    model_path: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    # CUDA: steps that are not pure decode (prefill chunks, mixed with decode rows) of up to this many
    # tokens replay graphs captured for token buckets 16, 32, ... (0: they run eagerly)
    max_prefill_graph_tokens: int = 0
    async_scheduling: bool = False  # plan + launch decode step n+1 before reading step n's tokens
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_hybrid(self) -> bool:
        return bool(self.model_config.linear_layer_ids)

    @classmethod
    def create(cls, model_config: ModelConfig, model_path: str | None = None, *,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
               enable_prefix_caching: bool = True, skip_tokenizer_init: bool = False,
               block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int = 256,
               max_num_batched_tokens: int | None = None, seed: int = 0, enforce_eager: bool = False,
               cpu_kv_cache_bytes: int = 4 << 30, num_state_snapshots: int | None = None,
               max_waiting_requests: int | None = None, async_scheduling: bool | None = None,
               max_prefill_graph_tokens: int | None = None) -> "EngineConfig":
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        limit = model_config.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        elif max_model_len > limit:
            raise ValueError(f"max_model_len: {max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit})")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 8192 if dev.type == "cuda" else 2048
        if max_prefill_graph_tokens is None:  # auto: where a prefill's kernels take less time than issuing them
            max_prefill_graph_tokens = min(DEFAULT_PREFILL_GRAPH_TOKENS, max_num_batched_tokens, max_model_len)
        if not isinstance(max_prefill_graph_tokens, int) or max_prefill_graph_tokens < 0:
            raise ValueError(f"max_prefill_graph_tokens: must be an integer >= 0, got {max_prefill_graph_tokens!r}")
        cache = CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                            gpu_memory_utilization=gpu_memory_utilization,
                            cpu_kv_cache_bytes=cpu_kv_cache_bytes,
                            enable_prefix_caching=enable_prefix_caching,
                            num_state_snapshots=num_state_snapshots)
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len, max_waiting_requests=max_waiting_requests)
        cache.validate()
        sched.validate()
        gen = load_generation_config(model_path) if model_path else {}
        if async_scheduling is None:  # auto: on CUDA, where it hides the host's work behind the GPU's
            async_scheduling = dev.type == "cuda"
        return cls(model_config=model_config, model_path=model_path, device=dev, dtype=dt, seed=seed,
                   skip_tokenizer_init=skip_tokenizer_init, enforce_eager=enforce_eager, cache=cache,
                   scheduler=sched, generation_config=gen, async_scheduling=bool(async_scheduling),
                   max_prefill_graph_tokens=max_prefill_graph_tokens)

    def eos_token_ids(self, tokenizer: Any = None) -> set[int]:
        """EOS ids: generation_config.json's plus config.json's plus the tokenizer's."""
        ids = set(self.model_config.eos_token_ids)
        gen_eos = self.generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(int(t) for t in gen_eos)
        tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        return ids


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: only 'cpu' and 'cuda' are supported, got {device!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_generation_config(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
