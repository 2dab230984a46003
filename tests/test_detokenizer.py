"""Tests of qwen3coder.chat.detokenizer.IncrementalDetokenizer with the real Qwen3-Coder tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3coder.chat.detokenizer import IncrementalDetokenizer
from qwen3coder.chat.tokenizer import Tokenizer, byte_to_unicode, load_tokenizer

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
TOK_DIR = REF / "qwen3-coder-30b-a3b-instruct"
pytestmark = pytest.mark.skipif(
    not (TOK_DIR / "vocab.json").is_file(),
    reason=f"Qwen3-Coder reference tokenizer files not found under {REF} (they live beside the repo)",
)

_TOK: Tokenizer | None = None


def tokenizer() -> Tokenizer:
    global _TOK
    if _TOK is None:
        _TOK = load_tokenizer(TOK_DIR)
    return _TOK


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every decode() window."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.windows: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        ids = list(ids)
        self.windows.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(ids: list[int], chunks: list[int], skip: bool = True, prompt_ids=None) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer(), prompt_ids=prompt_ids, skip_special_tokens=skip)
    deltas, pos = [], 0
    for size in chunks:
        deltas.append(detok.add_tokens(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.add_tokens(ids[pos:]))
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    assert detok.token_ids == ids
    return deltas, detok.text


ALPHABET = list("abc xyz\n\t(){}<>_=:;'\"") + [
    "中",
    "文",
    "字",
    "日本",
    "한국어",
    "é",
    "ß",
    "Ω",
    "😀",
    "🚀",
    "🦙",
    "👩‍👩‍👧",
    "😶‍🌫️",
    "ก",
    "\u200d",
    "<|im_end|>",
    "<tool_call>",
    "<|fim_prefix|>",
    "<|endoftext|>",
]
texts = st.lists(st.sampled_from(ALPHABET), min_size=0, max_size=40).map("".join)
chunkings = st.lists(st.integers(min_value=0, max_value=4), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, chunks=chunkings, skip=st.booleans())
def test_deltas_concatenate_to_decode(text, chunks, skip):
    tok = tokenizer()
    ids = tok.encode(text)
    deltas, full = stream(ids, chunks, skip=skip)
    assert full == tok.decode(ids, skip_special_tokens=skip)
    # valid text never shows a replacement character for a split multi-byte character
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=151668), max_size=30), chunks=chunkings, skip=st.booleans())
def test_random_token_ids(ids, chunks, skip):
    # arbitrary ids may hold invalid or truncated UTF-8: the concatenation must still equal decode()
    _, full = stream(ids, chunks, skip=skip)
    assert full == tokenizer().decode(ids, skip_special_tokens=skip)


def _byte_tokens(text: str) -> list[int]:
    """One token per UTF-8 byte (byte-level BPE has a token for every byte)."""
    from tokenizers.pre_tokenizers import ByteLevel

    tok = tokenizer()
    alphabet = ByteLevel.alphabet()
    mapping = {}
    for ch in alphabet:
        tid = tok.token_to_id(ch)
        assert tid is not None
        mapping[ch] = tid
    byte_to_char = byte_to_unicode()
    return [mapping[byte_to_char[b]] for b in text.encode("utf-8")]


def test_multibyte_split_is_held_back():
    ids = _byte_tokens("a中😀b")
    detok = IncrementalDetokenizer(tokenizer())
    out = [detok.add_token(i) for i in ids]
    # 'a', then 3 bytes of 中 (2 held), then 4 bytes of 😀 (3 held), then 'b'
    assert out == ["a", "", "", "中", "", "", "", "😀", "b"]
    assert detok.finish() == ""
    assert detok.text == "a中😀b"


def test_incomplete_tail_flushed_by_finish():
    ids = _byte_tokens("x中")[:-1]  # 'x' + two of the three bytes of 中
    detok = IncrementalDetokenizer(tokenizer())
    assert detok.add_tokens(ids) == "x"
    assert detok.finish() == "\ufffd"
    assert detok.text == tokenizer().decode(ids) == "x\ufffd"
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.add_tokens([1])


def test_invalid_bytes_emitted_once_followed_by_text():
    lone_continuation = _byte_tokens("中")[1:2]  # a stray continuation byte
    ids = lone_continuation + tokenizer().encode("ok")
    detok = IncrementalDetokenizer(tokenizer())
    assert detok.add_tokens(ids[:1]) == ""
    assert detok.add_tokens(ids[1:]) == "\ufffdok"


def test_skip_special_tokens():
    tok = tokenizer()
    ids = tok.encode("hi<tool_call>\n<|im_end|><|endoftext|>")
    assert "".join(stream(ids, [1] * len(ids), skip=True)[0]) == "hi<tool_call>\n"
    assert "".join(stream(ids, [1] * len(ids), skip=False)[0]) == "hi<tool_call>\n<|im_end|><|endoftext|>"


def test_prompt_context_not_in_output():
    tok = tokenizer()
    prompt = tok.encode("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode("好的, 🚀 done")
    deltas, full = stream(ids, [1] * len(ids), prompt_ids=prompt)
    assert full == "好的, 🚀 done"


def test_work_is_proportional_to_new_tokens():
    tok = tokenizer()
    text = "".join(["中文 emoji 😀🚀 code `x = 1`\n"] * 200)
    ids = tok.encode(text)
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, skip_special_tokens=False)
    for i in ids:
        detok.add_token(i)
    detok.finish()
    assert detok.text == text
    # each step decodes a small window, never the whole output
    assert max(counting.windows) <= 8
    assert sum(counting.windows) <= 8 * len(ids)


def test_rejects_bad_ids():
    detok = IncrementalDetokenizer(tokenizer())
    with pytest.raises(ValueError, match="non-negative"):
        detok.add_tokens([-5])
    assert detok.add_tokens([]) == ""
