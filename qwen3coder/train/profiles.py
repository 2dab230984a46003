"""Training profiles: every size, step count and wall-clock budget of the pipeline in dataclasses.

* `cpu-smoke` — the whole pipeline (data → tokenizer → pretrain → SFT → export) in about a minute on
  2 CPU cores: a small slice of the local Python stdlib, a 2K-token vocabulary, a ~0.3M-parameter
  Qwen3-MoE and a few dozen steps. It checks the plumbing, not the quality.
* `gpu` — the bundled default model on ONE H100 in under 8 minutes wall: up to ~400 MB of source text
  from the machine's stdlib, site-packages and system headers, a 16K vocabulary, a 23.6M-parameter
  (13.0M active) Qwen3-MoE trained for 290 s, SFT for 40 s, then export — within `total_budget_s`
  (500 s): if data preparation runs long, the training stages shorten so that export still happens.

`get_profile(name, **overrides)` returns a fresh copy; overrides use dotted names
(`pretrain.time_budget_s=60`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qwen3coder.config import ModelConfig, RopeConfig


@dataclass
class DataConfig:
    """Corpus collection, filtering, dedup and split (qwen3coder.train.data)."""

    roots: list[str] | None = None  # None: the sysconfig stdlib + site-packages + system headers
    include_site_packages: bool = True
    include_system_dirs: bool = True  # /usr/include, /usr/local/cuda/include, ... where present
    max_total_bytes: int = 300_000_000
    max_files: int = 400_000
    max_file_bytes: int = 200_000
    min_file_bytes: int = 200
    max_line_chars: int = 1000
    max_mean_line_chars: float = 100.0
    min_alnum_fraction: float = 0.25
    near_dup_threshold: float = 0.8  # estimated Jaccard of line shingles
    minhash_perms: int = 64
    lsh_bands: int = 16
    val_fraction: float = 0.01
    workers: int = 0  # 0: os.cpu_count()
    seed: int = 1234


@dataclass
class TokenizerConfig:
    """Byte-level BPE training (qwen3coder.train.tokenizer)."""

    vocab_size: int = 16384  # total, the 13 added tokens included
    sample_bytes: int = 30_000_000  # text the BPE trainer sees
    min_frequency: int = 2
    fim_rate: float = 0.5  # share of document chunks turned into PSM fill-in-the-middle
    fim_chunk_chars: int = 3000  # FIM applies to chunks of about a context's worth of text
    encode_time_budget_s: float | None = 40.0  # tokenizing stops with the documents done by then
    workers: int = 0  # 0: os.cpu_count()
    seed: int = 1234


@dataclass
class PretrainConfig:
    """Next-token pretraining on packed sequences (qwen3coder.train.pretrain)."""

    seq_len: int = 1024
    micro_batch: int = 32  # sequences per forward/backward
    grad_accum: int = 4  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    max_steps: int = 100_000  # upper bound; the time budget usually ends training first
    time_budget_s: float | None = 290.0  # None: exactly max_steps (deterministic)
    replan_until: float = 0.3  # re-estimate planned steps from measured step time until this progress
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in float32
    moe_dispatch: str = "auto"  # auto | grouped | dense | reference
    compile: bool = False
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    seed: int = 1234


@dataclass
class SFTConfig:
    """Supervised fine-tuning on generated conversations (qwen3coder.train.sft)."""

    max_examples: int = 20_000
    max_source_files: int = 5000
    max_len: int = 1024
    batch_size: int = 32
    lr: float = 4e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_steps: int = 100_000
    time_budget_s: float | None = 40.0
    log_every: int = 10
    seed: int = 1234


def tiny_moe_config(vocab_size: int) -> ModelConfig:
    """The bundled model: Qwen3-MoE, 8 layers, hidden 384, 8 experts top-2, tied embeddings."""
    return ModelConfig(
        model_type="qwen3_moe", vocab_size=vocab_size, hidden_size=384, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=192, norm_topk_prob=True,
        rope=RopeConfig(theta=1_000_000.0), max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, torch_dtype="bfloat16",
    )


def smoke_moe_config(vocab_size: int) -> ModelConfig:
    """A CPU-sized Qwen3-MoE of the same family for the smoke profile and the tests."""
    return ModelConfig(
        model_type="qwen3_moe", vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
        rope=RopeConfig(theta=1_000_000.0), max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, torch_dtype="float32",
    )


@dataclass
class Profile:
    name: str
    model: str  # "tiny-moe" | "smoke-moe"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run_eval: bool = True
    eval_profile: str = "gpu"
    cpu_threads: int | None = None  # torch threads when training on the CPU (None: leave as is)
    # wall-clock budget of the whole run (eval excluded): training stages shrink their own budgets so
    # that SFT and export still finish in time when data preparation ran long
    total_budget_s: float | None = None
    reserve_s: float = 25.0  # kept free after SFT for SFT start-up, export and slack

    def model_config(self, vocab_size: int) -> ModelConfig:
        if self.model == "tiny-moe":
            return tiny_moe_config(vocab_size)
        if self.model == "smoke-moe":
            return smoke_moe_config(vocab_size)
        raise ValueError(f"unknown model shape {self.model!r} (known: tiny-moe, smoke-moe)")


def _cpu_smoke() -> Profile:
    return Profile(
        name="cpu-smoke",
        model="smoke-moe",
        data=DataConfig(include_site_packages=False, include_system_dirs=False, max_total_bytes=3_000_000,
                        max_files=400, max_file_bytes=60_000, val_fraction=0.05, workers=2),
        tokenizer=TokenizerConfig(vocab_size=2048, sample_bytes=1_500_000, fim_chunk_chars=1500,
                                  encode_time_budget_s=None, workers=1),
        pretrain=PretrainConfig(seq_len=128, micro_batch=8, grad_accum=1, lr=3e-3, warmup_steps=5,
                                max_steps=40, time_budget_s=20.0, dtype="float32", moe_dispatch="dense",
                                log_every=5, eval_every=20, eval_batches=2, checkpoint_every=20),
        sft=SFTConfig(max_examples=400, max_source_files=80, max_len=256, batch_size=8, lr=1e-3,
                      warmup_steps=2, max_steps=15, time_budget_s=10.0, log_every=5),
        eval_profile="cpu-smoke",
        cpu_threads=1,  # a tiny model gains nothing from a second thread and loses a lot when cores are shared
    )


def _gpu() -> Profile:
    return Profile(name="gpu", model="tiny-moe", eval_profile="gpu", total_budget_s=500.0)


PROFILES = {"cpu-smoke": _cpu_smoke, "gpu": _gpu}


def get_profile(name: str, **overrides: Any) -> Profile:
    """A fresh profile; `overrides` maps dotted field names (`pretrain.max_steps`) to values."""
    if name not in PROFILES:
        raise ValueError(f"unknown training profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]()
    for dotted, value in overrides.items():
        obj: Any = profile
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not hasattr(obj, part):
                raise ValueError(f"profile override {dotted!r}: no section {part!r}")
            obj = getattr(obj, part)
        if not hasattr(obj, parts[-1]):
            raise ValueError(f"profile override {dotted!r}: no field {parts[-1]!r}")
        setattr(obj, parts[-1], value)
    return profile


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    return dataclasses.asdict(copy.deepcopy(profile))
