"""Value-ranked trees: selection, the online statistics, and losslessness through the engine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import MarkovLM
from logitspec.acceptance import TargetOutput
from logitspec.cost import CostCurve
from logitspec.recycling import SuccessorTable
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.drafters import (
    LogitSpecConfig, PoolConfig, ValueTreeDrafter, make_logitspec_drafter, suffix_candidates,
    value_prior,
)
from logitspec.suffix_tree import SuffixDraft
from logitspec.tree import DraftTree
from logitspec.value_tree import AcceptanceStats, BestFirstTree, bucket, entry_value


RATES: dict = {}


def grown(chains: list[tuple[list[int], list[float]]], capacity: int = 64, cost=None,
          max_depth=None, root: int = 0):
    """The tree grown from eager chains whose node ``i`` has rate ``rates[i]`` (each rate
    is its own feature)."""
    tree = BestFirstTree(root, RATES.__getitem__, max_depth)
    for c, (tokens, rates) in enumerate(chains):
        features = [(c, i) for i in range(len(tokens))]
        RATES.update(zip(features, rates))
        tree.offer(iter(list(zip(tokens, features))))
    return tree.grow(capacity, cost)


def test_docstring_example_picks_three_drafts():
    costs = {1: 1.0, 2: 1.02, 3: 1.05, 4: 1.1, 5: 1.4}
    tree, _ = grown([([1], [0.9]), ([2], [0.5]), ([3], [0.2]), ([4], [0.05])], 5, costs.__getitem__)
    assert tree.tokens == (0, 1, 2, 3)


def test_class_docstring_example_merges_and_keeps_each_chains_own_probability():
    tree, features = grown([([1, 2], [0.9, 0.5]), ([1, 3], [0.6, 0.8])])
    assert tree.tokens == (0, 1, 3, 2) and tree.parents == (-1, 0, 1, 1)
    assert features == [None, (0, 0), (1, 1), (0, 1)]  # node 1 valued by the first chain


@pytest.mark.parametrize(
    "chains,capacity,expected",
    [
        pytest.param([([1, 2, 3], [0.9, 0.9, 0.9])], 3, (0, 1, 2), id="chain-cut-by-budget"),
        pytest.param([([1, 2], [0.9, 0.1]), ([5], [0.5])], 3, (0, 1, 5), id="sibling-beats-deep-node"),
        pytest.param([([1], [0.2]), ([1, 7], [0.8, 0.9])], 8, (0, 1, 7), id="merge-shares-the-node"),
        pytest.param([([1, 2], [0.9, 0.9])], 1, (0,), id="budget-1-root-only"),
        pytest.param([], 8, (0,), id="no-candidates"),
    ],
)
def test_grow_by_budget(chains, capacity, expected):
    assert grown(chains, capacity)[0].tokens == expected


def test_max_depth_is_respected():
    tree, _ = grown([([1, 2, 3, 4], [0.99] * 4)], max_depth=2)
    assert tree.tokens == (0, 1, 2)


def test_flat_cost_takes_everything_steep_cost_takes_nothing():
    chains = [([1, 2, 3], [0.5, 0.5, 0.5])]
    assert grown(chains, cost=lambda n: 1.0)[0].tokens == (0, 1, 2, 3)
    assert grown(chains, cost=lambda n: float(n))[0].tokens == (0,)


def logged_chain(asked: list, name: str, rates: list[float]):
    """A lazy chain whose node ``i`` (token 10 x the nodes asked for so far, feature
    ``(name, i)``, rate ``rates[i]``) is logged in ``asked`` when it is asked for."""
    for i, rate in enumerate(rates):
        asked.append((name, i))
        RATES[(name, i)] = rate
        yield 10 * len(asked), (name, i)


def test_a_chain_is_asked_for_its_next_node_only_once_its_last_one_is_in():
    asked: list = []
    tree = BestFirstTree(0, RATES.__getitem__)
    tree.offer(logged_chain(asked, "a", [0.9, 0.9, 0.9]))
    tree.offer(logged_chain(asked, "b", [0.1, 0.9]))
    grown_tree, _ = tree.grow(3)
    assert len(grown_tree) == 3 and asked == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def reference_tree(chains, capacity, max_depth):
    """Best-first growth the plain way: every chain's next node goes through the heap (ties
    pop in push order)."""
    import heapq

    tokens, parents, depths, index, heap, pushed = [0], [-1], [0], {}, [], 0
    for c, (chain, rates) in enumerate(chains):
        heapq.heappush(heap, (-rates[0], pushed, 0, c, 0))
        pushed += 1
    while heap and len(tokens) < capacity:
        neg, _, parent, c, i = heapq.heappop(heap)
        chain, rates = chains[c]
        node = index.get((parent, chain[i]))
        if node is None:
            node = index[(parent, chain[i])] = len(tokens)
            tokens.append(chain[i])
            parents.append(parent)
            depths.append(depths[parent] + 1)
        if i + 1 < len(chain) and (max_depth is None or depths[node] < max_depth):
            heapq.heappush(heap, (neg * rates[i + 1], pushed, node, c, i + 1))
            pushed += 1
    return tuple(tokens), tuple(parents)


@settings(deadline=None, max_examples=300)
@given(
    chains=st.lists(st.tuples(st.lists(st.integers(1, 3), min_size=1, max_size=6),
                              st.lists(st.sampled_from([1.0, 0.5, 0.25]), min_size=6, max_size=6)),
                    max_size=8),
    capacity=st.integers(1, 30),
    max_depth=st.one_of(st.none(), st.integers(1, 4)),
)
def test_grow_pops_exactly_as_a_plain_heap_would(chains, capacity, max_depth):
    """Ties everywhere (rates 1, 1/2, 1/4) and merged prefixes (three tokens): taking a chain's
    next node directly when it beats the heap changes nothing."""
    chains = [(tokens, rates[: len(tokens)]) for tokens, rates in chains]
    tree, _ = grown(chains, capacity, max_depth=max_depth)
    assert (tree.tokens, tree.parents) == reference_tree(chains, capacity, max_depth)


def pop_order_ratio_argmax(chains, capacity, cost):
    """Brute force: grow without a cost, then the prefix of the pop order with the best ratio
    (the first on ties)."""
    full, _ = grown(chains, capacity)
    order = []
    tree = BestFirstTree(0, RATES.__getitem__)
    for c, (tokens, rates) in enumerate(chains):
        tree.offer(iter([(t, (c, i)) for i, t in enumerate(tokens)]))
    tree.grow(capacity)
    gains = [1.0]
    for prob in tree.probs[1:]:
        gains.append(gains[-1] + prob)
    ratios = [g / cost(n + 1) for n, g in enumerate(gains)]
    best = max(range(len(ratios)), key=lambda n: (ratios[n], -n))
    return full.tokens[: best + 1]


# up to 8 chains of up to 5 tokens (4 distinct: merged prefixes), rates in [0.01, 1]
RATED_CHAINS = st.lists(st.tuples(st.lists(st.integers(1, 4), min_size=1, max_size=5),
                                  st.lists(st.floats(0.01, 1.0), min_size=5, max_size=5)),
                        max_size=8)


@settings(deadline=None, max_examples=200)
@given(
    chains=RATED_CHAINS,
    capacity=st.integers(1, 30),
    steps=st.lists(st.floats(0.0, 0.5), min_size=30, max_size=30),
)
def test_early_stop_with_a_cost_equals_the_best_prefix(chains, capacity, steps):
    chains = [(tokens, rates[: len(tokens)]) for tokens, rates in chains]
    curve = [1.0]
    for step in steps:
        curve.append(curve[-1] + step)  # non-decreasing

    def cost(n):
        return curve[n - 1]

    assert grown(chains, capacity, cost)[0].tokens == pop_order_ratio_argmax(chains, capacity, cost)


def test_entry_value_by_hand():
    assert entry_value([0.0, 1.0, 1.3, 1.8]) == pytest.approx(0.3)  # the docstring's example
    assert entry_value([0.0, 1.0, 1.3, 1.8], overhead=1.0) == pytest.approx(0.15)
    assert entry_value([0.0, 1.0, 1.0, 2.0]) == 0.0  # a free second token: anything may enter
    assert entry_value([0.0, 1.0]) == 0.0  # no tree larger than the root


@settings(deadline=None, max_examples=300)
@given(
    chains=RATED_CHAINS,
    capacity=st.integers(2, 30),
    steps=st.lists(st.floats(0.0, 0.8), min_size=30, max_size=30),
    overhead=st.floats(0.0, 2.0),
    as_heads=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_no_kept_node_is_below_the_entry_value(chains, capacity, steps, overhead, as_heads):
    """Every node of a tree grown under a cost is at least entry_value (the bound's size:
    test_entry_value_by_hand), so candidates below it may be dropped when offered (chains, and
    heads whose tails are made on demand): the tree grown with that floor is the same."""
    chains = [(tokens, rates[: len(tokens)]) for tokens, rates in chains]
    curve = [0.0, 1.0]
    for step in steps[: capacity - 1]:
        curve.append(curve[-1] + step)
    floor = entry_value(curve, overhead)

    def grow(floor):
        tree = BestFirstTree(0, RATES.__getitem__, floor=floor)
        heads = []
        for c, (tokens, rates) in enumerate(chains):
            RATES.update(((c, i), r) for i, r in enumerate(rates))
            chain = [(t, (c, i)) for i, t in enumerate(tokens)]
            if as_heads[c]:
                heads.append((chain[0][0], chain[0][1], lambda rest=chain[1:]: iter(rest)))
            else:
                tree.offer(iter(chain))
        tree.offer_heads(heads)
        return tree, tree.grow(capacity, curve, overhead)

    tree, (kept, features) = grow(0.0)
    assert all(p >= floor - 1e-12 for p in tree.probs[1: len(kept)])
    assert grow(floor)[1] == (kept, features)


def test_the_floor_drops_candidates_and_asks_no_chain_past_it():
    asked: list = []
    tree = BestFirstTree(0, RATES.__getitem__, floor=0.5)
    tree.offer(logged_chain(asked, "a", [0.9, 0.5, 0.9]))  # 0.9, then 0.45: no further asking
    tree.offer(logged_chain(asked, "b", [0.4, 0.9]))  # below the floor at once
    RATES["h"] = 0.3
    tree.offer_heads([(7, "h", None)])
    kept, _ = tree.grow(8)
    assert kept.tokens == (0, 10)
    assert asked == [("a", 0), ("b", 0), ("a", 1)]


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
    with pytest.raises(ValueError, match="match-length"):
        LogitSpecConfig(match_lengths=True)  # the reference policy has no features
    with pytest.raises(ValueError, match="suffix-tree"):
        LogitSpecConfig(suffix_trees=True)
    with pytest.raises(ValueError, match="suffix_tokens"):
        LogitSpecConfig(tree_policy="value", suffix_trees=True, suffix_tokens=0)
    with pytest.raises(ValueError, match="agreement"):
        LogitSpecConfig(agreement=True)


CURVE = CostCurve((1, 8, 64), (1.0, 1.1, 2.0))


@settings(deadline=None, max_examples=40)
@given(
    prompt=st.lists(st.integers(0, 7), min_size=1, max_size=30),
    capacity=st.one_of(st.none(), st.integers(1, 40)),
    max_new=st.integers(1, 40),
    seed=st.integers(0, 3),
    match=st.booleans(),
    suffix=st.sampled_from(["off", "best", "branches", "grow"]),
    live=st.booleans(),
    recycle=st.sampled_from(["off", "verified", "prompt", "breadth", "successors"]),
    agree=st.booleans(),
)
def test_value_trees_are_lossless(prompt, capacity, max_new, seed, match, suffix, live, recycle,
                                  agree):
    """Every source (next and next-next chains in runs of rank buckets with made-on-demand
    tails, the successor table's chains, learned from verified tokens only or from the prompt's
    logits too, or its trees of two successors per node, or successors below every other
    node, suffix-tree drafts, valued by their draft's match or by the match each node extends;
    first tokens valued by how many sources agree on them) at fixed and automatic budgets."""
    model = MarkovLM(8, seed=seed, scale=4.0)
    config = GenerationConfig(max_new_tokens=max_new, eos_token_ids=(7,))
    vanilla = Decoder(model).generate(prompt, config)
    drafter = make_logitspec_drafter(
        LogitSpecConfig(pool=PoolConfig(2, 6, 2), draft_tree_capacity=capacity,
                        tree_policy="value", max_auto_capacity=16, match_lengths=match,
                        suffix_trees=suffix != "off", suffix_branches=suffix in ("branches", "grow"),
                        suffix_grow=suffix == "grow", suffix_tokens=5,
                        recycle_chains=3 if recycle != "off" else 0, recycle_depth=3,
                        recycle_breadth=2 if recycle == "breadth" else 1,
                        successor_children=2 if recycle == "successors" else 0,
                        live_costs=live and capacity is None, agreement=agree), CURVE,
        SuccessorTable(8, 3) if recycle != "off" else None,
        model.lm_head if recycle == "prompt" else None)
    assert drafter.needs_hidden == (recycle == "prompt")
    result = Decoder(model, drafter).generate(prompt, config)
    assert result.output_ids == vanilla.output_ids
    assert all(1 <= n <= drafter.tree_capacity for n in result.accept_lengths)
    assert sum(result.accept_lengths) == result.new_tokens
    # the same drafter answers a second request: its suffix trees carry the first answer
    again = Decoder(model, drafter).generate(prompt, config)
    assert again.output_ids == vanilla.output_ids


def test_live_costs_learn_from_the_decoder_and_stop_drafting_what_really_costs_too_much():
    """On a flat cost curve the repeat ``1 2 3 4`` is drafted; once 2-token passes are seen
    to cost ten times a 1-token pass, no draft can pay and the tree is the root alone. The
    decoder hands every step's verification time to the drafter."""
    config = LogitSpecConfig(pool=PoolConfig(2, 6), draft_tree_capacity=None, tree_policy="value",
                             max_auto_capacity=8, live_costs=True)
    with pytest.raises(ValueError, match="live_costs"):
        LogitSpecConfig(tree_policy="value", live_costs=True)  # a fixed budget has no cost
    flat = CostCurve((1, 8), (1.0, 1.0))
    drafter = ValueTreeDrafter(config, flat)
    drafter.begin([1, 2, 3, 4, 1, 2, 3], 0)
    tree = drafter.draft(4, np.array([4, 0]), 8)
    assert tree.num_inputs > 2 and 1 in tree.tokens
    rows = np.full((8, 2), -1)
    root_only = DraftTree((4,), (-1,), (0,))
    for _ in range(8):
        drafter.observe(root_only, TargetOutput(None, rows[:1], seconds=1.0))
        drafter.observe(tree, TargetOutput(None, rows[:tree.num_inputs], seconds=10.0))
    assert drafter.live.factors == (1.0, 10.0)
    assert drafter.draft(4, np.array([4, 0]), 8).tokens == (4,)
    # through the decoder: every step's time reaches the drafter (a fake model's microseconds
    # against a curve of seconds: the smallest factor)
    model = MarkovLM(8, seed=0, scale=4.0)
    drafter = make_logitspec_drafter(config, flat)
    result = Decoder(model, drafter).generate([1, 2, 3, 1, 2, 3], GenerationConfig(max_new_tokens=96))
    assert result.decoding_steps >= 16 and drafter.live.factors == (1 / 64, 1 / 64)


