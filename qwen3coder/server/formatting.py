"""Response pieces shared by the handlers: logprobs in the chat and the completions shapes, usage,
and the exact bytes of a token.

A byte-level BPE token may hold part of a UTF-8 character, so its text alone loses information;
`token_bytes` recovers the raw bytes from the token string through GPT-2's byte↔unicode table, as
OpenAI's `bytes` field expects.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from qwen3coder.engine.outputs import Logprob, RequestOutput


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    from qwen3coder.chat.tokenizer import byte_to_unicode

    return {c: b for b, c in byte_to_unicode().items()}


class TokenText:
    """Per-token text and bytes with a small cache (the same ids repeat a lot)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int, decoded: str | None = None) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        if self.tokenizer is None:
            text, raw = f"token_id:{token_id}", None
        else:
            text = decoded if decoded is not None else self.tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = _unicode_to_byte()
            if isinstance(piece, str) and piece and all(ch in table for ch in piece):
                raw = [table[ch] for ch in piece]
            else:
                raw = None
        out = (text, raw if raw is not None else list(text.encode("utf-8")))
        if len(self._cache) < 200_000:
            self._cache[token_id] = out
        return out


def _finite(x: float) -> float:
    return max(x, -9999.0)  # -inf is not valid JSON; OpenAI reports -9999.0 for impossible tokens


def chat_logprobs(texts: TokenText, token_ids: list[int], entries: list[dict[int, Logprob]] | None,
                  top_k: int) -> dict[str, Any] | None:
    """`choices[].logprobs` of a chat completion: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    content = []
    for tid, entry in zip(token_ids, entries):
        lp = entry.get(tid)
        text, raw = texts.get(tid, lp.decoded_token if lp else None)
        tops = []
        for other_id, other in sorted(entry.items(), key=lambda kv: (kv[1].rank or 0)):
            if other.rank is None or other.rank > top_k or len(tops) >= top_k:
                continue
            t, b = texts.get(other_id, other.decoded_token)
            tops.append({"token": t, "logprob": _finite(other.logprob), "bytes": b})
        content.append({"token": text, "logprob": _finite(lp.logprob if lp else float("-inf")), "bytes": raw,
                        "top_logprobs": tops})
    return {"content": content}


def completion_logprobs(texts: TokenText, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                        top_k: int, text_offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of a text completion: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for tid, entry in zip(token_ids, entries):
        lp = entry.get(tid) if entry is not None else None
        text, _ = texts.get(tid, lp.decoded_token if lp else None)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        token_lps.append(None if entry is None else _finite(lp.logprob if lp else float("-inf")))
        if entry is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for other_id, other in sorted(entry.items(), key=lambda kv: (kv[1].rank or 0)):
            if other.rank is not None and other.rank <= top_k and len(top) < top_k:
                top[texts.get(other_id, other.decoded_token)[0]] = _finite(other.logprob)
        if lp is not None:
            top.setdefault(text, _finite(lp.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def output_error(out: RequestOutput | None) -> str | None:
    if out is None:
        return "the request ended without output"
    return out.error
