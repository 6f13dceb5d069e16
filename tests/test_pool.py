"""The n-gram pool's policy (logitspec/pool.py docstring), pinned by tables and checked against
a brute-force reference that rescans the whole sequence for every lookup."""

from __future__ import annotations

import itertools
from typing import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.pool import NGramPool


def reference_lookup_all(
    tokens: Sequence[int],
    query: Sequence[int],
    max_ngram_size: int,
    num_pred_tokens: int,
    max_continuations: int = 1,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """The documented policy, computed from scratch.

    Longest suffix of ``query`` (n = max_ngram_size .. 1) that occurs in ``tokens`` with at
    least one following token. Candidates: the first such occurrence and every occurrence whose
    continuation is full; newest first, one per continuation first token, at most
    ``max_continuations``.
    """
    tokens = list(tokens)
    limit = num_pred_tokens if max_tokens is None else min(max_tokens, num_pred_tokens)
    if limit <= 0:
        return []
    last = len(tokens) - 1
    for n in range(min(max_ngram_size, len(query)), 0, -1):
        key = list(query[len(query) - n:])
        ends = [p for p in range(n - 1, last) if tokens[p - n + 1:p + 1] == key]
        if not ends:
            continue
        full = [p for p in ends if p + num_pred_tokens <= last]
        chosen: list[int] = []
        for p in sorted(set(full) | {ends[0]}, reverse=True):
            if all(tokens[q + 1] != tokens[p + 1] for q in chosen):
                chosen.append(p)
        return [tokens[p + 1:p + 1 + limit] for p in chosen[:max_continuations]]
    return []


def pool_of(tokens, max_ngram_size=3, num_pred_tokens=20, max_continuations=1) -> NGramPool:
    pool = NGramPool(max_ngram_size, num_pred_tokens, max_continuations)
    pool.extend(tokens)
    return pool


# ---------------------------------------------------------------------------------------------
# The policy, by hand-worked examples

# (tokens, max_ngram_size, num_pred_tokens, query, max_tokens, expected continuation)
LOOKUP_CASES = {
    "docstring-example": ([5, 6, 7, 5, 6, 8], 2, 2, [9, 5, 6], None, [7, 5]),
    "docstring-after-extend": ([5, 6, 7, 5, 6, 8, 9], 2, 2, [9, 5, 6], None, [8, 9]),
    "first-occurrence-stored": ([1, 2, 1, 3], 1, 3, [1], None, [2, 1, 3]),
    "later-full-replaces": ([1, 2, 1, 3, 4, 5], 1, 3, [1], None, [3, 4, 5]),
    "earliest-when-none-full": ([1, 2, 1, 3], 1, 5, [1], None, [2, 1, 3]),
    "most-recent-full-wins": ([1, 2, 2, 1, 3, 3, 1, 4, 4, 1, 5], 1, 2, [1], None, [4, 4]),
    "trigram-beats-bigram": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [1, 2, 3], None, [9, 9]),
    "other-trigram": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [5, 2, 3], None, [7, 7]),
    "bigram-fallback": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [4, 2, 3], None, [7, 7]),
    "unigram-fallback": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [4, 4, 3], None, [7, 7]),
    "bigram-pool-ignores-trigram": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 2, 2, [1, 2, 3], None,
                                    [7, 7]),
    "no-match": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [4, 4, 4], None, []),
    "query-longer-than-n": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [8, 8, 8, 1, 2, 3], None,
                            [9, 9]),
    "query-shorter-than-n": ([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 7], 3, 2, [5], None, [2, 3]),
    "last-token-has-no-continuation": ([1, 2, 3], 3, 2, [3], None, []),
    "empty-pool": ([], 3, 2, [1], None, []),
    "empty-query": ([1, 2, 3], 3, 2, [], None, []),
    "max-tokens-cap": ([1, 2, 3, 4, 5], 1, 4, [1], 2, [2, 3]),
    "max-tokens-zero": ([1, 2, 3, 4, 5], 1, 4, [1], 0, []),
    "max-tokens-above-pred": ([1, 2, 3, 4, 5], 1, 2, [1], 10, [2, 3]),
    "short-continuation-at-end": ([4, 1, 2], 1, 5, [1], None, [2]),
    "repeated-ones": ([1, 1, 1, 1, 2], 2, 2, [1, 1], None, [1, 2]),
    "repeated-unigram": ([1, 1, 1, 1, 2], 2, 2, [3, 1], None, [1, 2]),
    "repeated-not-full-keeps-first": ([1, 1, 1, 1, 2], 2, 9, [1, 1], None, [1, 1, 2]),
    "pred-1": ([1, 2, 1, 3], 1, 1, [1], None, [3]),
    "pred-64": (list(range(100)) + [0], 2, 64, [7, 0], None, list(range(1, 65))),
    "pred-64-not-full": (list(range(30)) + [0, 5], 1, 64, [0], None, list(range(1, 30)) + [0, 5]),
}


