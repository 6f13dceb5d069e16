"""Depth-limited suffix trees with occurrence counts: SuffixDecoding's index (arXiv 2411.04975).

A :class:`SuffixTree` indexes token sequences (several, each appended to incrementally, the
oldest removable). Every suffix of every sequence is kept up to ``max_depth`` tokens, so the
tree holds every substring of at most ``max_depth`` tokens, and each node carries its
*count*: how many times its string occurs in the indexed sequences (start positions).

Speculation from a matched string ``s`` (a node, or a point inside a tail) scores a
continuation ``p`` by its empirical probability ``count(s + p) / count(s)``: the child
probability is the parent probability times ``child count / parent count``, and the product
telescopes. Candidates below ``min_token_prob`` are pruned; the rest are taken best first
(:meth:`SuffixTree.speculate`), as a tree or, in chain mode, along the most frequent child.

Worked example, one sequence ``[1, 2, 3, 1, 2, 4, 1, 2]``, ``max_depth = 3``::

    count([1, 2]) = 3  (positions 0, 3, 6; the last one has no continuation yet)
    children of [1, 2]: 3 (count 1), 4 (count 1)
    speculate from [1, 2], min_token_prob 0.1, 4 tokens, tree mode:
        3 (1/3), 4 (1/3), then [1, 2, 3] + 1 is deeper than max_depth -> drafts 3 and 4,
        score 2/3; siblings of equal count in the order they first occurred

Representation: a node exists for every string that occurs at least twice or ends a suffix
that has a sibling branch; the unique tail of an occurrence (a chain of count-1 strings) is
one :class:`_Tail` that reads its tokens from the sequence itself, so a sequence's own
suffixes that are unique cost nothing as the sequence grows. Appending a token visits the
growing sequence's suffixes that end at a node ("loci", at most ``max_depth``): the cost per
token is bounded by ``max_depth``, in practice by the longest repeated suffix, and never by
the sequence length. A tail is split into a node when a second occurrence enters it.

Positions (``(node, k, source, start)``, see :meth:`SuffixTree.advance`) locate a matched
string: at ``node`` when ``k == 0``, else ``k`` tokens below it along the occurrence whose
tokens are ``source[start:]``. A split may insert nodes below ``node`` later; positions are
re-resolved on use, so they stay valid until a sequence is removed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable, Sequence


class _Tail:
    """The unique rest of one occurrence: tokens ``seq[pos:min(len(seq), cap)]``, each a
    string of count 1. ``cap`` is the occurrence's start + ``max_depth``."""

    __slots__ = ("seq", "pos", "cap")
    count = 1

    def __init__(self, seq: list[int], pos: int, cap: int) -> None:
        self.seq, self.pos, self.cap = seq, pos, cap

    @property
    def end(self) -> int:
        return min(len(self.seq), self.cap)


class _Node:
    """A string with its count, depth (its length) and children (token -> node or tail, in
    the order they first occurred). ``ranked`` caches the children whose count reaches the
    tree's threshold share of this node's count, most frequent first; every change below the
    node resets ``ranked_at``, and the cache is valid while ``count == ranked_at``."""

    __slots__ = ("count", "depth", "children", "ranked", "ranked_at")

    def __init__(self, depth: int, count: int) -> None:
        self.count, self.depth = count, depth
        self.children: dict[int, _Node | _Tail] = {}
        self.ranked: list[tuple[int, _Node | _Tail]] = []
        self.ranked_at = -1


Position = tuple  # (node, k, source, start): see the module docstring