def test_suffix_candidates_by_hand():
    """The matched string (5 tokens) occurred 4 times before the context's own occurrence: 3
    times followed by 7 (then twice by 8), once by 9."""
    draft = SuffixDraft(tokens=(7, 9, 8), parents=(-1, -1, 0), counts=(3, 1, 2), denominator=5,
                        match_len=5)
    top = suffix_candidates(draft, "local")
    assert [(c.token, c.feature) for c in top] == [
        (7, ("suf", "local", 6, 0.75)), (9, ("suf", "local", 6, 0.25))]
    assert [(c.token, c.feature) for c in top[0].children] == [(8, ("suf", "local", 6, 0.75))]
    assert top[1].children == [] and suffix_candidates(SuffixDraft(), "answers") == []
    # every rate 0.5, floor 0.3: the first tokens (0.5) stay, 8 below 7 (0.25) is left out
    halves = suffix_candidates(draft, "local", lambda feature: 0.5, 0.3)
    assert [c.token for c in halves] == [7, 9] and halves[0].children == []
    # the draft also stands for matches of 2 and 3 tokens (buckets 2, 3): each node takes the
    # bucket whose rate is highest for its share, the longest on ties
    rates = {(2, 0.75): 0.9, (3, 0.25): 0.8, (6, 0.25): 0.8}
    rate = lambda f: rates.get((f[2], f[3]), 0.1)  # noqa: E731
    both = suffix_candidates(replace(draft, also=(2, 3)), "branch", rate)
    assert [(c.token, c.feature) for c in both] == [
        (7, ("suf", "branch", 2, 0.75)), (9, ("suf", "branch", 6, 0.25))]
    assert both[0].children[0].feature == ("suf", "branch", 2, 0.75)
    assert suffix_candidates(replace(draft, also=(2, 3)), "branch")[1].feature[2] == 6  # no rate


