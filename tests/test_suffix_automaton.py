"""Suffix automata: every answer checked against brute force on small sequences, and the
documented policies (earliest occurrence, separators, the roomier-suffix walk, count ranking)
pinned by tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.suffix_automaton import (
    EMPTY, SEPARATOR, CorpusAutomaton, Match, SuffixAutomaton, SuffixMatcher,
)

sequences = st.lists(st.integers(0, 3), min_size=0, max_size=40)


def occurs(needle: list[int], hay: list[int]) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def earliest_end(needle: list[int], hay: list[int]) -> int:
    n = len(needle)
    return next(i + n for i in range(len(hay) - n + 1) if hay[i:i + n] == needle)


def longest_suffix_in(stream: list[int], hay: list[int]) -> int:
    """Length of the longest suffix of ``stream`` that is a substring of ``hay``."""
    return max(k for k in range(len(stream) + 1) if occurs(stream[len(stream) - k:], hay))


def count(needle: list[int], hay: list[int]) -> int:
    n = len(needle)
    return sum(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def string_of(automaton: SuffixAutomaton, state: int) -> list[int]:
    """The longest string of ``state``: it ends at the state's earliest end position."""
    end = automaton.first_end[state]
    return automaton.tokens[end - automaton.length[state]:end]


# --------------------------------------------------------------------------- brute force


@settings(max_examples=150, deadline=None)
@given(sequences, st.integers(0, 4))
def test_step_after_repeat_is_the_longest_match_and_its_earliest_occurrence(tokens, root):
    automaton = SuffixAutomaton()
    stream = tokens + [root]
    for i, token in enumerate(stream):
        prefix = stream[:i]  # what the automaton holds
        repeat = automaton.repeat()
        assert repeat.length == (longest_suffix_in(prefix, prefix[:-1]) if prefix else 0)
        match = automaton.step(repeat, token)
        want = longest_suffix_in(prefix + [token], prefix)
        assert match.length == want
        if want:
            matched = (prefix + [token])[-want:]
            assert automaton.first_end[match.state] == earliest_end(matched, prefix)
            assert automaton.length[automaton.link[match.state]] < want <= automaton.length[match.state]
        automaton.append(token)


@settings(max_examples=100, deadline=None)
@given(sequences)
def test_states_transitions_and_counts(tokens):
    automaton = SuffixAutomaton(tokens)
    assert automaton.tokens == tokens
    assert automaton.num_states <= max(2 * len(tokens) - 1, 1) + (len(tokens) == 1)
    counts = automaton.occurrence_counts()
    for state in range(1, automaton.num_states):
        string = string_of(automaton, state)
        assert counts[state] == count(string, tokens)
        for token, target in automaton.next[state].items():
            assert string_of(automaton, target)[-automaton.length[state] - 1:] == string + [token]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=4),
       st.lists(st.integers(0, 3), max_size=30))
def test_matcher_tracks_the_longest_suffix_in_the_corpus_never_across_documents(documents, stream):
    corpus = CorpusAutomaton(documents)
    matcher = SuffixMatcher(corpus.automaton)
    for i, token in enumerate(stream):
        peeked = matcher.peek(token)
        matcher.advance([token])
        assert matcher.match == peeked
        want = max(longest_suffix_in(stream[:i + 1], doc) for doc in documents)
        assert matcher.match.length == want
        cont = corpus.automaton.continuation(matcher.match.state, 50)
        assert SEPARATOR not in cont
        if want:
            matched = stream[i + 1 - want:i + 1]
            assert any(occurs(matched + cont, doc) for doc in documents)


# --------------------------------------------------------------------------- policies


def test_docstring_example():
    automaton = SuffixAutomaton([1, 2, 3, 1, 2])
    assert automaton.repeat().length == 2
    match = automaton.step(automaton.repeat(), 3)
    assert match.length == 3 and automaton.continuation(match.state, 5) == [1, 2]
    assert automaton.step(automaton.repeat(), 1).length == 1
    assert automaton.step(automaton.repeat(), 9) == EMPTY
    assert SuffixAutomaton([1, 2, 3]).repeat() == EMPTY
    assert SuffixAutomaton().repeat() == EMPTY


