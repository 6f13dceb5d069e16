"""PLD and LogitSpec drafters on a hand-made context and hand-made logits."""

from __future__ import annotations

import pytest
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.drafters import LogitSpecConfig, LogitSpecDrafter, PoolConfig, PromptLookupDrafter
from logitspec.tree import DraftTree

VOCAB = 128
# With unigram lookups (max_ngram_size 1) the continuation of a token is what followed its
# first occurrence here (no occurrence is followed by num_pred_tokens = 5 tokens twice):
#   50 -> 1 2 3 4 5      60 -> 11 12 13 14 70    70 -> 21 22 23 80 31
#   80 -> 31 32 90 99    90 -> 99                99 -> (nothing: last token)   7 -> (absent)
CONTEXT = [50, 1, 2, 3, 4, 5, 60, 11, 12, 13, 14, 70, 21, 22, 23, 80, 31, 32, 90, 99]
UNIGRAM = PoolConfig(max_ngram_size=1, num_pred_tokens=5)
# ranks 1-2 keep 3 tokens, ranks 3-4 keep 2, later ranks 1
SMALL_RANKS = ((2, 3), (4, 2))


def ranked_logits(order: list[int], vocab: int = VOCAB) -> torch.Tensor:
    """Logits whose top tokens are ``order`` (in that order); the rest far below, by index."""
    logits = -10.0 - torch.arange(vocab, dtype=torch.float32) / vocab
    for rank, token in enumerate(order):
        logits[token] = 10.0 - rank
    return logits


def top_ids(logits: torch.Tensor) -> np.ndarray:
    """Every token id of ``logits`` (V,), best first: the ``root_topk`` a drafter is given."""
    return logits.argsort(descending=True).numpy()


def ranked_ids(order: list[int], vocab: int = VOCAB) -> np.ndarray:
    return top_ids(ranked_logits(order, vocab))


TOP = [50, 60, 70, 80, 90, 99, 7]  # 50 is the argmax: the root


def logitspec(capacity=64, num_next_next=6, context=CONTEXT, pool=UNIGRAM, **kw):
    config = LogitSpecConfig(pool=pool, draft_tree_capacity=capacity,
                             num_next_next=num_next_next, rank_lengths=SMALL_RANKS,
                             beyond_length=1, **kw)
    drafter = LogitSpecDrafter(config)
    drafter.begin(context, 0)
    return drafter


def spelled(tree: DraftTree) -> list[list[int]]:
    """The tree as the token sequences of its root-to-leaf paths (root excluded)."""
    return [[tree.tokens[i] for i in path[1:]] for path in tree.retrieve_paths()]


def children_of_root(tree: DraftTree) -> list[int]:
    return [tree.tokens[i] for i in range(1, len(tree)) if tree.parents[i] == 0]


# Every chain, by hand, in the order the tree must hang them.
EXPECTED_CHAINS = [
    [1, 2, 3, 4, 5],  # next-token chain: continuation of 50
    [60, 11, 12],  # rank 1: 3 tokens
    [70, 21, 22],  # rank 2: 3 tokens
    [80, 31],  # rank 3: 2 tokens
    [90, 99],  # rank 4: 2 tokens
    [99],  # rank 5: 1 token, and 99 has no continuation anyway
    [7],  # rank 6: absent from the context: the token alone
]


def test_logitspec_tree_by_hand():
    tree = logitspec().draft(50, ranked_ids(TOP), max_depth=100)
    assert tree.tokens[0] == 50
    assert spelled(tree) == EXPECTED_CHAINS
    assert len(tree) == 1 + sum(map(len, EXPECTED_CHAINS))
    assert children_of_root(tree) == [1, 60, 70, 80, 90, 99, 7]  # next token first, then rank


def test_pld_tree_by_hand():
    drafter = PromptLookupDrafter(UNIGRAM, draft_tree_capacity=64)
    drafter.begin(CONTEXT, 0)
    tree = drafter.draft(50, ranked_ids(TOP), max_depth=100)
    assert spelled(tree) == [[1, 2, 3, 4, 5]]
    assert spelled(drafter.draft(80, ranked_ids(TOP), max_depth=100)) == [[31, 32, 90, 99]]
    assert spelled(drafter.draft(7, ranked_ids(TOP), max_depth=100)) == [[]]  # no match
    assert spelled(drafter.draft(50, ranked_ids(TOP), max_depth=2)) == [[1, 2]]


def test_default_rank_lengths():
    config = LogitSpecConfig(draft_tree_capacity=40)
    lengths = [config.chain_length(rank) for rank in range(1, 41)]
    assert lengths == [4] * 8 + [3] * 24 + [1] * 8
    assert config.candidates == 40
    assert LogitSpecConfig(num_next_next=3).candidates == 3


@pytest.mark.parametrize("num_next_next, roots", [(0, [1]), (1, [1, 60]), (3, [1, 60, 70, 80]),
                                                  (6, [1, 60, 70, 80, 90, 99, 7])],
                         ids=["none", "one", "three", "six"])
