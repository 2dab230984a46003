"""`tool_choice` for the `qwen3_coder` tool-call format.

* `auto` (default when tools are given): the tools are in the prompt; the reply is parsed for calls.
* `none`: the tools are left out of the prompt and the reply is not parsed — plain text.
* a named function: the assistant turn is **prefilled** with `<tool_call>\\n<function=NAME>\\n`, so
  the model can only continue with that call's parameters; the parsed reply keeps that one call.
* `required`: the call's name is chosen first, then the call is generated as for a named function.
  With one tool the name is that tool's. With several, a short first generation continues the
  prefill `<tool_call>\\n<function=` up to `>` (at most 24 tokens, sampled with the request's settings);
  the generated name is matched against the tools (exact, then the closest by `difflib`, then
  the first tool), so the call always names a defined function. Then the named prefill runs.
  With `n > 1` every choice uses that one name.

`parallel_tool_calls: false` (and a named choice) keep only the first call of a reply.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from qwen3coder.server.protocol import ChatCompletionRequest, NamedToolChoice

CALL_PREFIX = "<tool_call>\n<function="
NAME_PROBE_TOKENS = 24


@dataclass
class ToolPlan:
    prompt_tools: list[dict[str, Any]] | None  # tools rendered into the prompt
    parse_tools: list[dict[str, Any]] | None  # tools for the parser (None: do not parse)
    forced_name: str | None = None  # named or resolved-required function
    needs_name_probe: bool = False  # required with several tools: pick the name first
    single_call: bool = False  # keep only the first call

    @property
    def prefill(self) -> str:
        return f"{CALL_PREFIX}{self.forced_name}>\n" if self.forced_name else ""


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if not tools or choice == "none":
        return ToolPlan(None, None)
    single = not req.parallel_tool_calls
    if isinstance(choice, NamedToolChoice):
        return ToolPlan(tools, tools, forced_name=choice.function.name, single_call=True)
    if choice == "required":
        if len(tools) == 1:
            return ToolPlan(tools, tools, forced_name=tools[0]["function"]["name"], single_call=single)
        return ToolPlan(tools, tools, needs_name_probe=True, single_call=single)
    return ToolPlan(tools, tools, single_call=single)


def resolve_name(generated: str, tools: list[dict[str, Any]]) -> str:
    """The defined function a generated `<function=` name means (always one of `tools`)."""
    names = [t["function"]["name"] for t in tools]
    guess = generated.split(">", 1)[0].strip()
    if guess in names:
        return guess
    close = difflib.get_close_matches(guess, names, n=1, cutoff=0.0) if guess else []
    return close[0] if close else names[0]


def filter_calls(calls: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    if plan.forced_name and plan.single_call:
        calls = [c for c in calls if c["function"]["name"] == plan.forced_name]
    return calls[:1] if plan.single_call else calls