def test_suffix_candidates_grow_their_match_with_depth():
    """With ``grow`` a node's match is the matched length plus its depth less one: 7 and 9
    follow the 5-token match (bucket 6), 8 follows 7 and so a 6-token one, 4 below it a 7-token
    one (bucket 8); without ``grow`` every node keeps the draft's match."""
    draft = SuffixDraft(tokens=(7, 9, 8, 4), parents=(-1, -1, 0, 2), counts=(3, 1, 2, 2),
                        denominator=5, match_len=5)

    def features(candidates):
        return [(c.token, c.feature[2]) for c in candidates] + [
            pair for c in candidates for pair in features(c.children)]

    assert features(suffix_candidates(draft, "local", grow=True)) == [
        (7, 6), (9, 6), (8, 6), (4, 8)]
    assert {m for _, m in features(suffix_candidates(draft, "local"))} == {6}
    long = replace(draft, match_len=31)  # past the last edge: the last bucket
    assert features(suffix_candidates(long, "local", grow=True)) == [
        (7, 32), (9, 32), (8, 32), (4, 32)]
    # a draft standing for a 2-token match too: a node takes the best of 2 + depth - 1 and
    # m + depth - 1, as without grow it takes the best of their buckets
    rate = lambda f: {3: 0.9, 4: 0.2}.get(f[2], 0.5)  # noqa: E731
    both = suffix_candidates(replace(draft, also=(2,)), "branch", rate, grow=True)
    assert features(both) == [(7, 6), (9, 6), (8, 3), (4, 8)]
    # 5 and 6 share bucket 6, but one level down 6 + 1 falls in bucket 8 where 5 + 1 does not
    rate = lambda f: {8: 0.9}.get(f[2], 0.5)  # noqa: E731
    same = suffix_candidates(replace(draft, also=(6,)), "branch", rate, grow=True)
    assert features(same) == [(7, 6), (9, 6), (8, 8), (4, 8)]


