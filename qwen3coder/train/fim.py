"""Fill-in-the-middle for pretraining: the PSM transform of Qwen2.5-Coder / Qwen3-Coder.

A document is cut into chunks of about one context's worth of text at line boundaries ("context-level"
FIM). Each chunk becomes, with probability `fim_rate`,

    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}<|endoftext|>

with two cut points drawn uniformly over the chunk's characters — exactly the prompt that
`qwen3coder.chat.fim.build_fim_prompt` builds at inference, followed by the middle and the end of
text, so the model learns to stop. Plain chunks of a document stay contiguous and the document ends
with `<|endoftext|>`. The three pieces of a FIM chunk are tokenized separately, which is also what the
tokenizer does with the prompt string (added tokens split the text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from qwen3coder.chat.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class FimSplit:
    prefix: str
    middle: str
    suffix: str

    def psm(self) -> str:
        """The training string (without the trailing end of text)."""
        return f"{FIM_PREFIX}{self.prefix}{FIM_SUFFIX}{self.suffix}{FIM_MIDDLE}{self.middle}"


def fim_split(text: str, rng: random.Random) -> FimSplit:
    """Cut `text` at two uniform random character positions: prefix + middle + suffix == text."""
    a, b = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return FimSplit(text[:a], text[a:b], text[b:])


def chunk_lines(text: str, max_chars: int) -> list[str]:
    """Split at line boundaries into pieces of at most ~`max_chars` (a longer single line stays whole)."""
    if len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if cur and size + len(line) > max_chars:
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        chunks.append("".join(cur))
    return chunks


Segment = tuple[str, str]  # ("text", s) or ("token", "<|fim_prefix|>" ...)


def document_segments(text: str, rng: random.Random, fim_rate: float, chunk_chars: int) -> list[Segment]:
    """The document as text pieces and control tokens, FIM applied per chunk, ending in end-of-text."""
    out: list[Segment] = []
    for chunk in chunk_lines(text, chunk_chars):
        if fim_rate > 0 and rng.random() < fim_rate:
            s = fim_split(chunk, rng)
            out += [("token", FIM_PREFIX), ("text", s.prefix), ("token", FIM_SUFFIX), ("text", s.suffix),
                    ("token", FIM_MIDDLE), ("text", s.middle), ("token", ENDOFTEXT)]
        else:
            out.append(("text", chunk))
    if not out or out[-1] != ("token", ENDOFTEXT):
        out.append(("token", ENDOFTEXT))
    return out


def segments_to_string(segments: list[Segment]) -> str:
    return "".join(s for _, s in segments)
