"""kv_layout, kv_store and tiny_model: sharded blocks, token slots, and the induction oracle.

Covered: scatter/gather round trips and `convert` between every pair of (tp, pp) layouts in
{1,2,4}x{1,2,4}; that skipping the conversion scrambles data; the rank and local index a
(layer, head) lands on; `Layout.validate`'s errors; KVStore slot writes across block
boundaries in every layout, and its shared-memory lifetime; InductionModel's rule, its
sensitivity to damaged V and to a reordered block table, and `reindex` after a transfer
into a store with another layout reproducing a 20-step decode.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.stub_engine import kv_store
from orchestrator.stub_engine.kv_layout import DTYPE, Geometry, Layout, convert
from orchestrator.stub_engine.kv_store import KVStore
from orchestrator.stub_engine.tiny_model import InductionModel, SequenceKV

G = Geometry(tokens_per_block=4)  # 4 layers, 8 heads, head_dim 2
LAYOUTS = [Layout(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 4)]
PAIRS = list(itertools.permutations(LAYOUTS, 2))
MODEL = InductionModel(G)


def name(layout: Layout) -> str:
    return f"tp{layout.tp}pp{layout.pp}"


def canonical(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, G.layers, 2, G.heads, G.tokens_per_block, G.head_dim)).astype(DTYPE)


# -- kv_layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_scatter_then_gather_is_exact(layout):
    x = canonical(3)
    shards = layout.scatter(G, x)
    assert shards.shape == layout.shape(G, 3)
    assert np.array_equal(layout.gather(G, shards), x)


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=name)
def test_convert_preserves_blocks_and_skipping_it_scrambles_them(source, target):
    x = canonical(3, seed=LAYOUTS.index(source))
    shards = source.scatter(G, x)
    moved = convert(G, source, target, shards)
    assert moved.shape == target.shape(G, 3)
    assert np.array_equal(target.gather(G, moved), x)
    assert not np.array_equal(target.gather(G, shards), x)  # the same bytes read as the wrong layout


def test_a_single_block_is_byte_identical_across_tp1_layouts():
    # Why the test above uses 3 blocks: with tp=1 and one block, pp only splits the
    # outermost axis, so a one-block transfer cannot catch a missing conversion.
    x = canonical(1)
    assert np.array_equal(Layout(1, 4).gather(G, Layout(1, 1).scatter(G, x)), x)
    assert not np.array_equal(Layout(2, 1).gather(G, Layout(1, 1).scatter(G, x)), x)


@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_layer_and_head_land_on_their_rank(layout):
    lr, hr = G.layers // layout.pp, G.heads // layout.tp
    for layer, head in itertools.product(range(G.layers), range(G.heads)):
        x = np.zeros((2, G.layers, 2, G.heads, G.tokens_per_block, G.head_dim), dtype=DTYPE)
        x[1, layer, 1, head, 3, 1] = 7.0
        hits = np.argwhere(layout.scatter(G, x) == 7.0).tolist()
        rank = (layer // lr) * layout.tp + head // hr
        assert hits == [[rank, 1, layer % lr, 1, head % hr, 3, 1]]


@pytest.mark.parametrize(
    ("layout", "key"), [(Layout(tp=3), "tensor_parallel_size"), (Layout(pp=3), "pipeline_parallel_size"),
                        (Layout(tp=0), "tensor_parallel_size"), (Layout(pp=8), "pipeline_parallel_size")],
)  # fmt: skip
def test_validate_names_the_bad_setting(layout, key):
    with pytest.raises(ValueError, match=key):
        layout.validate(G)
    with pytest.raises(ValueError, match=key):
        KVStore(G, layout, 4)


# -- kv_store -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_slots_round_trip_across_block_boundaries(layout):
    store = KVStore(G, layout, 6)
    table = [4, 1, 5, 0]
    values = np.random.default_rng(1).standard_normal((7, G.layers, 2, G.heads, G.head_dim)).astype(DTYPE)
    store.write_slots(table, 3, values)  # positions 3..9: blocks 4, 1 and 5
    assert np.array_equal(store.read_slots(table, 3, 7), values)
    assert np.array_equal(store.read_slots(table, 5, 2), values[2:4])
    assert not store.read_slots(table, 0, 3).any() and not store.read_slots(table, 10, 6).any()
    assert not store.array[:, [0, 2, 3]].any()  # untouched blocks
    assert store.read_slots(table, 3, 0).shape == (0, G.layers, 2, G.heads, G.head_dim)
    # a block's slot t holds position 4*i + t; here position 4 = block 1, slot 0
    assert np.array_equal(layout.gather(G, store.read_blocks([1]))[0, :, :, :, 0, :], values[1])


def test_shared_store_is_attachable_until_closed():
    store = KVStore(G, Layout(2, 2), 3, shared=True, label="test/kv layout")
    try:
        name_ = store.shm_name
        assert name_.startswith("dkv_test_kv_layout_")
        store.write_slots([2, 0], 1, np.full((5, G.layers, 2, G.heads, G.head_dim), 3.5, dtype=DTYPE))
        shm = kv_store.attach(name_)
        try:
            view = np.ndarray(store.array.shape, dtype=DTYPE, buffer=shm.buf)
            same, total = np.array_equal(view, store.array), float(view.sum())
            del view  # a live view would keep the mapping open
            assert same and total == 3.5 * 5 * 128
        finally:
            shm.close()
    finally:
        store.close()
    assert store.shm_name == ""
    with pytest.raises(FileNotFoundError):
        kv_store.attach(name_)
    assert KVStore(G, Layout(), 1).shm_name == ""


# -- tiny_model ---------------------------------------------------------------------------
ONE_RANK = Layout()


def run_prompt(tokens, layout=ONE_RANK, key=0, table=(7, 2, 5, 0)) -> tuple[KVStore, SequenceKV]:
    store = KVStore(G, layout, 8)
    seq = SequenceKV(key, table=list(table))
    MODEL.write(store, seq, tokens, None)
    return store, seq


def induction(tokens: list[int]) -> int | None:
    """The classic rule: the token after the latest earlier occurrence of the last token."""
    for j in range(len(tokens) - 2, -1, -1):
        if tokens[j] == tokens[-1]:
            return tokens[j + 1]
    return None


@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_next_token_follows_the_induction_rule(layout):
    for tokens, want in (([5, 6, 7, 5], 6), ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 3), ([9, 9], 9)):
        store, seq = run_prompt(tokens, layout)
        assert induction(tokens) == want == MODEL.next_token(store, seq)
        assert MODEL.last_token(store, seq) == tokens[-1] and seq.length == len(tokens)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 20), min_size=2, max_size=16))
def test_induction_rule_on_random_prompts(tokens):
    store, seq = run_prompt(tokens)
    want = induction(tokens)
    got = MODEL.next_token(store, seq)
    assert got == want if want is not None else got in tokens


def test_corrupted_v_changes_the_next_token():
    store, seq = run_prompt([5, 6, 7, 5])
    slot = store.read_slots(seq.table, 1, 1)  # position 1 is the match: V says 6
    slot[:, :, 1] = MODEL.kv_values([42], 1, 5)[:, :, 1]
    store.write_slots(seq.table, 1, slot)
    assert MODEL.next_token(store, seq) == 42

    layout = Layout(2, 2)
    store, seq = run_prompt([5, 6, 7, 5], layout)
    assert MODEL.next_token(store, seq) == 6
    # one raw value: layer 3 / head 5 lives on rank 3 as local layer 1, local head 1
    store.array[3, seq.table[0], 1, 1, 1, 1, 0] += 100.0
    assert MODEL.next_token(store, seq) != 6


def test_swapped_blocks_change_the_output():
    tokens = [1, 2, 3, 4, 5, 6, 7, 1]
    store, seq = run_prompt(tokens)
    assert MODEL.next_token(store, seq) == 2
    seq.table[0], seq.table[1] = seq.table[1], seq.table[0]
    assert MODEL.next_token(store, seq) != 2
    MODEL.reindex(store, seq)  # a rebuilt index does not undo the damage either
    assert MODEL.next_token(store, seq) != 2


def decode(store: KVStore, seq: SequenceKV, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        token = MODEL.next_token(store, seq)
        MODEL.write(store, seq, [token], MODEL.last_token(store, seq))
        out.append(token)
    return out


@pytest.mark.parametrize("key", [0, 7])
@pytest.mark.parametrize(
    ("source", "target"), [(Layout(1, 1), Layout(2, 2)), (Layout(4, 1), Layout(1, 4)), (Layout(2, 4), Layout(4, 2))],
    ids=name,
)  # fmt: skip
def test_reindex_after_a_converted_copy_reproduces_the_decode(source, target, key):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # 3 blocks; 9 + 20 tokens need 8 blocks
    src = KVStore(G, source, 10)
    a = SequenceKV(key, table=[9, 3, 0, 7, 1, 2, 4, 5])
    MODEL.write(src, a, prompt, None)
    dst = KVStore(G, target, 12)
    b = SequenceKV(key, table=[2, 11, 5, 0, 1, 3, 4, 6], length=a.length)
    used = G.blocks_for(a.length)
    dst.write_blocks(b.table[:used], convert(G, source, target, src.read_blocks(a.table[:used])))
    MODEL.reindex(dst, b)
    assert b.index == a.index
    expected = decode(src, a, 20)
    assert decode(dst, b, 20) == expected
    assert len(set(expected)) > 1 and a.length == b.length == 29
    assert np.array_equal(dst.read_slots(b.table, 0, 29), src.read_slots(a.table, 0, 29))
