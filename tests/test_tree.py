"""Draft trees: ``build_tree`` tables (budget, merging, depth), masks and paths as properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.tree import DraftTree, build_tree

# (root, chains, capacity, options, expected tokens, expected parents)
BUILD_CASES = {
    "budget-1-root-only": (7, [[1, 2]], 1, {}, [7], [-1]),
    "no-chains": (7, [], 5, {}, [7], [-1]),
    "empty-chains": (7, [[], [1], []], 5, {}, [7, 1], [-1, 0]),
    "docstring-merged": (7, [[1, 2], [1, 3], [4]], 10, {}, [7, 1, 2, 3, 4], [-1, 0, 1, 1, 0]),
    "docstring-unmerged": (7, [[1, 2], [1, 3], [4]], 10, {"merge": False},
                           [7, 1, 2, 1, 3, 4], [-1, 0, 1, 0, 3, 0]),
    "duplicate-chain-free-when-merged": (7, [[1, 2], [1, 2], [1, 2, 3]], 4, {},
                                         [7, 1, 2, 3], [-1, 0, 1, 2]),
    "duplicate-chain-paid-unmerged": (7, [[1, 2], [1, 2]], 5, {"merge": False},
                                      [7, 1, 2, 1, 2], [-1, 0, 1, 0, 3]),
    "deep-merge": (7, [[1, 2, 3], [1, 2, 4], [1, 5]], 10, {},
                   [7, 1, 2, 3, 4, 5], [-1, 0, 1, 2, 2, 1]),
    "budget-cuts-first-chain": (7, [[1, 2, 3, 4]], 3, {}, [7, 1, 2], [-1, 0, 1]),
    "budget-cuts-second-chain": (7, [[1, 2], [5, 6, 7]], 4, {}, [7, 1, 2, 5], [-1, 0, 1, 0]),
    "budget-exact-then-stop": (7, [[1, 2], [3]], 3, {}, [7, 1, 2], [-1, 0, 1]),
    "merged-prefix-then-budget": (7, [[1, 2], [1, 4, 5]], 4, {}, [7, 1, 2, 4], [-1, 0, 1, 1]),
    "max-depth-2": (7, [[1, 2, 3], [4, 5, 6]], 10, {"max_depth": 2},
                    [7, 1, 2, 4, 5], [-1, 0, 1, 0, 3]),
    "max-depth-0": (7, [[1, 2, 3]], 10, {"max_depth": 0}, [7], [-1]),
    "root-token-is-not-a-trie-node": (7, [[7, 8]], 5, {}, [7, 7, 8], [-1, 0, 1]),
}


@pytest.mark.parametrize("root, chains, capacity, options, tokens, parents",
                         list(BUILD_CASES.values()), ids=list(BUILD_CASES))
def test_build_tree_table(root, chains, capacity, options, tokens, parents):
    tree = build_tree(root, chains, capacity, **options)
    assert list(tree.tokens) == tokens
    assert list(tree.parents) == parents
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    assert list(tree.depths) == depths
    assert len(tree) == len(tokens) <= capacity
    assert tree.num_draft_tokens == len(tokens) - 1


def test_docstring_example_paths_and_mask():
    tree = build_tree(7, [[1, 2], [1, 3], [4]], 10)
    assert tree.retrieve_paths() == [[0, 1, 2], [0, 1, 3], [0, 4]]
    assert tree.path_to(3) == [0, 1, 3] and tree.path_to(0) == [0]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 0, 0, 0, 1],
    ], dtype=bool)
    assert tree.tree_mask().dtype == bool
    assert np.array_equal(tree.tree_mask(), expected)


@pytest.mark.parametrize("length", [29, 30, 31, 62, 63, 64, 100, 127])
def test_long_chains(length):
    """Chains longer than 29 tokens work (the reference's fixed mask table did not)."""
    chain = list(range(1, length + 1))
    tree = build_tree(0, [chain], 128)
    assert list(tree.tokens) == [0] + chain
    assert list(tree.depths) == list(range(length + 1))
    assert np.array_equal(tree.tree_mask(), np.tril(np.ones((length + 1,) * 2, dtype=bool)))
    assert tree.retrieve_paths() == [list(range(length + 1))]


def test_long_chain_in_a_wide_tree():
    chains = [list(range(100, 160))] + [[i] for i in range(20)]
    tree = build_tree(0, chains, 128)
    assert len(tree) == 81 and max(tree.depths) == 60
    assert len(tree.retrieve_paths()) == 21


def test_chains_consumed_lazily():
    consumed = []

    def chains():
        for i in range(1000):
            consumed.append(i)
            yield [10 * i + 1, 10 * i + 2]

    tree = build_tree(0, chains(), 5)
    assert len(tree) == 5
    assert consumed == [0, 1]  # the second chain filled the budget: no third one drawn


def test_infinite_chain_stream_with_budget():
    def forever():
        i = 0
        while True:
            i += 1
            yield [i]

    assert list(build_tree(0, forever(), 4).tokens) == [0, 1, 2, 3]


def test_budget_one_consumes_nothing():
    def never():
        raise AssertionError("no chain should be drawn")
        yield []  # pragma: no cover

    assert build_tree(0, never(), 1).tokens == (0,)
    assert build_tree(0, never(), 9, max_depth=0).tokens == (0,)


@pytest.mark.parametrize("capacity", [0, -3])
def test_build_tree_rejects_capacity(capacity):
    with pytest.raises(ValueError, match="tree capacity must be >= 1"):
        build_tree(0, [[1]], capacity)


@pytest.mark.parametrize(
    "tokens, parents, depths, message",
    [
        ((), (), (), "needs a root"),
        ((1, 2), (-1,), (0, 1), "one parent and depth per node"),
        ((1, 2), (-1, 0), (0,), "one parent and depth per node"),
        ((1, 2), (0, 0), (0, 1), "parents must point to earlier nodes"),
        ((1, 2, 3), (-1, 2, 0), (0, 1, 1), "parents must point to earlier nodes"),
        ((1, 2), (-1, 1), (0, 1), "parents must point to earlier nodes"),
        ((1, 2), (-1, -1), (0, 1), "parents must point to earlier nodes"),
    ],
    ids=["empty", "short-parents", "short-depths", "root-has-parent", "parent-later",
         "self-parent", "second-root"],
)
def test_draft_tree_validation(tokens, parents, depths, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(tokens, parents, depths)


# ---------------------------------------------------------------------------------------------
# Properties over random chains

chains_strategy = st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=12)


@settings(deadline=None, max_examples=150)
@given(root=st.integers(0, 3), chains=chains_strategy, capacity=st.integers(1, 40),
       max_depth=st.one_of(st.none(), st.integers(0, 9)), merge=st.booleans())
def test_tree_properties(root, chains, capacity, max_depth, merge):
    tree = build_tree(root, chains, capacity, max_depth=max_depth, merge=merge)
    n = len(tree)
    assert 1 <= n <= capacity and tree.tokens[0] == root
    limit = capacity if max_depth is None else max_depth
    assert max(tree.depths) <= limit

    mask = tree.tree_mask()
    for i in range(n):
        path = tree.path_to(i)
        assert path[0] == 0 and path[-1] == i
        assert tree.depths[i] == len(path) - 1
        assert set(np.flatnonzero(mask[i])) == set(path)  # mask = ancestor-or-self
        spelled = [tree.tokens[j] for j in path[1:]]
        if i:  # only chain prefixes
            assert any(list(c[: len(spelled)]) == spelled for c in chains)

    paths = tree.retrieve_paths()
    leaves = [p[-1] for p in paths]
    assert leaves == sorted(leaves) and set(leaves) == set(range(n)) - set(tree.parents)
    assert set().union(*map(set, paths)) == set(range(n))

    if merge:  # a trie: siblings have different tokens
        siblings = [(tree.parents[i], tree.tokens[i]) for i in range(1, n)]
        assert len(siblings) == len(set(siblings))
        if n < capacity:  # nothing cut by the budget: every (depth-cut) chain is a path
            spelled_paths = {tuple(tree.tokens[j] for j in tree.path_to(i)[1:]) for i in range(n)}
            spelled_paths.add(())
            assert all(tuple(c[:limit]) in spelled_paths for c in chains)
    else:
        expected = 1 + sum(len(c[:limit]) for c in chains)
        assert n == min(capacity, expected)


# ---------------------------------------------------------------------------------------------
# Aux inputs: verified alongside the tree, never candidates


def test_aux_inputs_docstring_example():
    aux_mask = np.array([[1, 0, 1, 0], [1, 0, 1, 1]], dtype=bool)
    tree = DraftTree((7, 1), (-1, 0), (0, 1), aux_tokens=(5, 6), aux_depths=(1, 2), aux_mask=aux_mask)
    assert len(tree) == 2 and tree.num_inputs == 4 and tree.num_draft_tokens == 1
    assert tree.input_tokens() == (7, 1, 5, 6) and tree.input_depths() == (0, 1, 1, 2)
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=bool)
    assert np.array_equal(tree.input_mask(), expected)
    assert not tree.is_chain  # aux inputs need the explicit mask
    assert tree.retrieve_paths() == [[0, 1]]  # paths are over tree nodes only