@settings(deadline=None, max_examples=200)
@given(
    parents=st.lists(st.integers(-1, 30), min_size=1, max_size=30),
    counts=st.lists(st.integers(1, 8), min_size=30, max_size=30),
    rates=st.lists(st.floats(0.05, 1.0), min_size=5, max_size=5),
    floor=st.floats(0.0, 0.9),
    capacity=st.integers(2, 32),
)
def test_suffix_candidates_below_the_floor_are_left_out_with_the_same_tree(
        parents, counts, rates, floor, capacity):
    parents = [p if p < i else -1 for i, p in enumerate(parents)]  # parents come first
    draft = SuffixDraft(tokens=tuple(range(1, len(parents) + 1)), parents=tuple(parents),
                        counts=tuple(counts[: len(parents)]), denominator=9, match_len=4)
    rate = dict(zip((0.25, 0.5, 0.75, 0.99, 1.0), rates))
    rate_of = lambda feature: rate[feature[3]]  # noqa: E731

    def grown(candidates):
        tree = BestFirstTree(0, rate_of, floor=floor)
        tree.offer_nodes(candidates)
        return tree.grow(capacity)

    def count(nodes):
        return sum(1 + count(node.children) for node in nodes)

    pruned = suffix_candidates(draft, "local", rate_of, floor)
    assert grown(pruned) == grown(suffix_candidates(draft, "local"))
    assert count(pruned) <= len(parents)
    if floor == 0.0:
        assert count(pruned) == len(parents)


def test_a_verbatim_repeat_is_drafted_long_from_the_suffix_tree():
    """Context ``10..49, 10..29`` and root 30: the question's suffix tree matches ``10..30``
    (21 tokens, bucket 24) and continues ``31, 32, ...`` every time it occurred, so its prior
    (24 / 25 per node) pays for a long copy on a steep cost curve, where the n-gram chain alone
    drafts a token or two (the test above). A second answer that starts like the first is drafted
    from the tree of earlier answers."""
    config = LogitSpecConfig(pool=PoolConfig(3, 20), draft_tree_capacity=None, tree_policy="value",
                             max_auto_capacity=16, suffix_trees=True)
    drafter = ValueTreeDrafter(config, STEEP)
    drafter.begin(list(range(10, 50)) + list(range(10, 30)), 0)
    tree = drafter.draft(30, np.array([30]), 64)
    assert len(tree.tokens) >= 6 and tree.tokens[1:] == tuple(range(31, 30 + len(tree.tokens)))
    assert drafter._features[1] == ("suf", "local", 24, 1.0)
    # a new request over another prompt: the first answer (30, 31, ...) is in the global tree
    drafter.extend(list(range(30, 36)), tree, list(range(6)))
    drafter.begin([3, 4, 5, 6], 0)
    for token in (30, 31):
        step = drafter.draft(token, np.array([token]), 64)
        drafter.extend([token], step, [0])
    assert drafter.draft(32, np.array([32]), 64).tokens[:2] == (32, 33)
    assert drafter._features[1] == ("suf", "answers", 3, 1.0)


@pytest.mark.parametrize("branches", [False, True])
def test_suffix_branches_offer_the_other_match_lengths(branches):
    """Context ``1 2 3 9 5 2 3 7 6 2 3 7 8 1 2`` and root 3: the pool's 3-gram ``1 2 3`` and the
    question's best suffix-tree draft (the same match) both go on with 9; the shorter match
    ``2 3`` went on with 7 twice. Only the branches put 7 under the root, with its own feature
    (match bucket 2, share 2/3: bucket 0.75)."""
    config = LogitSpecConfig(pool=PoolConfig(3, 20), draft_tree_capacity=64, tree_policy="value",
                             suffix_trees=True, suffix_branches=branches)
    drafter = ValueTreeDrafter(config)
    drafter.begin([1, 2, 3, 9, 5, 2, 3, 7, 6, 2, 3, 7, 8, 1, 2], 0)
    tree = drafter.draft(3, np.array([3]), 64)
    firsts = {tree.tokens[i]: drafter._features[i] for i, p in enumerate(tree.parents) if p == 0}
    assert 9 in firsts
    if branches:
        assert firsts[7] == ("suf", "branch", 2, 0.75)
    else:
        assert 7 not in firsts
    with pytest.raises(ValueError, match="suffix_branches"):
        LogitSpecConfig(tree_policy="value", suffix_branches=True)


# shaped like a 2-core CPU's bfloat16 verification: each drafted token costs over half a step
STEEP = CostCurve((1, 2, 4, 8, 16), (1.0, 1.24, 2.3, 4.1, 7.6))


