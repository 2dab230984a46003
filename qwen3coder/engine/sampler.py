"""Batched, vectorised token sampling (CPU and GPU): penalties, temperature, top-k, top-p, min-p,
per-request seeds, min_tokens, and logprobs.

Order (per row): repetition / presence / frequency penalties -> (greedy rows: argmax) -> divide by
temperature -> top-k -> top-p -> min-p -> softmax -> sample. Sampling draws `argmax(p / q)` with
`q ~ Exp(1)` (an exact categorical sample); a request with a `seed` draws its `q` row from its own
`torch.Generator`, so its tokens do not depend on what else is in the batch. Logprobs are those of
the model's raw distribution (log-softmax of the logits before any processing), as vLLM reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3coder.engine.sequence import Sequence
from qwen3coder.models.context import host_to_device

_EPS = 1e-5


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32 (greedy rows hold 1.0)
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where disabled
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    repetition_penalty: torch.Tensor | None  # [B]
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    prompt_token_ids: torch.Tensor | None  # [B, P] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None  # [B, O] int64, padded with vocab_size
    generators: dict[int, torch.Generator]  # row -> per-request generator
    banned: list[tuple[int, list[int]]]  # (row, token ids) masked out (min_tokens)
    max_num_logprobs: int  # -1: no logprobs wanted

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int, device: torch.device,
                       pending_token_ids: torch.Tensor | None = None) -> "SamplingMetadata":
        """Per-row settings of `seqs`. `pending_token_ids [B]` (device; `vocab_size` where none): the
        async-scheduling case, tokens sampled by the previous step that the host has not read yet —
        they end each row's output tokens (the penalties count them)."""
        params = [s.params for s in seqs]
        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else float(p.temperature) for p, g in zip(params, greedy)]

        def column(values: list, dtype: torch.dtype, neutral) -> torch.Tensor | None:
            if all(v == neutral for v in values):
                return None
            return host_to_device(values, dtype, device)

        top_k = column([vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params],
                       torch.int64, vocab_size)
        top_p = column([float(p.top_p) for p in params], torch.float32, 1.0)
        min_p = column([float(p.min_p) for p in params], torch.float32, 0.0)
        rep = pres = freq = prompt_ids = output_ids = None
        if any(p.needs_penalties for p in params):
            rep = host_to_device([float(p.repetition_penalty) for p in params], torch.float32, device)
            pres = host_to_device([float(p.presence_penalty) for p in params], torch.float32, device)
            freq = host_to_device([float(p.frequency_penalty) for p in params], torch.float32, device)
            prompt_ids = _pad([s.token_ids[:s.num_prompt_tokens] for s in seqs], vocab_size, device)
            known = [s.output_token_ids[:-1] if s.has_pending_token else s.output_token_ids for s in seqs]
            output_ids = _pad(known, vocab_size, device)
            if pending_token_ids is not None:
                output_ids = torch.cat([output_ids, pending_token_ids.to(torch.int64)[:, None]], dim=1)
        generators: dict[int, torch.Generator] = {}
        banned: list[tuple[int, list[int]]] = []
        for row, (seq, p) in enumerate(zip(seqs, params)):
            if p.seed is not None and not p.is_greedy:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=device)
                    seq.generator.manual_seed(p.seed + seq.index)
                generators[row] = seq.generator
            if seq.num_output_tokens < p.min_tokens and p.all_stop_token_ids:
                banned.append((row, sorted(p.all_stop_token_ids)))
        want = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=host_to_device(temps, torch.float32, device),
            greedy=host_to_device(greedy, torch.bool, device),
            all_greedy=all(greedy), top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
            prompt_token_ids=prompt_ids, output_token_ids=output_ids, generators=generators,
            banned=banned, max_num_logprobs=max(want) if want else -1,
        )


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    data = [r + [pad] * (width - len(r)) for r in rows]
    return host_to_device(data, torch.int64, device)


# ---------------------------------------------------------------------- logit transforms
def apply_penalties(logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt+output tokens, presence/frequency over output."""
    b, v = logits.shape
    prompt_mask = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device)
    prompt_mask.scatter_(1, prompt_ids, True)
    counts = torch.zeros(b, v + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    prompt_mask, counts = prompt_mask[:, :v], counts[:, :v]
    output_mask = counts > 0
    r = repetition.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(prompt_mask | output_mask, penalised, logits)
    logits = logits - frequency.to(logits.dtype).unsqueeze(1) * counts
    return logits - presence.to(logits.dtype).unsqueeze(1) * output_mask.to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th kept), then the smallest set of most likely tokens
    whose probability reaches p (the most likely token is always kept)."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    v = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (v - top_k).clamp(0, v - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator],
                  default: torch.Generator | None) -> torch.Tensor:
    q = torch.empty_like(probs)
    q.exponential_(generator=default)
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] logprob of the sampled token
    ranks: torch.Tensor | None = None  # [B] 1-based rank of the sampled token
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # draws for rows without a seed

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw = logits
        if md.repetition_penalty is not None:
            logits = apply_penalties(logits, md.prompt_token_ids, md.output_token_ids,
                                     md.repetition_penalty, md.presence_penalty, md.frequency_penalty)
        if md.banned:
            if logits is raw:
                logits = logits.clone()
            for row, ids in md.banned:
                logits[row, host_to_device(ids, torch.int64, logits.device)] = float("-inf")
        greedy_ids = logits.argmax(dim=-1)
        if md.all_greedy:
            token_ids = greedy_ids
        else:
            scaled = logits / md.temperature.unsqueeze(1)
            scaled = apply_top_k_top_p(scaled, md.top_k, md.top_p)
            if md.min_p is not None:
                scaled = apply_min_p(scaled, md.min_p)
            sampled = random_sample(scaled.softmax(dim=-1), md.generators, self.generator)
            token_ids = torch.where(md.greedy, greedy_ids, sampled)
        out = SamplerOutput(token_ids=token_ids)
        if md.max_num_logprobs >= 0:
            lp = raw.log_softmax(dim=-1)
            chosen = lp.gather(1, token_ids.unsqueeze(1))
            out.logprobs = chosen.squeeze(1)
            out.ranks = (lp > chosen).sum(dim=-1) + 1
            if md.max_num_logprobs > 0:
                out.top_logprobs, out.top_ids = lp.topk(md.max_num_logprobs, dim=-1)
        return out


@dataclass
class SampledToken:
    """One sampled token as the scheduler sees it (host values)."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