def test_num_next_next_limits_candidates(num_next_next, roots):
    tree = logitspec(num_next_next=num_next_next).draft(50, ranked_ids(TOP), max_depth=100)
    assert children_of_root(tree) == roots


def test_root_excluded_from_candidates_wherever_it_ranks():
    """The root is skipped by identity: when it is not the argmax (sampling), the argmax
    becomes a next-next candidate and the ranks after the root shift by one."""
    drafter = logitspec(num_next_next=3)
    tree = drafter.draft(60, ranked_ids(TOP), max_depth=100)
    # root 60: next-token chain = continuation of 60; candidates 50 (rank 1), 70, 80
    assert spelled(tree) == [[11, 12, 13, 14, 70], [50, 1, 2], [70, 21, 22], [80, 31]]
    assert 60 not in children_of_root(tree)


def test_next_next_lookup_uses_the_root():
    """The next-next query is context + [root, t]: a bigram (root, t) in the context wins over
    the unigram t."""
    context = [60, 11, 12, 13, 50, 60, 77, 78, 79, 5]
    pool = PoolConfig(max_ngram_size=2, num_pred_tokens=3)
    tree = logitspec(num_next_next=1, context=context, pool=pool).draft(
        50, ranked_ids([50, 60]), max_depth=100)
    # next-token chain: (5, 50) unseen, 50 -> 60 77 78; rank 1: (50, 60) -> 77 78 (3 tokens)
    assert spelled(tree) == [[60, 77, 78]]  # merged: the rank-1 chain [60, 77, 78] is shared
    unmerged = logitspec(num_next_next=1, context=context, pool=pool,
                         merge_prefixes=False).draft(50, ranked_ids([50, 60]), max_depth=100)
    assert spelled(unmerged) == [[60, 77, 78], [60, 77, 78]]


def test_merge_on_and_off():
    context = [50, 60, 11, 12, 13, 14, 70, 21, 22, 23, 9]
    top = [50, 60, 70]
    merged = logitspec(num_next_next=2, context=context).draft(50, ranked_ids(top), 100)
    separate = logitspec(num_next_next=2, context=context, merge_prefixes=False).draft(
        50, ranked_ids(top), 100)
    # next-token chain 60 11 12 13 14; rank 1 is [60, 11, 12]: a prefix of it
    assert spelled(merged) == [[60, 11, 12, 13, 14], [70, 21, 22]]
    assert spelled(separate) == [[60, 11, 12, 13, 14], [60, 11, 12], [70, 21, 22]]
    assert len(separate) == len(merged) + 3


FULL_SIZE = 1 + sum(map(len, EXPECTED_CHAINS))  # 18


@pytest.mark.parametrize("capacity", range(1, FULL_SIZE + 3))
def test_capacity_respected_exactly(capacity):
    full = logitspec(capacity=64).draft(50, ranked_ids(TOP), max_depth=100)
    tree = logitspec(capacity=capacity).draft(50, ranked_ids(TOP), max_depth=100)
    assert len(tree) == min(capacity, FULL_SIZE)
    # the budget cuts the creation order: the tree is a prefix of the uncapped one
    assert tree.tokens == full.tokens[:len(tree)] and tree.parents == full.parents[:len(tree)]


@pytest.mark.parametrize("capacity", [1, 2, 5, 8])
def test_pld_capacity_respected_exactly(capacity):
    drafter = PromptLookupDrafter(PoolConfig(max_ngram_size=1, num_pred_tokens=20), capacity)
    drafter.begin(list(range(30)) + [0], 0)
    tree = drafter.draft(0, ranked_ids([0]), max_depth=100)
    assert len(tree) == capacity and list(tree.tokens) == list(range(capacity))


@pytest.mark.parametrize("max_depth, expected", [
    (0, [[]]),
    (1, [[1], [60], [70], [80], [90], [99], [7]]),
    (2, [[1, 2], [60, 11], [70, 21], [80, 31], [90, 99], [99], [7]]),
    (4, [[1, 2, 3, 4]] + EXPECTED_CHAINS[1:]),
], ids=["depth-0", "depth-1", "depth-2", "depth-4"])
def test_max_depth_respected(max_depth, expected):
    tree = logitspec().draft(50, ranked_ids(TOP), max_depth=max_depth)
    assert max(tree.depths) <= max_depth
    assert spelled(tree) == expected


def test_capacity_one_is_root_only():
    assert len(logitspec(capacity=1).draft(50, ranked_ids(TOP), max_depth=100)) == 1
    drafter = PromptLookupDrafter(UNIGRAM, draft_tree_capacity=1)
    drafter.begin(CONTEXT, 0)
    assert len(drafter.draft(50, ranked_ids(TOP), max_depth=100)) == 1