@pytest.mark.parametrize("match", [False, True])
def test_a_long_match_is_copied_at_length_on_a_steep_curve(match):
    """Context ``10..49, 10..29`` and root 30: the next-token chain's occurrence (``30`` at
    index 20) matches the context over 21 tokens. Valued by that match (prior 24 / 25 per
    node, before any step was observed) the copy pays for a long chain on a steep cost curve;
    valued by the 3-gram that found it (prior 0.5, then 0.7) only a token or two do. A short
    match (``5, 28, 29`` against ``27, 28, 29``) is drafted short either way."""
    config = LogitSpecConfig(pool=PoolConfig(3, 20), draft_tree_capacity=None, tree_policy="value",
                             max_auto_capacity=16, match_lengths=match)
    long_copy = ValueTreeDrafter(config, STEEP)
    long_copy.begin(list(range(10, 50)) + list(range(10, 30)), 0)
    tree = long_copy.draft(30, np.array([30]), 64)
    assert tree.tokens[1:] == tuple(range(31, 31 + len(tree.tokens) - 1))  # the copy itself
    short_copy = ValueTreeDrafter(config, STEEP)
    short_copy.begin(list(range(10, 50)) + [5, 28, 29], 0)
    short = short_copy.draft(30, np.array([30]), 64)
    if match:
        assert len(tree.tokens) >= 6 and len(short.tokens) <= 3
        assert long_copy._features[1] == ("match", 24, 1)  # 21 tokens -> bucket 24
    else:
        assert len(tree.tokens) <= 2 and len(short.tokens) <= 2


def test_online_statistics_raise_acceptance_on_repetitive_text():
    model = MarkovLM(6, seed=1, scale=6.0)  # nearly deterministic: text loops, drafts pay
    drafter = ValueTreeDrafter(LogitSpecConfig(pool=PoolConfig(2, 8), draft_tree_capacity=16,
                                               tree_policy="value"))
    result = Decoder(model, drafter).generate([0, 1, 2], GenerationConfig(max_new_tokens=200))
    assert result.mean_accepted_tokens > 3.0
    assert any(trials > 0 for _, trials in drafter.stats.counts.values())


@settings(deadline=None, max_examples=100)
@given(
    chains=st.lists(st.tuples(st.lists(st.integers(1, 4), min_size=1, max_size=4),
                              st.lists(st.sampled_from([0.9, 0.5, 0.3, 0.1]), min_size=4, max_size=4)),
                    max_size=8),
    capacity=st.integers(1, 20),
)
def test_offer_heads_equals_offering_each_chain(chains, capacity):
    """Heads with lazy tails grow the same tree as whole chains offered one by one; a tail is
    made only for heads that were popped."""
    features = {}
    for c, (tokens, rates) in enumerate(chains):
        for i in range(len(tokens)):
            features[(c, i)] = rates[i]
    made = []

    def tail(c):
        made.append(c)
        return iter([(t, (c, i)) for i, t in enumerate(chains[c][0]) if i > 0])

    one_by_one = BestFirstTree(0, features.__getitem__)
    for c, (tokens, _) in enumerate(chains):
        one_by_one.offer(iter([(t, (c, i)) for i, t in enumerate(tokens)]))
    heads = BestFirstTree(0, features.__getitem__)
    heads.offer_heads((tokens[0], (c, 0), lambda c=c: tail(c)) for c, (tokens, _) in enumerate(chains))
    expected, grown_heads = one_by_one.grow(capacity), heads.grow(capacity)
    assert grown_heads[0] == expected[0] and grown_heads[1] == expected[1]
    assert len(made) <= len(heads.tokens) + len(chains)  # no more tails than popped heads
    # with a bound on the tails' first rates, a tail waits as a placeholder until a node of
    # its value would be popped: the same tree (equal values keep their order), fewer tails
    without_bound = len(made)
    made.clear()
    bound = max([rates[1] for tokens, rates in chains if len(tokens) > 1], default=0.0)
    bounded = BestFirstTree(0, features.__getitem__)
    bounded.offer_heads(((tokens[0], (c, 0), lambda c=c: tail(c))
                         for c, (tokens, _) in enumerate(chains)), tail_bound=bound)
    grown_bounded = bounded.grow(capacity)
    assert grown_bounded[0] == expected[0] and grown_bounded[1] == expected[1]
    assert len(made) <= without_bound


@settings(deadline=None, max_examples=150)
@given(
    runs=st.lists(st.tuples(st.sampled_from([0.9, 0.5, 0.3, 0.1]),
                            st.lists(st.integers(1, 30), min_size=0, max_size=5, unique=True)),
                  max_size=6),
    chain=st.lists(st.integers(1, 250), max_size=4),
    capacity=st.integers(1, 16),
    floor=st.sampled_from([0.0, 0.2]),
    bound=st.sampled_from([None, 0.8]),
)
def test_offer_runs_equals_offering_every_head(runs, chain, capacity, floor, bound):
    """Runs of heads that share a feature grow the same tree as their heads offered one by
    one (ties with a chain's nodes included); a head's tail is asked for only when it is
    popped, so each run's in order."""
    runs = [(rate, [t + 40 * r for t in tokens]) for r, (rate, tokens) in enumerate(runs)]
    rates = {("run", r): rate for r, (rate, _) in enumerate(runs)}
    rates.update({"c": 0.5, "t": 0.8})
    asked = []

    def tail_of(token):
        asked.append(token)
        return token if token % 2 else None

    def make(token):
        return iter([(token + 100, "t"), (token + 200, "t")])

    def grown(offer):
        tree = BestFirstTree(0, rates.__getitem__, floor=floor)
        tree.offer(iter([(t, "c") for t in chain]))
        offer(tree)
        return tree.grow(capacity)

    def one_by_one(tree):
        heads = [(t, ("run", r), (lambda t=t: make(t)) if t % 2 else None)
                 for r, (_, tokens) in enumerate(runs) for t in tokens]
        tree.offer_heads(heads, tail_bound=bound)

    expected = grown(one_by_one)
    asked.clear()
    got = grown(lambda tree: tree.offer_runs(
        [(("run", r), tokens) for r, (_, tokens) in enumerate(runs)], tail_of,
        tail_bound=bound, make_tail=make))
    assert got[0] == expected[0] and got[1] == expected[1]
    # each run's heads are asked for from its first on, in order, once each
    for _, tokens in runs:
        mine = [t for t in asked if t in tokens]
        assert mine == tokens[:len(mine)]


