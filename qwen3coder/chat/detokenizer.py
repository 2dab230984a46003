"""Incremental (streaming) detokenisation.

``IncrementalDetokenizer`` turns generated token ids into text deltas as they arrive, using the
prefix/read-offset scheme of vLLM: it decodes only a short window of recent tokens
(``tokens[prefix_offset:]``) and compares it with the decode of the already-emitted part of the
window (``tokens[prefix_offset:read_offset]``). If the window's text ends in U+FFFD the last
token(s) stop inside a multi-byte UTF-8 sequence: only the text before that unfinished character
is emitted and the window is kept until a later token completes it; otherwise the new suffix is
emitted and the window slides forward.

Each call costs O(new tokens + the few tokens of an unfinished character), never a re-decode of
the whole output. A U+FFFD that is really in the output (invalid bytes) is emitted as soon as a
following token makes the text end cleanly, or by ``finish()``. The concatenation of all deltas
(including ``finish()``) equals ``tokenizer.decode(all_output_ids, skip_special_tokens)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer", "PROMPT_CONTEXT_TOKENS"]

#: How many trailing prompt tokens seed the decode window (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Stream text out of token ids; see the module docstring for the algorithm."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = bool(skip_special_tokens)
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        # Only the decode window is kept; emitted text lives in ``_pieces``.
        self._window: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Characters of the current window already emitted beyond ``prefix_text`` (the text
        # before an unfinished trailing character is emitted early).
        self._held_emitted = 0
        self._output_ids: list[int] = []
        self._pieces: list[str] = []
        self._finished = False

    # ------------------------------------------------------------------ public API
    def add_tokens(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the text that became stable (possibly "")."""
        if self._finished:
            raise RuntimeError("add_tokens() called after finish()")
        ids = list(new_ids)
        if not ids:
            return ""
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"token ids must be non-negative ints, got {i!r}")
        self._output_ids.extend(ids)
        self._window.extend(ids)
        prefix_text = self._decode(self._window[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._window[self._prefix_offset :])
        start = len(prefix_text) + self._held_emitted
        if new_text.endswith(_REPLACEMENT):
            # The window ends inside a multi-byte character: emit what precedes it, keep the window.
            stable = new_text.rstrip(_REPLACEMENT)
            delta = stable[start:] if len(stable) > start else ""
            self._held_emitted += len(delta)
        else:
            delta = new_text[start:] if len(new_text) > start else ""
            self._slide()
        if delta:
            self._pieces.append(delta)
        return delta

    def add_token(self, token_id: int) -> str:
        """``add_tokens([token_id])``."""
        return self.add_tokens([token_id])

    def finish(self) -> str:
        """Flush text still held back (an unfinished/invalid UTF-8 tail); idempotent."""
        if self._finished:
            return ""
        self._finished = True
        prefix_text = self._decode(self._window[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._window[self._prefix_offset :])
        start = len(prefix_text) + self._held_emitted
        delta = new_text[start:] if len(new_text) > start else ""
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far (after ``finish()``: the full output text)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def token_ids(self) -> list[int]:
        """All generated ids added so far (prompt context excluded)."""
        return list(self._output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._output_ids)

    @property
    def finished(self) -> bool:
        return self._finished

    # ------------------------------------------------------------------ internals
    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _slide(self) -> None:
        """Everything up to the end is emitted: move the window (drop tokens before it)."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._window)
        self._held_emitted = 0
        if self._prefix_offset:
            del self._window[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
