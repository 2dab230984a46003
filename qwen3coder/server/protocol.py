"""Request bodies of the OpenAI-compatible API as pydantic models (OpenAI names plus vLLM's extras).

Types are strict (a string is not a number, a bool is not an int), numbers are range-checked and
NaN/infinity are refused, so bad input becomes a 400 naming the field (see `errors.py`). Unknown
fields are ignored, as OpenAI and vLLM do, so clients that send `user`, `metadata`, `store` … work.
`to_sampling_kwargs` maps the shared sampling fields onto `SamplingParams` arguments.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator

MAX_N = 16  # choices per request; more is refused (n samples share a prompt but each needs a seat)
MAX_STOP = 16
MAX_LOGPROBS = 20
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=2)]
TopP = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)]
Penalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2, le=2)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
Seed = Annotated[int, Field(strict=True, ge=-(2**63), lt=2**64)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class FunctionDefinition(_Base):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.match(v):
            raise ValueError(f"function name {v!r} must be 1-64 characters of letters, digits, '_', '-', '.'")
        return v

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        kind = v.get("type", "object")
        if kind != "object":
            raise ValueError(f"parameters must be a JSON schema of type 'object', got type {kind!r}")
        props = v.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError("parameters.properties must be an object mapping names to schemas")
        for key, sub in props.items():
            if not isinstance(sub, dict):
                raise ValueError(f"parameters.properties.{key} must be a JSON schema object")
        req = v.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise ValueError("parameters.required must be a list of property names")
        return v


class Tool(_Base):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Base):
    name: StrictStr


class NamedToolChoice(_Base):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """One message; extra keys (name, reasoning_content, …) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[dict[str, Any] | StrictStr] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _content_needed(self) -> "ChatMessage":
        if self.role in ("user", "system", "developer") and self.content is None:
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and self.content is None:
            raise ValueError("a tool message needs 'content'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        return self


class SamplingFields(_Base):
    """Fields chat and text completions share (OpenAI + vLLM extras)."""

    model: StrictStr | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(strict=True, ge=-1)] | None = None
    min_p: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=10)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[int, Field(strict=True, ge=0)] = 0
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Float] | None = None
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        return -1 if v == 0 else v  # vLLM: 0 and -1 both disable top-k

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def to_sampling_kwargs(self) -> dict[str, Any]:
        """The fields that were given, as `SamplingParams` keyword arguments."""
        out: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if out.get("seed") is not None:
            out["seed"] = out["seed"] % (2**63)
        out.update(n=self.n, stop=list(self.stop or []), stop_token_ids=list(self.stop_token_ids or []),
                   ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                   skip_special_tokens=self.skip_special_tokens,
                   include_stop_str_in_output=self.include_stop_str_in_output)
        return out


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        if self.tools is not None:
            names = [t.function.name for t in self.tools]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"tools: function names must be unique, {sorted(dup)} repeat")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError(f"tool_choice: {self._choice_text()} needs a non-empty 'tools' list")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools or []}:
                raise ValueError(f"tool_choice: function {name!r} is not among the given tools")
        return self

    def _choice_text(self) -> str:
        c = self.tool_choice
        return f"function {c.function.name!r}" if isinstance(c, NamedToolChoice) else repr(c)

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptInput = StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    suffix: StrictStr | None = None
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    best_of: PositiveInt | None = None

    @model_validator(mode="after")
    def _checks(self) -> "CompletionRequest":
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be an empty list")
        if isinstance(p, list) and any(isinstance(x, list) and not x for x in p):
            raise ValueError("prompt: token-id prompts must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix is not None and self.echo:
            raise ValueError("suffix: cannot be combined with echo")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeCompletionRequest(_Base):
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Base):
    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Base):
    model: StrictStr | None = None
    tokens: list[TokenId]