@settings(deadline=None, max_examples=150)
@given(
    chains=st.lists(st.lists(st.tuples(st.integers(1, 6), st.sampled_from(["a", "b", "c"])),
                             min_size=1, max_size=4), max_size=5),
    kids=st.dictionaries(st.integers(1, 12), st.lists(
        st.tuples(st.integers(1, 12), st.sampled_from(["s1", "s2", "s3"])), max_size=3)),
    capacity=st.integers(1, 20),
    floor=st.sampled_from([0.0, 0.1, 0.3]),
    costly=st.booleans(),
    slack=st.sampled_from([0.0, 0.05]),
)
def test_lazy_expansion_grows_the_eager_tree(chains, kids, capacity, floor, costly, slack):
    """``expand`` with a bound (and a width) grows the tree that asking every added node for
    its children at once grows, with or without a cost table and a floor, ties included
    (equal rates, repeated tokens); it asks only nodes whose placeholder was popped."""
    rates = {"a": 0.9, "b": 0.6, "c": 0.6, "s1": 0.6, "s2": 0.5, "s3": 0.2}
    cost = [0.0] + [1.0 + 0.08 * n * n for n in range(1, capacity + 1)] if costly else None
    asked = []

    def expand(token, feature):
        asked.append(token)
        return kids.get(token)

    def grow(bound, width):
        tree = BestFirstTree(0, rates.__getitem__, floor=floor, expand=expand,
                             expand_bound=bound, expand_width=width)
        for chain in chains:
            tree.offer(iter(chain))
        return tree.grow(capacity, cost)

    eager = grow(None, 0)
    eager_asked, asked[:] = list(asked), []
    lazy = grow(lambda feature: 0.6 + slack, 3)
    assert lazy[0] == eager[0] and lazy[1] == eager[1]
    assert len(asked) <= len(eager_asked)
    with pytest.raises(ValueError, match="expand_width"):
        BestFirstTree(0, rates.__getitem__, expand=expand, expand_bound=lambda f: 0.6)


def test_a_lazy_expansion_past_the_tree_is_never_asked():
    """Chain 1 (.9), 2 (.9 x .9): node 1's children could be worth at most .9 x .5 = .45,
    below node 2's .81, so with room for two drafts node 1 is never asked for them; with room
    for three it is, and its child (.9 x .5) comes third."""
    asked = []

    def expand(token, feature):
        asked.append(token)
        return [(10 * token, "s")]

    def grow(capacity):
        tree = BestFirstTree(0, {"a": 0.9, "s": 0.5}.__getitem__, expand=expand,
                             expand_bound=lambda feature: 0.5, expand_width=1)
        tree.offer(iter([(1, "a"), (2, "a")]))
        return tree.grow(capacity)[0]

    assert grow(3).tokens == (0, 1, 2) and asked == []
    assert grow(4).tokens == (0, 1, 2, 10) and asked == [1]


def test_a_run_asks_for_no_tail_past_the_tree():
    """A run of ten heads (.5) in a tree of three nodes: two heads are kept and only their
    tails asked for (the third head entered the heap but was never popped)."""
    asked = []
    tree = BestFirstTree(0, {"r": 0.5}.__getitem__)
    tree.offer_runs([("r", list(range(1, 11)))], lambda t: asked.append(t))
    assert tree.grow(3)[0].tokens == (0, 1, 2) and asked == [1, 2]


def test_a_tail_below_the_trees_last_node_is_never_made():
    """Heads .9 and .8 (capacity 3: both kept, the tree is full); head .9's tail could give
    at most .9 x .5 = .45 < .8, so it is not made; with room, it is (and its node, .9 x .5,
    comes before head .8's tail node at .8 x .5)."""
    rates = {"a": 0.9, "b": 0.8, "t": 0.5}
    made = []

    def tail(name):
        made.append(name)
        return iter([(5 if name == "a" else 6, "t")])

    def grow(capacity):
        tree = BestFirstTree(0, rates.__getitem__)
        tree.offer_heads([(1, "a", lambda: tail("a")), (2, "b", lambda: tail("b"))],
                         tail_bound=0.5)
        return tree.grow(capacity)[0]

    assert grow(3).tokens == (0, 1, 2) and made == []
    assert grow(5).tokens == (0, 1, 2, 5, 6) and made == ["a", "b"]


def test_a_made_tail_keeps_the_order_its_placeholder_had():
    """Head "a" (.9) is offered before chain "c" (.9, then .5): a's tail placeholder (.45) is
    pushed before c's second node (.45), so a's tail node, equal in value, comes first."""
    rates = {"a": 0.9, "c": 0.9, "t": 0.5}
    tree = BestFirstTree(0, rates.__getitem__)
    tree.offer_heads([(1, "a", lambda: iter([(5, "t")]))], tail_bound=0.5)
    tree.offer(iter([(3, "c"), (4, "t")]))
    assert tree.grow(5)[0].tokens == (0, 1, 3, 5, 4)
    plain = BestFirstTree(0, rates.__getitem__)  # the same without a bound
    plain.offer_heads([(1, "a", lambda: iter([(5, "t")]))])
    plain.offer(iter([(3, "c"), (4, "t")]))
    assert plain.grow(5)[0].tokens == (0, 1, 3, 5, 4)


def test_replay_tells_a_live_cost_drafter_each_pass():
    """scripts/simulate_drafters.py --pass-cost-factors: replay tells the drafter what each
    pass costs (here every pass of 2+ tokens 3x the surface; all of this repeat's passes are
    8-token trees, so the 1-token size takes their factor too), as the decoding loop tells it
    the time it measured."""
    import argparse

    from cli_helpers import load_script

    simulate = load_script("simulate_drafters")
    drafter = simulate.make_drafter("logitspec:auto,max=8,live", CostCurve((1, 8), (1.0, 1.0)),
                                    vocab_size=16)
    output = [5, 6, 7, 8] * 40
    topk = torch.tensor([[t] + [0] * (simulate.TOP_K - 1) for t in output], dtype=torch.int32)
    trace = simulate.TurnTrace(1, "qa", [1, 2, 5, 6, 7, 8, 5, 6, 7], output, topk, len(output))
    simulate.replay_turn(drafter, trace, lambda tokens, context: 1.0 if tokens == 1 else 3.0)
    assert drafter.live.factors == (3.0, 3.0)
    assert simulate.size_factor("2=1.15") == (2, 1.15)
    with pytest.raises(argparse.ArgumentTypeError):
        simulate.size_factor("2:1.15")


