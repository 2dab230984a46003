"""Tests of qwen3coder.chat.fim (fill-in-the-middle prompt formats)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen3coder.chat.fim import (
    FIM_STOP_TOKENS,
    build_chat_fim_messages,
    build_fim_prompt,
    build_repo_fim_prompt,
    fim_stop_token_ids,
    truncate_fim_output,
)
from qwen3coder.chat.template import render_chat

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
TOK_DIR = REF / "qwen3-coder-30b-a3b-instruct"
needs_ref = pytest.mark.skipif(
    not (TOK_DIR / "vocab.json").is_file(),
    reason=f"Qwen3-Coder reference tokenizer/template files not found under {REF} (they live beside the repo)",
)

PREFIX = "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n    "
SUFFIX = "\n    return quick_sort(left) + middle + quick_sort(right)\n"


@pytest.fixture(scope="module")
def tok():
    if not (TOK_DIR / "vocab.json").is_file():
        pytest.skip(f"Qwen3-Coder reference tokenizer files not found under {REF}")
    from qwen3coder.chat.tokenizer import load_tokenizer

    return load_tokenizer(TOK_DIR)


def test_file_level_prompt():
    assert build_fim_prompt("a(", ")") == "<|fim_prefix|>a(<|fim_suffix|>)<|fim_middle|>"
    assert build_fim_prompt("", "") == "<|fim_prefix|><|fim_suffix|><|fim_middle|>"


@needs_ref
def test_file_level_prompt_tokens(tok):
    ids = tok.encode(build_fim_prompt(PREFIX, SUFFIX))
    assert ids[0] == 151659 and ids[-1] == 151660 and ids.count(151661) == 1
    assert ids[1 : ids.index(151661)] == tok.encode(PREFIX)


def test_repo_level_prompt():
    files = [("library/book.py", "class Book:\n    pass\n\n"), ("library/__init__.py", "from .book import Book")]
    prompt = build_repo_fim_prompt("library-system", files, "library/main.py", "import ", "\nprint(1)\n")
    assert prompt == (
        "<|repo_name|>library-system\n"
        "<|file_sep|>library/book.py\nclass Book:\n    pass\n\n"
        "<|file_sep|>library/__init__.py\nfrom .book import Book\n"
        "<|file_sep|>library/main.py\n<|fim_prefix|>import <|fim_suffix|>\nprint(1)\n<|fim_middle|>"
    )
    assert build_repo_fim_prompt("r", [], "a.py", "x", "y") == (
        "<|repo_name|>r\n<|file_sep|>a.py\n<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>"
    )


@needs_ref
def test_chat_wrapped_form(tok):
    messages = build_chat_fim_messages(PREFIX, SUFFIX)
    assert messages == [
        {"role": "system", "content": "You are a code completion assistant."},
        {"role": "user", "content": build_fim_prompt(PREFIX, SUFFIX)},
    ]
    template = (REF / "qwen3_coder_chat_template.jinja").read_text(encoding="utf-8")
    prompt = render_chat(template, messages, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a code completion assistant.<|im_end|>\n"
        f"<|im_start|>user\n{build_fim_prompt(PREFIX, SUFFIX)}<|im_end|>\n<|im_start|>assistant\n"
    )


@needs_ref
def test_stop_token_ids(tok):
    assert fim_stop_token_ids(tok) == [151664, 151662, 151659, 151660, 151661, 151663, 151645, 151643]
    assert len(FIM_STOP_TOKENS) == 8


def test_stop_token_ids_missing():
    class Tiny:
        def token_to_id(self, token):
            return {"<|endoftext|>": 0}.get(token)

    with pytest.raises(ValueError, match="file_sep"):
        fim_stop_token_ids(Tiny())


def test_truncate_output():
    assert truncate_fim_output("left = [x]\n<|file_sep|>other.py\nstuff") == "left = [x]\n"
    assert truncate_fim_output("a<|fim_pad|>b<|file_sep|>c") == "a"
    assert truncate_fim_output("x = 1<|endoftext|>") == "x = 1"
    assert truncate_fim_output("done<|im_end|>") == "done"
    assert truncate_fim_output("no stop here <tool_call>") == "no stop here <tool_call>"
    assert truncate_fim_output("") == ""


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"prefix contains the FIM control token '<\|fim_middle\|>'"):
        build_fim_prompt("a<|fim_middle|>", "")
    with pytest.raises(ValueError, match="suffix"):
        build_fim_prompt("", "<|file_sep|>")
    with pytest.raises(TypeError, match="prefix must be a str"):
        build_fim_prompt(None, "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path must be a single line"):
        build_repo_fim_prompt("r", [], "a\nb.py", "", "")
    with pytest.raises(ValueError, match=r"files\[0\] must be a \(path, content\) pair"):
        build_repo_fim_prompt("r", ["a.py"], "b.py", "", "")  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"files\[0\] content"):
        build_repo_fim_prompt("r", [("a.py", "<|repo_name|>")], "b.py", "", "")
