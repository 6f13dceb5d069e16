"""The n-gram pool: where retrieval-based drafters look up continuations.

The pool indexes a growing token sequence (prompt + accepted output). For every ``n`` in
``1..max_ngram_size`` it maps each n-gram to one or a few of its occurrences (the position of
the n-gram's last token); an occurrence's *continuation* is the up to ``num_pred_tokens`` tokens
that follow it in the sequence, read at lookup time (so it grows as the sequence grows).

Which occurrence wins (``max_continuations = 1``, the reference policy): an n-gram is stored at
its first occurrence that has at least one following token; a later occurrence replaces the
stored one as soon as its continuation is full (``num_pred_tokens`` long). In words: the most
recent occurrence with a full continuation, else the earliest one (whose continuation is the
longest). With ``max_continuations = k > 1`` the pool keeps the ``k`` most recent winners with
pairwise different continuations' first tokens, newest first (see :meth:`NGramPool.lookup_all`).

Worked example, ``max_ngram_size = 2``, ``num_pred_tokens = 2``::

    tokens  = [5, 6, 7, 5, 6, 8]   (positions 0..5)
    (5, 6) first occurs ending at 1 (continuation [7, 5], full)
           again ending at 4 (continuation [8], not full): position 1 stays
    lookup([9, 5, 6]) -> [7, 5]         (longest suffix first: (5, 6) matches)
    extend([9])       -> position 4's continuation [8, 9] is full: (5, 6) now -> [8, 9]

Updates are incremental: appending ``m`` tokens touches ``O((m + num_pred_tokens) *
max_ngram_size)`` entries; nothing is ever rebuilt except by :meth:`NGramPool.truncate`.
"""

from __future__ import annotations

from itertools import chain
from typing import Sequence


class NGramPool:
    """n-gram -> occurrence index over ``self.tokens``; see the module docstring."""

    def __init__(
        self, max_ngram_size: int = 3, num_pred_tokens: int = 20, max_continuations: int = 1
    ) -> None:
        if max_ngram_size < 1:
            raise ValueError(f"max_ngram_size must be >= 1, got {max_ngram_size}")
        if num_pred_tokens < 1:
            raise ValueError(f"num_pred_tokens must be >= 1, got {num_pred_tokens}")
        if max_continuations < 1:
            raise ValueError(f"max_continuations must be >= 1, got {max_continuations}")
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens
        self.max_continuations = max_continuations
        self.tokens: list[int] = []
        # n-gram -> occurrence end positions, newest first (at most max_continuations)
        self._index: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def reset(self, tokens: Sequence[int] = ()) -> None:
        self.tokens = []
        self._index = {}
        self.extend(tokens)

    def truncate(self, length: int) -> None:
        """Keeps only ``tokens[:length]`` (re-indexes them: stored occurrences may be lost)."""
        if length < len(self.tokens):
            self.reset(self.tokens[:length])

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Appends tokens and updates the index (incremental)."""
        tokens = self.tokens
        start = len(tokens)
        tokens.extend(map(int, new_tokens))
        last = len(tokens) - 1
        pred = self.num_pred_tokens
        # Positions whose continuation just became full (and were seen before), in order,
        # then those whose continuation appears (>= start - 1); a position's continuation is
        # full when pos + pred <= last.
        seen = max(0, start - 1)
        index, get, size = self._index, self._index.get, self.max_ngram_size
        single = self.max_continuations == 1
        became_full = range(max(0, start - pred), min(last + 1 - pred, seen))
        for pos in chain(became_full, range(seen, last)):
            full = pos + pred <= last
            for first in range(pos, max(pos - size, -1), -1):  # the n-grams ending at pos
                key = tuple(tokens[first:pos + 1])
                stored = get(key)
                if stored is None:
                    index[key] = [pos]
                elif full and stored[0] < pos:
                    if single:
                        stored[0] = pos
                    else:
                        self._promote(stored, pos)

    def _promote(self, stored: list[int], pos: int) -> None:
        """Makes ``pos`` the newest winner, keeping older ones with other first tokens
        (``max_continuations > 1``; with one, :meth:`extend` replaces the winner itself)."""
        first = self.tokens[pos + 1]
        kept = [p for p in stored if self.tokens[p + 1] != first]
        stored[:] = ([pos] + kept)[: self.max_continuations]

    def lookup(self, query: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """The continuation of the longest suffix of ``query`` (n = max_ngram_size .. 1) found
        in the pool; [] when no suffix is found. At most ``max_tokens`` tokens."""
        found = self.lookup_all(query, max_tokens)
        return found[0] if found else []

    def lookup_all(self, query: Sequence[int], max_tokens: int | None = None) -> list[list[int]]:
        """All stored continuations (newest first) of the longest matching suffix of ``query``."""
        return self.match(query, max_tokens)[1]

    def match(self, query: Sequence[int], max_tokens: int | None = None) -> tuple[int, list[list[int]]]:
        """``(n, continuations)``: the order ``n`` of the longest suffix of ``query`` found
        (0 when none) and its stored continuations, newest first, at most ``max_tokens`` long."""
        limit = self.num_pred_tokens if max_tokens is None else min(max_tokens, self.num_pred_tokens)
        if limit <= 0:
            return 0, []
        n, stored = self.occurrences(query)
        tokens = self.tokens
        return n, [tokens[p + 1:p + 1 + limit] for p in stored]

    def continues(self, token: int) -> bool:
        """Whether ``token`` occurs followed by another token: else no query ending with it
        matches (:meth:`occurrences` finds nothing)."""
        return (token,) in self._index

    def first_match(self, query: Sequence[int], max_tokens: int) -> tuple[int, list[int]]:
        """``(n, continuation)``: :meth:`match` with only its newest continuation (``(0, [])``
        when nothing matched or ``max_tokens`` is 0)."""
        limit = min(max_tokens, self.num_pred_tokens)
        n, stored = self.occurrences(query) if limit > 0 else (0, [])
        if not stored:
            return 0, []
        return n, self.tokens[stored[0] + 1:stored[0] + 1 + limit]

    def occurrences(self, query: Sequence[int]) -> tuple[int, list[int]]:
        """``(n, positions)``: the order of the longest suffix of ``query`` found (0 when none)
        and where its stored occurrences end, newest first (the list is the pool's own)."""
        index, size = self._index, len(query)
        for n in range(min(self.max_ngram_size, size), 0, -1):
            stored = index.get(tuple(query[size - n:]))
            if stored is not None:
                return n, stored
        return 0, []

    def agreement(self, pos: int, tail: Sequence[int], limit: int) -> int:
        """How many tokens of ``tokens + tail``, read backwards, equal the sequence ending at
        ``pos`` read backwards (at most ``limit``): the length of the match that the stored
        occurrence ``pos`` of a query ending with ``tail`` really has. Example: tokens
        ``[7, 5, 6, 9, 7, 5]``, tail ``[6]``, pos 2 -> 3 (``7, 5, 6`` at 0-2)."""
        tokens = self.tokens
        limit = min(limit, pos + 1)
        length = 0
        for token in reversed(tail):
            if length == limit or tokens[pos - length] != token:
                return length
            length += 1
        last = len(tokens) + len(tail) - 1  # index of tail[-1] in tokens + tail
        while length < limit and tokens[pos - length] == tokens[last - length]:
            length += 1
        return length