@settings(deadline=None, max_examples=40)
@given(rates=st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12),
       top=st.permutations(range(80)),
       steep=st.floats(0.0, 0.5))
def test_next_next_ranks_past_the_floor_are_not_offered_and_the_tree_is_the_same(rates, top, steep):
    """With an automatic budget only the ranks up to the last whose rate reaches the entry
    value are offered; the tree equals the one grown from every rank (rates need not fall
    with the rank)."""
    curve = CostCurve((1, 16, 32, 64), (1.0, 1.0 + steep, 1.0 + 2 * steep, 1.0 + 4 * steep))
    config = LogitSpecConfig(pool=PoolConfig(3, 8, 3), draft_tree_capacity=None, tree_policy="value")
    drafters = [ValueTreeDrafter(config, curve) for _ in range(2)]
    everything = drafters[1]
    everything._ranks_reaching = lambda floor: everything.config.candidates
    context = [int(t) for t in np.random.default_rng(top[0]).integers(0, 61, 300)]
    offered = []
    for drafter in drafters:
        drafter.begin(context, 0)
        for rank, edge in enumerate((1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)):
            drafter.stats.counts[("first", edge)] = (rates[rank] * 100, 100.0)
        drafter.overhead = 0.0
        offered.append(drafter.draft(context[-1], np.array(top[:66]), 32))
    assert offered[0] == offered[1]
    floor = drafters[0]._entry_value()
    cut = drafters[0]._ranks_reaching(floor)
    reaching = [r for r in range(1, config.candidates + 1)
                if drafters[0].stats.rate(drafters[0]._rank_features[r]) >= floor]
    assert cut == (max(reaching) if reaching else 0)


def test_no_larger_tree_wins_by_hand():
    from logitspec.value_tree import _no_larger_tree_wins, least_step
    assert _no_larger_tree_wins(2.0, 0.1, 1.5, 0.5, 3, 1.45)  # the docstring's example
    assert not _no_larger_tree_wins(2.0, 0.1, 1.5, 0.0, 3, 1.45)  # flat: 2.3 / 1.5 > 1.45
    assert not _no_larger_tree_wins(2.0, 0.2, 1.5, 0.5, 3, 1.45)  # one more node: 2.2 / 1.5
    assert least_step([0.0, 1.0, 1.5, 1.7, 2.5], 4) == pytest.approx(0.2)
    assert least_step([0.0, 1.0, 0.9, 1.7], 3) == 0.0  # a falling cost bounds nothing


def test_a_steep_cost_stops_growing_after_the_first_losing_nodes():
    """Each more node costs a whole pass: once a node no longer pays, no larger tree can,
    and the chain is not asked for more (a bound on the cost of the largest tree alone would
    go on towards the capacity)."""
    pulled = []

    def chain():
        for i in range(1, 64):
            pulled.append(i)
            yield i, "r"

    tree = BestFirstTree(0, {"r": 0.5}.__getitem__)
    tree.offer(chain())
    draft, _ = tree.grow(64, [0.0] + [float(n) for n in range(1, 65)])
    assert draft.tokens == (0,)  # 1.5 tokens for 2 passes loses to 1 for 1
    assert len(pulled) <= 3


def test_prompt_logits_teach_the_recycled_chains_before_any_verification(monkeypatch):
    """With the LM head, a generation's new prompt positions copy their logits into the
    successor table (several chunks; a reused prefix is not copied again), and the very first
    draft already holds the chain they give; without it the table knows nothing yet."""
    monkeypatch.setattr("logitspec.recycling.PROMPT_CHUNK", 2)
    calls = []

    def head(hidden):  # (T, 1) -> logits (T, 8) ranking hidden + 1 first, then hidden + 2
        calls.append(hidden.shape[0])
        return (torch.nn.functional.one_hot(hidden[:, 0].long() + 1, 8) * 2.0
                + torch.nn.functional.one_hot(hidden[:, 0].long() + 2, 8).float())

    config = LogitSpecConfig(pool=PoolConfig(2, 4, 1), draft_tree_capacity=8, tree_policy="value",
                             recycle_chains=2, recycle_depth=3)
    drafter = make_logitspec_drafter(config, None, SuccessorTable(8, 2), head)
    assert drafter.needs_hidden
    context = [5, 0, 1, 2, 3]
    drafter.begin(context, 2, torch.tensor([[2.0], [3.0], [4.0]]))  # positions 2, 3, 4 are new
    table = drafter.successors
    assert calls == [2, 1]
    assert table.successors_of(1).tolist() == [3, 4]
    assert table.successors_of(2).tolist() == [4, 5]
    assert table.successors_of(3).tolist() == [5, 6]
    assert table.successors_of(0).tolist() == [-1, -1]  # reused: not copied again
    tree = drafter.draft(1, np.array([1, 0, 0], dtype=np.int64), 4)
    chains = {tuple(tree.tokens[i] for i in path) for path in tree.retrieve_paths()}
    assert any(chain[:3] == (1, 3, 5) for chain in chains), chains  # 1 -> 3 -> 5 (-> 6)
    plain = make_logitspec_drafter(config, None, SuccessorTable(8, 2))
    assert not plain.needs_hidden
    plain.begin(context, 2, None)
    assert (plain.successors.table == -1).all()
    # without recycled chains the head has nothing to teach: no hidden states asked for
    off = LogitSpecConfig(pool=PoolConfig(2, 4, 1), draft_tree_capacity=8, tree_policy="value")
    assert not make_logitspec_drafter(off, None, None, head).needs_hidden