def test_small_vocabulary():
    """Fewer tokens than candidates (vocabulary 5, capacity 64): each other token once, with
    the default rank lengths (4 tokens for ranks 1-8)."""
    context = [0, 1, 2, 3, 4, 0, 2]
    drafter = LogitSpecDrafter(LogitSpecConfig(pool=UNIGRAM, draft_tree_capacity=64))
    drafter.begin(context, 0)
    tree = drafter.draft(3, ranked_ids([3, 1, 0, 4, 2], vocab=5), max_depth=100)
    # next-token chain 3 -> [4, 0, 2]; rank 1: 1 -> 2 3 4 (cut to 4 tokens); rank 2: 0 -> the
    # full continuation at position 0; rank 3: [4, 0, 2] merges into the first chain;
    # rank 4: 2 -> first occurrence (none full)
    assert spelled(tree) == [[4, 0, 2], [1, 2, 3, 4], [0, 1, 2, 3], [2, 3, 4, 0]]


def test_begin_and_extend_follow_the_context():
    drafter = logitspec()
    drafter.begin(CONTEXT + [50, 7, 7], len(CONTEXT))  # reuses the common prefix
    assert drafter.pool.tokens == CONTEXT + [50, 7, 7]
    drafter.begin(CONTEXT[:5] + [8, 9], 5)  # diverges at 5: the rest is dropped
    assert drafter.pool.tokens == CONTEXT[:5] + [8, 9]
    tree = DraftTree((9,), (-1,), (0,))
    drafter.extend([9, 6], tree, [0])
    assert drafter.pool.tokens[-3:] == [9, 9, 6]
    assert drafter.pool.lookup([8]) == [9, 9, 6]


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: LogitSpecConfig(draft_tree_capacity=0), "draft_tree_capacity must be >= 1"),
        (lambda: LogitSpecConfig(num_next_next=-1), "num_next_next must be >= 0"),
        (lambda: LogitSpecConfig(rank_lengths=((8, 0),)), "chain lengths must be >= 1"),
        (lambda: LogitSpecConfig(beyond_length=0), "chain lengths must be >= 1"),
        (lambda: PoolConfig(max_ngram_size=0), "max_ngram_size must be >= 1"),
        (lambda: PoolConfig(num_pred_tokens=0), "num_pred_tokens must be >= 1"),
        (lambda: PoolConfig(max_continuations=0), "max_continuations must be >= 1"),
        (lambda: PromptLookupDrafter(PoolConfig(), 0), "draft_tree_capacity must be >= 1"),
    ],
    ids=["capacity-0", "negative-candidates", "rank-length-0", "beyond-0", "ngram-0",
         "pred-0", "continuations-0", "pld-capacity-0"],
)
def test_invalid_configs(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


# ---------------------------------------------------------------------------------------------
# Properties


@settings(deadline=None, max_examples=100)
@given(
    context=st.lists(st.integers(0, 7), min_size=1, max_size=40),
    root=st.integers(0, 7),
    scores=st.permutations(range(8)),
    capacity=st.integers(1, 40),
    max_depth=st.integers(0, 12),
    ngram=st.integers(1, 3),
    pred=st.integers(1, 8),
    merge=st.booleans(),
)
def test_num_next_next_zero_equals_pld(context, root, scores, capacity, max_depth, ngram, pred,
                                       merge):
    pool = PoolConfig(max_ngram_size=ngram, num_pred_tokens=pred)
    logits = torch.tensor(scores, dtype=torch.float32)  # no ties
    pld = PromptLookupDrafter(pool, capacity)
    spec = LogitSpecDrafter(LogitSpecConfig(pool=pool, draft_tree_capacity=capacity,
                                            num_next_next=0, merge_prefixes=merge))
    pld.begin(context, 0)
    spec.begin(context, 0)
    assert spec.draft(root, top_ids(logits), max_depth) == pld.draft(root, top_ids(logits), max_depth)


@settings(deadline=None, max_examples=100)
@given(
    context=st.lists(st.integers(0, 9), min_size=1, max_size=40),
    scores=st.permutations(range(10)),
    capacity=st.integers(1, 64),
    max_depth=st.integers(0, 12),
    num_next_next=st.one_of(st.none(), st.integers(0, 12)),
    merge=st.booleans(),
)
def test_logitspec_tree_properties(context, scores, capacity, max_depth, num_next_next, merge):
    logits = torch.tensor(scores, dtype=torch.float32)  # no ties
    root = int(logits.argmax())
    config = LogitSpecConfig(pool=PoolConfig(max_ngram_size=2, num_pred_tokens=6),
                             draft_tree_capacity=capacity, num_next_next=num_next_next,
                             merge_prefixes=merge)
    drafter = LogitSpecDrafter(config)
    drafter.begin(context, 0)
    tree = drafter.draft(root, top_ids(logits), max_depth)
    assert len(tree) <= capacity and max(tree.depths) <= max_depth and tree.tokens[0] == root
    # after the next-token chain's first node, the root's children follow the logit ranking
    ranking = [t for t in logits.argsort(descending=True).tolist() if t != root]
    kids = children_of_root(tree)
    next_chain = drafter.pool.lookup(list(context) + [root], max_tokens=capacity - 1)
    later = kids[1:] if next_chain and kids and kids[0] == next_chain[0] else kids
    positions = [ranking.index(t) for t in later]
    assert positions == sorted(positions)
    assert all(p < config.candidates for p in positions)
