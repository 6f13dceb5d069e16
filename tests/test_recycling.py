"""Token Recycling: the static template, the successor table, drafting, and losslessness with
the fake Markov target (tests/fakes.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import MarkovLM
from logitspec.acceptance import TargetOutput
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.recycling import (
    DEFAULT_RANK_PROBS, RecyclingConfig, SuccessorTable, TokenRecyclingDrafter, static_template,
)
from logitspec.tree import DraftTree

# --------------------------------------------------------------------------- template

TEMPLATES = [
    # (capacity, rank_probs, expected shape)
    (1, (0.5, 0.3), [()]),
    (2, (0.5, 0.3), [(), (0,)]),
    (3, (0.5, 0.3), [(), (0,), (1,)]),
    (6, (0.5, 0.3, 0.2), [(), (0,), (1,), (0, 0), (2,), (0, 1)]),  # (0, 1) ties (1, 0): path order
    (5, (0.9, 0.1), [(), (0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]),  # a chain along rank 0
    (4, (1.0, 1.0), [(), (0,), (1,), (0, 0)]),  # all equal: breadth first
    (8, DEFAULT_RANK_PROBS,
     [(), (0,), (0, 0), (0, 0, 0), (1,), (0, 0, 0, 0), (0, 1), (1, 0)]),
]


@pytest.mark.parametrize("capacity,rank_probs,expected", TEMPLATES)
def test_static_template_table(capacity, rank_probs, expected):
    assert static_template(capacity, rank_probs) == expected


@pytest.mark.parametrize("capacity", [1, 2, 7, 16, 64, 200])
def test_static_template_is_parents_first_and_deterministic(capacity):
    shape = static_template(capacity)
    assert len(shape) == len(set(shape)) == capacity and shape[0] == ()
    seen = set()
    for path in shape:
        assert path[:-1] in seen or path == ()
        seen.add(path)
    assert static_template(capacity) == shape


def test_default_template_is_wide_near_the_root_and_deep_along_rank_0():
    shape = static_template(64)
    widths = Counter(len(p) for p in shape)
    assert [widths[d] for d in range(1, 9)] == [8, 18, 16, 9, 6, 4, 1, 1]
    assert max(shape, key=len) == (0,) * 8


def test_template_ties_do_not_depend_on_rounding():
    # in floating point (0.2 * 0.1) * 0.3 > (0.3 * 0.2) * 0.1; exact weights tie: path order
    shape = static_template(60, (0.3, 0.2, 0.1))
    perms = [p for p in shape if sorted(p) == [0, 1, 2]]
    assert perms == sorted(perms) and len(perms) == 6


@pytest.mark.parametrize("capacity,rank_probs", [(0, (0.5,)), (4, ()), (4, (0.5, 0.0)), (4, (1.5,))])
def test_static_template_rejects_bad_input(capacity, rank_probs):
    with pytest.raises(ValueError):
        static_template(capacity, rank_probs)


def test_config_validates_and_cuts_ranks_at_k():
    with pytest.raises(ValueError):
        RecyclingConfig(draft_tree_capacity=0)
    with pytest.raises(ValueError):
        RecyclingConfig(k=0)
    assert all(max(p, default=0) < 2 for p in RecyclingConfig(32, k=2).template())


# --------------------------------------------------------------------------- table


def test_table_starts_unknown_and_last_write_wins():
    table = SuccessorTable(10, k=2)
    assert table.successors_of(5).tolist() == [-1, -1]
    table.update([5, 7, 5], np.array([[3, 4], [5, 1], [9, 8]]))
    assert table.successors_of(5).tolist() == [9, 8]
    assert table.successors_of(7).tolist() == [5, 1]
    table.update([7], np.array([[2, 6]]))
    assert table.successors_of(7).tolist() == [2, 6] and table.successors_of(5).tolist() == [9, 8]


def test_table_last_write_wins_for_many_repeats():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, size=200)
    rows = rng.integers(0, 50, size=(200, 3))
    table = SuccessorTable(6, k=3)
    table.update(tokens.tolist(), rows)
    for token in range(6):
        last = np.flatnonzero(tokens == token)[-1]
        assert table.successors_of(token).tolist() == rows[last].tolist()


@pytest.mark.parametrize("size", [1, 2, 5, 6, 9, 12, 30])
@pytest.mark.parametrize("repeats", [False, True])
def test_table_writes_equal_a_dict_of_last_rows(size, repeats):
    """Few rows are written one by one, many at once (fancy indexing): the same table."""
    rng = np.random.default_rng(size)
    tokens = rng.integers(0, 8 if repeats else 1000, size=size)
    if not repeats:
        tokens = rng.permutation(1000)[:size]
    rows = rng.integers(0, 50, size=(size, 4))
    table = SuccessorTable(1000, k=4)
    table.update(tokens, rows)
    last = {int(t): rows[i].tolist() for i, t in enumerate(tokens)}
    for token in range(1000):
        assert table.successors_of(token).tolist() == last.get(token, [-1] * 4)


def test_observe_skips_unknown_rows():
    table = SuccessorTable(10, k=2)
    tree = DraftTree((1, 2, 3), (-1, 0, 0), (0, 1, 1))
    table.observe(tree, TargetOutput(None, np.array([[4, 5, 0], [-1, -1, -1], [6, 7, 0]])))
    assert table.successors_of(1).tolist() == [4, 5] and table.successors_of(3).tolist() == [6, 7]
    assert table.successors_of(2).tolist() == [-1, -1]


def test_table_pads_narrow_rows_and_rejects_bad_shapes():
    table = SuccessorTable(5, k=3)
    table.update([1], np.array([[4]]))
    assert table.successors_of(1).tolist() == [4, -1, -1]
    with pytest.raises(ValueError):
        table.update([1, 2], np.array([[4, 3, 2]]))
    with pytest.raises(ValueError):
        table.update([1], np.array([[4, 3, 2, 1]]))
    with pytest.raises(ValueError, match="integer"):
        table.update([1], np.array([[4.5, 3.0]]))
    with pytest.raises(ValueError):
        SuccessorTable(0)


def target_output(logits: torch.Tensor, k: int) -> TargetOutput:
    """What the decoding loop hands a drafter: top-k rows at most the vocabulary wide."""
    return TargetOutput(logits, logits.topk(min(k, logits.shape[-1])).indices.numpy())


def test_observe_records_the_top_k_of_every_node():
    tree = DraftTree((2, 0, 1), (-1, 0, 0), (0, 1, 1))
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 0.0], [0.0, 0.0, 9.0, 8.0]])
    table = SuccessorTable(4, k=2)
    table.observe(tree, target_output(logits, 8))
    assert [table.successors_of(t).tolist() for t in range(4)] == [[0, 2], [2, 3], [1, 3], [-1, -1]]
    wide = SuccessorTable(4, k=8)  # k past the vocabulary: the rest stays unknown
    wide.observe(tree, target_output(logits, 8))
    assert wide.successors_of(2).tolist()[:4] == [1, 3, 2, 0] and wide.successors_of(2)[4:].max() == -1


def test_observe_skips_unknown_rows_and_aux_inputs():
    aux = np.array([[True, False, False, True]])
    tree = DraftTree((2, 0, 1), (-1, 0, 0), (0, 1, 1), aux_tokens=(3,), aux_depths=(1,), aux_mask=aux)
    rows = np.array([[1, 0], [-1, -1], [3, 2], [0, 1]])  # node 1 unknown; row 3 is the aux input
    table = SuccessorTable(4, k=2)
    table.observe(tree, TargetOutput(None, rows))
    assert [table.successors_of(t).tolist() for t in range(4)] == [[-1, -1], [3, 2], [1, 0], [-1, -1]]


# --------------------------------------------------------------------------- drafting


NO_TOPK = np.zeros(0, dtype=np.int64)  # Token Recycling reads no top-k at drafting time


def drafter_with(rows: dict[int, list[int]], capacity: int, rank_probs, k: int = 2):
    table = SuccessorTable(16, k)
    table.update(list(rows), np.array(list(rows.values())))
    return TokenRecyclingDrafter(RecyclingConfig(capacity, k, rank_probs), table)


DRAFTS = [
    # (table rows, capacity, rank_probs, max_depth, tokens, parents)
    ({7: [3, 4], 3: [9, 5], 4: [1, 2], 9: [8, 6]}, 6, (0.5, 0.3), 10,
     (7, 3, 4, 9, 5, 1), (-1, 0, 0, 1, 1, 2)),
    ({7: [3, 4], 3: [9, -1]}, 6, (0.5, 0.3), 10,  # (0, 1) and (1, 0) unknown: dropped
     (7, 3, 4, 9), (-1, 0, 0, 1)),
    ({7: [3, 4], 4: [1, 2]}, 6, (0.5, 0.3), 10,  # 3's row unknown: its subtree is dropped
     (7, 3, 4, 1), (-1, 0, 0, 2)),
    ({7: [3, 4], 3: [9, 5], 9: [8, 6]}, 8, (0.9, 0.05), 2,  # the chain cut at max_depth
     (7, 3, 9), (-1, 0, 1)),
    ({7: [3, 4]}, 6, (0.5, 0.3), 0, (7,), (-1,)),
    ({}, 6, (0.5, 0.3), 10, (7,), (-1,)),  # nothing known: the root alone
    ({7: [3, 4]}, 1, (0.5, 0.3), 10, (7,), (-1,)),
]


@pytest.mark.parametrize("rows,capacity,rank_probs,max_depth,tokens,parents", DRAFTS)
def test_draft_from_a_hand_made_table(rows, capacity, rank_probs, max_depth, tokens, parents):
    tree = drafter_with(rows, capacity, rank_probs).draft(7, NO_TOPK, max_depth)
    assert (tree.tokens, tree.parents) == (tokens, parents)
    assert len(tree) <= capacity and max(tree.depths) <= max_depth


def test_a_fresh_drafter_drafts_the_root_alone_until_it_observes():
    drafter = TokenRecyclingDrafter(RecyclingConfig(8))
    assert drafter.draft(3, NO_TOPK, 4).tokens == (3,)
    drafter.observe(DraftTree((3,), (-1,), (0,)), target_output(torch.tensor([[0.0, 4.0, 1.0, 2.0, 3.0]]), 8))
    assert drafter.table.vocab_size == 5
    assert drafter.draft(3, NO_TOPK, 4).tokens[:2] == (3, 1)


def test_observe_learns_from_rejected_nodes_and_begin_keeps_the_table():
    drafter = TokenRecyclingDrafter(RecyclingConfig(4, k=2), SuccessorTable(6, 2))
    tree = DraftTree((1, 2, 3), (-1, 0, 0), (0, 1, 1))  # say node 2 (token 3) was rejected
    drafter.observe(tree, target_output(torch.eye(6)[[4, 5, 0]] * 3, 2))
    drafter.extend([1, 2], tree, [0, 1])
    drafter.begin([0, 1, 2], 0)
    assert drafter.table.successors_of(3)[0] == 0 and drafter.table.successors_of(1)[0] == 4


def test_a_shared_table_must_keep_enough_successors():
    with pytest.raises(ValueError, match="fewer"):
        TokenRecyclingDrafter(RecyclingConfig(k=8), SuccessorTable(10, k=4))


# --------------------------------------------------------------------------- losslessness

VOCAB = 9
MODEL = MarkovLM(VOCAB, seed=5)
SHARED = {cap: TokenRecyclingDrafter(RecyclingConfig(cap)) for cap in (2, 8, 64)}  # hot across examples


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
       max_new=st.integers(1, 40), eos=st.lists(st.integers(0, VOCAB - 1), max_size=1),
       capacity=st.sampled_from(sorted(SHARED)))
def test_greedy_recycling_equals_vanilla(prompt, max_new, eos, capacity):
    config = GenerationConfig(max_new_tokens=max_new, eos_token_ids=tuple(eos))
    vanilla = Decoder(MODEL, None).generate(prompt, config)
    result = Decoder(MODEL, SHARED[capacity]).generate(prompt, config)
    assert result.output_ids == vanilla.output_ids
    assert sum(result.accept_lengths) == result.new_tokens
    assert max(result.draft_lengths) <= capacity - 1


def test_same_seed_sampling_reproduces_vanilla_token_for_token():
    drafter = TokenRecyclingDrafter(RecyclingConfig(16))
    for seed in range(60):
        config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        vanilla = Decoder(MODEL, None).generate([0, 1, 2, 1], config).output_ids
        assert Decoder(MODEL, drafter).generate([0, 1, 2, 1], config).output_ids == vanilla


def test_mean_accepted_tokens_above_one_on_a_repetitive_target():
    """Greedy decoding of a small Markov chain falls into a cycle the table learns."""
    model = MarkovLM(6, seed=2, scale=3.0)
    drafter = TokenRecyclingDrafter(RecyclingConfig(16))
    config = GenerationConfig(max_new_tokens=120)
    Decoder(model, drafter).generate([0, 1], config)  # warms the table (hot start)
    result = Decoder(model, drafter).generate([3, 4], config)
    assert result.output_ids == Decoder(model, None).generate([3, 4], config).output_ids
    assert result.mean_accepted_tokens > 1.5
