"""The n-gram automaton's policies (logitspec/automaton.py docstring): windows and counts,
least-recently-used eviction of leaves, the exact suffix state, best-first continuations.
Pinned by tables and checked against a brute-force reference that recomputes everything."""

from __future__ import annotations

from typing import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitspec.automaton import Continuation, NGramAutomaton


def automaton_of(context: Sequence[int], max_ngram: int = 3, max_nodes: int = 1000) -> NGramAutomaton:
    automaton = NGramAutomaton(max_ngram, max_nodes)
    automaton.resume(context, 0)
    return automaton


# --------------------------------------------------------------------------- brute force


class ReferenceTrie:
    """The documented policy computed naively: strings with counts and last-use times; using a
    node uses its ancestors after it; the least recently used node is evicted."""

    def __init__(self, max_ngram: int, max_nodes: int) -> None:
        self.n, self.max_nodes = max_ngram, max_nodes
        self.count: dict[tuple[int, ...], int] = {}
        self.used: dict[tuple[int, ...], int] = {}
        self.created: dict[tuple[int, ...], int] = {}
        self.clock = 0
        self.context: list[int] = []

    def touch(self, path: tuple[int, ...]) -> None:
        for d in range(len(path), 0, -1):
            self.clock += 1
            self.used[path[:d]] = self.clock

    def insert(self, window: tuple[int, ...]) -> None:
        existing = 0
        while existing < len(window) and window[:existing + 1] in self.count:
            existing += 1
        self.touch(window[:existing])
        for d in range(existing + 1, len(window) + 1):
            if len(self.count) + 1 >= self.max_nodes:
                victim = min(self.used, key=self.used.get)
                assert not any(p[:-1] == victim for p in self.count)
                del self.count[victim], self.used[victim], self.created[victim]
            self.count[window[:d]] = 0
            self.clock += 1
            self.used[window[:d]] = self.created[window[:d]] = self.clock
        for d in range(1, len(window) + 1):
            self.count[window[:d]] += 1
        self.touch(window)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.context.append(token)
            if len(self.context) >= self.n:
                self.insert(tuple(self.context[-self.n:]))

    def matched(self) -> list[int]:
        return [m for m in range(self.n - 1, 0, -1)
                if len(self.context) >= m and tuple(self.context[-m:]) in self.count]

    def continuations(self, token: int, limit: int, min_match: int = 1) -> list[tuple]:
        """(path after the root, count, parent count, match), chosen one at a time: the best
        candidate whose parent is the root or already chosen, by (-count, depth, -match, the
        parent's place in the output, creation time). Borders are used, longest first."""
        n = len(self.context)
        borders = [tuple(self.context[n - m:]) + (token,) for m in range(self.n - 2, min_match - 1, -1)
                   if n >= m and tuple(self.context[n - m:]) + (token,) in self.count]
        for border in borders:
            self.touch(border)
        chosen: list[tuple] = []  # (border, full path)
        while len(chosen) < limit:
            options = []
            for border in borders:
                for path in self.count:
                    if len(path) <= len(border) or path[:len(border)] != border:
                        continue
                    if (border, path) in chosen:
                        continue
                    parent = path[:-1]
                    place = -1 if parent == border else next(
                        (i for i, c in enumerate(chosen) if c == (border, parent)), None)
                    if place is None:
                        continue
                    key = (-self.count[path], len(path) - len(border), -(len(border) - 1), place,
                           self.created[path])
                    options.append((key, border, path))
            if not options:
                break
            _, border, path = min(options)
            chosen.append((border, path))
        return [(path[len(border):], self.count[path], self.count[path[:-1]], len(border) - 1)
                for border, path in chosen]


def tails(items: list[Continuation]) -> list[tuple]:
    """Each continuation's path after the root, rebuilt from the parent indices."""
    paths: list[tuple[int, ...]] = []
    for item in items:
        assert -1 <= item.parent < len(paths)
        prefix = paths[item.parent] if item.parent >= 0 else ()
        assert len(prefix) + 1 == item.depth
        paths.append(prefix + (item.token,))
    return [(p, i.count, i.parent_count, i.match) for p, i in zip(paths, items)]


# --------------------------------------------------------------------------- windows and counts

COUNT_CASES = [
    # (context, max_ngram, path, expected count)
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [1], 2),
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [1, 2], 2),
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [1, 2, 3], 1),
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [2], 2),  # 231, 241; the last 2 starts no whole window yet
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [4, 1, 2], 1),
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [1, 2, 1], 0),
    ([1, 2], 3, [1], 0),  # shorter than a window: nothing inserted
    ([5, 5, 5, 5, 5], 2, [5], 4),
    ([5, 5, 5, 5, 5], 2, [5, 5], 4),
]


@pytest.mark.parametrize("context,max_ngram,path,expected", COUNT_CASES)
def test_counts_are_windows_starting_with_the_path(context, max_ngram, path, expected):
    assert automaton_of(context, max_ngram).count(path) == expected


def test_the_trie_outlives_a_new_context_and_resume_inserts_only_new_windows():
    automaton = automaton_of([1, 2, 3, 4])
    automaton.resume([7, 1, 2, 3], 0)  # a new question: 123 counted again, 712 new
    assert automaton.count([1, 2, 3]) == 2 and automaton.count([7, 1, 2]) == 1
    automaton.resume([7, 1, 2, 3, 9, 9], 4)  # a follow-up turn: windows ending at 4 and 5 only
    assert automaton.count([1, 2, 3]) == 2 and automaton.count([2, 3, 9]) == 1
    assert automaton.count([3, 9, 9]) == 1 and automaton.count([7, 1, 2]) == 1


def test_extend_token_by_token_equals_one_call():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]
    whole = automaton_of(tokens, 4, 30)
    pieces = automaton_of(tokens[:5], 4, 30)
    for i in range(5, len(tokens), 3):
        pieces.extend(tokens[i:i + 3])
    assert whole.paths() == pieces.paths() and whole.matched_lengths() == pieces.matched_lengths()


# --------------------------------------------------------------------------- eviction


def test_eviction_removes_the_least_recently_used_leaf():
    automaton = automaton_of([1, 2, 3], max_ngram=3, max_nodes=7)  # root + 1, 12, 123
    automaton.extend([4])  # + 2, 23, 234: full
    assert sorted(automaton.paths()) == [(), (1,), (1, 2), (1, 2, 3), (2,), (2, 3), (2, 3, 4)]
    automaton.extend([5])  # 345 needs 3 nodes: 123, then 12, then 1 are the oldest
    assert sorted(automaton.paths()) == [(), (2,), (2, 3), (2, 3, 4), (3,), (3, 4), (3, 4, 5)]


@pytest.mark.parametrize("used,survivors", [
    (True, [(), (1,), (1, 2), (2,), (9,), (9, 1), (9, 1, 8)]),
    (False, [(), (2,), (2, 3), (2, 3, 4), (9,), (9, 1), (9, 1, 8)]),
])
def test_a_used_border_survives_eviction(used, survivors):
    automaton = automaton_of([1, 2, 3, 4], max_ngram=3, max_nodes=7)  # 123 and 234: full
    automaton.resume([9, 1], 0)  # a new context that ends with 1
    if used:
        list(automaton.continuations(2, 5))  # border 12: 12 and 1 become the most recent
    automaton.extend([8])  # window 918 needs three nodes
    assert sorted(automaton.paths()) == survivors


def test_parameters_are_validated():
    with pytest.raises(ValueError):
        NGramAutomaton(1, 100)
    with pytest.raises(ValueError):
        NGramAutomaton(10, 10)
    with pytest.raises(ValueError):
        automaton_of([1, 2, 3]).borders(2, min_match=-1)


# --------------------------------------------------------------------------- state and borders

STATE_CASES = [
    # (context, max_ngram, matched suffix lengths, longest first)
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, [2, 1]),
    ([1, 2, 3, 1, 2, 4, 1, 2, 9], 3, []),
    ([1, 2, 3, 4, 5, 1, 2, 3], 4, [3, 2, 1]),
    ([1, 2, 3, 4, 5, 2, 3], 4, [2, 1]),
    # periodic text: 'a b a b' matches itself through the window just inserted
    ([1, 2, 1, 2], 4, [2]),
    ([1, 2, 1, 2, 1], 4, [3, 2, 1]),
]


@pytest.mark.parametrize("context,max_ngram,expected", STATE_CASES)
def test_state_lists_every_held_suffix(context, max_ngram, expected):
    assert automaton_of(context, max_ngram).matched_lengths() == expected


BORDER_CASES = [
    # (context, max_ngram, token, min_match, [(border path, match)])
    ([1, 2, 3, 4, 5, 1, 2, 3], 5, 4, 1, [((1, 2, 3, 4), 3), ((2, 3, 4), 2), ((3, 4), 1)]),
    ([1, 2, 3, 4, 5, 1, 2, 3], 5, 4, 3, [((1, 2, 3, 4), 3)]),
    ([1, 2, 3, 4, 5, 1, 2, 3], 5, 4, 0, [((1, 2, 3, 4), 3), ((2, 3, 4), 2), ((3, 4), 1), ((4,), 0)]),
    ([1, 2, 3, 4, 5, 1, 2, 3], 5, 9, 0, []),
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, 3, 1, [((2, 3), 1)]),  # the docstring's example
]


@pytest.mark.parametrize("context,max_ngram,token,min_match,expected", BORDER_CASES)
def test_borders_are_matched_suffixes_continued_by_the_token(context, max_ngram, token, min_match, expected):
    automaton = automaton_of(context, max_ngram)
    found = [(automaton._path_of(node), m) for node, m in automaton.borders(token, min_match)]
    assert found == expected


# --------------------------------------------------------------------------- continuations

CONTINUATION_CASES = [
    # (context, max_ngram, token, limit, [(path after the root, count, parent count, match)])
    ("docstring", [1, 2, 3, 1, 2, 4, 1, 2], 3, 3, 5, [((1,), 1, 1, 1)]),
    ("count-first", [7, 1, 5, 7, 1, 5, 7, 1, 6, 0, 0, 9, 1], 3, 5, 5,
     # borders: 9 1 5 (none), 1 5: 1 5 7 twice
     [((7,), 2, 2, 1)]),
    ("shallow-before-deep", [4, 1, 2, 3, 0, 4, 1, 2, 5, 0, 4, 1], 4, 2, 10,
     # state 4 1 (2), 1 (1); borders 4 1 2 (match 2) and 1 2 (match 1)
     # under 412: 3 and 5 (count 1); under 12: 3 and 5 then 30, 50
     [((3,), 1, 2, 2), ((5,), 1, 2, 2), ((3,), 1, 2, 1), ((5,), 1, 2, 1),
      ((3, 0), 1, 1, 1), ((5, 0), 1, 1, 1)]),
    ("limit", [4, 1, 2, 3, 0, 4, 1, 2, 5, 0, 4, 1], 4, 2, 3,
     [((3,), 1, 2, 2), ((5,), 1, 2, 2), ((3,), 1, 2, 1)]),
    ("no-border", [1, 2, 3, 4], 3, 7, 5, []),
]


@pytest.mark.parametrize("name,context,max_ngram,token,limit,expected", CONTINUATION_CASES,
                         ids=[c[0] for c in CONTINUATION_CASES])
def test_continuations_table(name, context, max_ngram, token, limit, expected):
    assert tails(list(automaton_of(context, max_ngram).continuations(token, limit))) == expected


def test_continuations_are_prefix_closed_and_never_outrank_their_parent():
    context = [1, 2, 3, 1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 6, 1, 2, 3, 1, 2]
    items = list(automaton_of(context, 5).continuations(3, 50))
    assert items and all(i.parent < n for n, i in enumerate(items))
    for item in items:
        if item.parent >= 0:
            assert items[item.parent].count >= item.count == item.count
            assert items[item.parent].count == item.parent_count


# --------------------------------------------------------------------------- against brute force


@st.composite
def scenarios(draw):
    max_ngram = draw(st.integers(2, 5))
    max_nodes = draw(st.integers(max_ngram + 1, 40))
    vocab = draw(st.integers(1, 5))
    contexts = draw(st.lists(st.lists(st.integers(0, vocab), max_size=30), min_size=1, max_size=3))
    probes = draw(st.lists(st.tuples(st.integers(0, vocab), st.integers(1, 12)), min_size=1, max_size=4))
    return max_ngram, max_nodes, contexts, probes


@settings(max_examples=200, deadline=None)
@given(s=scenarios())
def test_matches_the_brute_force_reference(s):
    max_ngram, max_nodes, contexts, probes = s
    automaton, reference = NGramAutomaton(max_ngram, max_nodes), ReferenceTrie(max_ngram, max_nodes)
    for context in contexts:
        half = len(context) // 2
        automaton.resume(context[:half], 0)
        reference.context = []
        reference.extend(context[:half])
        automaton.extend(context[half:])
        reference.extend(context[half:])
        for token, limit in probes:
            assert automaton.matched_lengths() == reference.matched()
            assert tails(list(automaton.continuations(token, limit))) == reference.continuations(token, limit)
        assert sorted(automaton.paths()) == sorted([()] + list(reference.count))
        for path, count in reference.count.items():
            assert automaton.count(path) == count
        assert len(automaton) <= max_nodes
