"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest
first: a decode takes one token, an unfinished prefill takes the next chunk that fits. If the KV
pool cannot hold a running sequence's new tokens, the most recently admitted running sequence is
preempted (its blocks freed, its tokens recomputed later), repeatedly, down to the sequence itself.
Waiting sequences (FCFS) are then admitted while budget, sequence slots and blocks last, starting
from their longest prefix-cache hit; no admissions happen in a step that preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen3coder.engine.block_manager import BlockManager, StateSlotManager
from qwen3coder.engine.config import CacheConfig, SchedulerConfig
from qwen3coder.engine.sampler import SampledToken
from qwen3coder.engine.outputs import Logprob
from qwen3coder.engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # tokens already computed before this step
    sample: bool  # this step completes the sequence's tokens, so a next token is sampled
    has_initial_state: bool  # hybrid: continue from the state slot
    children: list[Sequence] = field(default_factory=list)  # n>1 samples drawn from the same logits


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    block_copies: list[tuple[int, int]]  # (src, dst) KV block copies to do before the forward
    state_copies: list[tuple[int, int]]  # (src, dst) state-slot copies to do before the forward
    num_batched_tokens: int
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def sample_rows(self) -> list[tuple[Sequence, int]]:
        """(sequence, index into `seqs`) for every row the sampler draws."""
        rows = []
        for i, s in enumerate(self.seqs):
            if s.sample:
                rows.append((s.seq, i))
                rows.extend((c, i) for c in s.children)
        return rows


