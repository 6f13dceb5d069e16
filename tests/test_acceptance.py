"""Greedy acceptance: tables for ``greedy_accept`` and ``GreedyVerifier``, and a brute-force
property check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.acceptance import GreedyVerifier, greedy_accept
from logitspec.tree import DraftTree, build_tree

X = 99  # a prediction that matches no draft token

# (tokens, parents, pred, expected path); the bonus token is always pred[path[-1]]
ACCEPT_CASES = {
    "root-only": ([7], [-1], [3], [0]),
    "first-draft-rejected": ([7, 1, 2, 3], [-1, 0, 1, 2], [4, X, X, X], [0]),
    "full-chain": ([7, 1, 2, 3], [-1, 0, 1, 2], [1, 2, 3, 9], [0, 1, 2, 3]),
    "partial-chain": ([7, 1, 2, 3], [-1, 0, 1, 2], [1, 2, 5, 9], [0, 1, 2]),
    "mismatch-blocks-subtree": ([7, 1, 2, 3], [-1, 0, 1, 2], [1, 5, 3, 9], [0, 1]),
    "second-child-of-root": ([7, 1, 4], [-1, 0, 0], [4, X, X], [0, 2]),
    "docstring-example": ([7, 1, 2, 3, 4], [-1, 0, 1, 1, 0], [1, 3, X, X, X], [0, 1, 3]),
    "tie-takes-first": ([7, 1, 2, 1, 2], [-1, 0, 1, 0, 3], [1, 2, X, 2, X], [0, 1, 2]),
    "deeper-branch-wins": ([7, 1, 2, 1, 2, 3], [-1, 0, 1, 0, 3, 4], [1, 2, X, 2, 3, 8],
                           [0, 3, 4, 5]),
    "deeper-in-trie": ([7, 1, 2, 3, 4], [-1, 0, 1, 1, 3], [1, 3, X, 4, X], [0, 1, 3, 4]),
    "rejected-parent-accepted-lookalike": ([7, 1, 5, 2, 2], [-1, 0, 0, 2, 1],
                                           [1, 2, 2, X, X], [0, 1, 4]),
}


@pytest.mark.parametrize("tokens, parents, pred, expected", list(ACCEPT_CASES.values()),
                         ids=list(ACCEPT_CASES))
def test_greedy_accept_table(tokens, parents, pred, expected):
    assert greedy_accept(tokens, parents, pred) == expected


@pytest.mark.parametrize("tokens, parents, pred, expected", list(ACCEPT_CASES.values()),
                         ids=list(ACCEPT_CASES))
def test_greedy_verifier_table(tokens, parents, pred, expected):
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    tree = DraftTree(tuple(tokens), tuple(parents), tuple(depths))
    logits = torch.full((len(tokens), 100), -1.0)
    logits[torch.arange(len(tokens)), torch.tensor(pred)] = 5.0
    verifier = GreedyVerifier()
    predicted, topk = verifier.read(logits, 3, np.arange(len(tokens)))
    assert predicted == pred and topk[:, 0].tolist() == pred
    path, bonus = verifier.accept(tree, predicted)
    assert path == expected
    assert bonus == pred[expected[-1]]


def test_first_token_is_argmax():
    logits = torch.tensor([[0.5, -1.0, 3.0, 2.9]])
    verifier = GreedyVerifier()
    assert verifier.first_token(verifier.read(logits, 0, np.array([6]))[0]) == 2


def reference_accept(tokens, parents, pred) -> list[int]:
    """Every node whose whole path agrees with the predictions; the deepest, lowest index."""
    def path(i):
        out = []
        while i >= 0:
            out.append(i)
            i = parents[i]
        return out[::-1]

    accepted = [i for i in range(len(tokens))
                if all(tokens[j] == pred[parents[j]] for j in path(i)[1:])]
    best = min(accepted, key=lambda i: (-len(path(i)), i))
    return path(best)


@settings(deadline=None, max_examples=300)
@given(root=st.integers(0, 2),
       chains=st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=10),
       capacity=st.integers(1, 30), merge=st.booleans(), data=st.data())
def test_greedy_accept_matches_reference(root, chains, capacity, merge, data):
    tree = build_tree(root, chains, capacity, merge=merge)
    pred = data.draw(st.lists(st.integers(0, 2), min_size=len(tree), max_size=len(tree)))
    path = greedy_accept(tree.tokens, tree.parents, pred)
    assert path == reference_accept(tree.tokens, tree.parents, pred)
    # the accepted drafts spell the target's own greedy continuation
    assert [tree.tokens[i] for i in path[1:]] == [pred[i] for i in path[:-1]]
    assert path == tree.path_to(path[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_tokens_take_the_first_of_tied_maxima(dtype):
    from logitspec.acceptance import greedy_tokens

    logits = torch.zeros(3, 1000, dtype=dtype)
    logits[:, [7, 300, 999]] = 2.0
    logits[1, 3] = 2.0
    assert greedy_tokens(logits).tolist() == [7, 3, 7]
    assert greedy_tokens(logits).tolist() == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_read_back_keeps_the_first_index_rule_with_any_top_k(dtype, k):
    """Ties at the maximum, more ties than k, and a plain row: the greedy column equals
    :func:`greedy_tokens` whatever k, and the top-k ids are the k best, best first."""
    from logitspec.acceptance import greedy_tokens, read_back

    logits = torch.zeros(4, 50, dtype=dtype)
    logits[0, [40, 7, 30]] = 3.0  # three tied maxima
    logits[1, [9, 8, 7, 6, 5, 4]] = 2.0  # six tied maxima: more than k
    logits[2, 33] = 1.0
    logits[2, 12] = 0.5
    logits[3] = torch.arange(50, dtype=dtype) % 7  # six maxima at 6, 13, ...
    greedy, topk = read_back(logits, k)
    assert greedy.tolist() == greedy_tokens(logits).tolist() == [7, 4, 33, 6]
    assert topk.shape == (4, k) and topk.dtype == np.int64
    if k:
        values = logits.gather(1, torch.from_numpy(topk))
        assert torch.equal(values, logits.topk(k).values)
    assert read_back(logits, 500)[1].shape == (4, 50)  # k capped at the vocabulary
