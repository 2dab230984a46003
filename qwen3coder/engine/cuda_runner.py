"""`CudaModelRunner`: the model runner on a CUDA device.

Differences from the plain runner:
* the KV pool is sized from free memory after a warm-up forward of the largest step
  (`max_num_batched_tokens` tokens, plus sampling `max_num_seqs` rows): blocks =
  (total * gpu_memory_utilization - memory in use - warm-up peak - state slots) / bytes per block;
* decode steps replay CUDA graphs captured for batch buckets [1, 2, 4, 8, 16, 32, 64, ...] up to
  `max_num_seqs`, reading static input buffers (ids, positions, slot mapping, block tables,
  sequence lengths, state slots); padding rows write to a scratch KV block and a scratch state
  slot that no sequence owns. Logits come out of the graph; sampling runs on the GPU, and the only
  host sync per step is reading the sampled token ids.

* the other steps (prefill chunks, alone or mixed with decode rows) of up to `max_prefill_graph_tokens`
  tokens replay graphs captured for token buckets [16, 32, 64, ...] (an eager prefill of a short
  prompt is host-bound: issuing ~12 launches per layer through Python takes longer than running
  them). The step's tokens are padded to the bucket (padding tokens: id and position left over,
  KV written to the scratch block, attention output zero); its sequences fill the first rows of
  `min(bucket, max_num_seqs)`; the varlen attention runs over a tile map built on the host
  (`kernels.paged_prefill.build_tile_map`), so the graph's grid is fixed; logits are computed for
  that many rows. Steps with more logits rows (prompt logprobs) run eagerly.

Graphs are captured only for models that declare `supports_cuda_graphs = True`, i.e. whose decode
path (`ctx.is_decode`) reads only device tensors (no `*_cpu` lists, no `.item()`): in a captured
decode, `ctx.seq_lens_cpu` holds `max_model_len` upper bounds, not the real lengths, and in a
captured prefill `ctx.query_lens_cpu` is `[bucket]`. Prefill graphs also need a model without
Gated DeltaNet layers (their prefill loops over sequences on the host). Other models, or
`enforce_eager=True`, run every step eagerly.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from qwen3coder.engine.block_manager import cdiv
from qwen3coder.engine.config import EngineConfig
from qwen3coder.engine.model_runner import ModelRunner
from qwen3coder.engine.sampler import SamplingMetadata
from qwen3coder.engine.sampling_params import SamplingParams
from qwen3coder.kernels.paged_prefill import build_tile_map, prefill_block_m, tile_map_size
from qwen3coder.models.context import ForwardContext

logger = logging.getLogger("qwen3coder.engine")


def _doubling(first: int, last: int) -> list[int]:
    """first, 2*first, 4*first, ... below `last`, then `last`."""
    sizes, n = [], first
    while n < last:
        sizes.append(n)
        n *= 2
    return sizes + [last]


# From this many tokens the prefill buckets also hold 1.5x each power of two (384, 768, 1536): a step is
# padded to its bucket, and above a few hundred tokens a step's time grows with its tokens (H200, 30B-A3B:
# 1,024 tokens 20.7 ms, 2,048 37.7), so a prompt of ~1K joined by a few decode rows (1,039 tokens in the
# online benchmark) no longer runs the 2,048-token graph.
PREFILL_HALF_STEPS_FROM = 256


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """Token buckets of the prefill graphs: 16, 32, 64, ... below `max_tokens` plus 1.5x the powers of two
    from `PREFILL_HALF_STEPS_FROM`, then `max_tokens` (none below 2 tokens: a one-token step is a decode,
    or a one-token prompt that runs eagerly)."""
    if max_tokens < 2:
        return []
    sizes = _doubling(16, max_tokens)
    half = [n * 3 // 2 for n in sizes if n >= PREFILL_HALF_STEPS_FROM and n * 3 // 2 < max_tokens]
    return sorted(set(sizes + half))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    return _doubling(1, max_num_seqs)


class CudaModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, model: nn.Module):
        assert config.device.type == "cuda"
        torch.cuda.set_device(config.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        graphable = not config.enforce_eager and getattr(model, "supports_cuda_graphs", False)
        max_tokens = min(config.max_prefill_graph_tokens, config.scheduler.max_num_batched_tokens)
        self.prefill_graph_sizes = prefill_graph_sizes(max_tokens) if graphable and not model.config.linear_layer_ids \
            else []
        self.num_prefill_graph_steps = 0  # steps that replayed a prefill graph
        super().__init__(config, model)
        if graphable:
            self.capture_graphs()
        elif not config.enforce_eager:
            logger.info("model does not declare supports_cuda_graphs: decode runs eagerly")

    # ------------------------------------------------------------------ memory
    @torch.inference_mode()
    def profile_num_kv_blocks(self) -> int:
        sched = self.config.scheduler
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(sched.max_num_batched_tokens, sched.max_model_len * sched.max_num_seqs)
        lens = [min(sched.max_model_len, n - i) for i in range(0, n, sched.max_model_len)]
        self._warmup_forward(lens)
        peak_extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        graph_pool = 0
        if self.prefill_graph_sizes:  # the prefill graphs keep the activations of their largest bucket
            torch.cuda.reset_peak_memory_stats()
            t = self.prefill_graph_sizes[-1]
            self._warmup_forward([min(sched.max_model_len, t - i) for i in range(0, t, sched.max_model_len)])
            graph_pool = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        state = (self.num_state_slots + 1) * self.state_bytes_per_slot
        available = int(total * self.config.cache.gpu_memory_utilization) - used - peak_extra - graph_pool - state
        num = available // self.kv_bytes_per_block - 1  # one scratch block for graph padding
        if num < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (total {total / 2**30:.1f} GiB, in use "
                f"{used / 2**30:.1f} GiB, warm-up peak +{peak_extra / 2**30:.1f} GiB, prefill graphs "
                f"{graph_pool / 2**30:.1f} GiB, state slots {state / 2**30:.1f} GiB); raise "
                f"gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs / "
                f"max_prefill_graph_tokens")
        max_useful = sched.max_num_seqs * cdiv(sched.max_model_len, self.block_size)
        torch.cuda.empty_cache()
        return int(min(num, max_useful))

    def _warmup_forward(self, lens: list[int]) -> None:
        """A forward of no-cache sequences of `lens` tokens, then sampling `max_num_seqs` rows."""
        sched = self.config.scheduler
        n = sum(lens)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(t, device=self.device) for t in lens])
        ctx = ForwardContext.no_cache(lens, self.device)
        hidden = self.model.forward_step(ids, positions, ctx)
        rows = torch.arange(min(sched.max_num_seqs, n), device=self.device) % n
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        dummy = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, logprobs=5)
        md = SamplingMetadata(
            temperature=torch.full((rows.numel(),), dummy.temperature, device=self.device),
            greedy=torch.zeros(rows.numel(), dtype=torch.bool, device=self.device), all_greedy=False,
            top_k=torch.full((rows.numel(),), 20, dtype=torch.long, device=self.device),
            top_p=torch.full((rows.numel(),), 0.8, device=self.device), min_p=None,
            repetition_penalty=None, presence_penalty=None, frequency_penalty=None, prompt_token_ids=None,
            output_token_ids=None, generators={}, banned=[], max_num_logprobs=5)
        self.sampler(logits, md)
        del hidden, logits
        torch.cuda.synchronize()

    def allocate_caches(self, extra_blocks: int = 1, extra_slots: int = 1) -> None:
        super().allocate_caches(extra_blocks=1, extra_slots=1 if self.hybrid else 0)
        self.scratch_block = self.num_kv_blocks
        self.scratch_slot = self.num_state_slots

    # ------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture_graphs(self) -> None:
        sched = self.config.scheduler
        self.graph_sizes = graph_batch_sizes(sched.max_num_seqs)
        max_bs = self.graph_sizes[-1]
        self.max_blocks_per_seq = cdiv(sched.max_model_len, self.block_size)
        dev = self.device
        self.g_input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slot_mapping = torch.full((max_bs,), self.scratch_block * self.block_size, dtype=torch.long,
                                         device=dev)
        self.g_block_tables = torch.full((max_bs, self.max_blocks_per_seq), self.scratch_block,
                                         dtype=torch.int32, device=dev)
        self.g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_state_indices = torch.full((max_bs,), self.scratch_slot if self.hybrid else 0, dtype=torch.long,
                                          device=dev)
        self.g_logits = torch.zeros(max_bs, self.vocab_size, dtype=self.dtype, device=dev)
        pool = self._capture_prefill_graphs()  # the largest first: later graphs reuse their pool's memory
        for bs in reversed(self.graph_sizes):
            ctx = self._graph_context(bs)
            self.graphs[bs] = graph = self._capture(lambda: self._graph_body(bs, ctx), pool)
            pool = graph.pool()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.graph_sizes)

    @staticmethod
    def _capture(body: Callable[[], None], pool: "tuple[int, int] | None") -> torch.cuda.CUDAGraph:
        """`body` captured into a graph on the memory pool `pool` (None: a new one), after one run outside
        the capture (allocations, Triton compilation and autotuning)."""
        body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body()
        torch.cuda.synchronize()
        return graph

    _STATIC_INPUTS = ("g_input_ids", "g_positions", "g_slot_mapping", "g_block_tables", "g_seq_lens",
                      "g_query_start_loc", "g_state_indices")

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        """A copy of the decode graphs' static inputs (what a replay now would compute on)."""
        return {name: getattr(self, name).clone() for name in self._STATIC_INPUTS}

    @torch.inference_mode()  # the static inputs are inference tensors: written in place only in it
    def set_graph_inputs(self, saved: dict[str, torch.Tensor]) -> None:
        """Put back static inputs saved by `graph_inputs` (benchmarks replay a step's graph later)."""
        for name, value in saved.items():
            getattr(self, name).copy_(value)

    def recapture_graphs(self) -> None:
        """Capture the decode graphs again, e.g. after switching a launch setting that graphs bake in
        (programmatic dependent launch, the skinny-GEMM switch); no-op when the runner has none. The
        static inputs keep their values (capture starts from fresh buffers), so a replay right after
        runs the same step as one right before (`bench.profile.graph_replay_ms` relies on it)."""
        if not self.graphs:
            return
        saved = self.graph_inputs()
        self.graphs.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.capture_graphs()
        self.set_graph_inputs(saved)

    # ------------------------------------------------------------------ prefill graphs
    def _prefill_rows(self, tokens: int) -> int:
        """Sequences, and logits rows, that the prefill graph of `tokens` tokens has room for."""
        return min(tokens, self.config.scheduler.max_num_seqs)

    def _prefill_tiles(self, tokens: int) -> tuple[int, int]:
        """(query rows per attention tile, tile-map size) of the prefill graph of `tokens` tokens."""
        block_m = prefill_block_m(tokens)
        return block_m, tile_map_size(tokens, self._prefill_rows(tokens), block_m)

    def _capture_prefill_graphs(self) -> "tuple[int, int] | None":  # torch's graph-pool handle
        """Capture a graph per token bucket, the largest first; returns the memory pool (None: no graphs)."""
        self.prefill_graphs.clear()
        if not self.prefill_graph_sizes:
            return None
        t_max = self.prefill_graph_sizes[-1]
        s_max, dev = self._prefill_rows(t_max), self.device
        self.p_input_ids = torch.zeros(t_max, dtype=torch.long, device=dev)
        self.p_positions = torch.zeros(t_max, dtype=torch.long, device=dev)
        self.p_slot_mapping = torch.full((t_max,), self.scratch_block * self.block_size, dtype=torch.long,
                                         device=dev)
        self.p_query_start_loc = torch.zeros(s_max + 1, dtype=torch.int32, device=dev)
        self.p_seq_lens = torch.ones(s_max, dtype=torch.int32, device=dev)
        self.p_block_tables = torch.full((s_max, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32,
                                         device=dev)
        map_size = max(self._prefill_tiles(t)[1] for t in self.prefill_graph_sizes)
        self.p_tile_map = torch.full((map_size,), -1, dtype=torch.int32, device=dev)  # no work: warm-up, capture
        self.p_rows = torch.zeros(s_max, dtype=torch.long, device=dev)
        pool = None
        for t in reversed(self.prefill_graph_sizes):
            ctx = self._prefill_context(t)
            self.prefill_graphs[t] = graph = self._capture(lambda: self._prefill_body(t, ctx), pool)
            pool = graph.pool()
        logger.info("captured CUDA graphs for prefill steps of %s tokens", self.prefill_graph_sizes)
        return pool

    def _prefill_context(self, tokens: int) -> ForwardContext:
        rows = self._prefill_rows(tokens)
        block_m, map_size = self._prefill_tiles(tokens)
        return ForwardContext(
            query_start_loc=self.p_query_start_loc[:rows + 1], seq_lens=self.p_seq_lens[:rows],
            query_lens_cpu=[tokens], seq_lens_cpu=[self.config.scheduler.max_model_len],  # see module docstring
            slot_mapping=self.p_slot_mapping[:tokens], block_tables=self.p_block_tables[:rows],
            tile_map=self.p_tile_map[:map_size], tile_block_m=block_m)

    def _prefill_body(self, tokens: int, ctx: ForwardContext) -> None:
        rows = self._prefill_rows(tokens)
        hidden = self.model.forward_step(self.p_input_ids[:tokens], self.p_positions[:tokens], ctx)
        self.g_logits[:rows] = self.model.compute_logits(hidden.index_select(0, self.p_rows[:rows]))

    def prefill_bucket(self, num_tokens: int, ctx: ForwardContext, num_rows: int) -> int | None:
        """The prefill graph that can run this step (None: it runs eagerly, or on a decode graph)."""
        if not self.prefill_graphs or ctx.is_decode or num_tokens > self.prefill_graph_sizes[-1]:
            return None
        tokens = next(t for t in self.prefill_graph_sizes if t >= num_tokens)
        if num_rows > self._prefill_rows(tokens) or ctx.block_tables is None \
                or ctx.block_tables.shape[1] > self.max_blocks_per_seq:
            return None
        assert ctx.num_seqs <= self._prefill_rows(tokens)  # every sequence has a token, and <= max_num_seqs
        return tokens

    def _replay_prefill(self, tokens: int, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                        rows: torch.Tensor) -> torch.Tensor:
        n, seqs, width = input_ids.numel(), ctx.num_seqs, ctx.block_tables.shape[1]
        block_m, map_size = self._prefill_tiles(tokens)
        self.p_input_ids[:n].copy_(input_ids)  # padding tokens keep earlier ids and positions: any valid ones do
        self.p_positions[:n].copy_(positions)
        self.p_slot_mapping[:n].copy_(ctx.slot_mapping)
        if tokens > n:  # ... but their keys and values must not land in a sequence's blocks
            self.p_slot_mapping[n:tokens].fill_(self.scratch_block * self.block_size)
        self.p_query_start_loc[:seqs + 1].copy_(ctx.query_start_loc)
        self.p_seq_lens[:seqs].copy_(ctx.seq_lens)
        self.p_block_tables[:seqs, :width].copy_(ctx.block_tables)
        tile_map = build_tile_map(ctx.query_lens_cpu, block_m, map_size)
        self.p_tile_map[:map_size].copy_(torch.tensor(tile_map, dtype=torch.int32, pin_memory=True), non_blocking=True)
        num_rows, graph_rows = rows.numel(), self._prefill_rows(tokens)
        self.p_rows[:num_rows].copy_(rows)
        if num_rows < graph_rows:  # the graph's other logits rows must index this bucket (a larger one's
            self.p_rows[num_rows:graph_rows].zero_()  # replay left them pointing past it)
        self.prefill_graphs[tokens].replay()
        self.num_prefill_graph_steps += 1
        return self.g_logits[:num_rows]

    # ------------------------------------------------------------------ decode graphs
    def _graph_context(self, bs: int) -> ForwardContext:
        max_len = self.config.scheduler.max_model_len
        return ForwardContext(
            query_start_loc=self.g_query_start_loc[:bs + 1], seq_lens=self.g_seq_lens[:bs],
            query_lens_cpu=[1] * bs, seq_lens_cpu=[max_len] * bs,  # upper bounds: see module docstring
            slot_mapping=self.g_slot_mapping[:bs], block_tables=self.g_block_tables[:bs],
            state_indices=self.g_state_indices[:bs] if self.hybrid else None,
            has_initial_state_cpu=[True] * bs if self.hybrid else None,
            logits_indices=None)

    def _graph_body(self, bs: int, ctx: ForwardContext) -> None:
        hidden = self.model.forward_step(self.g_input_ids[:bs], self.g_positions[:bs], ctx)
        self.g_logits[:bs] = self.model.compute_logits(hidden)

    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                       rows: torch.Tensor) -> torch.Tensor:
        bs = ctx.num_seqs
        usable = (self.graphs and ctx.is_decode and rows.numel() == bs and bs <= self.graph_sizes[-1]
                  and (not self.hybrid or all(ctx.has_initial_state_cpu))
                  and ctx.block_tables.shape[1] <= self.max_blocks_per_seq)
        if not usable:
            tokens = self.prefill_bucket(input_ids.numel(), ctx, rows.numel())
            if tokens is not None:
                return self._replay_prefill(tokens, input_ids, positions, ctx, rows)
            return super().forward_logits(input_ids, positions, ctx, rows)
        bucket = next(b for b in self.graph_sizes if b >= bs)
        width = ctx.block_tables.shape[1]
        self.g_input_ids[:bs].copy_(input_ids)
        self.g_positions[:bs].copy_(positions)
        self.g_slot_mapping[:bs].copy_(ctx.slot_mapping)
        self.g_block_tables[:bs, :width].copy_(ctx.block_tables)
        self.g_seq_lens[:bs].copy_(ctx.seq_lens)
        if self.hybrid:
            self.g_state_indices[:bs].copy_(ctx.state_indices)
        if bucket > bs:  # padding rows: one token at position 0 in the scratch block / slot
            self.g_input_ids[bs:bucket].zero_()
            self.g_positions[bs:bucket].zero_()
            self.g_slot_mapping[bs:bucket].fill_(self.scratch_block * self.block_size)
            self.g_block_tables[bs:bucket, 0].fill_(self.scratch_block)
            self.g_seq_lens[bs:bucket].fill_(1)
            if self.hybrid:
                self.g_state_indices[bs:bucket].fill_(self.scratch_slot)
        self.graphs[bucket].replay()
        return self.g_logits[:bs]