@dataclass(frozen=True)
class SuffixDraft:
    """Speculated tokens below a matched string, in the order they were chosen (parents first).

    ``parents[i]``: index of token ``i``'s parent in this draft, -1 for a child of the matched
    string. ``counts[i]``: occurrences of the matched string followed by the path to token
    ``i``; ``denominator``: occurrences of the matched string; token ``i``'s probability is
    ``counts[i] / denominator`` and the draft's score is their sum. ``match_len``: the matched
    string's length.
    """

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    denominator: int = 1
    match_len: int = 0

    @property
    def probs(self) -> tuple[float, ...]:
        return tuple(c / self.denominator for c in self.counts)

    @property
    def score(self) -> float:
        return sum(self.counts) / self.denominator

    def beats(self, other: SuffixDraft) -> bool:
        """Whether this draft's score is strictly higher (exact: integer cross-multiplication)."""
        return sum(self.counts) * other.denominator > sum(other.counts) * self.denominator

    def depths(self) -> list[int]:
        """Each token's depth below the matched string (1 for its children)."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return depths


class SuffixTree:
    """Suffixes of indexed sequences, up to ``max_depth`` tokens, with occurrence counts.

    One sequence at a time grows (:meth:`start_sequence`, then :meth:`append`); earlier ones
    are frozen and may be removed (:meth:`remove`). ``min_token_prob`` is the pruning
    threshold of :meth:`speculate`.
    """

    def __init__(self, max_depth: int = 64, min_token_prob: float = 0.1) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        if not 0 <= min_token_prob <= 1:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        self.max_depth = max_depth
        self.min_token_prob = min_token_prob
        self.root = _Node(0, 0)
        self.sequence: list[int] | None = None  # the growing sequence
        # nodes where the growing sequence's suffixes shorter than max_depth end, deepest first
        self.loci: list[_Node] = []

    # ----------------------------------------------------------------------------- updates

    def start_sequence(self) -> list[int]:
        """Freezes the growing sequence and starts a new, empty one (returned: its handle
        for :meth:`remove`; it fills as tokens are appended)."""
        self.sequence = []
        self.loci = []
        return self.sequence

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Appends ``token`` to the growing sequence: every suffix that ends at a node moves
        to its child for ``token`` (created as a tail when new, split out of a tail when
        another occurrence owns it); the new one-token suffix starts at the root."""
        seq = self.sequence
        if seq is None:
            raise RuntimeError("append needs a growing sequence: call start_sequence first")
        token = int(token)
        index = len(seq)
        seq.append(token)
        root, limit = self.root, self.max_depth
        root.count += 1
        loci = []
        self.loci.append(root)
        for node in self.loci:
            node.ranked_at = -1  # one of its children changes
            child = node.children.get(token)
            if child is None:
                node.children[token] = _Tail(seq, index, index - node.depth + limit)
                continue
            if type(child) is _Tail:
                child = self._split(node, token, child)
            else:
                child.count += 1
            if child.depth < limit:
                loci.append(child)
        self.loci = loci

    @staticmethod
    def _split(node: _Node, token: int, tail: _Tail) -> _Node:
        """A second occurrence enters ``tail``: its first token becomes a node of count 2
        and the rest of the tail (if any) hangs below it."""
        child = _Node(node.depth + 1, 2)
        node.children[token] = child
        tail.pos += 1
        if tail.pos < tail.end:
            child.children[tail.seq[tail.pos]] = tail
        return child

    def remove(self, seq: list[int]) -> None:
        """Removes an indexed sequence (the handle from :meth:`start_sequence`): every one of
        its suffixes is walked down, counts decremented, its tail and emptied nodes dropped.
        Outstanding positions become invalid. Cost: ``len(seq) * max_depth`` at most."""
        if seq is self.sequence:
            self.sequence, self.loci = None, []
        n, limit = len(seq), self.max_depth
        for start in range(n):
            node = self.root
            node.count -= 1
            node.ranked_at = -1
            for index in range(start, start + min(n - start, limit)):
                token = seq[index]
                child = node.children[token]
                if type(child) is _Tail or child.count == 1:
                    del node.children[token]
                    break
                child.count -= 1
                child.ranked_at = -1
                node = child

    # ----------------------------------------------------------------------------- queries

    def root_position(self) -> Position:
        return (self.root, 0, None, 0)

    def position_depth(self, position: Position) -> int:
        return position[0].depth + position[1]

    def locus_position(self, node: _Node) -> Position:
        return (node, 0, None, 0)

    def _resolve(self, position: Position) -> Position:
        """Moves a position inside a tail down past nodes split out of that tail since."""
        node, k, source, start = position
        while k:
            child = node.children[source[start]]
            if type(child) is _Tail:
                break
            node, k, start = child, k - 1, start + 1
        return (node, k, source, start)

    def advance(self, position: Position, token: int) -> Position | None:
        """The position of the matched string followed by ``token``, None if that string
        does not occur (or would be deeper than ``max_depth``)."""
        node, k, source, start = self._resolve(position)
        if not k:
            child = node.children.get(token)
            if child is None:
                return None
            if type(child) is _Tail:
                return (node, 1, child.seq, child.pos)
            return (child, 0, None, 0)
        index = start + k
        if index < min(len(source), start - node.depth + self.max_depth) and source[index] == token:
            return (node, k + 1, source, start)
        return None

    def find(self, tokens: Sequence[int]) -> Position | None:
        """The position of ``tokens`` (at most ``max_depth`` of them), None if absent."""
        position = self.root_position()
        for token in tokens:
            position = self.advance(position, token)
            if position is None:
                return None
        return position

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of ``tokens`` in the indexed sequences (0 if absent or too long)."""
        if len(tokens) > self.max_depth:
            return 0
        position = self.find(tokens)
        if position is None:
            return 0
        node, k, _, _ = self._resolve(position)
        return 1 if k else node.count

    def _ranked(self, node: _Node) -> list[tuple[int, _Node | _Tail]]:
        """``(token, child)`` for the children with ``count >= min_token_prob * node.count``,
        most frequent first, equal counts in the order they first occurred (cached)."""
        if node.ranked_at != node.count:
            threshold = self.min_token_prob * node.count
            ranked = [(t, c) for t, c in node.children.items() if c.count >= threshold]
            ranked.sort(key=_child_count, reverse=True)  # stable: first occurrence on ties
            node.ranked, node.ranked_at = ranked, node.count
        return node.ranked

    def speculate(
        self, position: Position, max_tokens: int, *, tree: bool = True, max_depth: int | None = None
    ) -> SuffixDraft:
        """Up to ``max_tokens`` continuations of the string at ``position``, no deeper than
        ``max_depth`` tokens below it, each with probability ``>= min_token_prob``.

        Tree mode: best first by count (every candidate's probability has the same
        denominator); equal counts in the order the candidates were reached, which puts
        siblings in the order they first occurred. Chain mode: the most frequent child
        (first occurred on ties), repeatedly. Example in the module docstring.
        """
        node, k, source, start = self._resolve(position)
        depth_limit = max_tokens if max_depth is None else min(max_tokens, max_depth)
        denominator = 1 if k else node.count
        match_len = node.depth + k
        if depth_limit <= 0 or not denominator:
            return SuffixDraft(denominator=max(denominator, 1), match_len=match_len)
        threshold = self.min_token_prob * denominator
        if k:
            cursor: _Node | tuple = (source, start + k, min(len(source), start - node.depth + self.max_depth))
        else:
            cursor = node
        grow = self._grow_tree if tree else self._grow_chain
        tokens, parents, counts = grow(cursor, threshold, max_tokens, depth_limit)
        return SuffixDraft(tuple(tokens), tuple(parents), tuple(counts), denominator, match_len)

    def _candidates(self, cursor, threshold: float) -> list[tuple[int, int, object]]:
        """``(count, token, next cursor)`` below ``cursor`` that reach ``threshold``, most
        frequent first. A cursor is a node or ``(seq, index, end)`` inside a tail."""
        if type(cursor) is _Node:
            found = []
            for token, child in self._ranked(cursor):
                if child.count < threshold:
                    break
                if type(child) is _Tail:
                    found.append((1, token, (child.seq, child.pos + 1, child.end)))
                else:
                    found.append((child.count, token, child))
            return found
        seq, index, end = cursor
        if index < end and 1 >= threshold:
            return [(1, seq[index], (seq, index + 1, end))]
        return []

    def _grow_tree(self, cursor, threshold: float, max_tokens: int, depth_limit: int):
        tokens: list[int] = []
        parents: list[int] = []
        counts: list[int] = []
        heap: list = []
        order = 0
        for count, token, after in self._candidates(cursor, threshold):
            heap.append((-count, order, token, -1, 1, after))
            order += 1
        heapq.heapify(heap)
        while heap and len(tokens) < max_tokens:
            negative, _, token, parent, depth, after = heapq.heappop(heap)
            index = len(tokens)
            tokens.append(token)
            parents.append(parent)
            counts.append(-negative)
            if depth >= depth_limit:
                continue
            for count, child_token, child_after in self._candidates(after, threshold):
                heapq.heappush(heap, (-count, order, child_token, index, depth + 1, child_after))
                order += 1
        return tokens, parents, counts

    def _grow_chain(self, cursor, threshold: float, max_tokens: int, depth_limit: int):
        tokens: list[int] = []
        counts: list[int] = []
        limit = min(max_tokens, depth_limit)
        while len(tokens) < limit:
            found = self._candidates(cursor, threshold)
            if not found:
                break
            count, token, cursor = found[0]
            tokens.append(token)
            counts.append(count)
        return tokens, list(range(-1, len(tokens) - 1)), counts


def _child_count(item: tuple[int, _Node | _Tail]) -> int:
    return item[1].count
