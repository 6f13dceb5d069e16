"""Value-ranked trees: selection, the online statistics, and losslessness through the engine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import MarkovLM
from logitspec.cost import CostCurve
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.drafters import LogitSpecConfig, PoolConfig, ValueTreeDrafter, make_logitspec_drafter
from logitspec.value_tree import AcceptanceStats, CandidateTrie, bucket, select_nodes


def trie_of(chains: list[tuple[list[int], list[float]]], root: int = 0) -> CandidateTrie:
    trie = CandidateTrie(root)
    for tokens, rates in chains:
        trie.add_chain(tokens, [("f", i) for i in range(len(tokens))], rates)
    return trie


def test_docstring_example_picks_three_drafts():
    trie = trie_of([([1], [0.9]), ([2], [0.5]), ([3], [0.2]), ([4], [0.05])])
    costs = {1: 1.0, 2: 1.02, 3: 1.05, 4: 1.1, 5: 1.4}
    assert select_nodes(trie, 64, costs.__getitem__) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "chains,capacity,expected",
    [
        pytest.param([([1, 2, 3], [0.9, 0.9, 0.9])], 3, [0, 1, 2], id="chain-cut-by-budget"),
        pytest.param([([1, 2], [0.9, 0.1]), ([5], [0.5])], 3, [0, 1, 3], id="sibling-beats-deep-node"),
        pytest.param([([1], [0.2]), ([1, 7], [0.8, 0.9])], 8, [0, 1, 2], id="merge-keeps-higher-prob"),
        pytest.param([([1, 2], [0.9, 0.9])], 1, [0], id="budget-1-root-only"),
        pytest.param([], 8, [0], id="no-candidates"),
    ],
)
def test_select_nodes_by_budget(chains, capacity, expected):
    assert select_nodes(trie_of(chains), capacity) == expected


def test_selection_is_prefix_closed_even_when_a_merge_raised_a_child():
    trie = CandidateTrie(0)
    trie.add_chain([1, 2], ["a", "b"], [0.1, 0.9])  # P(1) = 0.1, P(2) = 0.09
    trie.add_chain([3, 4], ["c", "d"], [0.5, 0.5])
    trie.probs[2] = 0.95  # a child more probable than its parent is clipped to the parent
    chosen = select_nodes(trie, 3)
    assert all(trie.parents[n] in chosen for n in chosen if n)


def test_max_depth_is_respected():
    trie = trie_of([([1, 2, 3, 4], [0.99] * 4)])
    assert select_nodes(trie, 64, max_depth=2) == [0, 1, 2]


def test_flat_cost_takes_everything_steep_cost_takes_nothing():
    trie = trie_of([([1, 2, 3], [0.5, 0.5, 0.5])])
    assert select_nodes(trie, 64, lambda n: 1.0) == [0, 1, 2, 3]
    assert select_nodes(trie, 64, lambda n: float(n)) == [0]


def test_to_tree_reindexes_in_creation_order():
    trie = trie_of([([1, 2], [0.9, 0.9]), ([3], [0.95])])
    tree, features = trie.to_tree([0, 1, 3])
    assert tree.tokens == (0, 1, 3) and tree.parents == (-1, 0, 0) and tree.depths == (0, 1, 1)
    assert features == [None, ("f", 0), ("f", 0)]


def test_acceptance_stats_learn_and_follow_the_prior():
    stats = AcceptanceStats(prior=lambda f: 0.5, strength=2.0, horizon=100)
    assert stats.rate("x") == 0.5
    # tree: root 0 -> 1 -> 2, and 0 -> 3; path [0, 1]: node 1 success, node 2 trial failure,
    # node 3 trial failure (parent accepted, itself not)
    stats.update([None, "x", "y", "x"], [-1, 0, 1, 0], {0, 1})
    assert stats.counts == {"x": (1.0, 2.0), "y": (0.0, 1.0)}
    assert stats.rate("x") == pytest.approx((1 + 1) / (2 + 2))
    for _ in range(200):
        stats.update([None, "z"], [-1, 0], {0, 1})
    assert stats.counts["z"][1] <= 100  # halved past the horizon


def test_bucket_edges():
    assert [bucket(v, (1, 2, 4, 8)) for v in (1, 2, 3, 8, 100)] == [1, 2, 4, 8, 8]


def test_config_validation():
    with pytest.raises(ValueError, match="tree_policy"):
        LogitSpecConfig(tree_policy="greedy")
    with pytest.raises(ValueError, match="automatic"):
        LogitSpecConfig(draft_tree_capacity=None)
    with pytest.raises(ValueError, match="cost curve"):
        ValueTreeDrafter(LogitSpecConfig(draft_tree_capacity=None, tree_policy="value"))


CURVE = CostCurve((1, 8, 64), (1.0, 1.1, 2.0))


@settings(deadline=None, max_examples=40)
@given(
    prompt=st.lists(st.integers(0, 7), min_size=1, max_size=30),
    capacity=st.one_of(st.none(), st.integers(1, 40)),
    max_new=st.integers(1, 40),
    seed=st.integers(0, 3),
)
def test_value_trees_are_lossless(prompt, capacity, max_new, seed):
    model = MarkovLM(8, seed=seed, scale=4.0)
    config = GenerationConfig(max_new_tokens=max_new, eos_token_ids=(7,))
    vanilla = Decoder(model).generate(prompt, config)
    drafter = make_logitspec_drafter(
        LogitSpecConfig(pool=PoolConfig(2, 6, 2), draft_tree_capacity=capacity,
                        tree_policy="value", max_auto_capacity=16), CURVE)
    result = Decoder(model, drafter).generate(prompt, config)
    assert result.output_ids == vanilla.output_ids
    assert all(1 <= n <= drafter.tree_capacity for n in result.accept_lengths)
    assert sum(result.accept_lengths) == result.new_tokens


def test_online_statistics_raise_acceptance_on_repetitive_text():
    model = MarkovLM(6, seed=1, scale=6.0)  # nearly deterministic: text loops, drafts pay
    drafter = ValueTreeDrafter(LogitSpecConfig(pool=PoolConfig(2, 8), draft_tree_capacity=16,
                                               tree_policy="value"))
    result = Decoder(model, drafter).generate([0, 1, 2], GenerationConfig(max_new_tokens=200))
    assert result.mean_accepted_tokens > 3.0
    assert any(trials > 0 for _, trials in drafter.stats.counts.values())
