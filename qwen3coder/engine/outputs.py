"""What the engine hands back: `RequestOutput` holding one `CompletionOutput` per sample (vLLM's shapes).

`logprobs` is a list (one entry per generated token) of `{token_id: Logprob}` dicts holding the
sampled token and the `k` most likely ones; `prompt_logprobs` is the same for prompt tokens, with
`None` for the first one (nothing predicts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SampleLogprobs = list[dict[int, "Logprob"]]
PromptLogprobs = list["dict[int, Logprob] | None"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine had to abort this request because of a failure
    num_cached_tokens: int = field(default=0)
