"""Turns sequence progress into `RequestOutput`s: incremental detokenization, stop strings, and
the three output kinds (cumulative, delta, final-only).

Stop strings are matched on the detokenized text, so they are found across token boundaries; the
text is cut before the stop string (kept with `include_stop_str_in_output`). While a sequence
runs, text that could still become the start of a stop string is held back from the visible
output, so a streamed stop string never leaks.
"""

from __future__ import annotations

from typing import Any

from qwen3coder.engine.outputs import CompletionOutput, RequestOutput
from qwen3coder.engine.sampling_params import RequestOutputKind
from qwen3coder.engine.sequence import Request, Sequence


class SeqTextState:
    __slots__ = ("detok", "text", "num_tokens", "stopped", "sent_text", "sent_tokens", "sent_logprobs",
                 "sent_finished")

    def __init__(self, detok: Any):
        self.detok = detok
        self.text = ""
        self.num_tokens = 0  # output tokens already detokenized
        self.stopped = False  # a stop string ended the text
        self.sent_text = 0  # DELTA: characters / tokens / logprob entries already sent
        self.sent_tokens = 0
        self.sent_logprobs = 0
        self.sent_finished = False


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """Earliest stop string occurrence that ends at or after `start` (index, string)."""
    found: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (found is None or i < found[0]):
            found = (i, stop)
    return found


class OutputProcessor:
    def __init__(self, tokenizer: Any, detokenizer_cls: Any = None):
        self.tokenizer = tokenizer
        self.detokenizer_cls = detokenizer_cls

    def _state(self, seq: Sequence) -> SeqTextState:
        req = seq.request
        if req.output_state is None:
            req.output_state = {}
        st = req.output_state.get(seq.index)
        if st is None:
            detok = None
            if self.tokenizer is not None:
                detok = self.detokenizer_cls(self.tokenizer, prompt_ids=req.prompt_token_ids,
                                             skip_special_tokens=req.params.skip_special_tokens)
            st = req.output_state[seq.index] = SeqTextState(detok)
        return st

    def update_text(self, seq: Sequence) -> tuple[str, str] | None:
        """Detokenize the sequence's new tokens; returns ("stop", stop string) if one matched."""
        st = self._state(seq)
        out = seq.output_token_ids
        new = out[st.num_tokens:]
        st.num_tokens = len(out)
        if st.detok is None or st.stopped:
            return None
        p = seq.params
        if new and seq.finish_reason == "stop" and isinstance(seq.stop_reason, int) \
                and not p.include_stop_str_in_output:
            new = new[:-1]  # a stop token id's text is not part of the output
        elif new and seq.finish_reason == "stop" and seq.stop_reason is None and not p.include_stop_str_in_output:
            new = new[:-1]  # nor is EOS
        before = len(st.text)
        st.text += st.detok.add_tokens(new)
        if seq.is_finished:
            st.text += st.detok.finish()
        if p.stop:
            hit = find_stop(st.text, p.stop, before)
            if hit is not None:
                i, stop = hit
                st.text = st.text[:i + len(stop)] if p.include_stop_str_in_output else st.text[:i]
                st.stopped = True
                return "stop", stop
        return None

    def _visible_text(self, seq: Sequence, st: SeqTextState) -> str:
        if seq.is_finished or st.stopped or not seq.params.stop:
            return st.text
        return st.text[:len(st.text) - stop_holdback(st.text, seq.params.stop)]

    def _decode_logprobs(self, entries: list[dict]) -> None:
        if self.tokenizer is None:
            return
        for entry in entries:
            for tid, lp in entry.items():
                if lp is not None and lp.decoded_token is None:
                    lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)

    def make_output(self, req: Request) -> RequestOutput | None:
        kind = req.params.output_kind
        finished = req.is_finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for seq in req.seqs:
            st = self._state(seq)
            text = self._visible_text(seq, st)
            logprobs = seq.logprobs
            if kind is RequestOutputKind.DELTA:
                if len(text) == st.sent_text and seq.num_output_tokens == st.sent_tokens \
                        and (st.sent_finished or not seq.is_finished):
                    continue
                c = CompletionOutput(seq.index, text[st.sent_text:], seq.output_token_ids[st.sent_tokens:],
                                     None, None if logprobs is None else logprobs[st.sent_logprobs:],
                                     seq.finish_reason, seq.stop_reason)
                st.sent_text, st.sent_tokens = len(text), seq.num_output_tokens
                st.sent_logprobs = len(logprobs) if logprobs is not None else 0
                st.sent_finished = seq.is_finished
            else:
                c = CompletionOutput(seq.index, text, list(seq.output_token_ids), None,
                                     None if logprobs is None else list(logprobs),
                                     seq.finish_reason, seq.stop_reason)
            if logprobs is not None:
                c.cumulative_logprob = seq.cumulative_logprob
                self._decode_logprobs(c.logprobs)
            completions.append(c)
        if not completions and not finished:
            return None
        completions.sort(key=lambda c: c.index)
        prompt_lp = req.prompt_logprobs
        if prompt_lp is not None:
            self._decode_logprobs([e for e in prompt_lp if e is not None])
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), completions, finished,
                             prompt_logprobs=None if prompt_lp is None else list(prompt_lp),
                             metrics=req.metrics, error=req.error,
                             num_cached_tokens=req.metrics.num_cached_tokens)