CONTINUATIONS = [
    # (sequence, stream read from the start state, max tokens, expected continuation)
    ([1, 2, 3, 1, 2, 4], [1, 2], 5, [3, 1, 2, 4]),  # earliest occurrence, not the latest
    ([1, 2, 3, 1, 2, 4], [1, 2], 2, [3, 1]),  # cut at max_tokens
    ([1, 2, 3, 1, 2, 4], [2, 4], 5, []),  # at the end: nothing follows
    ([1, 2, SEPARATOR, 1, 2, 5], [1, 2], 5, []),  # stops at a separator
    ([7, 1, 2, SEPARATOR, 9], [1], 5, [2]),
    ([1, 2, 3], [], 5, []),  # the start state has no continuation
]


@pytest.mark.parametrize("sequence,stream,max_tokens,expected", CONTINUATIONS)
def test_continuation_table(sequence, stream, max_tokens, expected):
    automaton = SuffixAutomaton(sequence)
    match = automaton.walk(EMPTY, stream)
    assert match.length == len(stream)
    assert automaton.continuation(match.state, max_tokens) == expected


ROOMIER = [
    # (sequence, root, needed, expected match length of the walk's end, its continuation[:4])
    ([2, 3, 7, 8, 8, 8, 8, 0, 2, 3, 5, 0, 2], 3, 3, 10, [5, 0, 2]),  # room 3 is enough
    ([2, 3, 7, 8, 8, 8, 8, 0, 2, 3, 5, 0, 2], 3, 4, 2, [7, 8, 8, 8]),  # shorter suffix [2, 3]
    ([5, 1, 2, 6, 1, 2], 6, 40, 4, [1, 2]),  # link is the start state: the walk stops
]


@pytest.mark.parametrize("sequence,root,needed,length,continuation", ROOMIER)
def test_roomier_suffix_table(sequence, root, needed, length, continuation):
    automaton = SuffixAutomaton(sequence)
    state = automaton.roomier_suffix(automaton.step(automaton.repeat(), root).state, needed)
    assert automaton.length[state] == length
    assert automaton.continuation(state, 4) == continuation


def test_roomier_suffix_of_the_start_state_is_the_start_state():
    assert SuffixAutomaton([1, 2]).roomier_suffix(0, 10) == 0


def test_corpus_next_counts_rank_by_frequency_then_token():
    corpus = CorpusAutomaton([[1, 2, 3], [1, 2, 4], [1, 2, 4], [5, 2]])
    match = corpus.automaton.walk(EMPTY, [1, 2])
    assert corpus.next_counts(match.state) == [(4, 2), (3, 1)]
    assert corpus.next_counts(match.state, k=1) == [(4, 2)]
    state_2 = corpus.automaton.walk(EMPTY, [2]).state
    assert corpus.next_counts(state_2) == [(4, 2), (3, 1)]  # the separator after [5, 2] is no token
    assert corpus.automaton.continuation(match.state, 5) == [3]
    tie = CorpusAutomaton([[1, 9], [1, 3]])
    assert tie.next_counts(tie.automaton.walk(EMPTY, [1]).state) == [(3, 1), (9, 1)]


def test_corpus_documents_never_join():
    corpus = CorpusAutomaton([[1, 2], [3, 4]])
    assert corpus.automaton.walk(EMPTY, [2, 3]).length == 1
    assert len(corpus) == 5  # four tokens and one separator


def test_matcher_reset():
    matcher = SuffixMatcher(SuffixAutomaton([1, 2, 3]))
    matcher.advance([1, 2])
    assert matcher.match.length == 2
    matcher.reset()
    assert matcher.match == Match(0, 0)
