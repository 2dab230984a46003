"""`POST /v1/completions`: raw text or token-id prompts (one or a batch), `suffix` (fill-in-the-middle),
`echo`, `logprobs`, `n`, `stop`, streaming.

Each prompt of a batch is one engine request; choice `index` is `prompt_index * n + sample_index`
(OpenAI's order). With `suffix`, the prompt becomes `<|fim_prefix|>{prompt}<|fim_suffix|>{suffix}
<|fim_middle|>` (`qwen3coder.chat.fim`) and the FIM stop tokens end the completion.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from qwen3coder.chat.fim import build_fim_prompt, fim_stop_token_ids, truncate_fim_output
from qwen3coder.engine.outputs import RequestOutput
from qwen3coder.engine.sampling_params import RequestOutputKind
from qwen3coder.server.errors import APIError, error_body
from qwen3coder.server.formatting import TokenText, completion_logprobs, output_error, usage
from qwen3coder.server.protocol import CompletionRequest
from qwen3coder.server.state import (SSEResponse, ServerState, collect_final, merge_streams, random_id,
                                     run_until_disconnect, sse)

MAX_BATCH = 64  # prompts per request


class CompletionHandler:
    def __init__(self, state: ServerState):
        self.state = state
        self.texts = TokenText(state.tokenizer)

    def _prepare(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(prompt text, prompt ids) per prompt, FIM applied."""
        state, tok = self.state, self.state.tokenizer
        prompts = req.prompts()
        if len(prompts) > MAX_BATCH:
            raise APIError(f"prompt: at most {MAX_BATCH} prompts per request, got {len(prompts)}", 400, param="prompt")
        out: list[tuple[str | None, list[int]]] = []
        for k, p in enumerate(prompts):
            if req.suffix is not None:
                tok = state.need_tokenizer("suffix (fill-in-the-middle)")
                prefix = p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False)
                try:
                    p = build_fim_prompt(prefix, req.suffix)
                except ValueError as e:
                    raise APIError(str(e), 400, param="suffix") from e
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt: must not be empty", 400, param="prompt")
                tok = state.need_tokenizer("a text prompt")
                ids = tok.encode(p)
                text: str | None = p
            else:
                bad = [t for t in p if t >= state.engine.engine.vocab_size]
                if bad:
                    raise APIError(f"prompt[{k}]: token ids {bad[:5]} are outside the vocabulary "
                                   f"[0, {state.engine.engine.vocab_size})", 400, param="prompt")
                ids = list(p)
                text = tok.decode(ids, skip_special_tokens=False) if tok is not None else None
            state.check_prompt_len(len(ids), param="prompt")
            out.append((text, ids))
        return out

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        state = self.state
        model = state.check_model(req.model)
        prompts = self._prepare(req)
        overrides = req.to_sampling_kwargs()
        if req.logprobs is not None:
            overrides["logprobs"] = req.logprobs
            if req.echo:
                overrides["prompt_logprobs"] = req.logprobs
        if req.suffix is not None:
            overrides["stop_token_ids"] = sorted(set(overrides["stop_token_ids"]) | set(
                fim_stop_token_ids(state.tokenizer)))
        request_id = random_id("cmpl")
        streams = []
        try:
            for k, (text, ids) in enumerate(prompts):
                params = state.sampling_params(overrides, req.max_tokens, len(ids))
                params.output_kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
                prompt = {"prompt_token_ids": ids, "prompt": text}
                streams.append(state.submit(prompt, params, f"{request_id}-{k}"))
        except BaseException:
            for s in streams:
                s.aclose_sync()
            raise
        if req.stream:
            return SSEResponse(self._stream(req, streams, prompts, model, request_id))

        async def gather() -> list[RequestOutput]:
            import asyncio

            return list(await asyncio.gather(*(collect_final(s) for s in streams)))

        try:
            finals = await run_until_disconnect(raw, gather)
        finally:
            for s in streams:
                s.aclose_sync()
        if finals is None:
            return Response(status_code=499)
        for f in finals:
            err = output_error(f)
            if err is not None:
                raise APIError(f"generation failed: {err}", 500)
        choices = []
        n_prompt = n_out = cached = 0
        for k, final in enumerate(finals):
            n_prompt += len(final.prompt_token_ids)
            cached += final.num_cached_tokens
            for c in final.outputs:
                n_out += len(c.token_ids)
                text, lp = self._text_and_logprobs(req, prompts[k], final, c)
                choice = {"index": k * req.n + c.index, "text": text, "logprobs": lp,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if self.state.tokenizer is None:  # no text without a tokenizer: give the ids
                    choice["token_ids"] = list(c.token_ids)
                choices.append(choice)
        return JSONResponse({"id": request_id, "object": "text_completion", "created": int(time.time()),
                             "model": model, "choices": choices, "usage": usage(n_prompt, n_out, cached),
                             "system_fingerprint": None})

    def _text_and_logprobs(self, req: CompletionRequest, prompt: tuple[str | None, list[int]],
                           final: RequestOutput, c: Any, echo_done: bool = False) -> tuple[str, Any]:
        text = truncate_fim_output(c.text) if req.suffix is not None else c.text
        prompt_text = prompt[0] or ""
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(self.texts, c.token_ids, c.logprobs or [None] * len(c.token_ids), req.logprobs,
                                     len(prompt_text) if req.echo else 0)
            if req.echo and not echo_done and final.prompt_logprobs is not None:
                plp = completion_logprobs(self.texts, prompt[1], list(final.prompt_logprobs), req.logprobs)
                for key in lp:
                    lp[key] = plp[key] + lp[key]
        if req.echo and not echo_done:
            text = prompt_text + text
        return text, lp

    async def _stream(self, req: CompletionRequest, streams: list[Any],
                      prompts: list[tuple[str | None, list[int]]], model: str, request_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n_prompt = sum(len(ids) for _, ids in prompts)
        n_out = 0
        echoed: set[int] = set()
        try:
            async for k, out in merge_streams(streams):
                if out.error:
                    yield sse(json.dumps(error_body(f"generation failed: {out.error}", 500)))
                    break
                for c in out.outputs:
                    n_out += len(c.token_ids)
                    index = k * req.n + c.index
                    text, lp = self._text_and_logprobs(req, prompts[k], out, c, echo_done=index in echoed)
                    echoed.add(index)
                    # with a tokenizer an empty delta is text held back (a partial character, a possible
                    # stop string): skip it; without one (skip_tokenizer_init) text is always empty and
                    # each chunk carries the new token ids instead, so clients still see tokens stream
                    tokenizer_less = self.state.tokenizer is None
                    if not text and c.finish_reason is None and lp is None and not (tokenizer_less and c.token_ids):
                        continue
                    choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason}
                    if tokenizer_less:
                        choice["token_ids"] = list(c.token_ids)
                    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [choice]}
                    yield sse(json.dumps(body, ensure_ascii=False))
            if include_usage:
                body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": usage(n_prompt, n_out)}
                yield sse(json.dumps(body))
            yield sse("[DONE]")
        finally:
            for s in streams:
                s.aclose_sync()
