"""The model runner: turns a `SchedulerOutput` into one forward pass plus sampling.

`ModelRunner` is the plain-PyTorch implementation (CPU, and the eager path on CUDA): it sizes and
allocates the paged KV cache (and, for hybrid models, the recurrent-state slots), flattens the
scheduled chunks into `input_ids [N]` / `positions [N]` with a `ForwardContext` (block tables,
slot mapping, state slots), runs `model.forward_step`, computes logits only for the rows that are
sampled (or scored for prompt logprobs) and samples them. `CudaModelRunner`
(engine/cuda_runner.py) subclasses it to size the cache from free GPU memory and to replay CUDA
graphs for decode batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from qwen3coder.engine.block_manager import cdiv
from qwen3coder.engine.config import EngineConfig
from qwen3coder.engine.outputs import Logprob
from qwen3coder.engine.sampler import SampledToken, Sampler, SamplingMetadata
from qwen3coder.engine.scheduler import ModelRunnerOutput, SchedulerOutput
from qwen3coder.engine.sequence import Sequence
from qwen3coder.models.cache import (allocate_kv_cache, allocate_state_cache, copy_state_slot,
                                     kv_cache_bytes_per_block, state_bytes_per_slot)
from qwen3coder.models.context import ForwardContext, host_to_device

logger = logging.getLogger("qwen3coder.engine")


@dataclass
class StepHandle:
    """A launched step (`ModelRunner.launch`): what `collect` needs to read its results."""

    sched: SchedulerOutput
    seqs: list[Sequence]  # the sampled rows, in order
    token_ids: torch.Tensor | None  # [rows] sampled ids on the device (the next step's pending inputs)
    host: dict[str, torch.Tensor]  # host copies of the sampler outputs (pinned, written asynchronously)
    event: "torch.cuda.Event | None"  # recorded after the copies (CUDA)
    out: ModelRunnerOutput  # prompt logprobs are filled at launch


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

DEFAULT_MAX_SNAPSHOTS = 16


class ModelRunner:
    def __init__(self, config: EngineConfig, model: nn.Module):
        self.config = config
        self.model = model
        self.model_config = model.config
        self.device = config.device
        self.dtype = config.dtype
        self.block_size = config.cache.block_size
        self.vocab_size = self.model_config.vocab_size
        self.hybrid = bool(self.model_config.linear_layer_ids)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(config.seed)
        self.sampler = Sampler(gen)
        sched = config.scheduler
        if self.hybrid:
            snaps = config.cache.num_state_snapshots
            if snaps is None:
                snaps = min(sched.max_num_seqs, DEFAULT_MAX_SNAPSHOTS)
            self.num_snapshots = snaps if config.cache.enable_prefix_caching else 0
            self.num_state_slots = sched.max_num_seqs + self.num_snapshots
        else:
            self.num_snapshots = self.num_state_slots = 0
        self.kv_bytes_per_block = max(1, kv_cache_bytes_per_block(self.model_config, self.block_size, self.dtype))
        self.state_bytes_per_slot = state_bytes_per_slot(self.model_config, self.dtype)
        self.num_kv_blocks = config.cache.num_kv_blocks or self.profile_num_kv_blocks()
        self.allocate_caches()

    # ------------------------------------------------------------------ cache sizing
    def profile_num_kv_blocks(self) -> int:
        """CPU: enough blocks for max_num_seqs full-length sequences, capped by the memory budget."""
        sched = self.config.scheduler
        want = sched.max_num_seqs * cdiv(sched.max_model_len, self.block_size)
        budget = max(0, self.config.cache.cpu_kv_cache_bytes - self.num_state_slots * self.state_bytes_per_slot)
        return max(1, min(want, budget // self.kv_bytes_per_block))

    def allocate_caches(self, extra_blocks: int = 0, extra_slots: int = 0) -> None:
        allocate_kv_cache(self.model, self.num_kv_blocks + extra_blocks, self.block_size, self.dtype, self.device)
        if self.hybrid:
            allocate_state_cache(self.model, self.num_state_slots + extra_slots, self.dtype, self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB); state slots: %d (%d snapshots)",
                    self.num_kv_blocks, self.block_size, self.num_kv_blocks * self.kv_bytes_per_block / 2**20,
                    self.num_state_slots, self.num_snapshots)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = host_to_device([s for s, _ in pairs], torch.long, self.device)
        dst = host_to_device([d for _, d in pairs], torch.long, self.device)
        for module in self.model.modules():
            if getattr(module, "is_paged_attention", False):
                module.k_cache[dst] = module.k_cache[src]
                module.v_cache[dst] = module.v_cache[src]

    def copy_state_slots(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:  # in order: a later copy may read a slot an earlier one wrote
            if src != dst:
                copy_state_slot(self.model, src, dst)

    # ------------------------------------------------------------------ one step
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return its results (launch + collect)."""
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: "StepHandle | None" = None) -> "StepHandle":
        """Queue one step on the device: inputs, forward, sampling, and non-blocking copies of the
        sampled ids (and logprobs) to pinned host memory. On CUDA nothing here waits for the GPU
        (except prompt logprobs), so the host can plan the next step while this one runs.

        `prev`: the launched step whose sampled tokens are this step's pending inputs (async
        scheduling): an entry of a sequence with a pending placeholder takes its input id from
        `prev.token_ids` on the device and its penalties count that token."""
        self.copy_blocks(sched.block_copies)
        self.copy_state_slots(sched.state_copies)
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        sample_row_of_entry: dict[int, int] = {}
        prompt_rows: list[tuple[int, int, int]] = []  # (seq_id, position, logits row) for prompt logprobs
        pending_at: list[int] = []  # flat input positions whose id is prev's sampled token
        pending_row: list[int] = []  # ... and that token's row in prev
        prev_rows = {s.seq_id: r for r, s in enumerate(prev.seqs)} if prev is not None else {}
        for i, e in enumerate(sched.seqs):
            seq, base = e.seq, len(ids)
            ids.extend(seq.token_ids[e.start:e.start + e.num_new_tokens])
            positions.extend(range(e.start, e.start + e.num_new_tokens))
            if seq.has_pending_token and e.start + e.num_new_tokens == len(seq):
                assert seq.seq_id in prev_rows, "a pending token needs the step that samples it"
                pending_at.append(len(ids) - 1)
                pending_row.append(prev_rows[seq.seq_id])
            req = seq.request
            if req.prompt_logprobs is not None and seq is req.seqs[0]:
                for pos in range(e.start, min(e.start + e.num_new_tokens, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((seq.seq_id, pos, len(logit_rows)))
                    logit_rows.append(base + pos - e.start)
            if e.sample:
                sample_row_of_entry[i] = len(logit_rows)
                logit_rows.append(len(ids) - 1)
        ctx = ForwardContext.build(
            query_lens=[e.num_new_tokens for e in sched.seqs],
            seq_lens=[e.start + e.num_new_tokens for e in sched.seqs],
            block_tables=[e.seq.block_table for e in sched.seqs],
            block_size=self.block_size,
            state_indices=[e.seq.state_slot for e in sched.seqs] if self.hybrid else None,
            has_initial_state=[e.has_initial_state for e in sched.seqs] if self.hybrid else None,
            device=self.device, only_last_logits=False)
        input_ids = host_to_device(ids, torch.long, self.device)
        if pending_at:
            at = host_to_device(pending_at, torch.long, self.device)
            src = host_to_device(pending_row, torch.long, self.device)
            input_ids.index_copy_(0, at, prev.token_ids.index_select(0, src))
        pos_t = host_to_device(positions, torch.long, self.device)
        rows = host_to_device(logit_rows, torch.long, self.device)
        ctx.logits_indices = rows
        logits = self.forward_logits(input_ids, pos_t, ctx, rows)
        handle = StepHandle(sched, [], None, {}, None, ModelRunnerOutput(sampled={}))
        if prompt_rows:
            self._prompt_logprobs(logits, prompt_rows, sched, handle.out)
        sample_rows = sched.sample_rows()
        if sample_rows:
            seqs = [s for s, _ in sample_rows]
            index = host_to_device([sample_row_of_entry[i] for _, i in sample_rows], torch.long, self.device)
            pending = None
            if prev is not None and any(s.has_pending_token for s in seqs):
                where = [r for r, s in enumerate(seqs) if s.has_pending_token]
                pending = torch.full((len(seqs),), self.vocab_size, dtype=torch.long, device=self.device)
                pending.index_copy_(0, host_to_device(where, torch.long, self.device), prev.token_ids.index_select(
                    0, host_to_device([prev_rows[seqs[r].seq_id] for r in where], torch.long, self.device)))
            md = SamplingMetadata.from_sequences(seqs, self.vocab_size, self.device, pending)
            res = self.sampler(logits.index_select(0, index), md)
            handle.seqs, handle.token_ids = seqs, res.token_ids
            for name in ("token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"):
                t = getattr(res, name)
                if t is not None:
                    handle.host[name] = _to_host(t)
        if self.device.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        return handle

    def collect(self, handle: "StepHandle") -> ModelRunnerOutput:
        """Wait for a launched step's sampled tokens and turn them into host values."""
        if handle.event is not None:
            handle.event.synchronize()
        out, host = handle.out, handle.host
        if not handle.seqs:
            return out
        toks = host["token_ids"].tolist()
        lps = host["logprobs"].tolist() if "logprobs" in host else None
        ranks = host["ranks"].tolist() if "ranks" in host else None
        top_ids = host["top_ids"].tolist() if "top_ids" in host else None
        top_lps = host["top_logprobs"].tolist() if "top_logprobs" in host else None
        for r, seq in enumerate(handle.seqs):
            tok = SampledToken(toks[r])
            k = seq.params.logprobs
            if k is not None:
                tok.logprob, tok.rank = lps[r], ranks[r]
                tok.top = list(zip(top_ids[r][:k], top_lps[r][:k])) if k > 0 else []
            out.sampled[seq.seq_id] = tok
        return out

    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                       rows: torch.Tensor) -> torch.Tensor:
        hidden = self.model.forward_step(input_ids, positions, ctx)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows: list[tuple[int, int, int]],
                         sched: SchedulerOutput, out: ModelRunnerOutput) -> None:
        seq_by_id = {e.seq.seq_id: e.seq for e in sched.seqs}
        rows = torch.tensor([r for _, _, r in prompt_rows], dtype=torch.long, device=self.device)
        lp = logits.index_select(0, rows).float().log_softmax(dim=-1)
        targets = torch.tensor([seq_by_id[sid].token_ids[pos + 1] for sid, pos, _ in prompt_rows],
                               dtype=torch.long, device=self.device)
        chosen = lp.gather(1, targets[:, None])
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
        k = max(seq_by_id[sid].params.prompt_logprobs for sid, _, _ in prompt_rows)
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)
        chosen_l, targets_l = chosen[:, 0].tolist(), targets.tolist()
        top_v_l = top_v.tolist() if top_v is not None else None
        top_i_l = top_i.tolist() if top_i is not None else None
        for j, (sid, pos, _) in enumerate(prompt_rows):
            entry = {targets_l[j]: Logprob(chosen_l[j], ranks[j])}
            kk = seq_by_id[sid].params.prompt_logprobs
            for rank in range(kk):
                tid = top_i_l[j][rank]
                if tid not in entry:
                    entry[tid] = Logprob(top_v_l[j][rank], rank + 1)
            out.prompt_logprobs.setdefault(sid, []).append((pos + 1, entry))
