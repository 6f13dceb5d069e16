"""The suffix tree of SuffixDecoding (logitspec/suffix_tree.py): counts, positions and
speculation pinned by hand-worked tables and checked against brute-force substring counting."""

from __future__ import annotations

import itertools
from typing import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.suffix_tree import SuffixDraft, SuffixTree


def brute_count(sequences: Sequence[Sequence[int]], s: Sequence[int]) -> int:
    """Occurrences of ``s`` in ``sequences`` (start positions), by rescanning."""
    n, s = len(s), list(s)
    return sum(1 for q in sequences for i in range(len(q) - n + 1) if list(q[i:i + n]) == s)


def tree_of(*sequences: Sequence[int], max_depth: int = 64, min_token_prob: float = 0.1) -> SuffixTree:
    tree = SuffixTree(max_depth, min_token_prob)
    for seq in sequences:
        tree.start_sequence()
        tree.extend(seq)
    return tree


def paths_of(draft: SuffixDraft) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(draft.tokens, draft.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    return paths


# --------------------------------------------------------------------------- the policy, by hand

def test_module_docstring_example():
    tree = tree_of([1, 2, 3, 1, 2, 4, 1, 2], max_depth=3)
    assert tree.count([1, 2]) == 3 and tree.count([1, 2, 3]) == tree.count([1, 2, 4]) == 1
    draft = tree.speculate(tree.find([1, 2]), 4)
    assert draft.tokens == (3, 4) and draft.parents == (-1, -1)
    assert draft.counts == (1, 1) and draft.denominator == 3 and draft.score == pytest.approx(2 / 3)


# (sequence, max_depth, min_token_prob, matched string, max_tokens, tree mode,
#  expected tokens, parents, counts, denominator)
SPECULATE_CASES = {
    "chain through a tail, probability 1/2 with the final occurrence":
        ([5, 6, 7, 8, 5, 6], 64, 0.1, [5, 6], 5, True, (7, 8, 5, 6), (-1, 0, 1, 2), (1, 1, 1, 1), 2),
    "budget cuts the chain":
        ([5, 6, 7, 8, 5, 6], 64, 0.1, [5, 6], 2, True, (7, 8), (-1, 0), (1, 1), 2),
    "tail cut at max_depth":
        ([5, 6, 7, 8, 5, 6], 3, 0.1, [5, 6], 5, True, (7,), (-1,), (1,), 2),
    "best first: the frequent branch before the rare one":
        ([1, 2, 1, 3, 1, 2, 1, 2, 1], 2, 0.1, [1], 3, True, (2, 3), (-1, -1), (3, 1), 5),
    "pruned below min_token_prob (1/5 < 0.3)":
        ([1, 2, 1, 3, 1, 2, 1, 2, 1], 2, 0.3, [1], 3, True, (2,), (-1,), (3,), 5),
    "equal counts: first occurrence first":
        ([9, 4, 9, 3, 9], 2, 0.1, [9], 1, True, (4,), (-1,), (1,), 3),
    "chain mode follows the most frequent child":
        ([1, 2, 5, 1, 3, 1, 3, 6, 1], 64, 0.1, [1], 4, False, (3, 1, 3, 6), (-1, 0, 1, 2), (2, 1, 1, 1), 4),
    "tree mode: the frequent branch first, then equal counts in the order they were reached":
        ([1, 2, 5, 1, 3, 1, 3, 6, 1], 64, 0.1, [1], 4, True, (3, 2, 1, 6), (-1, -1, 0, 0), (2, 1, 1, 1), 4),
    "a match inside a tail has count 1 and a deterministic continuation":
        ([4, 5, 6, 7], 64, 0.1, [5, 6], 9, True, (7,), (-1,), (1,), 1),
    "nothing follows the only occurrence":
        ([4, 5, 6], 64, 0.1, [5, 6], 9, True, (), (), (), 1),
}


@pytest.mark.parametrize("case", SPECULATE_CASES.values(), ids=SPECULATE_CASES.keys())
def test_speculate_table(case):
    seq, max_depth, min_prob, match, max_tokens, tree_mode, tokens, parents, counts, den = case
    tree = tree_of(seq, max_depth=max_depth, min_token_prob=min_prob)
    draft = tree.speculate(tree.find(match), max_tokens, tree=tree_mode)
    got = (draft.tokens, draft.parents, draft.counts, draft.denominator)
    assert got == (tokens, parents, counts, den)
    assert draft.match_len == len(match)


def test_speculate_respects_the_step_depth_limit():
    tree = tree_of([5, 6, 7, 8, 9, 5, 6])
    draft = tree.speculate(tree.find([5, 6]), 10, max_depth=2)
    assert draft.tokens == (7, 8)
    assert tree.speculate(tree.find([5, 6]), 10, max_depth=0).tokens == ()


def test_counts_include_every_sequence_and_removal_forgets_one():
    tree = SuffixTree(4)
    tree.start_sequence()
    tree.extend([1, 2, 3])
    tree.start_sequence()
    tree.extend([1, 2, 4, 1, 2])
    assert tree.count([1, 2]) == 3 and tree.count([2, 3]) == 1 and tree.count([]) == 8
    tree.remove_oldest()
    assert tree.count([1, 2]) == 2 and tree.count([2, 3]) == 0 and tree.count([]) == 5
    assert tree.speculate(tree.find([1, 2]), 3).tokens == (4, 1)  # max_depth 4


def test_loci_are_the_growing_suffixes_that_occurred_before():
    tree = tree_of([7, 1, 2, 3, 1, 2])
    assert [tree.node_depth(node) for node in tree.loci] == [2, 1]  # [3, 1, 2] is new
    assert [tree.node_count(node) for node in tree.loci] == [tree.count([1, 2]), tree.count([2])]


def test_append_needs_a_growing_sequence():
    with pytest.raises(RuntimeError):
        SuffixTree().append(1)


@pytest.mark.parametrize("kwargs", [
    dict(max_depth=0), dict(min_token_prob=-0.1), dict(min_token_prob=1.5),
])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SuffixTree(**kwargs)


def test_growing_cost_does_not_scan_the_sequence():
    """Unique text keeps at most one locus per token: appending is O(1) per token, not O(n)."""
    tree = tree_of(range(5000))
    assert tree.loci == [] and tree.count([]) == 5000
    assert tree.count([4997, 4998, 4999]) == 1 and tree.count([4999, 0]) == 0


# --------------------------------------------------------------------------- against brute force

sequences_strategy = st.lists(st.lists(st.integers(0, 2), max_size=14), min_size=1, max_size=3)


@settings(deadline=None, max_examples=100)
@given(sequences=sequences_strategy, max_depth=st.integers(1, 5), removed=st.integers(0, 3),
       later=st.lists(st.integers(0, 2), max_size=10))
def test_counts_match_brute_force(sequences, max_depth, removed, later):
    """Counts after appends, removals of the oldest sequences, and appends that reuse the
    removed rows."""
    tree = tree_of(*sequences, max_depth=max_depth)
    for _ in range(min(removed, len(sequences))):
        tree.remove_oldest()
    tree.start_sequence()
    tree.extend(later)
    live = sequences[removed:] + [later]
    assert tree.count([]) == sum(map(len, live))
    for length in range(1, max_depth + 2):
        for s in itertools.product(range(3), repeat=length):
            expected = brute_count(live, s) if length <= max_depth else 0
            assert tree.count(s) == expected, s


@settings(deadline=None, max_examples=80)
@given(sequences=sequences_strategy, max_depth=st.integers(1, 5),
       min_prob=st.sampled_from([0.0, 0.1, 0.3, 0.6]), max_tokens=st.integers(0, 6),
       depth_limit=st.one_of(st.none(), st.integers(1, 4)))
def test_speculation_matches_brute_force(sequences, max_depth, min_prob, max_tokens, depth_limit):
    """Every drafted token's count is exact and reaches the threshold; the tree takes the
    ``max_tokens`` highest counts among eligible continuations (its score does not depend on
    ties); the chain takes a most frequent child at every step and stops only when none is
    eligible."""
    tree = tree_of(*sequences, max_depth=max_depth, min_token_prob=min_prob)
    limit = max_tokens if depth_limit is None else min(max_tokens, depth_limit)
    for length in range(1, max_depth + 1):
        for s in map(list, itertools.product(range(3), repeat=length)):
            position = tree.find(s)
            total = brute_count(sequences, s)
            assert (position is None) == (total == 0)
            if position is None:
                continue
            # the first tokens a draft may take: their largest and summed counts
            nexts = [c for a in range(3) if (c := brute_count(sequences, s + [a]))
                     and c >= min_prob * total and length < max_depth]
            counts = (max(nexts, default=0), sum(nexts), total)
            assert tree.continuation_counts(position) == counts
            assert tree.top_continuation(position) == (counts[0], total)
            for tree_mode in (True, False):
                draft = tree.speculate(position, max_tokens, tree=tree_mode, max_depth=depth_limit)
                assert draft.denominator == total and draft.match_len == length
                paths = paths_of(draft)
                assert len(set(paths)) == len(paths) <= max_tokens
                for path, count in zip(paths, draft.counts):
                    assert count == brute_count(sequences, s + list(path)) >= min_prob * total
                    assert len(path) <= limit and length + len(path) <= max_depth
                for depth in range(1, limit + 1):  # the bound _best relies on
                    assert sum(c for p, c in zip(paths, draft.counts) if len(p) == depth) <= counts[1]
                eligible = sorted(
                    (c for n in range(1, min(max_depth - length, limit) + 1)
                     for p in itertools.product(range(3), repeat=n)
                     if (c := brute_count(sequences, s + list(p))) and c >= min_prob * total),
                    reverse=True,
                )
                if tree_mode:
                    assert sum(draft.counts) == sum(eligible[:max_tokens])
                    continue
                for path, count in zip(paths, draft.counts):
                    siblings = [brute_count(sequences, s + list(path[:-1]) + [a]) for a in range(3)]
                    assert count == max(siblings)
                stop = paths[-1] if paths else ()
                if len(paths) < limit and length + len(stop) < max_depth:
                    best = max(brute_count(sequences, s + list(stop) + [a]) for a in range(3))
                    assert best == 0 or best < min_prob * total


def plain_best_first(tree: SuffixTree, position, max_tokens: int, depth_limit: int):
    """Tree-mode speculation as a plain heap over ``_candidates``, one node per pop: the
    order (ties included) that ``speculate`` must keep with its runs through spans and
    tails."""
    import heapq
    cursor, denominator = tree._locate(position)
    threshold = tree.min_token_prob * denominator
    heap = [(-count, order, token, -1, 1, after)
            for order, (count, token, after) in enumerate(tree._candidates(cursor, threshold))]
    heapq.heapify(heap)
    out, order = [], len(heap)
    while heap and len(out) < max_tokens:
        negative, _, token, parent, depth, after = heapq.heappop(heap)
        out.append((token, parent, -negative))
        if depth < depth_limit:
            for count, child, child_after in tree._candidates(after, threshold):
                heapq.heappush(heap, (-count, order, child, len(out) - 1, depth + 1, child_after))
                order += 1
    return out


def test_a_run_through_a_span_goes_on_below_the_node_it_reaches():
    """From "1" (3 occurrences, twice followed by 2 3 4, a span of one node): 2 alone, then
    the run 3 4 to the node's end, then both of its children."""
    tree = tree_of([1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 1])
    position = tree.find([1])
    draft = tree.speculate(position, 5)
    assert (draft.tokens, draft.parents, draft.counts) == ((2, 3, 4, 5, 6), (-1, 0, 1, 2, 2),
                                                           (2, 2, 2, 1, 1))
    longer = tree.speculate(position, 10)  # the two tails go on, one token each in turn
    assert longer.tokens == (2, 3, 4, 5, 6, 1, 1, 2, 3, 4)
    assert list(zip(longer.tokens, longer.parents, longer.counts)) == plain_best_first(
        tree, position, 10, 10)
    # a limit inside the span stops the run there
    assert tree.speculate(position, 2).tokens == (2, 3)


@settings(deadline=None, max_examples=150)
@given(sequences=st.lists(st.lists(st.integers(0, 3), max_size=24), min_size=1, max_size=3),
       max_depth=st.integers(2, 12), min_prob=st.sampled_from([0.0, 0.1, 0.4]),
       max_tokens=st.integers(1, 12), depth_limit=st.one_of(st.none(), st.integers(1, 8)),
       suffix=st.integers(0, 6))
def test_speculation_runs_equal_one_pop_per_node(sequences, max_depth, min_prob, max_tokens,
                                                 depth_limit, suffix):
    """Tokens, parents and counts in exactly the order of a plain best-first heap, for the
    matched suffixes of the last sequence (long runs through spans and tails included)."""
    tree = tree_of(*sequences, max_depth=max_depth, min_token_prob=min_prob)
    last = sequences[-1]
    limit = max_tokens if depth_limit is None else min(max_tokens, depth_limit)
    for start in range(max(0, len(last) - suffix - 1), len(last) + 1):
        position = tree.find(last[start:][:max_depth])
        if position is None:
            continue
        draft = tree.speculate(position, max_tokens, max_depth=depth_limit)
        expected = plain_best_first(tree, position, max_tokens, limit)
        assert list(zip(draft.tokens, draft.parents, draft.counts)) == expected


@settings(deadline=None, max_examples=60)
@given(sequences=sequences_strategy, more=st.lists(st.integers(0, 2), max_size=10),
       max_depth=st.integers(1, 6))
def test_positions_stay_valid_while_the_tree_grows(sequences, more, max_depth):
    """A position taken before appends (which may split the tail it points into) advances and
    speculates exactly like a fresh one."""
    tree = tree_of(*sequences, max_depth=max_depth)
    strings = [list(s) for n in range(1, max_depth + 1) for s in itertools.product(range(3), repeat=n)]
    held = {tuple(s): tree.find(s) for s in strings}
    tree.extend(more)
    for s in strings:
        old, new = held[tuple(s)], tree.find(s)
        if old is None:
            continue
        assert tree.speculate(old, 5) == tree.speculate(new, 5)
        for token in range(3):
            a, b = tree.advance(old, token), tree.advance(new, token)
            assert (a is None) == (b is None)
            if a is not None:
                assert tree.speculate(a, 4) == tree.speculate(b, 4)
