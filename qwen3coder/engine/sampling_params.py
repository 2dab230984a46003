"""Per-request generation settings (`SamplingParams`), following vLLM's names and defaults.

`SamplingParams()` means plain sampling at temperature 1 with nothing masked, as in vLLM; the
checkpoint's recommended settings (generation_config.json) come from
`LLM.get_default_sampling_params()`, which `LLM.generate` uses when no params are given.
Every value is checked in `__post_init__`; a bad one raises `ValueError` naming the field.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k: sampled token + top-k
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # filled by the engine from the checkpoint / tokenizer; not user settings
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"SamplingParams.{name}: {msg}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN

        need(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k",
             "must be -1 (disabled) or >= 1")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "must be > 0")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "must be in [-2, 2]")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "must be in [-2, 2]")
        need(self.seed is None or is_int(self.seed), "seed", "must be an integer or None")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             "must be an integer >= 1 or None")
        need(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None:
            need(self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS), name,
                 f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        need(isinstance(self.output_kind, RequestOutputKind), "output_kind", "must be a RequestOutputKind")

    # ------------------------------------------------------------------ derived
    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """Checkpoint defaults (generation_config.json) as vLLM reads them; `overrides` win."""
        kwargs: dict[str, Any] = {}
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        elif gen.get("temperature") is not None:
            kwargs["temperature"] = float(gen["temperature"])
        for key, kind in (("top_p", float), ("top_k", int), ("min_p", float),
                          ("repetition_penalty", float)):
            if gen.get(key) is not None:
                kwargs[key] = kind(gen[key])
        if kwargs.get("top_k") == 0:
            kwargs["top_k"] = -1
        if gen.get("max_new_tokens") is not None:
            kwargs["max_tokens"] = int(gen["max_new_tokens"])
        kwargs.update(overrides)
        return cls(**kwargs)
