"""Evaluations on held-out source files: mean token NLL and fill-in-the-middle exact match.

* ``heldout_loss``: each text is tokenized and cut into windows of at most ``window`` tokens; the
  engine scores every window (``prompt_logprobs``) and the loss is the mean negative log-likelihood
  over all predicted tokens (the first token of a window has no prediction), in nats.
* ``fim_exact_match``: random middle spans of 1..``max_lines`` whole lines are cut out of the texts;
  the model gets ``<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`` (greedy, stopping at the
  FIM stop tokens) and an example counts when ``truncate_fim_output(output).strip()`` equals the
  removed span ``.strip()``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3coder.chat.fim import FIM_STOP_TOKENS, build_fim_prompt, fim_stop_token_ids, truncate_fim_output

__all__ = ["load_texts", "heldout_loss", "FimExample", "make_fim_examples", "fim_exact_match"]

_CONTROL = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")


def load_texts(items: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Texts from a mix of file paths and literal texts.

    An ``os.PathLike`` is always a file; a ``str`` is a file when it has no newline and names an
    existing file, otherwise it is the text itself.
    """
    texts = []
    for item in items:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.isfile(item)):
            texts.append(Path(item).read_text(encoding="utf-8", errors="replace"))
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise TypeError(f"held-out items must be paths or str, got {type(item).__name__}")
    return texts


def heldout_loss(llm: Any, texts: Sequence[str], window: int = 1024, max_windows: int | None = None) -> dict[str, Any]:
    """Mean token NLL (nats) of ``texts`` under ``llm``; also the token count and perplexity."""
    from qwen3coder.engine import SamplingParams

    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("held-out loss needs the model's tokenizer")
    max_len = llm.llm_engine.config.scheduler.max_model_len
    window = max(2, min(window, max_len - 1))  # the request also asks for one generated token
    windows: list[list[int]] = []
    for ids in tokenizer.encode_batch(list(texts)):
        windows += [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise ValueError("held-out loss: no text with at least two tokens")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    total, count = 0.0, 0
    for w, out in zip(windows, outs):
        for tok, entry in zip(w[1:], out.prompt_logprobs[1:]):
            total -= entry[tok].logprob
            count += 1
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "windows": len(windows)}


@dataclass(frozen=True)
class FimExample:
    prefix: str
    middle: str
    suffix: str


def make_fim_examples(texts: Sequence[str], num: int, seed: int = 0, max_lines: int = 3,
                      context_chars: int = 2000) -> list[FimExample]:
    """``num`` examples (fewer if the texts have too few usable lines): a middle of 1..``max_lines``
    whole lines that is not blank, prefix and suffix clipped to ``context_chars`` each."""
    rng = random.Random(seed)
    pool = [t for t in texts if not any(c in t for c in _CONTROL) and len(t.splitlines()) >= 2]
    examples: list[FimExample] = []
    attempts = 0
    while pool and len(examples) < num and attempts < 20 * num:
        attempts += 1
        lines = pool[attempts % len(pool)].splitlines(keepends=True)
        span = rng.randint(1, min(max_lines, len(lines)))
        start = rng.randrange(0, len(lines) - span + 1)
        middle = "".join(lines[start:start + span])
        if not middle.strip():
            continue
        prefix = "".join(lines[:start])[-context_chars:]
        suffix = "".join(lines[start + span:])[:context_chars]
        examples.append(FimExample(prefix, middle, suffix))
    return examples


def fim_exact_match(llm: Any, examples: Sequence[FimExample], max_tokens: int = 64) -> dict[str, Any]:
    """Greedy FIM on ``examples``; the fraction whose stripped output equals the stripped middle."""
    from qwen3coder.engine import SamplingParams

    if not examples:
        raise ValueError("FIM exact match: no examples (the held-out texts have too few non-blank lines)")
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("FIM exact match needs the model's tokenizer")
    stop_ids = fim_stop_token_ids(tokenizer)  # raises naming the missing FIM tokens
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop_ids,
                            stop=list(FIM_STOP_TOKENS), skip_special_tokens=False)
    outs = llm.generate([build_fim_prompt(e.prefix, e.suffix) for e in examples], params, use_tqdm=False)
    hits = [truncate_fim_output(o.outputs[0].text).strip() == e.middle.strip() for e, o in zip(examples, outs)]
    return {"exact_match": sum(hits) / len(hits), "examples": len(hits), "max_tokens": max_tokens}
