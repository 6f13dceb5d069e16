"""RACER's policies (logitspec/racer.py docstring): copy-logit breadths and breadth-first
growth, the retrieval tree first, merging without charge, the breadth-first layout, and which
logits fill the successor table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from logitspec.acceptance import TargetOutput
from logitspec.automaton import Continuation
from logitspec.racer import (
    RacerConfig, RacerDrafter, TrieBuilder, add_retrieval_tree, child_breadths, grow_copy_logit_tree,
)
from logitspec.recycling import SuccessorTable
from logitspec.tree import DraftTree


def table_of(rows: dict[int, list[int]], k: int = 2, vocab_size: int = 32) -> SuccessorTable:
    table = SuccessorTable(vocab_size, k)
    if rows:
        table.update(list(rows), np.array(list(rows.values())))
    return table


# --------------------------------------------------------------------------- copy-logit tree

BREADTHS = [
    # (breadth, depth, children's breadths)
    (8, 0, [4, 2, 1, 1, 1, 1, 1, 1]),
    (4, 1, [4, 2, 1, 1]),
    (2, 1, [2, 1]),
    (4, 2, [2, 1, 1, 1]),
    (2, 3, [1, 1]),
    (1, 0, [1]),
    (1, 1, [1]),
    (1, 5, [1]),
]


@pytest.mark.parametrize("breadth,depth,expected", BREADTHS)
def test_child_breadths_table(breadth, depth, expected):
    assert child_breadths(breadth, depth) == expected


COPY_LOGIT_TREES = [
    # (rows, breadth, capacity, max_depth, tokens (breadth-first), parents)
    ({7: [3, 4], 3: [5, 6], 4: [8, 9], 5: [1, 2]}, 2, 6, 10,  # the docstring's example
     (7, 3, 4, 5, 8, 1), (-1, 0, 0, 1, 2, 3)),
    ({7: [3, 4], 3: [5, 6], 4: [8, 9], 5: [1, 2]}, 2, 4, 10,  # the budget ends mid-level
     (7, 3, 4, 5), (-1, 0, 0, 1)),
    ({7: [3, 4], 3: [5, 6], 4: [8, 9], 5: [1, 2]}, 2, 9, 1,  # max_depth 1: one level
     (7, 3, 4), (-1, 0, 0)),
    ({7: [3, 4], 4: [8, 9]}, 2, 9, 10,  # 3's row unknown: nothing under 3; 8 and 9 too
     (7, 3, 4, 8), (-1, 0, 0, 2)),
    ({7: [3, -1]}, 2, 9, 10, (7, 3), (-1, 0)),  # an unknown successor ends the row
    ({}, 2, 9, 10, (7,), (-1,)),
    ({7: [3, 4], 3: [5, 6], 4: [8, 9]}, 4, 9, 10,  # breadth past k: ranks end with the row
     (7, 3, 4, 5, 6, 8), (-1, 0, 0, 1, 1, 2)),  # 3 has breadth 2, 4 breadth 1
]


@pytest.mark.parametrize("rows,breadth,capacity,max_depth,tokens,parents", COPY_LOGIT_TREES)
def test_copy_logit_tree_table(rows, breadth, capacity, max_depth, tokens, parents):
    trie = TrieBuilder(7)
    grow_copy_logit_tree(trie, table_of(rows), capacity, max_depth, breadth)
    tree = trie.to_tree()
    assert (tree.tokens, tree.parents) == (tokens, parents)


def test_copy_logit_levels_at_the_published_settings():
    rng = np.random.default_rng(0)
    table = SuccessorTable(4000, 8)
    table.table[:] = np.array([rng.permutation(4000)[:8] for _ in range(4000)], dtype=np.int32)
    trie = TrieBuilder(0)
    grow_copy_logit_tree(trie, table, 64, 100, 8)
    assert len(trie) == 64
    assert [Counter(trie.depths)[d] for d in range(1, 6)] == [8, 12, 17, 18, 8]


def test_trie_builder_adds_until_the_capacity_and_reuses_paths():
    trie = TrieBuilder(7)
    assert [trie.add(0, 3, 3), trie.add(1, 4, 3), trie.add(0, 5, 3), trie.add(0, 3, 3)] == [1, 2, -1, 1]
    assert trie.to_tree() == DraftTree((7, 3, 4), (-1, 0, 1), (0, 1, 2))


def test_nodes_already_in_the_trie_cost_nothing():
    trie = TrieBuilder(7)
    trie.add(0, 3, 5)  # as if retrieval had drafted 7 -> 3
    grow_copy_logit_tree(trie, table_of({7: [3, 4], 3: [5, 6], 4: [8, 9]}), 5, 10, 2)
    assert trie.to_tree().tokens == (7, 3, 4, 5, 8)  # 3 reused: room for 5 and 8


# --------------------------------------------------------------------------- retrieval tree


def item(parent, token, depth, count=1):
    return Continuation(parent, token, depth, count, count, 1)


RETRIEVAL_TREES = [
    # (continuations, capacity, max_depth, tokens, parents)
    ([item(-1, 3, 1), item(0, 4, 2), item(-1, 5, 1)], 9, 10, (7, 3, 5, 4), (-1, 0, 0, 1)),
    ([item(-1, 3, 1), item(0, 4, 2), item(-1, 5, 1)], 3, 10, (7, 3, 4), (-1, 0, 1)),
    ([item(-1, 3, 1), item(0, 4, 2), item(1, 6, 3), item(-1, 5, 1)], 9, 1,  # too deep: skipped
     (7, 3, 5), (-1, 0, 0)),
    # the same path under two borders merges: the second 3 -> 4 costs nothing
    ([item(-1, 3, 1), item(-1, 3, 1), item(0, 4, 2), item(1, 4, 2), item(-1, 5, 1)], 4, 10,
     (7, 3, 5, 4), (-1, 0, 0, 1)),
]


@pytest.mark.parametrize("items,capacity,max_depth,tokens,parents", RETRIEVAL_TREES)
def test_retrieval_tree_table(items, capacity, max_depth, tokens, parents):
    trie = TrieBuilder(7)
    add_retrieval_tree(trie, items, capacity, max_depth)
    tree = trie.to_tree()
    assert (tree.tokens, tree.parents) == (tokens, parents)


# --------------------------------------------------------------------------- the drafter


def drafter_of(context, rows, capacity=8, breadth=2, ngram=3) -> RacerDrafter:
    drafter = RacerDrafter(RacerConfig(capacity, ngram, 100, breadth), table_of(rows, k=breadth))
    drafter.begin(context, 0)
    return drafter


def test_retrieval_first_then_copy_logit_merged_breadth_first():
    # windows of 3: 1 2 5, 2 5 9, ... the context ends with 1; root 2 -> border 1 2 -> 5
    drafter = drafter_of([1, 2, 5, 9, 1], {2: [5, 6], 5: [8, 0], 6: [4, 0], 8: [7, 0]}, capacity=6)
    tree = drafter.draft(2, np.array([2]), 10)
    # retrieval: 2 -> 5 (count 1); copy-logit: 5 (merged, free) and 6 at breadth 1 each, then
    # 8 under 5 and 4 under 6 (rank 0 only), then 7 under 8
    assert tree.tokens == (2, 5, 6, 8, 4, 7)
    assert tree.parents == (-1, 0, 0, 1, 2, 3)
    assert tree.depths == (0, 1, 1, 2, 2, 3)


def test_retrieval_may_use_the_whole_budget():
    drafter = drafter_of([1, 2, 5, 1, 2, 6, 1, 2, 7, 1], {2: [8, 9]}, capacity=3)
    assert drafter.draft(2, np.array([2]), 10).tokens == (2, 5, 6)


def test_no_candidates_no_table_gives_the_root_alone():
    drafter = RacerDrafter(RacerConfig(8, 3, 100, 2))
    drafter.begin([1, 2, 3], 0)
    assert drafter.draft(4, np.array([4]), 10).tokens == (4,)
    assert drafter.draft(2, np.array([2]), 0).tokens == (2,)


def test_observe_copies_every_node_and_the_deepest_wins():
    drafter = drafter_of([1, 2, 3], {}, capacity=8)
    tree = DraftTree((4, 5, 4, 6), (-1, 0, 1, 0), (0, 1, 2, 1))
    topk = np.array([[1, 2, 9], [3, 4, 9], [5, 6, 9], [7, 8, 9]])
    drafter.observe(tree, TargetOutput(torch.zeros(4, 32), topk))
    table = drafter.successors
    assert table.successors_of(4).tolist() == [5, 6]  # node 2 (depth 2), not the root
    assert table.successors_of(5).tolist() == [3, 4] and table.successors_of(6).tolist() == [7, 8]
    unknown = np.array([[-1, -1, -1], [11, 12, 9], [-1, -1, -1], [-1, -1, -1]])  # trace replay
    drafter.observe(tree, TargetOutput(None, unknown))
    assert table.successors_of(4).tolist() == [5, 6] and table.successors_of(5).tolist() == [11, 12]


def test_begin_copies_the_prompt_logits_of_the_new_positions(monkeypatch):
    monkeypatch.setattr("logitspec.recycling.PROMPT_CHUNK", 2)  # several chunks
    heads = []

    def head(hidden):  # (T, 1) -> logits (T, 6) whose best ids are hidden + 1, then hidden + 2
        heads.append(hidden.shape[0])
        return torch.nn.functional.one_hot(hidden[:, 0].long() + 1, 6) * 2.0 + \
            torch.nn.functional.one_hot(hidden[:, 0].long() + 2, 6).float()

    drafter = RacerDrafter(RacerConfig(8, 3, 100, 2), head=head)
    assert drafter.needs_hidden and drafter.top_k == 2
    context = [0, 1, 3, 0, 2]
    drafter.begin(context, 2, torch.tensor([[1.0], [3.0], [0.0]]))  # positions 2, 3, 4 are new
    table = drafter.successors
    assert heads == [2, 1] and table.table.shape == (6, 2)
    assert table.successors_of(3).tolist() == [2, 3]  # position 2 (token 3), hidden 1
    assert table.successors_of(0).tolist() == [4, 5]  # position 3 (token 0), hidden 3
    assert table.successors_of(2).tolist() == [1, 2]  # the last position too
    assert table.successors_of(1).tolist() == [-1, -1]  # reused: not copied again
    assert not RacerDrafter(RacerConfig(8, 3, 100, 2)).needs_hidden


def test_learn_creates_the_table_on_first_use():
    drafter = RacerDrafter(RacerConfig(8, 3, 100, 2))
    drafter.learn([3, 4, 3], np.array([[1, 2, 5], [6, 7, 5], [8, 9, 5]]), 16)
    assert drafter.successors.table.shape == (16, 2)
    assert drafter.successors.successors_of(3).tolist() == [8, 9]


@pytest.mark.parametrize("kwargs", [
    dict(draft_tree_capacity=0), dict(ngram=1), dict(max_nodes=10), dict(max_breadth=0),
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        RacerConfig(**kwargs)


def test_a_shared_table_must_be_wide_enough():
    with pytest.raises(ValueError):
        RacerDrafter(RacerConfig(max_breadth=8), SuccessorTable(10, 4))


def test_drafts_are_accepted_with_the_fake_copying_target():
    """The property tests (tests/test_decoding.py) are meaningful only if drafts get accepted."""
    from test_decoding import REPEATED, CopyLM

    from logitspec.decoding import Decoder, GenerationConfig

    decoder = Decoder(CopyLM(20, seed=1), RacerDrafter(RacerConfig(16, 4, 40, 3)))
    result = decoder.generate(REPEATED, GenerationConfig(max_new_tokens=60))
    assert max(result.accept_lengths) >= 3 and result.mean_accepted_tokens > 1.2


def test_replay_spec_and_a_replayed_turn():
    """scripts/simulate_drafters.py builds RACER from its spec and replays it on a trace."""
    from cli_helpers import load_script

    simulate = load_script("simulate_drafters")
    drafter = simulate.make_drafter("racer:16,ngram=4,nodes=50,breadth=2", None, vocab_size=32)
    assert isinstance(drafter, RacerDrafter) and drafter.successors.table.shape == (32, 2)
    assert drafter.config == RacerConfig(16, 4, 50, 2)
    assert simulate.make_drafter("racer", None).config == RacerConfig()
    output = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 9]
    topk = torch.tensor([[t] + [0] * (simulate.TOP_K - 1) for t in output], dtype=torch.int32)
    trace = simulate.TurnTrace(1, "qa", [1, 2, 5, 6, 7, 8], output, topk, 13)
    lengths = simulate.replay_turn(drafter, trace).accept_lengths
    assert sum(lengths) == len(output) and max(lengths) > 2
