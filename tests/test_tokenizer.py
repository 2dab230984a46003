"""Tests of qwen3coder.chat.tokenizer against llama.cpp vectors and transformers' Qwen2Tokenizer."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from qwen3coder.chat.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
TOK_DIR = REF / "qwen3-coder-30b-a3b-instruct"
LLAMA = REF / "llama-cpp-tokenizer-tests" / "ggml-vocab-qwen2.gguf"
SKIP_REASON = f"Qwen3-Coder reference tokenizer files not found under {REF} (they live beside the repo)"
pytestmark = pytest.mark.skipif(not (TOK_DIR / "vocab.json").is_file(), reason=SKIP_REASON)

CORPUS = [
    # Python
    "def quick_sort(arr: list[int]) -> list[int]:\n    if len(arr) <= 1:\n        return arr\n"
    "    pivot, *rest = arr\n    return quick_sort([x for x in rest if x < pivot]) + [pivot]\n",
    "class Foo(Base):\n\t'''Doc string.'''\n\tdef __init__(self):\n\t\tself.x = 0x1F  # hex\r\n",
    # C
    '#include <stdio.h>\nint main(int argc, char **argv) {\n    printf("%d\\n", argc);\n    return 0;\n}\n',
    # JavaScript
    "const f = async (a, b) => { await fetch(`/api/${a}?b=${b}`); return a ?? b; };\n",
    # Rust
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!("{:?}", v);\n}\n',
    # Go
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tch := make(chan int, 3)\n\tfmt.Println(<-ch)\n}\n',
    # shell
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo "$f" | wc -c >> "${OUT:-/dev/null}"; done\n',
    # CJK, emoji, other scripts
    "我想在apple工作1314151天～ 日本語のテキスト、한국어 텍스트",
    "emoji 🚀🦙😶‍🌫️ ✅ 👩‍👩‍👧‍👦 flags 🇯🇵",
    "нещо на Български, Ελληνικά, العربية, עברית, हिन्दी, ภาษาไทย",
    # whitespace runs and numbers
    "a  b   c    d\n\n\n\t\t  \n   \n" + " " * 17 + "x\r\n\r\n",
    "3 33 333 3333 3.14159 1e-10 0b1011 1_000_000",
    # unicode normalisation (decomposed é, Å)
    "cafe\u0301 A\u030a",
    # special and added tokens written in text
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>",
    "<|fim_prefix|>def f():\n    <|fim_suffix|>\n    return 1<|fim_middle|><|file_sep|><|repo_name|><|endoftext|>",
    "<think>\nhmm\n</think><tool_response>\nok\n</tool_response><|fim_pad|>",
    "contractions: I'm, you're, it's, we've, they'll, he'd, DON'T, 'S",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_qwen")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(TOK_DIR / name, d / name)
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _llama_vectors() -> list[tuple[str, list[int]]]:
    sep = "\n__ggml_vocab_test__\n"
    raw = Path(str(LLAMA) + ".inp").read_text(encoding="utf-8")
    # llama.cpp's test-tokenizer-0: every case is terminated by the separator line.
    assert raw.endswith(sep)
    inputs = raw.split(sep)[:-1]
    outputs = Path(str(LLAMA) + ".out").read_text(encoding="utf-8").split("\n")
    assert outputs[-1] == ""
    outputs = outputs[:-1]
    assert len(inputs) == len(outputs) == raw.count(sep)
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, outputs, strict=True)]


@pytest.mark.skipif(not Path(str(LLAMA) + ".inp").is_file(), reason=SKIP_REASON)
def test_llama_cpp_vectors(tok):
    vectors = _llama_vectors()
    assert len(vectors) == 46  # every case in the file (46 separator-terminated inputs)
    assert vectors[0][0] == "ied 4 ½ months"
    failures = [(i, text) for i, (text, ids) in enumerate(vectors) if tok.encode(text) != ids]
    assert failures == []
    for text, ids in vectors:
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_known_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]
    assert tok.vocab_size == 151669
    assert tok.eos_token_id == 151645 and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == 151643 and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token_id is None and tok.bos_token is None
    assert tok.token_to_id("<tool_call>") == 151657
    assert tok.token_to_id("</tool_call>") == 151658
    assert tok.token_to_id("<|fim_prefix|>") == 151659
    assert tok.token_to_id("no-such-token") is None
    assert tok.convert_ids_to_tokens([9707, 1879, 151644]) == ["Hello", "Ġworld", "<|im_start|>"]
    assert tok.convert_ids_to_tokens(151664) == "<|file_sep|>"


def test_special_flags(tok):
    assert tok.special_token_ids == frozenset(range(151643, 151657))
    assert tok.all_special_tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert "<tool_call>" not in tok.all_special_tokens
    assert len(tok.added_tokens) == 26


def test_matches_transformers(tok, hf_tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert set(tok.all_special_tokens) == set(hf_tok.all_special_tokens)
    assert tok.vocab_size == len(hf_tok)


def test_decode_round_trip(tok):
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    assert tok.encode_batch(CORPUS[:3]) == [tok.encode(t) for t in CORPUS[:3]]


def test_added_tokens_are_atomic(tok):
    text = "<|im_start|>assistant\n<tool_call><|fim_middle|><|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 151644 and 151657 in ids and 151660 in ids and ids[-1] == 151645


def test_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nok<tool_call>\n<|fim_prefix|>x<|file_sep|><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nok<tool_call>\n<|fim_prefix|>x<|file_sep|>"
    assert tok.decode(ids).endswith("<|im_end|><|endoftext|>")


def test_decode_edge_cases(tok):
    assert tok.decode([]) == ""
    assert tok.decode([151700]) == ""  # an embedding padding row has no token
    with pytest.raises(ValueError, match="non-negative"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_chat_template_from_config(tok):
    assert tok.chat_template is not None and tok.chat_template.startswith("{% macro render_item_list")


def test_save_and_reload(tok, tmp_path, hf_tok):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    again = load_tokenizer(tmp_path)
    assert again.special_token_ids == tok.special_token_ids
    assert again.eos_token_id == tok.eos_token_id and again.chat_template == tok.chat_template
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS:
        assert again.encode(text) == tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert auto.eos_token_id == tok.eos_token_id and auto.pad_token_id == tok.pad_token_id
    assert auto.chat_template == tok.chat_template


def test_chat_template_jinja_wins(tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(TOK_DIR / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}", encoding="utf-8")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0].content }}"


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerLoadError, match=r"neither tokenizer\.json nor tokenizer_config\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    shutil.copy(TOK_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(TokenizerLoadError, match=r"merges\.txt") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path)