@pytest.mark.parametrize(
    "aux_tokens, aux_depths, aux_mask",
    [
        ((5,), (), np.ones((1, 2), dtype=bool)),  # no depth
        ((5,), (1,), None),  # no mask
        ((), (), np.ones((0, 1), dtype=bool)),  # a mask without inputs
        ((5,), (1,), np.ones((1, 1), dtype=bool)),  # too narrow
        ((5, 6), (1, 2), np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)),  # input 6 blind to itself
    ],
    ids=["no-depth", "no-mask", "mask-without-inputs", "narrow-mask", "not-self"],
)
def test_aux_input_validation(aux_tokens, aux_depths, aux_mask):
    with pytest.raises(ValueError, match="aux"):
        DraftTree((7,), (-1,), (0,), aux_tokens=aux_tokens, aux_depths=aux_depths, aux_mask=aux_mask)


@pytest.mark.parametrize("tokens, parents, depths, chain", [
    ((7,), (-1,), (0,), True),
    ((7, 1, 2), (-1, 0, 1), (0, 1, 2), True),
    ((7, 1, 2), (-1, 0, 0), (0, 1, 1), False),
    ((7, 1, 2, 3), (-1, 0, 1, 0), (0, 1, 2, 1), False),
])
def test_is_chain(tokens, parents, depths, chain):
    assert DraftTree(tokens, parents, depths).is_chain is chain


@pytest.mark.parametrize("size", [2, 40, 63, 64, 65, 90])
def test_mask_of_a_random_tree_is_ancestor_or_self(size):
    """Trees of up to 64 nodes pack a row into one integer, larger ones into bytes: both agree
    with an ancestor walk."""
    rng = np.random.default_rng(size)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, size)]
    depths = [0]
    for parent in parents[1:]:
        depths.append(depths[parent] + 1)
    tree = DraftTree(tuple(range(size)), tuple(parents), tuple(depths))
    expected = np.zeros((size, size), dtype=bool)
    for i in range(size):
        expected[i, tree.path_to(i)] = True
    assert tree.tree_mask().dtype == bool and np.array_equal(tree.tree_mask(), expected)


def test_a_tree_from_a_trusted_builder_equals_a_checked_one():
    checked = DraftTree((7, 1, 2, 4), (-1, 0, 1, 0), (0, 1, 2, 1))
    trusted = DraftTree.of_valid((7, 1, 2, 4), (-1, 0, 1, 0), (0, 1, 2, 1))
    assert trusted == checked and hash(trusted) == hash(checked)
    assert trusted.num_inputs == 4 and not trusted.is_chain
    assert (trusted.input_mask() == checked.input_mask()).all()
