"""Supervised fine-tuning on the generated conversations, loss on assistant tokens only.

Each conversation is rendered with the bundled chat template (`qwen3coder.train.chat_template`). The
assistant spans are found by rendering (`chat_template.assistant_spans`): for assistant message i,
`render(messages[:i], add_generation_prompt=True)` is a prefix of `render(messages[:i+1])`, and the
characters between the two, up to and including `<|im_end|>`, are the assistant's (its text, tool-call
XML and the end of turn, so the model learns to stop). The full rendering is tokenized once with
offsets; a token is trained on when its first character lies in an assistant span (a token that
straddles the boundary — only possible when an answer starts with a newline — counts as prompt).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from qwen3coder.chat.tokenizer import Tokenizer
from qwen3coder.models import CausalLM
from qwen3coder.train.chat_template import assistant_spans
from qwen3coder.train.loop import LoopConfig, LoopState, lm_loss, train_loop
from qwen3coder.train.profiles import SFTConfig

@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]  # token id where trained on, -100 elsewhere (aligned with ids)
    kind: str


def _rendered(conv: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    if "text" in conv and "spans" in conv:  # rendered already by the data-stage workers
        return conv["text"], [tuple(s) for s in conv["spans"]]
    return assistant_spans(conv["messages"], conv.get("tools"))


def encode_conversation(tok: Tokenizer, conv: dict[str, Any], max_len: int, enc: Any = None) -> SFTExample | None:
    """Token ids and labels of one conversation, truncated to `max_len + 1` tokens (None if no
    assistant token survives the truncation). `enc`: its `tokenizers` encoding, if done already."""
    text, spans = _rendered(conv)
    if enc is None:
        enc = tok.backend.encode(text, add_special_tokens=False)
    ids = enc.ids[:max_len + 1]
    labels = []
    for tid, (start, _) in zip(ids, enc.offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tid if inside else -100)
    if all(x == -100 for x in labels[1:]):
        return None
    return SFTExample(ids, labels, conv.get("kind", ""))


def encode_all(tok: Tokenizer, convs: Sequence[dict[str, Any]], max_len: int) -> list[SFTExample]:
    """`encode_conversation` for many conversations, tokenized in one parallel batch."""
    rendered = [_rendered(c) for c in convs]
    encodings = tok.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for conv, (text, spans), enc in zip(convs, rendered, encodings):
        ex = encode_conversation(tok, {"text": text, "spans": spans, "kind": conv.get("kind", "")}, max_len, enc)
        if ex is not None:
            out.append(ex)
    return out


class SFTBatches:
    """Seeded random batches of examples, right-padded; targets -100 on prompt and padding tokens."""

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, pad_id: int, seed: int) -> None:
        if not examples:
            raise ValueError("no SFT examples to train on")
        self.examples, self.batch_size, self.pad_id, self.seed = list(examples), batch_size, pad_id, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, token mask) of batch `index`."""
        rows = []
        n = len(self.examples)
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, k = divmod(j, n)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
            rows.append(self.examples[int(self._perm[1][k])])
        width = max(len(r.ids) for r in rows) - 1
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            n_tok = len(r.ids) - 1
            inputs[i, :n_tok] = torch.tensor(r.ids[:-1])
            targets[i, :n_tok] = torch.tensor(r.labels[1:])
            mask[i, :n_tok] = True
        return inputs, targets, mask


@torch.no_grad()
def evaluate_sft(model: CausalLM, batches: SFTBatches, n: int, device: torch.device, dtype: str) -> float:
    model.eval()
    losses = []
    for b in range(n):
        inputs, targets, _ = batches.batch_at(b)
        _, ce, _ = lm_loss(model, inputs.to(device), targets.to(device), 0.0, device, dtype)
        losses.append(ce.item())
    return float(np.mean(losses))


def run_sft(model: CausalLM, tok: Tokenizer, convs: Sequence[dict[str, Any]], cfg: SFTConfig,
            out_dir: str | os.PathLike, device: torch.device, dtype: str, aux_loss_coef: float,
            resume: bool = False, log: Any = print) -> LoopState:
    """Fine-tune `model` in place on `convs` (2% held out for the reported held-out loss)."""
    order = list(range(len(convs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, len(order) // 50)
    examples = encode_all(tok, [convs[i] for i in order[n_val:]], cfg.max_len)
    val_examples = encode_all(tok, [convs[i] for i in order[:n_val]], cfg.max_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train = SFTBatches(examples, cfg.batch_size, pad, cfg.seed)
    val = SFTBatches(val_examples or examples, cfg.batch_size, pad, cfg.seed + 1)
    trained = sum(sum(1 for x in e.labels if x != -100) for e in examples)
    log(f"[sft] {len(examples)} train / {len(val_examples)} held-out conversations, "
        f"{trained:,} assistant tokens of {sum(len(e.ids) for e in examples):,}")
    lc = LoopConfig(name="sft", lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                    time_budget_s=cfg.time_budget_s, schedule="linear", weight_decay=cfg.weight_decay,
                    aux_loss_coef=aux_loss_coef, log_every=cfg.log_every, eval_every=10 ** 9,
                    checkpoint_every=10 ** 9, dtype=dtype, replan_until=0.5)
    avg_len = float(np.mean([len(e.ids) for e in examples]))
    eval_batches = max(1, min(8, len(val_examples) // cfg.batch_size))
    return train_loop(model, lc, lambda step, micro: train.batch_at(step), device, out_dir,
                      int(cfg.batch_size * avg_len), int(avg_len),
                      evaluate=lambda: evaluate_sft(model, val, eval_batches, device, dtype),
                      resume=resume, log=log)
