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

import torch
from torch import nn

from qwen3coder.engine.block_manager import cdiv
from qwen3coder.engine.config import EngineConfig
from qwen3coder.engine.outputs import Logprob
from qwen3coder.engine.sampler import SampledToken, Sampler, SamplingMetadata
from qwen3coder.engine.scheduler import ModelRunnerOutput, SchedulerOutput
from qwen3coder.models.cache import (allocate_kv_cache, allocate_state_cache, copy_state_slot,
                                     kv_cache_bytes_per_block, state_bytes_per_slot)
from qwen3coder.models.context import ForwardContext

logger = logging.getLogger("qwen3coder.engine")

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
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for module in self.model.modules():
            if getattr(module, "is_paged_attention", False):
                module.k_cache[dst] = module.k_cache[src]
                module.v_cache[dst] = module.v_cache[src]

    def copy_state_slots(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:  # in order: a later copy may read a slot an earlier one wrote
            if src != dst:
                copy_state_slot(self.model, src, dst)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.copy_blocks(sched.block_copies)
        self.copy_state_slots(sched.state_copies)
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        sample_row_of_entry: dict[int, int] = {}
        prompt_rows: list[tuple[int, int, int]] = []  # (seq_id, position, logits row) for prompt logprobs
        for i, e in enumerate(sched.seqs):
            seq, base = e.seq, len(ids)
            ids.extend(seq.token_ids[e.start:e.start + e.num_new_tokens])
            positions.extend(range(e.start, e.start + e.num_new_tokens))
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
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        ctx.logits_indices = rows
        logits = self.forward_logits(input_ids, pos_t, ctx, rows)
        out = ModelRunnerOutput(sampled={})
        if prompt_rows:
            self._prompt_logprobs(logits, prompt_rows, sched, out)
        sample_rows = sched.sample_rows()
        if sample_rows:
            seqs = [s for s, _ in sample_rows]
            index = torch.tensor([sample_row_of_entry[i] for _, i in sample_rows], dtype=torch.long,
                                 device=self.device)
            md = SamplingMetadata.from_sequences(seqs, self.vocab_size, self.device)
            res = self.sampler(logits.index_select(0, index), md)
            toks = res.token_ids.tolist()
            lps = res.logprobs.tolist() if res.logprobs is not None else None
            ranks = res.ranks.tolist() if res.ranks is not None else None
            top_ids = res.top_ids.tolist() if res.top_ids is not None else None
            top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
            for r, seq in enumerate(seqs):
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
