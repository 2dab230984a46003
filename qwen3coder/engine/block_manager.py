"""Paged KV-cache bookkeeping with prefix caching, and recurrent-state slots for hybrid models.

`BlockManager` hands out fixed-size KV blocks to sequences (their `block_table`) and keeps
reference counts. With prefix caching, a block whose tokens are all computed is registered under
its chained hash (hash of the parent block's hash + its token ids); a new sequence reuses the
longest chain of registered blocks whose token ids also compare equal. Freed blocks that carry a
hash stay in the cache (LRU order) until the pool needs them; blocks without one are reused first.

`StateSlotManager` does the same job for the Gated DeltaNet state of hybrid (Qwen3-Next) models:
one slot per running sequence, plus snapshot slots holding the state after a block-aligned prefix
(keyed by that prefix's block hash, with its token ids kept for an equality check). See
docs/ENGINE.md, "Prefix caching for hybrid models".
"""

from __future__ import annotations

from collections import OrderedDict

from qwen3coder.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))  # stack, pops low ids first
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: evict from the front
        self.hash_to_block: dict[bytes, int] = {}
        self.num_cache_queries = 0  # tokens looked up / found, for the hit-rate metric
        self.num_cache_hits = 0

    # ------------------------------------------------------------------ stats
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ------------------------------------------------------------------ prefix cache
    def find_cached_prefix(self, seq: Sequence, max_blocks: int) -> list[int]:
        """Block ids of the longest registered prefix of `seq` (at most `max_blocks` blocks)."""
        if not self.enable_prefix_caching or max_blocks <= 0:
            return []
        hashes = seq.compute_block_hashes(self.block_size)
        hit: list[int] = []
        bs = self.block_size
        for i in range(min(max_blocks, len(hashes))):
            block_id = self.hash_to_block.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # hash collision: never reuse a block whose tokens differ
            hit.append(block_id)
        return hit

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_cache_queries += num_tokens
        self.num_cache_hits += num_hit_tokens

    # ------------------------------------------------------------------ allocation
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, hit: list[int] = ()) -> int:
        """Blocks taken from the free pool to give `seq` room for `num_new_tokens` more tokens."""
        have = len(seq.block_table) + len(hit)
        need_tokens = seq.num_computed_tokens + len(hit) * self.block_size + num_new_tokens
        new = max(0, cdiv(need_tokens, self.block_size) - have)
        revived = sum(1 for b in hit if self.blocks[b].ref_count == 0)  # cached but free
        return new + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hit: list[int] = (), reserve: int = 0) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens, hit) + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: list[int] = ()) -> bool:
        """Take references on the `hit` blocks, then add blocks for `num_new_tokens` tokens.

        The hit blocks count as computed (`seq.num_computed_tokens` grows). Returns False, changing
        nothing, when the pool is too small.
        """
        if not self.can_allocate(seq, num_new_tokens, hit):
            return False
        if hit:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for block_id in hit:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_cached[block_id]
                block.ref_count += 1
            seq.block_table.extend(hit)
            seq.num_computed_tokens = len(hit) * self.block_size
            seq.num_registered_blocks = len(hit)
        need = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.pop()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently used
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks go back first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.free_cached[block_id] = None
                else:
                    self.free_uncached.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Register every newly completed, fully computed block of `seq` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = seq.compute_block_hashes(self.block_size)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self.hash_to_block:
                block.block_hash = hashes[i]
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.hash_to_block[hashes[i]] = block.block_id
        seq.num_registered_blocks = num_full

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share the parent's blocks with `child`; a partly filled last block is copied.

        Returns the (src, dst) block copy the runner must do before the next step, or None.
        The caller checks `num_free_blocks` first (a copy needs one block).
        """
        assert not child.block_table
        num_tokens = parent.num_computed_tokens
        shared = num_tokens // self.block_size
        table = parent.block_table[:cdiv(num_tokens, self.block_size)]
        for block_id in table[:shared]:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(table[:shared])
        child.num_computed_tokens = num_tokens
        child.num_registered_blocks = min(parent.num_registered_blocks, shared)
        if shared < len(table):
            dst = self._take_free_block()
            child.block_table.append(dst)
            return table[shared], dst
        return None

    def check_invariants(self, live: list[Sequence]) -> None:
        """Reference counts equal table occurrences; free lists hold exactly the unreferenced blocks."""
        counts = [0] * self.num_blocks
        for seq in live:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} repeats a block"
            for block_id in seq.block_table:
                counts[block_id] += 1
        free = set(self.free_uncached) | set(self.free_cached)
        assert len(free) == len(self.free_uncached) + len(self.free_cached), "block in both free lists"
        owners: dict[int, set[str]] = {}
        for seq in live:
            for block_id in seq.block_table:
                owners.setdefault(block_id, set()).add(seq.request.request_id)
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], \
                f"block {block.block_id}: ref_count {block.ref_count} != {counts[block.block_id]} owners"
            assert (block.ref_count == 0) == (block.block_id in free), f"block {block.block_id} free-list state"
            if block.ref_count > 1 and block.block_hash is None:
                # only the samples of one request (n > 1 fork) may share a block outside the prefix cache
                assert len(owners[block.block_id]) == 1, f"block {block.block_id} shared across requests"
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].block_hash == h
        for block_id in self.free_cached:
            assert self.blocks[block_id].block_hash is not None


class StateSlotManager:
    """Recurrent-state slots: one per running sequence, the rest hold prefix snapshots (LRU)."""

    def __init__(self, num_slots: int, max_snapshots: int):
        self.num_slots = num_slots
        self.max_snapshots = max_snapshots
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.snapshots: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash -> slot, tokens
        self.num_seq_slots = 0

    def allocate(self) -> int:
        if not self.free_slots:
            assert self.snapshots, "state slots exhausted: more running sequences than slots"
            _, (slot, _) = self.snapshots.popitem(last=False)
            self.free_slots.append(slot)
        self.num_seq_slots += 1
        return self.free_slots.pop()

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self.free_slots
        self.num_seq_slots -= 1
        self.free_slots.append(slot)

    def lookup(self, block_hash: bytes, prefix: list[int]) -> int | None:
        """Snapshot slot holding the state after exactly `prefix` (tokens compared), or None."""
        entry = self.snapshots.get(block_hash)
        if entry is None or entry[1] != tuple(prefix):
            return None
        self.snapshots.move_to_end(block_hash)
        return entry[0]

    def has_snapshot(self, block_hash: bytes) -> bool:
        return block_hash in self.snapshots

    def save(self, block_hash: bytes, prefix: list[int]) -> int | None:
        """Reserve a snapshot slot for `prefix`; returns it (the caller copies the state in) or None."""
        if self.max_snapshots == 0 or block_hash in self.snapshots:
            return None
        if len(self.snapshots) >= self.max_snapshots or not self.free_slots:
            if not self.snapshots:
                return None
            _, (slot, _) = self.snapshots.popitem(last=False)
            self.free_slots.append(slot)
        slot = self.free_slots.pop()
        self.snapshots[block_hash] = (slot, tuple(prefix))
        return slot

    def check_invariants(self, live: list[Sequence]) -> None:
        seq_slots = [s.state_slot for s in live if s.state_slot >= 0]
        snap_slots = [slot for slot, _ in self.snapshots.values()]
        everything = seq_slots + snap_slots + self.free_slots
        assert sorted(everything) == list(range(self.num_slots)), "state slots leaked or shared"
        assert len(seq_slots) == self.num_seq_slots
