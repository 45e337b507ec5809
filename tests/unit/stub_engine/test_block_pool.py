"""BlockPool, KVCacheManager and block_hash on tiny pools, with exact block ids.

Covered: allocation order and the three error tiers (None / ValueError / assert); the free
queue's order after releases (a sequence's blocks go back tail first); prefix caching
(full blocks only, chained hashes, `reused` / `cached_tokens`, `max_hits`); LRU eviction of
cached-but-free blocks; GUARANTEED_NO_EVICT reservations (`available`, `ensure`,
`unreserve`); the `check_idle` leak check; pinned, process-independent block hashes; and a
hypothesis property over random admit / grow / commit / unreserve / release sequences.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.wire.block_hash import SEED, block_hashes, chain_hash, prompt_digest

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # tokens_per_block=4: two full blocks and a partial tail
# Pinned: router and engines in different processes must agree; a change of SEED or of the
# hash breaks every router's predictions, so it must be deliberate.
PINNED = [9574545223452399684, 17699449250715261181]  # block_hashes(PROMPT[:8], 4)


def manager(num_blocks: int, tokens_per_block: int, enable_reuse: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), tokens_per_block, enable_reuse)


# -- BlockPool ----------------------------------------------------------------------------
def test_fresh_pool_allocates_in_id_order_and_returns_none_without_taking_anything():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.allocate(2) is None
    assert pool.free_order() == [5] and pool.num_free == 1
    assert pool.allocate(0) == []
    with pytest.raises(ValueError, match="-1"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match="at least 1 block"):
        BlockPool(0)
    assert pool.ref_count == [1, 1, 1, 1, 1, 0]
    pool.check()


def test_release_appends_to_the_tail_in_the_order_given():
    pool = BlockPool(6)
    assert pool.allocate(4) == [0, 1, 2, 3]
    pool.release([2, 0])
    assert pool.free_order() == [4, 5, 2, 0]
    assert pool.allocate(3) == [4, 5, 2]
    pool.release([3, 1])
    assert pool.free_order() == [0, 3, 1]
    with pytest.raises(AssertionError, match="released more times"):
        pool.release([3])
    pool.check()


def test_acquiring_a_cached_free_block_takes_it_out_of_the_queue_and_allocation_evicts():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.register(1, 111) is True
    assert pool.register(0, 111) is False  # another block already caches the hash
    assert pool.register(1, 222) is False  # the block already has a hash
    pool.release([1, 0])
    assert pool.free_order() == [2, 3, 1, 0]
    pool.acquire(1)
    assert pool.free_order() == [2, 3, 0] and pool.ref_count[1] == 1 and pool.lookup(111) == 1
    pool.release([1])
    assert pool.free_order() == [2, 3, 0, 1]
    assert pool.allocate(4) == [2, 3, 0, 1]
    assert pool.evictions == 1 and pool.lookup(111) is None and pool.hash_of(1) is None
    pool.release([0])
    with pytest.raises(AssertionError, match="registering free block"):
        pool.register(0, 333)
    pool.check()


# -- KVCacheManager -----------------------------------------------------------------------
def test_manager_release_gives_blocks_back_tail_first():
    kv = manager(8, 2)
    a = kv.admit([1, 2, 3, 4, 5], 5)
    assert a.blocks == [0, 1, 2] and (a.reused, a.new, a.reserved) == (0, 3, 0)
    kv.release(a)
    assert kv.pool.free_order() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert a.blocks == []
    kv.check_idle()


def test_same_prompt_reuses_its_full_blocks_but_never_the_partial_tail():
    kv = manager(8, 4)
    a = kv.admit(PROMPT, 10)
    assert a.blocks == [0, 1, 2] and a.reused == 0 and a.cached_tokens == 0
    kv.commit(a, PROMPT)
    assert a.hashes == block_hashes(PROMPT, 4) == PINNED
    assert [kv.pool.lookup(h) for h in a.hashes] == [0, 1] and kv.pool.hash_of(2) is None
    kv.release(a)
    assert kv.pool.free_order() == [3, 4, 5, 6, 7, 2, 1, 0]
    b = kv.admit(PROMPT, 10)
    assert b.blocks == [0, 1, 3]  # the tail block 2 is not shared: a fresh one is taken
    assert (b.reused, b.new, b.cached_tokens) == (2, 1, 8) and b.hashes == PINNED
    assert kv.pool.free_order() == [4, 5, 6, 7, 2] and kv.pool.evictions == 0
    kv.release(b)
    kv.check_idle()


def test_prefix_match_stops_at_the_first_differing_block_and_hashes_chain():
    kv = manager(8, 4)
    a = kv.admit(PROMPT, 10)
    kv.commit(a, PROMPT)
    first_only = kv.admit([1, 2, 3, 4, 9, 9, 9, 9, 1], 9)  # shares block 0 only
    assert first_only.blocks == [0, 3, 4] and first_only.reused == 1 and first_only.cached_tokens == 4
    # block 1's tokens after a different block 0: a different prefix, so no hit at all
    moved = kv.admit([0, 0, 0, 0, 5, 6, 7, 8], 8)
    assert moved.reused == 0 and moved.blocks == [5, 6]
    assert block_hashes([0, 0, 0, 0, 5, 6, 7, 8], 4)[1] != PINNED[1]
    for alloc in (a, first_only, moved):
        kv.release(alloc)
    kv.check_idle()


def test_lru_evicts_cached_free_blocks_in_queue_order():
    kv = manager(4, 2)
    a = kv.admit([1, 2, 3, 4], 4)
    kv.commit(a, [1, 2, 3, 4])
    h0, h1 = a.hashes
    kv.release(a)
    assert kv.pool.free_order() == [2, 3, 1, 0]  # the prompt's last block is evicted first
    other = kv.admit([9, 9], 2)
    assert other.blocks == [2] and kv.pool.evictions == 0
    big = kv.admit([8, 8, 8, 8], 4)
    assert big.blocks == [3, 1]
    assert kv.pool.evictions == 1 and kv.pool.lookup(h1) is None and kv.pool.lookup(h0) == 0
    # block 0 still hits, but taking it and one fresh block needs 2 free blocks; only 1 is
    assert kv.admit([1, 2, 3, 4], 4) is None
    assert kv.pool.free_order() == [0] and kv.pool.ref_count[0] == 0 and kv.pool.lookup(h0) == 0
    kv.release(big)
    assert kv.pool.free_order() == [0, 1, 3]
    again = kv.admit([1, 2, 3, 4], 4)
    assert again.blocks == [0, 1] and again.reused == 1 and kv.pool.evictions == 1
    for alloc in (other, again):
        kv.release(alloc)
    kv.check_idle()


def test_reservations_guarantee_growth_and_block_admission():
    kv = manager(8, 2)
    a = kv.admit([1, 2, 3], 8)  # 2 blocks now, 2 more reserved
    assert a.blocks == [0, 1] and (a.new, a.reserved) == (2, 2)
    assert kv.reserved == 2 and kv.available == 4
    assert kv.admit([5, 6], 10) is None  # 5 blocks > 4 available
    assert kv.pool.free_order() == [2, 3, 4, 5, 6, 7] and kv.reserved == 2
    b = kv.admit([5, 6], 8)  # exactly fits: 1 block now, 3 reserved
    assert b.blocks == [2] and kv.reserved == 5 and kv.available == 0
    assert kv.admit([], 1) is None
    kv.ensure(a, 4)
    assert a.blocks == [0, 1] and kv.reserved == 5
    kv.ensure(a, 5)
    assert a.blocks == [0, 1, 3] and (a.new, a.reserved, kv.reserved) == (3, 1, 4)
    kv.ensure(a, 8)
    assert a.blocks == [0, 1, 3, 4] and a.reserved == 0 and kv.reserved == 3
    with pytest.raises(AssertionError, match="grew past"):
        kv.ensure(a, 9)
    kv.release(a)
    assert kv.pool.free_order() == [5, 6, 7, 4, 3, 1, 0] and kv.reserved == 3
    kv.unreserve(b)
    assert b.reserved == 0 and kv.reserved == 0
    with pytest.raises(AssertionError, match="grew past"):
        kv.ensure(b, 3)
    kv.release(b)
    assert kv.reserved == 0
    kv.check_idle()
    with pytest.raises(ValueError, match="max_tokens=2"):
        kv.admit([1, 2, 3], 2)
    assert kv.fits_empty(16) and not kv.fits_empty(17)


def test_max_hits_caps_reuse_and_disabled_reuse_never_hits():
    kv = manager(8, 4)
    a = kv.admit(PROMPT, 10)
    kv.commit(a, PROMPT)
    kv.release(a)
    b = kv.admit(PROMPT, 10, max_hits=1)
    assert b.blocks == [0, 3, 4] and (b.reused, b.new, b.cached_tokens) == (1, 2, 4)
    kv.commit(b, PROMPT)  # block 4 holds hash 1 too, but block 1 keeps it
    assert b.hashes == PINNED and kv.pool.lookup(PINNED[1]) == 1 and kv.pool.hash_of(4) is None
    c = kv.admit(PROMPT, 10, max_hits=0)
    assert c.reused == 0 and c.blocks == [5, 6, 7]
    for alloc in (b, c):
        kv.release(alloc)
    kv.check_idle()

    off = manager(8, 4, enable_reuse=False)
    d = off.admit(PROMPT, 10)
    off.commit(d, PROMPT)
    off.release(d)
    e = off.admit(PROMPT, 10)
    assert e.reused == 0 and e.hashes == [] and off.pool.num_cached == 0 and e.blocks == [3, 4, 5]
    off.release(e)
    off.check_idle()


def test_check_idle_catches_held_blocks_and_reservations():
    kv = manager(4, 2)
    a = kv.admit([1, 2, 3], 3)
    with pytest.raises(AssertionError, match=r"leak: blocks \[0, 1\] held"):
        kv.check_idle()
    kv.release(a)
    kv.check_idle()
    promise = kv.admit([], 4)  # no block yet, 2 reserved
    assert promise.blocks == [] and kv.reserved == 2
    with pytest.raises(AssertionError, match="2 reserved"):
        kv.check_idle()
    kv.release(promise)
    kv.check_idle()


# -- block_hash ---------------------------------------------------------------------------
def test_block_hashes_cover_full_blocks_only_and_chain_from_seed():
    assert SEED == 0x6B76_6361_6368_6531
    assert block_hashes(PROMPT[:8], 4) == PINNED
    h0 = chain_hash(SEED, [1, 2, 3, 4])
    assert PINNED == [h0, chain_hash(h0, [5, 6, 7, 8])]
    assert block_hashes(PROMPT, 4) == PINNED == block_hashes(PROMPT[:9], 4)
    assert block_hashes(PROMPT[:7], 4) == PINNED[:1] and block_hashes(PROMPT[:3], 4) == []
    assert block_hashes(PROMPT, 1) == block_hashes(PROMPT, 1) and len(block_hashes(PROMPT, 1)) == 10
    for bad in (0, -2):
        with pytest.raises(ValueError, match="tokens_per_block"):
            block_hashes(PROMPT, bad)


def test_extra_keys_and_lengths_change_the_hash():
    plain = block_hashes(PROMPT, 4)
    assert block_hashes(PROMPT, 4, extra=(7,)) != plain
    assert block_hashes(PROMPT, 4, extra=(7,)) != block_hashes(PROMPT, 4, extra=(8,))
    assert chain_hash(SEED, [1, 2], (3,)) != chain_hash(SEED, [1, 2, 3])  # the length is hashed
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 3, 4])


def test_hashes_are_the_same_in_another_process():
    code = "from orchestrator.wire.block_hash import block_hashes; print(block_hashes(list(range(1, 9)), 4))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(PINNED)


# -- property -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_operations_keep_the_pool_consistent(data):
    t, kv = 2, manager(4, 2)
    live: list[tuple] = []  # (alloc, tokens, max_tokens, growing)
    written: dict[int, tuple[int, ...]] = {}  # block -> the sequence prefix up to its last slot

    def write(alloc, tokens):  # what a model writes: only the sequence's own (non-hit) blocks
        for i in range(alloc.reused, kv.blocks_for(len(tokens))):
            written[alloc.blocks[i]] = tuple(tokens[: (i + 1) * t])

    for _ in range(data.draw(st.integers(0, 25))):
        op = data.draw(st.sampled_from(["admit", "grow", "commit", "unreserve", "release"]))
        if op == "admit":
            prompt = data.draw(st.lists(st.integers(0, 1), max_size=6))
            max_tokens = data.draw(st.integers(len(prompt), 8))
            before = (kv.pool.free_order(), list(kv.pool.ref_count), kv.reserved)
            alloc = kv.admit(prompt, max_tokens)
            if alloc is None:
                assert (kv.pool.free_order(), kv.pool.ref_count, kv.reserved) == before
                continue
            for i, block in enumerate(alloc.blocks[: alloc.reused]):  # a hit holds this exact prefix
                assert written[block] == tuple(prompt[: (i + 1) * t])
            write(alloc, prompt)
            live.append((alloc, list(prompt), max_tokens, True))
        elif live:
            i = data.draw(st.integers(0, len(live) - 1))
            alloc, tokens, max_tokens, growing = live[i]
            if op == "grow" and growing and len(tokens) < max_tokens:
                tokens += data.draw(st.lists(st.integers(0, 1), min_size=1, max_size=max_tokens - len(tokens)))
                kv.ensure(alloc, len(tokens))  # never fails within max_tokens
                write(alloc, tokens)
            elif op == "commit":
                kv.commit(alloc, tokens)
            elif op == "unreserve":
                kv.unreserve(alloc)
                live[i] = (alloc, tokens, max_tokens, False)
            elif op == "release":
                kv.release(live.pop(i)[0])
        kv.pool.check()
        assert kv.reserved == sum(a.reserved for a, *_ in live) and kv.available >= 0
        assert kv.pool.ref_count == [sum(b in a.blocks for a, *_ in live) for b in range(4)]
    for alloc, *_ in live:
        kv.release(alloc)
    kv.check_idle()
