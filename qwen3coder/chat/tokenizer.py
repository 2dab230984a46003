"""Qwen3-Coder tokenizer: a thin, typed wrapper around HF ``tokenizers``.

``load_tokenizer(checkpoint_dir)`` loads ``tokenizer.json`` when the checkpoint ships one and
otherwise rebuilds the identical byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` (what transformers' ``Qwen2Tokenizer`` does): NFC normalisation, the
Qwen2 pre-tokenizer split regex followed by ``ByteLevel(add_prefix_space=False, use_regex=False)``,
a ``ByteLevel`` decoder and the added tokens of ``added_tokens_decoder`` with their ``special``
flags. Tokens flagged ``special`` (``<|im_end|>``, ``<|endoftext|>`` ...) are dropped by
``decode(..., skip_special_tokens=True)``; non-special added tokens (``<tool_call>``, the FIM
tokens ...) are atomic but survive decoding.

The engine and the server use this class only through its public methods/properties.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

__all__ = ["Tokenizer", "load_tokenizer", "QWEN2_PRETOKENIZE_REGEX", "TokenizerLoadError"]

#: The Qwen2 pre-tokenizer regex (transformers ``tokenization_qwen2.PRETOKENIZE_REGEX``).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_FILE = "tokenizer.json"
_TEMPLATE_FILE = "chat_template.jinja"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level table: each byte 0..255 as the printable character byte-level BPE uses for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class TokenizerLoadError(FileNotFoundError):
    """A checkpoint directory lacks the files needed to build its tokenizer."""


def _token_content(value: Any) -> str | None:
    """``eos_token`` & co. are either a string, ``None`` or an AddedToken-like dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unsupported special-token entry in {_CONFIG_FILE}: {value!r}")


def _build_from_vocab_merges(directory: Path, config: dict[str, Any]) -> _HFTokenizer:
    """Rebuild the byte-level BPE tokenizer exactly as transformers' Qwen2Tokenizer does."""
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    for needed in (vocab_path, merges_path):
        if not needed.is_file():
            raise TokenizerLoadError(
                f"cannot build a tokenizer for {directory}: neither {_TOKENIZER_FILE} nor {needed.name} is present"
            )
    model = BPE.from_file(
        str(vocab_path),
        str(merges_path),
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = _HFTokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise ValueError(f"{directory / _CONFIG_FILE}: added_tokens_decoder must be a mapping")
    for key in sorted(added, key=int):
        spec = added[key]
        token = AddedToken(
            spec["content"],
            single_word=bool(spec.get("single_word", False)),
            lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)),
            normalized=bool(spec.get("normalized", False)),
            special=bool(spec.get("special", False)),
        )
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(spec["content"])
        if got != int(key):
            raise ValueError(
                f"{directory / _CONFIG_FILE}: added token {spec['content']!r} declared with id {key} "
                f"but the vocabulary assigns {got}; added tokens must follow vocab.json contiguously"
            )
    return tok


class Tokenizer:
    """A loaded Qwen tokenizer plus the bits of ``tokenizer_config.json`` the system needs."""

    def __init__(
        self, hf_tokenizer: _HFTokenizer, config: dict[str, Any] | None = None, chat_template: str | None = None
    ) -> None:
        self._tok = hf_tokenizer
        self._config: dict[str, Any] = dict(config or {})
        if chat_template is None and isinstance(self._config.get("chat_template"), str):
            chat_template = self._config["chat_template"]
        self._chat_template = chat_template
        self._added = dict(hf_tokenizer.get_added_tokens_decoder())
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self._eos = _token_content(self._config.get("eos_token"))
        self._pad = _token_content(self._config.get("pad_token"))
        self._bos = _token_content(self._config.get("bos_token"))

    # ----------------------------------------------------------------- encoding / decoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; added tokens written literally are matched atomically."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """``encode`` for several texts at once (parallel in the Rust core)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids without a token (embedding padding rows) decode to nothing."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def _check_ids(ids: Iterable[int]) -> list[int]:
        out = list(ids)
        for i in out:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"token ids must be non-negative ints, got {i!r}")
        return out

    # ----------------------------------------------------------------- vocabulary
    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """Token string(s) for id(s) (byte-level form, e.g. ``'Ġworld'``); ``None`` for unknown ids."""
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in self._check_ids(ids)]

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or ``None`` if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added tokens (151,669 for Qwen3-Coder)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens(self) -> dict[int, str]:
        """Added-token id -> content."""
        return {i: t.content for i, t in sorted(self._added.items())}

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids whose ``special`` flag is true (removed by ``skip_special_tokens``)."""
        return self._special_ids

    @property
    def all_special_tokens(self) -> list[str]:
        """Contents of the tokens whose ``special`` flag is true, by id."""
        return [self._added[i].content for i in sorted(self._special_ids)]

    def _id_of(self, content: str | None) -> int | None:
        return None if content is None else self._tok.token_to_id(content)

    @property
    def eos_token(self) -> str | None:
        return self._eos

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self._eos)

    @property
    def pad_token(self) -> str | None:
        return self._pad

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self._pad)

    @property
    def bos_token(self) -> str | None:
        return self._bos

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self._bos)

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (``chat_template.jinja`` wins over the config field)."""
        return self._chat_template

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the ``tokenizer_config.json`` contents this tokenizer was loaded with."""
        return json.loads(json.dumps(self._config))

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``).

        The result loads with ``load_tokenizer`` and with transformers' ``AutoTokenizer``.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / _TOKENIZER_FILE))
        config = self.config
        config.pop("chat_template", None)
        config.setdefault("tokenizer_class", "Qwen2Tokenizer")
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._added.items())
        }
        (out / _CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if self._chat_template is not None:
            (out / _TEMPLATE_FILE).write_text(self._chat_template, encoding="utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self._eos!r}, pad={self._pad!r})"


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory (see the module docstring)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise TokenizerLoadError(f"tokenizer directory {directory} does not exist or is not a directory")
    config_path = directory / _CONFIG_FILE
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
    tokenizer_path = directory / _TOKENIZER_FILE
    if tokenizer_path.is_file():
        hf = _HFTokenizer.from_file(str(tokenizer_path))
    elif not config_path.is_file():
        raise TokenizerLoadError(
            f"cannot build a tokenizer for {directory}: neither {_TOKENIZER_FILE} nor {_CONFIG_FILE} is present"
        )
    else:
        hf = _build_from_vocab_merges(directory, config)
    template_path = directory / _TEMPLATE_FILE
    template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
    return Tokenizer(hf, config, template)