@pytest.mark.parametrize(
    "tokens, max_ngram_size, num_pred_tokens, query, max_tokens, expected",
    list(LOOKUP_CASES.values()), ids=list(LOOKUP_CASES),
)
def test_lookup_table(tokens, max_ngram_size, num_pred_tokens, query, max_tokens, expected):
    pool = pool_of(tokens, max_ngram_size, num_pred_tokens)
    assert pool.lookup(query, max_tokens=max_tokens) == expected
    # the reference agrees with the hand-worked answer too (it is checked, not trusted)
    reference = reference_lookup_all(tokens, query, max_ngram_size, num_pred_tokens,
                                     max_tokens=max_tokens)
    assert (reference[0] if reference else []) == expected


def test_docstring_example_incremental():
    pool = pool_of([5, 6, 7, 5, 6, 8], max_ngram_size=2, num_pred_tokens=2)
    assert pool.lookup([9, 5, 6]) == [7, 5]
    pool.extend([9])
    assert pool.lookup([9, 5, 6]) == [8, 9]
    assert len(pool) == 7


def test_continuation_grows_with_the_sequence():
    """The stored occurrence's continuation is read at lookup time, so it grows."""
    pool = pool_of([3, 1], max_ngram_size=1, num_pred_tokens=4)
    assert pool.lookup([3]) == [1]
    pool.extend([2])
    assert pool.lookup([3]) == [1, 2]
    pool.extend([3, 5, 6])  # 3 again, but position 0 is full first: it stays
    assert pool.lookup([3]) == [1, 2, 3, 5]
    pool.extend([7, 8])  # position 3's continuation [5, 6, 7, 8] is now full: it wins
    assert pool.lookup([3]) == [5, 6, 7, 8]


# (tokens, max_continuations, query, expected lookup_all)
MULTI_CASES = {
    "k2-distinct-first-tokens": ([1, 2, 9, 1, 3, 9, 1, 2, 8, 1, 4], 2, [1], [[2, 8], [3, 9]]),
    "k3-duplicate-dropped": ([1, 2, 9, 1, 3, 9, 1, 2, 8, 1, 4], 3, [1], [[2, 8], [3, 9]]),
    "k1-newest-full": ([1, 2, 9, 1, 3, 9, 1, 2, 8, 1, 4], 1, [1], [[2, 8]]),
    "k3-three-kinds": ([1, 2, 9, 1, 3, 9, 1, 4, 8, 1], 3, [1], [[4, 8], [3, 9], [2, 9]]),
    "k2-oldest-dropped": ([1, 2, 9, 1, 3, 9, 1, 4, 8, 1], 2, [1], [[4, 8], [3, 9]]),
    "k2-only-occurrence-not-full": ([5, 1, 2], 2, [1], [[2]]),
    "k2-two-full": ([1, 2, 1, 3, 4], 2, [1], [[3, 4], [2, 1]]),
    "k2-single-occurrence": ([1, 2, 3], 2, [2], [[3]]),
    "k2-no-match": ([1, 2, 3], 2, [5], []),
}


@pytest.mark.parametrize("tokens, k, query, expected", list(MULTI_CASES.values()),
                         ids=list(MULTI_CASES))
def test_lookup_all_table(tokens, k, query, expected):
    pool = pool_of(tokens, max_ngram_size=1, num_pred_tokens=2, max_continuations=k)
    assert pool.lookup_all(query) == expected
    assert pool.lookup(query) == (expected[0] if expected else [])
    assert reference_lookup_all(tokens, query, 1, 2, k) == expected


def test_truncate():
    tokens = [1, 2, 9, 1, 3, 9, 1, 2, 8]
    pool = pool_of(tokens, max_ngram_size=2, num_pred_tokens=2)
    assert pool.lookup([1]) == [2, 8]  # position 6, the newest full one
    pool.truncate(6)
    assert pool.tokens == tokens[:6] and len(pool) == 6
    fresh = pool_of(tokens[:6], max_ngram_size=2, num_pred_tokens=2)
    for query in itertools.product([1, 2, 3, 9], repeat=2):
        assert pool.lookup(query) == fresh.lookup(query)
    assert pool.lookup([1]) == [3, 9]  # position 6 (continuation [2, 8]) is gone
    pool.truncate(10)  # longer than the pool: nothing happens
    assert pool.tokens == tokens[:6]
    pool.truncate(0)
    assert len(pool) == 0 and pool.lookup([1]) == []


