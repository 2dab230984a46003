"""Fill-in-the-middle (FIM) prompt formats of Qwen3-Coder / Qwen2.5-Coder.

* File-level FIM (base models, raw completion, no chat template)::

      <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

* Repo-level FIM: ``<|repo_name|>{repo}\\n`` then each context file as
  ``<|file_sep|>{path}\\n{content}`` and finally the file being completed as
  ``<|file_sep|>{path}\\n<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``.
* Instruct models: the file-level FIM string as the user message after the system message
  "You are a code completion assistant.", rendered with the chat template
  (``add_generation_prompt=True``).

Generation stops at any of ``FIM_STOP_TOKENS`` (ids via ``fim_stop_token_ids``);
``truncate_fim_output`` cuts text at the first of them (e.g. the next ``<|file_sep|>``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

__all__ = [
    "FIM_PREFIX",
    "FIM_SUFFIX",
    "FIM_MIDDLE",
    "FIM_PAD",
    "REPO_NAME",
    "FILE_SEP",
    "FIM_STOP_TOKENS",
    "FIM_SYSTEM_PROMPT",
    "build_fim_prompt",
    "build_repo_fim_prompt",
    "build_chat_fim_messages",
    "fim_stop_token_ids",
    "truncate_fim_output",
]

FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

#: Strings that end a FIM completion (the Qwen2.5-Coder example's stop ids, as text).
FIM_STOP_TOKENS: tuple[str, ...] = (
    FILE_SEP,
    FIM_PAD,
    FIM_PREFIX,
    FIM_MIDDLE,
    FIM_SUFFIX,
    REPO_NAME,
    IM_END,
    ENDOFTEXT,
)
_CONTROL_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD, REPO_NAME, FILE_SEP)

FIM_SYSTEM_PROMPT = "You are a code completion assistant."


class _TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def _check_text(name: str, value: Any, *, single_line: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    for token in _CONTROL_TOKENS:
        if token in value:
            raise ValueError(f"{name} contains the FIM control token {token!r}, which would corrupt the prompt")
    if single_line and ("\n" in value or "\r" in value):
        raise ValueError(f"{name} must be a single line, got {value!r}")
    return value


def build_fim_prompt(prefix: str, suffix: str) -> str:
    """``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`` (raw, for completions)."""
    return f"{FIM_PREFIX}{_check_text('prefix', prefix)}{FIM_SUFFIX}{_check_text('suffix', suffix)}{FIM_MIDDLE}"


def build_repo_fim_prompt(
    repo_name: str,
    files: Iterable[tuple[str, str]],
    path: str,
    prefix: str,
    suffix: str,
) -> str:
    """Repo-level FIM prompt; ``files`` are (path, content) context files, ``path`` is completed last.

    Contents are inserted verbatim except that a newline is appended to a content that does not
    end with one, so every ``<|file_sep|>`` starts a line.
    """
    parts = [REPO_NAME, _check_text("repo_name", repo_name, single_line=True), "\n"]
    for i, item in enumerate(files):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"files[{i}] must be a (path, content) pair")
        file_path = _check_text(f"files[{i}] path", item[0], single_line=True)
        content = _check_text(f"files[{i}] content", item[1])
        if content and not content.endswith("\n"):
            content += "\n"
        parts += [FILE_SEP, file_path, "\n", content]
    parts += [FILE_SEP, _check_text("path", path, single_line=True), "\n", build_fim_prompt(prefix, suffix)]
    return "".join(parts)


def build_chat_fim_messages(prefix: str, suffix: str) -> list[dict[str, str]]:
    """The Instruct-model form: a system message plus the FIM string as the user message."""
    return [
        {"role": "system", "content": FIM_SYSTEM_PROMPT},
        {"role": "user", "content": build_fim_prompt(prefix, suffix)},
    ]


def fim_stop_token_ids(tokenizer: _TokenLookup) -> list[int]:
    """Ids of ``FIM_STOP_TOKENS`` in ``tokenizer`` (in that order, without duplicates).

    Raises ``ValueError`` naming the tokens the vocabulary lacks.
    """
    ids: list[int] = []
    missing = []
    for token in FIM_STOP_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            missing.append(token)
        elif token_id not in ids:
            ids.append(token_id)
    if missing:
        raise ValueError(f"tokenizer has no token for FIM stop string(s) {missing}; is this a Qwen coder tokenizer?")
    return ids


def truncate_fim_output(text: str) -> str:
    """Cut generated text at the first FIM stop-token string (e.g. the next ``<|file_sep|>``)."""
    cut = len(text)
    for token in FIM_STOP_TOKENS:
        at = text.find(token, 0, cut)
        if at != -1:
            cut = at
    return text[:cut]
