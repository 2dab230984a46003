"""The bundled model's tokenizer: byte-level BPE trained on the corpus, with Qwen3's control tokens.

Built the way `qwen3coder.chat.tokenizer` rebuilds Qwen's: NFC normalisation, the Qwen2 split regex,
`ByteLevel(add_prefix_space=False, use_regex=False)`, a ByteLevel decoder. The BPE vocabulary fills
ids `0 .. V-14`; the 13 added tokens follow in Qwen's order, with Qwen's `special` flags (only
`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are special, so `skip_special_tokens` keeps tool-call and
FIM markup). `encode_documents` turns documents into one packed uint16 token stream with FIM applied
(`qwen3coder.train.fim`) and counts tokens per language.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from qwen3coder.chat.tokenizer import QWEN2_PRETOKENIZE_REGEX, Tokenizer, load_tokenizer
from qwen3coder.train.data import Document
from qwen3coder.train.fim import document_segments
from qwen3coder.train.profiles import TokenizerConfig

#: (content, special) in Qwen3's id order
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False),
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def tokenizer_config(chat_template: str | None = None, max_length: int = 32768) -> dict[str, Any]:
    """tokenizer_config.json fields (the added_tokens_decoder is written by `Tokenizer.save`)."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "bos_token": None, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": max_length,
        "additional_special_tokens": [c for c, special in ADDED_TOKENS if special and c != PAD_TOKEN],
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def _text_sample(docs: Sequence[Document], max_bytes: int, seed: int) -> list[str]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= max_bytes:
            break
        out.append(docs[i].text)
        total += len(docs[i].text)
    return out


def train_tokenizer(docs: Sequence[Document], cfg: TokenizerConfig, log: Any = print) -> Tokenizer:
    """Train byte-level BPE on a sample of `docs`; returns the wrapped tokenizer (no chat template yet)."""
    if cfg.vocab_size <= 256 + len(ADDED_TOKENS):
        raise ValueError(f"tokenizer vocab_size must exceed {256 + len(ADDED_TOKENS)}, got {cfg.vocab_size}")
    t0 = time.time()
    tok = HFTokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(ADDED_TOKENS), min_frequency=cfg.min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    sample = _text_sample(docs, cfg.sample_bytes, cfg.seed)
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    log(f"[tokenizer] trained byte-level BPE: {tok.get_vocab_size()} tokens on "
        f"{sum(map(len, sample)) / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return Tokenizer(tok, tokenizer_config())


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inline too) + chat_template.jinja."""
    wrapped = Tokenizer(tok.backend, tokenizer_config(chat_template), chat_template)
    wrapped.save(directory)
    if chat_template is not None:  # `Tokenizer.save` keeps the template in its own file only
        import json

        path = Path(directory) / "tokenizer_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["chat_template"] = chat_template
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load(directory: str | os.PathLike) -> Tokenizer:
    return load_tokenizer(directory)


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D uint16/uint32, documents separated by <|endoftext|>
    tokens_per_lang: dict[str, int]


def _doc_rng(doc: Document, seed: int) -> random.Random:
    return random.Random(seed * 1_000_003 + zlib.crc32(doc.path.encode("utf-8")))


_WORKER: dict[str, Any] = {}


def _encode_chunk(args: tuple[int, int]) -> tuple[int, np.ndarray, dict[str, int]]:
    """Pool worker (forked): encode documents [lo, hi) of the list set up by `encode_documents`."""
    lo, hi = args
    w = _WORKER
    stream = _encode_serial(w["tok"], w["docs"][lo:hi], w["fim_rate"], w["chunk_chars"], w["seed"])
    return lo, stream.tokens, stream.tokens_per_lang


def _encode_serial(tok: Tokenizer, docs: Sequence[Document], fim_rate: float, chunk_chars: int,
                   seed: int) -> TokenStream:
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    control = {c: tok.token_to_id(c) for c, _ in ADDED_TOKENS}
    backend = tok.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    segs = [document_segments(d.text, _doc_rng(d, seed), fim_rate, chunk_chars) for d in docs]
    texts = [s for doc_segs in segs for kind, s in doc_segs if kind == "text"]
    encoded = iter(encode(texts, add_special_tokens=False))
    parts: list[np.ndarray] = []
    per_lang: dict[str, int] = {}
    for doc, doc_segs in zip(docs, segs):
        ids: list[int] = []
        for kind, s in doc_segs:
            if kind == "token":
                ids.append(control[s])
            else:
                ids.extend(next(encoded).ids)
        parts.append(np.asarray(ids, dtype=dtype))
        per_lang[doc.lang] = per_lang.get(doc.lang, 0) + len(ids)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, per_lang)


def encode_documents(tok: Tokenizer, docs: Sequence[Document], fim_rate: float, chunk_chars: int,
                     seed: int, workers: int = 1, time_budget_s: float | None = None,
                     chunk_docs: int = 256, log: Any = print) -> TokenStream:
    """Tokenize `docs` into one stream (FIM per chunk with probability `fim_rate`).

    Documents are processed in order, `chunk_docs` at a time, by `workers` forked processes; with a
    `time_budget_s` the stream ends with the last chunk finished in time (a prefix of `docs`, which the
    caller shuffles), and the log says how many documents were left out.
    """
    if workers <= 1 and time_budget_s is None:
        return _encode_serial(tok, docs, fim_rate, chunk_chars, seed)
    t0 = time.time()
    ranges = [(lo, min(lo + chunk_docs, len(docs))) for lo in range(0, len(docs), chunk_docs)]
    results: list[tuple[int, np.ndarray, dict[str, int]]] = []
    _WORKER.update(tok=tok, docs=docs, fim_rate=fim_rate, chunk_chars=chunk_chars, seed=seed)
    # one Rust thread per process; also keeps `tokenizers` from warning about the fork
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        if workers <= 1:
            for r in ranges:
                results.append(_encode_chunk(r))
                if time_budget_s is not None and time.time() - t0 > time_budget_s:
                    break
        else:
            from multiprocessing import get_context

            pool = get_context("fork").Pool(workers)
            try:
                for res in pool.imap(_encode_chunk, ranges):
                    results.append(res)
                    if time_budget_s is not None and time.time() - t0 > time_budget_s:
                        break
            finally:
                pool.terminate()
                pool.join()
    finally:
        _WORKER.clear()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    done = sum(hi - lo for (lo, hi), _ in zip(ranges, results))
    if done < len(docs):
        log(f"[tokenizer] time budget {time_budget_s}s reached: tokenized {done} of {len(docs)} documents")
    per_lang: dict[str, int] = {}
    for _, _, counts in results:
        for k, v in counts.items():
            per_lang[k] = per_lang.get(k, 0) + v
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    tokens = np.concatenate([t for _, t, _ in results]) if results else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, per_lang)