def test_recycled_successor_trees():
    """``recycle_breadth`` b: below the first level every node's b best remembered successors
    are candidates, down to ``recycle_depth``; with room for all of them the tree holds exactly
    those paths, with b = 1 the chains only."""
    table = SuccessorTable(64, 3)
    rows = {}
    for token in range(1, 40):  # token t -> 3t, 3t+1, 3t+2 (mod 64, never 0 or t itself)
        rows[token] = [(3 * token + i) % 63 + 1 for i in range(3)]
    table.update(list(rows), np.array(list(rows.values())))
    root = 1

    def expected(breadth: int, chains: int, depth: int) -> set:
        paths, level = set(), [(t,) for t in rows[root][:chains]]
        for d in range(1, depth + 1):
            paths |= set(level)
            level = [p + (c,) for p in level for c in rows.get(p[-1], [])[:breadth]]
        return paths

    for breadth in (1, 2, 3):
        config = LogitSpecConfig(pool=PoolConfig(2, 4, 1), draft_tree_capacity=200,
                                 tree_policy="value", recycle_chains=2, recycle_depth=3,
                                 recycle_breadth=breadth, num_next_next=0)
        drafter = make_logitspec_drafter(config, None, table)
        drafter.begin([5, 6], 0)
        tree = drafter.draft(root, np.array([root, 0], dtype=np.int64), 8)
        got = {tuple(tree.tokens[i] for i in tree.path_to(n))[1:] for n in range(1, len(tree.tokens))}
        assert got == expected(breadth, 2, 3), breadth
    assert len(expected(3, 2, 3)) == 2 + 6 + 18
    with pytest.raises(ValueError, match="recycle_breadth"):
        LogitSpecConfig(tree_policy="value", recycle_breadth=2)
    with pytest.raises(ValueError, match="recycle_breadth"):
        LogitSpecConfig(tree_policy="value", recycle_chains=2, recycle_breadth=0)


def test_successor_children_below_every_other_source():
    """``successor_children`` c, ``successor_hops`` h: below every node that no recycled chain
    made, its c best remembered successors, and theirs, h levels down; the recycled chain's own
    nodes get none. Pool ``20 21 22 23 20``, root 21: the next-token chain 22 23 20; successors
    of t are 2t, 2t + 1; the root's recycled chain (one node) is 42."""
    table = SuccessorTable(256, 2)
    rows = {t: [2 * t, 2 * t + 1] for t in range(1, 120)}
    table.update(list(rows), np.array(list(rows.values())))

    def below(path: tuple, hops: int) -> set:
        found, level = set(), [path]
        for _ in range(hops):
            level = [p + (c,) for p in level for c in rows[p[-1]]]
            found |= set(level)
        return found

    for hops in (1, 2):
        config = LogitSpecConfig(pool=PoolConfig(2, 4, 1), draft_tree_capacity=200,
                                 tree_policy="value", recycle_chains=1, recycle_depth=1,
                                 successor_children=2, successor_hops=hops, num_next_next=0)
        drafter = make_logitspec_drafter(config, None, table)
        drafter.begin([20, 21, 22, 23, 20], 0)
        tree = drafter.draft(21, np.array([21, 0], dtype=np.int64), 8)
        got = {tuple(tree.tokens[i] for i in tree.path_to(n))[1:] for n in range(1, len(tree.tokens))}
        chain = [(22,), (22, 23), (22, 23, 20)]
        expected = {(42,)} | set(chain) | set().union(*(below(p, hops) for p in chain))
        assert got == expected, hops
        assert len(expected) == 1 + 3 + 3 * (2 if hops == 1 else 6)
    off = LogitSpecConfig(pool=PoolConfig(2, 4, 1), draft_tree_capacity=200, tree_policy="value",
                          recycle_chains=1, recycle_depth=1, num_next_next=0)
    drafter = make_logitspec_drafter(off, None, table)
    drafter.begin([20, 21, 22, 23, 20], 0)
    assert len(drafter.draft(21, np.array([21, 0], dtype=np.int64), 8).tokens) == 1 + 1 + 3
    with pytest.raises(ValueError, match="successor_children needs recycled chains"):
        LogitSpecConfig(tree_policy="value", successor_children=2)
    with pytest.raises(ValueError, match="successor_hops"):
        LogitSpecConfig(tree_policy="value", recycle_chains=2, successor_children=2, successor_hops=0)


def test_agreement_values_a_first_token_by_the_sources_that_propose_it():
    """Context ``5 6 7 8 5 6``, root 7: the pool continues it with 8; the last logit's
    next-next guesses are 8 (rank 1) and 9; the root's remembered successors are 8 and 10.
    With ``agreement``, 8 (three sources) carries ``("agree", 3, f)`` for the feature ``f`` of
    each source's node, the others their own features; a learned rate for three agreeing
    sources puts 8 first in a one-draft tree even where the sources' own rates rank 10 first;
    without it the tree drafts 10."""
    table = SuccessorTable(64, 2)
    table.update([7], np.array([[10, 8]]))
    context, root, top = [5, 6, 7, 8, 5, 6], 7, np.array([7, 8, 9], dtype=np.int64)

    def drafter(agreement: bool, capacity: int) -> ValueTreeDrafter:
        config = LogitSpecConfig(pool=PoolConfig(2, 4, 1), draft_tree_capacity=capacity,
                                 tree_policy="value", recycle_chains=2, recycle_depth=1,
                                 num_next_next=2, agreement=agreement)
        d = make_logitspec_drafter(config, None, table)
        d.begin(context, 0)
        return d

    d = drafter(True, 64)
    tree = d.draft(root, top, 8)
    firsts = {tree.tokens[n]: d._features[n] for n in range(1, len(tree.tokens))
              if tree.parents[n] == 0}
    assert set(firsts) == {8, 9, 10}
    assert firsts[8][:2] == ("agree", 3) and firsts[8][2][0] in ("next", "first", "rec")
    assert firsts[9] == ("first", 2) and firsts[10][0] == "rec"
    assert value_prior(("agree", 2, ("first", 2))) == pytest.approx(1 - (1 - 0.15) ** 2)

    for agreement, first in ((False, 10), (True, 8)):
        d = drafter(agreement, 2)  # the root and one draft
        d.stats.counts.update({("rec", 1, 1): (90.0, 100.0), ("rec", 2, 1): (90.0, 100.0),
                               ("next", 2, 1): (1.0, 100.0), ("first", 1): (1.0, 100.0),
                               ("agree", 3, ("next", 2, 1)): (99.0, 100.0),
                               ("agree", 3, ("first", 1)): (99.0, 100.0),
                               ("agree", 3, ("rec", 2, 1)): (99.0, 100.0)})
        tree = d.draft(root, top, 8)
        assert list(tree.tokens[1:]) == [first], agreement