def test_reset():
    pool = pool_of([1, 2, 3])
    pool.reset([4, 5])
    assert pool.tokens == [4, 5] and pool.lookup([1]) == [] and pool.lookup([4]) == [5]


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 20, 1), "max_ngram_size must be >= 1"),
        ((3, 0, 1), "num_pred_tokens must be >= 1"),
        ((3, 20, 0), "max_continuations must be >= 1"),
    ],
    ids=["ngram-0", "pred-0", "continuations-0"],
)
def test_invalid_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        NGramPool(*args)


# ---------------------------------------------------------------------------------------------
# Properties against the reference


def all_queries(alphabet: int, max_len: int) -> list[tuple[int, ...]]:
    """Every sequence over ``range(alphabet + 1)`` (one token never in the pool) up to
    ``max_len`` long."""
    symbols = range(alphabet + 1)
    return [q for n in range(1, max_len + 1) for q in itertools.product(symbols, repeat=n)]


pool_params = st.fixed_dictionaries({
    "max_ngram_size": st.integers(1, 3),
    "num_pred_tokens": st.integers(1, 6),
    "max_continuations": st.integers(1, 3),
})


@settings(deadline=None, max_examples=200)
@given(tokens=st.lists(st.integers(0, 2), max_size=40), params=pool_params,
       max_tokens=st.one_of(st.none(), st.integers(0, 7)))
def test_pool_matches_reference(tokens, params, max_tokens):
    pool = pool_of(tokens, **params)
    for query in all_queries(3, params["max_ngram_size"] + 1):
        expected = reference_lookup_all(tokens, query, **params, max_tokens=max_tokens)
        assert pool.lookup_all(query, max_tokens=max_tokens) == expected, query
        if max_tokens is not None:
            n, first = pool.first_match(query, max_tokens)
            assert first == (expected[0] if expected else [])
            assert n == (pool.match(query)[0] if first else 0)
        # continues(t): t occurs with a token after it; no query ending with any other
        # token matches (the next-next tails rely on it)
        last = query[-1]
        assert pool.continues(last) == bool(reference_lookup_all(tokens, [last], **params))
        assert pool.continues(last) or not expected


@settings(deadline=None, max_examples=200)
@given(tokens=st.lists(st.integers(0, 3), max_size=50), params=pool_params,
       cuts=st.lists(st.integers(0, 50), max_size=8))
def test_chunked_extend_equals_one_extend(tokens, params, cuts):
    whole = pool_of(tokens, **params)
    chunked = NGramPool(**params)
    bounds = sorted({0, len(tokens), *(c for c in cuts if c <= len(tokens))})
    for start, end in zip(bounds, bounds[1:]):
        chunked.extend(tokens[start:end])
        # every intermediate state also matches the reference
        prefix = tokens[:end]
        for query in all_queries(4, 2):
            assert chunked.lookup_all(query) == reference_lookup_all(prefix, query, **params)
    assert chunked.tokens == whole.tokens
    for query in all_queries(4, params["max_ngram_size"]):
        assert chunked.lookup_all(query) == whole.lookup_all(query)


@settings(deadline=None, max_examples=40)
@given(tokens=st.lists(st.integers(0, 2), max_size=30), length=st.integers(0, 35),
       params=pool_params)
def test_truncate_equals_fresh_pool(tokens, length, params):
    pool = pool_of(tokens, **params)
    pool.truncate(length)
    fresh = pool_of(tokens[:length], **params)
    assert pool.tokens == fresh.tokens
    for query in all_queries(3, params["max_ngram_size"]):
        assert pool.lookup_all(query) == fresh.lookup_all(query)


def test_agreement_by_hand():
    pool = NGramPool(3, 4)
    pool.extend([7, 5, 6, 9, 7, 5])
    assert pool.agreement(2, [6], 10) == 3  # 7 5 6 at 0-2 against ... 7 5 | 6
    assert pool.agreement(2, [5, 6], 10) == 2  # the 7 before 5 6 meets a 5
    assert pool.agreement(2, [6], 2) == 2  # the limit
    assert pool.agreement(2, [4], 10) == 0  # the occurrence's own token differs
    assert pool.agreement(5, [], 10) == 6  # the sequence against itself


@settings(deadline=None, max_examples=300)
@given(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=30),
       tail=st.lists(st.integers(0, 2), max_size=3), data=st.data())
def test_agreement_is_the_common_suffix_length(tokens, tail, data):
    pool = pool_of(tokens, 2, 3, 1)
    pos = data.draw(st.integers(0, len(tokens) - 1))
    limit = data.draw(st.integers(0, 40))
    whole, earlier = tokens + tail, tokens[:pos + 1]
    expected = 0
    while (expected < min(limit, len(earlier)) and expected < len(whole)
           and earlier[-1 - expected] == whole[-1 - expected]):
        expected += 1
    assert pool.agreement(pos, tail, limit) == expected
