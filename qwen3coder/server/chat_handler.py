"""`POST /v1/chat/completions`: chat template → engine → tool-call parsing → OpenAI response/chunks.

Streaming follows OpenAI's chunk shapes: each choice's first chunk carries `role: "assistant"`;
content arrives as `delta.content`; a tool call arrives as `delta.tool_calls` with
`index`, `id`, `type` and `function.name` once, then `function.arguments` fragments (from
`ToolCallStreamParser`); the last chunk of a choice has `finish_reason`; with
`stream_options.include_usage` a final chunk with empty `choices` carries `usage`; then
`data: [DONE]`. `tool_choice` handling is in `tool_choice.py`, JSON mode in `json_mode.py`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from qwen3coder.chat import ChatTemplateError, ToolCallStreamParser, parse_tool_calls, render_chat
from qwen3coder.engine.outputs import CompletionOutput, RequestOutput
from qwen3coder.engine.sampling_params import RequestOutputKind, SamplingParams
from qwen3coder.server.errors import APIError, error_body
from qwen3coder.server.formatting import TokenText, chat_logprobs, output_error, usage
from qwen3coder.server.json_mode import JSON_ATTEMPTS, add_json_instruction, extract_json
from qwen3coder.server.protocol import ChatCompletionRequest
from qwen3coder.server.state import (SSEResponse, ServerState, collect_final, random_id, run_until_disconnect,
                                     sse)
from qwen3coder.server.tool_choice import CALL_PREFIX, NAME_PROBE_TOKENS, ToolPlan, filter_calls, plan_tools, \
    resolve_name

logger = logging.getLogger("qwen3coder.server")


def render_prompt(state: ServerState, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None) -> str:
    template = state.need_chat_template()
    reserved = {"messages", "tools", "add_generation_prompt"} & set(template_kwargs or {})
    if reserved:
        raise APIError(f"chat_template_kwargs: may not set {sorted(reserved)}", 400, param="chat_template_kwargs")
    try:
        return render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           **(template_kwargs or {}))
    except (ChatTemplateError, ValueError, TypeError) as e:
        raise APIError(f"messages: {e}", 400, param="messages") from e
    except RecursionError as e:
        raise APIError("messages: too deeply nested to render", 400, param="messages") from e


class ChatCompletionHandler:
    def __init__(self, state: ServerState):
        self.state = state
        self.texts = TokenText(state.tokenizer)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        state = self.state
        model = state.check_model(req.model)
        tok = state.need_tokenizer("/v1/chat/completions")
        plan = plan_tools(req)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        json_mode = req.response_format is not None and req.response_format.type != "text"
        if json_mode:
            messages = add_json_instruction(messages, req.response_format)
        prompt = render_prompt(state, messages, plan.prompt_tools, req.add_generation_prompt,
                               req.chat_template_kwargs)
        prompt_len = len(tok.encode(prompt + (CALL_PREFIX if plan.needs_name_probe else plan.prefill)))
        state.check_prompt_len(prompt_len)
        overrides = req.to_sampling_kwargs()
        if req.logprobs:
            overrides["logprobs"] = req.top_logprobs or 0
        params = state.sampling_params(overrides, req.effective_max_tokens, prompt_len + NAME_PROBE_TOKENS
                                       if plan.needs_name_probe and req.effective_max_tokens is None else prompt_len)
        request_id = random_id("chatcmpl")
        if plan.needs_name_probe:
            plan.forced_name = await self._probe_name(prompt, params, plan, request_id, raw)
            if plan.forced_name is None:
                return Response(status_code=499)
        full_prompt = prompt + plan.prefill
        if req.stream:
            params.output_kind = RequestOutputKind.DELTA
            stream = state.submit(full_prompt, params, request_id)
            return SSEResponse(self._stream(req, stream, model, request_id, plan, params))
        params.output_kind = RequestOutputKind.FINAL_ONLY
        attempts = JSON_ATTEMPTS if json_mode else 1
        for attempt in range(attempts):
            rid = request_id if attempt == 0 else f"{request_id}-retry{attempt}"
            stream = state.submit(full_prompt, params, rid)
            final = await run_until_disconnect(raw, lambda: collect_final(stream))
            if final is None:
                return Response(status_code=499)  # the client is gone; the request was aborted
            err = output_error(final)
            if err is not None:
                raise APIError(f"generation failed: {err}", 500)
            body = self._response(req, final, model, request_id, plan, params, json_mode)
            if not json_mode or all(c["message"].get("json_valid", True) for c in body["choices"]):
                break
            logger.warning("json_object reply %d/%d is not JSON", attempt + 1, attempts)
            if params.seed is not None:
                params.seed += 1000
        for c in body["choices"]:
            c["message"].pop("json_valid", None)
        return JSONResponse(body)

    async def _probe_name(self, prompt: str, params: SamplingParams, plan: ToolPlan, request_id: str,
                          raw: Request) -> str | None:
        probe = params.clone()
        probe.n, probe.max_tokens, probe.stop, probe.logprobs = 1, NAME_PROBE_TOKENS, [">", "\n"], None
        probe.output_kind = RequestOutputKind.FINAL_ONLY
        stream = self.state.submit(prompt + CALL_PREFIX, probe, f"{request_id}-name")
        final = await run_until_disconnect(raw, lambda: collect_final(stream))
        if final is None:
            return None
        text = final.outputs[0].text if final.outputs and not final.error else ""
        return resolve_name(text, plan.parse_tools or [])

    # ------------------------------------------------------------------ non-streaming
    def _choice(self, req: ChatCompletionRequest, c: CompletionOutput, plan: ToolPlan, params: SamplingParams,
                json_mode: bool) -> dict[str, Any]:
        text = plan.prefill + c.text
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = c.finish_reason or "stop"
        if plan.parse_tools is not None:
            content, calls = parse_tool_calls(text, plan.parse_tools)
            calls = filter_calls(calls, plan)
            message["content"] = content
            if calls:
                message["tool_calls"] = calls
                if finish == "stop":
                    finish = "tool_calls"
        if json_mode and not message.get("tool_calls"):
            extracted = extract_json(message["content"] or "")
            message["json_valid"] = extracted is not None
            if extracted is not None:
                message["content"] = extracted
        lp = chat_logprobs(self.texts, c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None
        return {"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish,
                "stop_reason": c.stop_reason}

    def _response(self, req: ChatCompletionRequest, final: RequestOutput, model: str, request_id: str,
                  plan: ToolPlan, params: SamplingParams, json_mode: bool) -> dict[str, Any]:
        choices = [self._choice(req, c, plan, params, json_mode) for c in final.outputs]
        n_out = sum(len(c.token_ids) for c in final.outputs)
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage(len(final.prompt_token_ids), n_out, final.num_cached_tokens),
                "system_fingerprint": None}

    # ------------------------------------------------------------------ streaming
    async def _stream(self, req: ChatCompletionRequest, stream: Any, model: str, request_id: str,
                      plan: ToolPlan, params: SamplingParams) -> AsyncIterator[str]:
        created = int(time.time())
        n = params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        parsers = [ToolCallStreamParser(plan.parse_tools) if plan.parse_tools is not None else None
                   for _ in range(n)]
        num_tokens = [0] * n
        finished = [False] * n
        has_calls = [False] * n
        prompt_tokens = 0

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None,
                  stop_reason: Any = None) -> str:
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": [choice]}
            if continuous and prompt_tokens:
                body["usage"] = usage(prompt_tokens, sum(num_tokens))
            return sse(json.dumps(body, ensure_ascii=False))

        def keep(i: int, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = []
            for d in deltas:
                if "tool_calls" in d:
                    if plan.single_call and d["tool_calls"][0]["index"] > 0:
                        continue
                    has_calls[i] = True
                out.append(d)
            return out

        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            pending: list[list[dict[str, Any]]] = [[] for _ in range(n)]
            if plan.prefill:
                for i in range(n):
                    pending[i] = keep(i, parsers[i].feed(plan.prefill))  # type: ignore[union-attr]
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids)
                if out.error:
                    yield sse(json.dumps(error_body(f"generation failed: {out.error}", 500)))
                    break
                for c in out.outputs:
                    i = c.index
                    num_tokens[i] += len(c.token_ids)
                    parser = parsers[i]
                    deltas = pending[i] + (keep(i, parser.feed(c.text)) if parser else
                                           ([{"content": c.text}] if c.text else []))
                    pending[i] = []
                    if c.finish_reason is not None and parser is not None:
                        deltas += keep(i, parser.finish())
                    lp = (chat_logprobs(self.texts, c.token_ids, c.logprobs, req.top_logprobs or 0)
                          if req.logprobs and c.token_ids else None)
                    if lp is not None and not deltas:
                        deltas = [{"content": ""}]
                    for k, d in enumerate(deltas):
                        yield chunk(i, d, logprobs=lp if k == 0 else None)
                    if c.finish_reason is not None and not finished[i]:
                        finished[i] = True
                        finish = "tool_calls" if has_calls[i] and c.finish_reason == "stop" else c.finish_reason
                        yield chunk(i, {}, finish=finish, stop_reason=c.stop_reason)
            if include_usage:
                body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(prompt_tokens, sum(num_tokens))}
                yield sse(json.dumps(body))
            yield sse("[DONE]")
        finally:
            stream.aclose_sync()