@dataclass
class ModelRunnerOutput:
    sampled: dict[int, SampledToken]  # seq_id -> token
    prompt_logprobs: dict[int, list[tuple[int, dict[int, Logprob]]]] = field(default_factory=dict)
    # seq_id -> [(position of the scored prompt token, {token: Logprob})]


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_kv_blocks: int,
                 num_state_slots: int = 0, num_snapshots: int = 0):
        self.config = sched
        self.block_size = cache.block_size
        self.enable_prefix_caching = cache.enable_prefix_caching
        self.block_manager = BlockManager(num_kv_blocks, cache.block_size, cache.enable_prefix_caching)
        self.hybrid = num_state_slots > 0
        self.state_manager = StateSlotManager(num_state_slots, num_snapshots if cache.enable_prefix_caching
                                              else 0) if self.hybrid else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.pending_block_copies: list[tuple[int, int]] = []
        self.pending_state_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, req: Request) -> None:
        assert req.request_id not in self.requests, f"duplicate request id {req.request_id!r}"
        self.requests[req.request_id] = req
        self.waiting.append(req.seqs[0])

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def live_sequences(self) -> list[Sequence]:
        return list(self.running) + list(self.waiting)

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.pending_forks = 0
        for seq in req.seqs:
            if not seq.is_finished:
                self.finish_seq(seq, "abort")
        return req

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def pop_finished_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.is_finished:
            del self.requests[request_id]

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.state_slot >= 0:
            self.state_manager.free(seq.state_slot)
            seq.state_slot = -1
        seq.snapshot_at = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ scheduling
    def _chunk(self, seq: Sequence, budget: int) -> int:
        num_new = min(seq.num_uncomputed_tokens, budget)
        if seq.snapshot_at > seq.num_computed_tokens:  # end the chunk where the state is snapshot
            num_new = min(num_new, seq.snapshot_at - seq.num_computed_tokens)
        assert num_new > 0
        return num_new

    def _schedule_entry(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        sample = start + num_new == len(seq)
        entry = ScheduledSeq(seq, num_new, start, sample, has_initial_state=start > 0)
        req = seq.request
        if sample and seq is req.seqs[0] and req.pending_forks:
            for _ in range(req.pending_forks):
                child = Sequence(req, len(req.seqs), seq.token_ids)
                req.seqs.append(child)
                entry.children.append(child)
            req.pending_forks = 0
        return entry

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        entries: list[ScheduledSeq] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._chunk(seq, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                entries.append(self._schedule_entry(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # `seq` itself was preempted: it was the last running sequence
        if not preempted:
            budget = self._admit(entries, budget)
        out = SchedulerOutput(entries, self.pending_block_copies, self.pending_state_copies,
                              self.config.max_num_batched_tokens - budget, preempted)
        self.pending_block_copies, self.pending_state_copies = [], []
        return out

    def schedule_lookahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Async scheduling: the next decode step, planned while `prev` still runs on the GPU.

        Every sequence of `prev` gets a pending placeholder for the token `prev` samples
        (`Sequence.append_pending`; `update_from_output(prev, ...)` fills it in) and is scheduled for one
        more token whose input the runner takes from `prev`'s sampled ids on the device. Sequences that
        `prev` certainly finishes (`max_tokens`, `max_model_len`) are left out. A sequence that stops on
        EOS, a stop token or a stop string is only known to after `prev`; its share of this step is
        then wasted and dropped (`update_from_output` skips finished sequences).

        Waiting requests are admitted into the rest of the token budget as `schedule()` admits them
        (their prompts are known on the host). Returns None — the engine then waits for `prev` and
        schedules normally — whenever this plan could differ from what `schedule()` would do: a
        sequence of the running set that `prev` did not sample (prefill chunks), forks, block or state
        copies pending, a hybrid snapshot due, or not enough free blocks without preemption.
        """
        if self.pending_block_copies or self.pending_state_copies or prev.num_preempted:
            return None
        if len(prev.seqs) != len(self.running) or any(
                not e.sample or e.children or e.seq.status is not SequenceStatus.RUNNING or e.seq.snapshot_at
                for e in prev.seqs):
            return None
        max_len = self.config.max_model_len
        nxt = []
        for e in prev.seqs:
            seq, p = e.seq, e.seq.params
            outputs = seq.num_output_tokens + 1  # after prev's token
            if (p.max_tokens is not None and outputs >= p.max_tokens) or len(seq) + 1 >= max_len:
                continue
            nxt.append(e)
        if not nxt or len(nxt) > self.config.max_num_batched_tokens:
            return None
        need = sum(self.block_manager.num_blocks_needed(e.seq, e.num_new_tokens + 1) for e in nxt)
        if need > self.block_manager.num_free_blocks:
            return None
        entries = []
        for e in nxt:
            seq = e.seq
            start = e.start + e.num_new_tokens
            assert start == len(seq)
            ok = self.block_manager.allocate(seq, e.num_new_tokens + 1)
            assert ok
            seq.num_computed_tokens = start  # what update_from_output(prev) will set too
            seq.append_pending()
            entries.append(ScheduledSeq(seq, 1, start, sample=True, has_initial_state=True))
        budget = self._admit(entries, self.config.max_num_batched_tokens - len(entries))  # new requests join
        out = SchedulerOutput(entries, self.pending_block_copies, self.pending_state_copies,
                              self.config.max_num_batched_tokens - budget)
        self.pending_block_copies, self.pending_state_copies = [], []
        return out

    def _admit(self, entries: list[ScheduledSeq], budget: int) -> int:
        bm, bs = self.block_manager, self.block_size
        reserve = int(self.config.admission_watermark * bm.num_blocks)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit, snapshot = self._prefix_hit(seq)
            boundary = self._snapshot_boundary(seq, len(hit) * bs)
            num_new = min(len(seq) - len(hit) * bs, budget)
            if boundary:
                num_new = min(num_new, boundary - len(hit) * bs)
            if not bm.can_allocate(seq, num_new, hit, reserve if self.running else 0):
                break
            self.waiting.popleft()
            bm.allocate(seq, num_new, hit)
            bm.record_query(len(seq), len(hit) * bs)
            req = seq.request
            if seq is req.seqs[0] and req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = len(hit) * bs
            if self.hybrid:
                seq.state_slot = self.state_manager.allocate()
                if snapshot is not None:
                    self.pending_state_copies.append((snapshot, seq.state_slot))
                seq.snapshot_at = boundary
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entries.append(self._schedule_entry(seq, num_new))
            budget -= num_new
        return budget

    def _prefix_hit(self, seq: Sequence) -> tuple[list[int], int | None]:
        """Cached blocks to reuse and (hybrid) the snapshot slot holding the state after them."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return [], None
        hit = self.block_manager.find_cached_prefix(seq, (len(seq) - 1) // self.block_size)
        if not self.hybrid:
            return hit, None
        for k in range(len(hit), 0, -1):  # longest hit that also has a state snapshot
            slot = self.state_manager.lookup(seq.block_hashes[k - 1], seq.token_ids[:k * self.block_size])
            if slot is not None:
                return hit[:k], slot
        return [], None

    def _snapshot_boundary(self, seq: Sequence, num_cached: int) -> int:
        """Hybrid: the last full-block boundary before the final token, where a prefill chunk must
        end so the state can be snapshot (0: no snapshot, e.g. that prefix already has one)."""
        sm = self.state_manager
        if sm is None or not self.enable_prefix_caching or sm.max_snapshots == 0 \
                or seq.params.prompt_logprobs is not None:
            return 0
        boundary = (len(seq) - 1) // self.block_size * self.block_size
        if boundary <= num_cached:
            return 0
        hashes = seq.compute_block_hashes(self.block_size)
        return 0 if sm.has_snapshot(hashes[boundary // self.block_size - 1]) else boundary

    # ------------------------------------------------------------------ results
    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput,
                           eos_token_ids: set[int]) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Apply a step's results. Returns the sequences that got a token and the (src, dst)
        state-slot copies (snapshots) the runner must do now, before the next forward."""
        updated: list[Sequence] = []
        snapshot_copies: list[tuple[int, int]] = []
        bm = self.block_manager
        for entry in out.seqs:
            seq = entry.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens = entry.start + entry.num_new_tokens
            bm.register_computed_blocks(seq)
            req = seq.request
            if seq.seq_id in result.prompt_logprobs and req.prompt_logprobs is not None:
                for pos, entry_lp in result.prompt_logprobs[seq.seq_id]:
                    if pos == len(req.prompt_logprobs):
                        req.prompt_logprobs.append(entry_lp)
            if seq.snapshot_at and seq.num_computed_tokens == seq.snapshot_at:
                i = seq.snapshot_at // self.block_size - 1
                slot = self.state_manager.save(seq.block_hashes[i], seq.token_ids[:seq.snapshot_at])
                if slot is not None:
                    snapshot_copies.append((seq.state_slot, slot))
                seq.snapshot_at = 0
            if not entry.sample:
                continue
            for child in entry.children:  # fork before the parent may finish and free its blocks
                self._append(child, result.sampled[child.seq_id], eos_token_ids)
                updated.append(child)
                if not child.is_finished:
                    self._fork(seq, child)
            self._append(seq, result.sampled[seq.seq_id], eos_token_ids)
            updated.append(seq)
        return updated, snapshot_copies

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        bm = self.block_manager
        if len(self.running) < self.config.max_num_seqs and bm.num_free_blocks >= 1:
            copy = bm.fork(parent, child)
            if copy is not None:
                self.pending_block_copies.append(copy)
            if self.hybrid:
                child.state_slot = self.state_manager.allocate()
                self.pending_state_copies.append((parent.state_slot, child.state_slot))
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:  # no room now: recompute it later like a preempted sequence
            child.status = SequenceStatus.WAITING
            self.waiting.appendleft(child)

    def _append(self, seq: Sequence, tok: SampledToken, eos_token_ids: set[int]) -> None:
        seq.append_token(tok.token_id)
        if tok.logprob is not None:
            seq.cumulative_logprob += tok.logprob
        if seq.logprobs is not None:
            entry = {tok.token_id: Logprob(tok.logprob, tok.rank)}
            for rank, (tid, lp) in enumerate(tok.top or [], start=1):
                if tid not in entry:
                    entry[tid] = Logprob(lp, rank)
            seq.logprobs.append(entry)
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and tok.token_id in eos_token_ids:
                return self.finish_seq(seq, "stop", None)
            if tok.token_id in p.stop_token_ids:
                return self.finish_seq(seq, "stop", tok.token_id)
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                or len(seq) >= self.config.max_model_len:
            self.finish_seq(seq, "length")

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        live = self.live_sequences()
        assert all(s.status is SequenceStatus.RUNNING for s in self.running)
        assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in self.waiting)
        assert len(self.running) <= self.config.max_num_seqs
        assert len({s.seq_id for s in live}) == len(live), "sequence queued twice"
        self.block_manager.check_invariants(self.running)
        if self.state_manager is not None:
            self.state_manager.check_invariants(self.running)
            assert all(s.state_slot >= 0 for s in self.running)
