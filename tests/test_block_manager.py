"""BlockManager / StateSlotManager: allocation, prefix hits with token equality, LRU eviction,
fork copy-on-write, and a hypothesis test of reference-count invariants under random operations."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from qwen3coder.engine.block_manager import BlockManager, StateSlotManager
from qwen3coder.engine.sampling_params import SamplingParams
from qwen3coder.engine import sequence as sequence_mod
from qwen3coder.engine.sequence import Request

BS = 4


def make_seq(tokens, rid="r"):
    return Request(rid, None, tokens, SamplingParams()).seqs[0]


def compute_all(bm: BlockManager, seq) -> None:
    seq.num_computed_tokens = len(seq)
    bm.register_computed_blocks(seq)


def test_allocate_and_free():
    bm = BlockManager(8, BS)
    s = make_seq(list(range(10)))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    big = make_seq(list(range(40)))
    assert not bm.allocate(big, 40) and big.block_table == []


def test_prefix_hit_and_lru_eviction():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(13)), "a")
    bm.allocate(a, 13)
    compute_all(bm, a)
    assert len(bm.hash_to_block) == 3
    b = make_seq(list(range(12)) + [99, 98], "b")
    hit = bm.find_cached_prefix(b, (len(b) - 1) // BS)
    assert hit == a.block_table[:3]
    bm.allocate(b, len(b) - 12, hit)
    assert b.num_computed_tokens == 12 and bm.blocks[hit[0]].ref_count == 2
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    # cached blocks stay findable after free, and uncached ones are reused first
    c = make_seq([7] * 8, "c")
    bm.allocate(c, 8)
    assert bm.find_cached_prefix(make_seq(list(range(13))), 3) == hit
    d = make_seq([5] * 12, "d")
    bm.allocate(d, 12)  # needs evictions now: the tail block of the old prefix goes first
    assert bm.find_cached_prefix(make_seq(list(range(13))), 3) == hit[:1]
    bm.check_invariants([c, d])


def test_hash_collision_is_not_reused(monkeypatch):
    monkeypatch.setattr(sequence_mod, "hash_block", lambda parent, toks: b"same")
    bm = BlockManager(4, BS)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    compute_all(bm, a)
    b = make_seq([9, 9, 9, 9, 5])
    assert bm.find_cached_prefix(b, 1) == []  # same hash, different tokens: a miss


def test_fork_shares_full_blocks_and_copies_partial():
    bm = BlockManager(8, BS)
    parent = make_seq(list(range(10)))
    bm.allocate(parent, 10)
    compute_all(bm, parent)
    child = Request("r2", None, [], SamplingParams()).seqs[0]
    child.request = parent.request
    copy = bm.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2]
    assert copy == (parent.block_table[2], child.block_table[2])
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    bm.check_invariants([parent, child])
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_state_slots_and_snapshots():
    sm = StateSlotManager(3, max_snapshots=2)
    s0 = sm.allocate()
    snap = sm.save(b"h1", [1, 2])
    assert snap is not None and sm.lookup(b"h1", [1, 2]) == snap
    assert sm.lookup(b"h1", [1, 3]) is None  # token check
    s1 = sm.allocate()
    s2 = sm.allocate()  # pool exhausted: the snapshot is evicted for a running sequence
    assert sm.lookup(b"h1", [1, 2]) is None and len({s0, s1, s2}) == 3
    for s in (s0, s1, s2):
        sm.free(s)
    assert sorted(sm.free_slots) == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "grow", "free", "fork"]), st.integers(0, 6),
                          st.lists(st.integers(0, 3), min_size=1, max_size=14)), max_size=40),
       st.integers(4, 16), st.booleans())
def test_refcounts_balance_under_random_ops(ops, num_blocks, caching):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    live = []
    for k, (op, pick, toks) in enumerate(ops):
        if op == "new":
            s = make_seq(toks, f"q{k}")
            hit = bm.find_cached_prefix(s, (len(s) - 1) // BS)
            if bm.allocate(s, len(s) - len(hit) * BS, hit):
                compute_all(bm, s)
                live.append(s)
        elif live and op == "grow":
            s = live[pick % len(live)]
            if bm.allocate(s, 1):
                s.append_token(toks[0])
                compute_all(bm, s)
        elif live and op == "free":
            bm.free(live.pop(pick % len(live)))
        elif live and op == "fork" and bm.num_free_blocks >= 1:
            p = live[pick % len(live)]
            child = Request("tmp", None, [], SamplingParams()).seqs[0]
            child.request, child.token_ids = p.request, list(p.token_ids)
            bm.fork(p, child)
            live.append(child)
        bm.check_invariants(live)
    for s in live:
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks
