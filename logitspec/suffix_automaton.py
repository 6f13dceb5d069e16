"""Suffix automata over token sequences: exact longest suffix matches and their continuations.

A suffix automaton (Blumer et al., 1985) of a sequence ``s`` is the smallest automaton that
accepts every suffix of ``s``; each *state* is a class of substrings with the same set of end
positions, and reading a substring from the start state ends in its class. Built online, one
token at a time, in amortized O(1) per token (at most ``2n - 1`` states, ``3n - 4``
transitions). SAM-Decoding (Hu et al., ACL 2025) uses it as a retrieval index: the automaton
of the context finds the longest suffix of ``context + [root]`` that occurred before, and the
tokens that followed that earlier occurrence are the draft.

Terms used here:

- ``length[v]``: the longest substring of state ``v``; ``link[v]``: the state of the longest
  suffix of ``v``'s strings that lies in another class (the suffix link);
- ``first_end[v]``: where the *earliest* occurrence of ``v``'s strings ends (an exclusive
  index into the sequence); the continuation of ``v`` is ``tokens[first_end[v]:]``;
- a :class:`Match` ``(state, length)``: the last ``length`` tokens read, a substring of the
  indexed sequence, in class ``state`` (``length[link[state]] < length <= length[state]``).

Policies:

- Matching: :meth:`SuffixAutomaton.step` extends a match by one token, falling back along
  suffix links to the longest suffix that can be extended; a token never seen gives the empty
  match ``(0, 0)``. Lengths grow by at most one per token, so a run of steps is amortized O(1).
- Continuations come from the earliest occurrence (``first_end``), as in the public
  SAM-Decoding code; they stop at :data:`SEPARATOR` (a document boundary of a corpus).
- :meth:`SuffixAutomaton.repeat` is the longest suffix of the whole sequence that also ends
  earlier: the state behind the suffix link of the last state, kept up to date by the
  construction itself, so a context's match state needs no bookkeeping of its own.

Example: the sequence ``[1, 2, 3, 1, 2]``; its longest repeated suffix is ``[1, 2]`` (also at
0-1). With root ``3`` the match grows to ``[1, 2, 3]`` (length 3), whose earliest occurrence
ends at index 3: the continuation is ``[1, 2]``.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

SEPARATOR = -1  # between the documents of a corpus: matches never cross it, drafts stop at it


class Match(NamedTuple):
    """A matched suffix: its automaton state and its length in tokens (``(0, 0)``: none)."""

    state: int
    length: int


EMPTY = Match(0, 0)


class SuffixAutomaton:
    """The suffix automaton of ``tokens``, extended online (module docstring).

    State 0 is the start state (the empty string). Parallel lists indexed by state:
    ``next`` (token -> state), ``link``, ``length``, ``first_end``; ``cloned[v]`` marks the
    states made by splitting a class (they add no end position of their own).
    """

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [0]
        self.cloned: list[bool] = [False]
        self.last = 0
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_states(self) -> int:
        return len(self.length)

    def extend(self, tokens: Iterable[int]) -> None:
        """Appends ``tokens``, one :meth:`append` each."""
        for token in tokens:
            self.append(int(token))

    def append(self, token: int) -> None:
        """Appends one token: a new state for the whole sequence, transitions into it from
        every suffix state that lacked ``token``, and a clone when a class must split."""
        nxt, link, length = self.next, self.link, self.length
        self.tokens.append(token)
        cur = self._new_state(length[self.last] + 1, len(self.tokens), {}, cloned=False)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p == -1:
            link[cur] = 0
        else:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = self._new_state(length[p] + 1, self.first_end[q], dict(nxt[q]), cloned=True)
                link[clone] = link[q]
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur

    def _new_state(self, length: int, first_end: int, transitions: dict[int, int], *, cloned: bool) -> int:
        self.next.append(transitions)
        self.link.append(-1)
        self.length.append(length)
        self.first_end.append(first_end)
        self.cloned.append(cloned)
        return len(self.length) - 1

    def repeat(self) -> Match:
        """The longest suffix of the sequence that also ends earlier in it (module docstring).
        Example: ``[1, 2, 3, 1, 2]`` -> length 2 (``[1, 2]``); ``[1, 2, 3]`` -> ``(0, 0)``."""
        state = self.link[self.last] if self.last else 0
        return Match(state, self.length[state])

    def step(self, match: Match, token: int) -> Match:
        """``match`` extended by ``token``: the longest suffix of ``matched + [token]`` that is
        a substring of the sequence. Example: in ``[1, 2, 3, 1, 2]``, the match ``[1, 2]``
        stepped by 3 -> ``[1, 2, 3]`` (length 3); stepped by 1 -> ``[1]`` (length 1: neither
        ``[1, 2, 1]`` nor ``[2, 1]`` occurs); stepped by 9 -> ``(0, 0)``."""
        state, size = match
        nxt, link = self.next, self.link
        while state and token not in nxt[state]:
            state = link[state]
            size = self.length[state]
        target = nxt[state].get(token)
        if target is None:
            return EMPTY
        return Match(target, size + 1)

    def walk(self, match: Match, tokens: Iterable[int]) -> Match:
        """``match`` stepped by each of ``tokens`` in turn."""
        for token in tokens:
            match = self.step(match, int(token))
        return match

    def continuation(self, state: int, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens after the earliest occurrence of ``state``'s strings,
        cut before the first :data:`SEPARATOR`. The start state has none."""
        if state == 0 or max_tokens <= 0:
            return []
        start = self.first_end[state]
        tokens = self.tokens[start:start + max_tokens]
        if SEPARATOR in tokens:
            tokens = tokens[: tokens.index(SEPARATOR)]
        return tokens

    def room(self, state: int) -> int:
        """How many tokens follow the earliest occurrence of ``state``'s strings."""
        return len(self.tokens) - self.first_end[state] if state else 0

    def roomier_suffix(self, state: int, needed: int) -> int:
        """The public code's draft position for the context automaton: from ``state``, follow
        suffix links (shorter suffixes, whose earliest occurrences end no later) while fewer
        than ``needed`` tokens follow the earliest occurrence; the walk ends at a state whose
        suffix link is the start state (the match never shrinks to nothing).

        Example: in ``[2, 3, 7, 8, 8, 8, 8, 0, 2, 3, 5, 0, 2]`` with root 3, the match
        ``[0, 2, 3]`` ends first at index 10, followed by 3 tokens (``[5, 0, 2]``). With
        ``needed`` 4 the walk moves to the class of ``[2, 3]``, first ending at index 2 with
        11 tokens after it, whose continuation is ``[7, 8, 8, 8, ...]``.
        """
        link = self.link
        while state and link[state] and self.room(state) < needed:
            state = link[state]
        return state

    def occurrence_counts(self) -> list[int]:
        """Each state's number of end positions (how often its strings occur), computed in
        one pass over the states in decreasing ``length``: O(states). The start state counts
        every position plus one (the empty string ends everywhere)."""
        counts = [0 if cloned else 1 for cloned in self.cloned]
        order = sorted(range(1, self.num_states), key=self.length.__getitem__, reverse=True)
        for state in order:
            counts[self.link[state]] += counts[state]
        counts[0] += 1
        return counts


class CorpusAutomaton:
    """A static suffix automaton over a corpus of documents (built once, never extended),
    with occurrence counts for frequency-ranked continuations.

    Documents are joined with :data:`SEPARATOR`, so no match spans two documents and no
    continuation runs into the next one. Example: documents ``[[1, 2, 3], [1, 2, 4]]``: the
    match ``[1, 2]`` occurs twice; its continuation is ``[3]`` (the earliest), and
    :meth:`next_counts` ranks ``3`` and ``4`` at one occurrence each.
    """

    def __init__(self, documents: Iterable[Sequence[int]]) -> None:
        self.automaton = SuffixAutomaton()
        for document in documents:
            if self.automaton.tokens:
                self.automaton.append(SEPARATOR)
            self.automaton.extend(document)
        self.counts = self.automaton.occurrence_counts()

    def __len__(self) -> int:
        return len(self.automaton)

    def next_counts(self, state: int, k: int | None = None) -> list[tuple[int, int]]:
        """The tokens that follow ``state``'s strings in the corpus, with how often they do,
        most frequent first, ties by smaller token id; at most ``k`` (all when ``None``)."""
        pairs = [(token, self.counts[target]) for token, target in self.automaton.next[state].items()
                 if token != SEPARATOR]
        pairs.sort(key=lambda pair: (-pair[1], pair[0]))
        return pairs if k is None else pairs[:k]


class SuffixMatcher:
    """A match state carried along a token stream against a fixed automaton (the corpus's):
    :meth:`advance` with every token that joins the stream, :meth:`peek` for one more token
    without moving. Amortized O(1) per token (lengths grow by at most one per step)."""

    def __init__(self, automaton: SuffixAutomaton) -> None:
        self.automaton = automaton
        self.match = EMPTY

    def reset(self) -> None:
        self.match = EMPTY

    def advance(self, tokens: Iterable[int]) -> None:
        self.match = self.automaton.walk(self.match, tokens)

    def peek(self, token: int) -> Match:
        return self.automaton.step(self.match, token)
