"""Depth-limited suffix trees with occurrence counts: SuffixDecoding's index (arXiv 2411.04975).

A :class:`SuffixTree` indexes token sequences (several, each appended to incrementally, the
oldest removable). Every suffix of every sequence is kept up to ``max_depth`` tokens, so the
tree holds every substring of at most ``max_depth`` tokens, and each node carries its
*count*: how many times its string occurs in the indexed sequences (start positions).

Speculation from a matched string ``s`` scores a
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

Representation (path-compressed, as in the public implementation): a node spans a run of
tokens that all have the same count, from its parent's end to its own end; a string that
occurs once is part of a *tail*, which reads its tokens from its sequence, so a sequence's own
unique suffixes cost nothing as the sequence grows. Each suffix of the growing sequence shorter
than ``max_depth`` that occurred before ends exactly at a node's end (its *locus*); appending a
token visits the loci, deepest first, so the cost per token is bounded by ``max_depth`` (in
practice by the longest repeated suffix) and never by the sequence length. A locus takes the
token by one of:

- no child for it: a new tail;
- the locus's only other occurrences all go on with it (its count is its only child's + 1):
  the node's end slides one token down into that child (no new node, the copying case);
- otherwise the child's first token is split off as a node (or, if it is one token, counted).

A node's tokens are read from its most recent occurrence, which stays valid because sequences
are removed oldest first. Nodes and tails are rows of flat lists (ids; a tail is stored in its
parent's children as ``~id``), so the tree holds no per-node Python objects for the garbage
collector to scan: its dicts map ints to ints.

Positions (:meth:`SuffixTree.advance`) name a matched string by a node (the string ends at its
end) or by one of its occurrences ``(source, start, length)``, resolved from the root when it
is used, so that they survive the growing sequence's appends; removals invalidate them.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

ROOT = 0


@dataclass(frozen=True)
class SuffixDraft:
    """Speculated tokens below a matched string, in the order they were chosen (parents first).

    ``parents[i]``: index of token ``i``'s parent in this draft, -1 for a child of the matched
    string. ``counts[i]``: occurrences of the matched string followed by the path to token
    ``i``; ``denominator``: occurrences of the matched string; token ``i``'s probability is
    ``counts[i] / denominator`` and the draft's score is their sum. ``match_len``: the matched
    string's length; ``also``: other matched lengths with the same occurrences, whose drafts
    this one stands for (:meth:`~logitspec.suffix_decoding.SuffixCache.branches`).
    """

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    denominator: int = 1
    match_len: int = 0
    also: tuple[int, ...] = ()

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
    are frozen and may be removed, oldest first (:meth:`remove_oldest`). ``min_token_prob`` is the
    pruning threshold of :meth:`speculate`. Node ``ROOT`` is the empty string.
    """

    def __init__(self, max_depth: int = 64, min_token_prob: float = 0.1) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        if not 0 <= min_token_prob <= 1:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        self.max_depth = max_depth
        self.min_token_prob = min_token_prob
        # nodes: occurrences of every string the node spans, depth of its end, parent,
        # children (first token -> node, or ~tail) in first-occurrence order, and the most
        # recent occurrence (sequence, start) through it, which spells its tokens;
        # _ranked caches _ranked_children(), valid while _ranked_at == count
        self._count: list[int] = [0]
        self._depth: list[int] = [0]
        self._parent: list[int] = [-1]
        self._children: list[dict[int, int]] = [{}]
        self._rep_seq: list[list[int] | None] = [None]
        self._rep_start: list[int] = [0]
        self._ranked: list[list | None] = [None]
        self._ranked_at: list[int] = [-1]
        # tails: the occurrence's sequence, its next token's index, its start + max_depth
        self._tail_seq: list[list[int] | None] = []
        self._tail_pos: list[int] = []
        self._tail_cap: list[int] = []
        self._free_nodes: list[int] = []
        self._free_tails: list[int] = []
        self._sequences: deque[list[int]] = deque()  # oldest first
        self.sequence: list[int] | None = None  # the growing sequence
        # nodes where the growing sequence's suffixes shorter than max_depth end, deepest first
        self.loci: list[int] = []

    def node_count(self, node: int) -> int:
        return self._count[node]

    def node_depth(self, node: int) -> int:
        return self._depth[node]

    def num_nodes(self) -> int:
        return len(self._count) - len(self._free_nodes)

    # ----------------------------------------------------------------------------- updates

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    def start_sequence(self) -> None:
        """Freezes the growing sequence and starts a new, empty one."""
        self.sequence = []
        self.loci = []
        self._sequences.append(self.sequence)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Appends ``token`` to the growing sequence; every suffix that ends at a node end
        (a locus) is extended by it, deepest first (module docstring), and the new one-token
        suffix starts at the root.

        The loop runs once per locus, so the common cases (a node's end sliding one token
        down, a child's count going up) are written out in it; splits and new tails, rarer,
        are methods."""
        seq = self.sequence
        if seq is None:
            raise RuntimeError("append needs a growing sequence: call start_sequence first")
        token = int(token)
        index = len(seq)
        seq.append(token)
        count, depth, children, ranked_at = self._count, self._depth, self._children, self._ranked_at
        rep_seq, rep_start = self._rep_seq, self._rep_start
        tail_seq, tail_pos, tail_cap = self._tail_seq, self._tail_pos, self._tail_cap
        limit = self.max_depth
        count[ROOT] += 1
        loci = self.loci
        loci.append(ROOT)
        moved = []
        for node in loci:
            # the suffix ending at node's end (it starts at index - depth) takes the token
            ranked_at[node] = -1  # one of its children changes
            kids = children[node]
            child = kids.get(token)
            below = depth[node] + 1
            start = index - below + 1
            if child is None:
                kids[token] = ~self._new_tail(seq, index, start + limit)
                continue
            # this suffix is the only occurrence ending at node when its count exceeds its
            # only child's by one: then node's end slides one token down instead of a new node
            if child < 0:
                if node != ROOT and len(kids) == 1 and count[node] == 2:
                    depth[node] = below  # node takes the first token of its only child, a tail
                    del kids[token]
                    tail = ~child
                    pos = tail_pos[tail] + 1
                    tail_pos[tail] = pos
                    spelled = tail_seq[tail]
                    if pos < len(spelled) and pos < tail_cap[tail]:
                        kids[spelled[pos]] = child
                    else:
                        self._free_tail(tail)
                else:
                    node = self._split_tail(node, token, ~child)
            elif node != ROOT and len(kids) == 1 and count[node] == count[child] + 1:
                if depth[child] > below:  # node takes the first token of its only child
                    depth[node] = below
                    del kids[token]
                    kids[rep_seq[child][rep_start[child] + below]] = child
                else:
                    node = self._absorb(node, child)
            elif depth[child] == below:
                count[child] += 1
                node = child
            else:
                node = self._split_node(node, token, child)
            rep_seq[node], rep_start[node] = seq, start
            if depth[node] < limit:
                moved.append(node)
        self.loci = moved

    def _absorb(self, node: int, child: int) -> int:
        """``node`` takes its only child's only token: the child takes ``node``'s place (it
        keeps its id) and ``node`` is released."""
        parent = self._parent[node]
        self._children[parent][self._token_at(node, self._depth[parent])] = child
        self._ranked_at[parent] = -1
        self._parent[child] = parent
        self._count[child] = self._count[node]
        self._release_node(node)
        return child

    def _split_tail(self, node: int, token: int, tail: int) -> int:
        """A second occurrence enters ``tail``: its first token becomes a node of count 2
        with the rest of the tail (if any) below it."""
        child = self._new_node(self._depth[node] + 1, 2, node)
        self._children[node][token] = child
        pos = self._tail_pos[tail] + 1
        self._tail_pos[tail] = pos
        if pos < self._tail_end(tail):
            self._children[child][self._tail_seq[tail][pos]] = ~tail
        else:
            self._free_tail(tail)
        return child

    def _split_node(self, node: int, token: int, child: int) -> int:
        """The suffix enters ``child``'s first token only: a node of that one token goes
        between ``node`` and ``child``."""
        middle = self._new_node(self._depth[node] + 1, self._count[child] + 1, node)
        self._children[node][token] = middle
        self._children[middle][self._token_at(child, self._depth[middle])] = child
        self._parent[child] = middle
        return middle

    def _token_at(self, node: int, depth: int) -> int:
        """Token ``depth`` (0-based) of ``node``'s string."""
        return self._rep_seq[node][self._rep_start[node] + depth]

    def _new_tail(self, seq: list[int], pos: int, cap: int) -> int:
        if self._free_tails:
            tail = self._free_tails.pop()
            self._tail_seq[tail], self._tail_pos[tail], self._tail_cap[tail] = seq, pos, cap
            return tail
        self._tail_seq.append(seq)
        self._tail_pos.append(pos)
        self._tail_cap.append(cap)
        return len(self._tail_pos) - 1

    def _new_node(self, depth: int, count: int, parent: int) -> int:
        if self._free_nodes:
            node = self._free_nodes.pop()
            self._count[node], self._depth[node], self._parent[node] = count, depth, parent
            return node
        self._count.append(count)
        self._depth.append(depth)
        self._parent.append(parent)
        self._children.append({})
        self._rep_seq.append(None)
        self._rep_start.append(0)
        self._ranked.append(None)
        self._ranked_at.append(-1)
        return len(self._count) - 1

    def _tail_end(self, tail: int) -> int:
        return min(len(self._tail_seq[tail]), self._tail_cap[tail])

    def _free_tail(self, tail: int) -> None:
        self._tail_seq[tail] = None
        self._free_tails.append(tail)

    def _release_node(self, node: int) -> None:
        self._children[node] = {}
        self._rep_seq[node] = None
        self._ranked[node], self._ranked_at[node] = None, -1
        self._free_nodes.append(node)

    def _free_subtree(self, node: int) -> None:
        stack = [node]
        while stack:
            node = stack.pop()
            for child in self._children[node].values():
                if child < 0:
                    self._free_tail(~child)
                else:
                    stack.append(child)
            self._release_node(node)

    def remove_oldest(self) -> None:
        """Removes the oldest indexed sequence: every one of its suffixes is walked down,
        counts decremented, its tails and emptied nodes dropped. Oldest first keeps every
        node's most recent occurrence valid. Cost: ``len(seq) * max_depth`` at most."""
        seq = self._sequences.popleft()
        if seq is self.sequence:
            self.sequence, self.loci = None, []
        count, depth, children, ranked_at = self._count, self._depth, self._children, self._ranked_at
        n = len(seq)
        for start in range(n):
            length = min(n - start, self.max_depth)
            node, reached = ROOT, 0
            count[node] -= 1
            while reached < length:
                ranked_at[node] = -1
                token = seq[start + reached]
                child = children[node][token]
                if child < 0 or count[child] == 1:
                    del children[node][token]
                    if child < 0:
                        self._free_tail(~child)
                    else:
                        self._free_subtree(child)
                    break
                count[child] -= 1
                node, reached = child, depth[child]

    # ----------------------------------------------------------------------------- queries

    def position_depth(self, position) -> int:
        """The matched string's length."""
        return self._depth[position] if type(position) is int else position[2]

    def position_count(self, position) -> int:
        """How often the matched string occurs."""
        return self._locate(position)[1]

    def _locate(self, position) -> tuple[object, int]:
        """``(cursor, count)`` for a position: the cursor is a node (at its end), ``(node,
        depth)`` inside a node's span, or ``(seq, index, end)`` inside a tail."""
        if type(position) is int:
            return position, self._count[position]
        source, start, length = position
        node, reached = ROOT, 0
        while reached < length:
            child = self._children[node][source[start + reached]]
            if child < 0:
                tail = ~child
                index = self._tail_pos[tail] + length - reached
                return (self._tail_seq[tail], index, self._tail_end(tail)), 1
            if self._depth[child] > length:
                return (child, length), self._count[child]
            node, reached = child, self._depth[child]
        return node, self._count[node]

    def advance(self, position, token: int):
        """The position of the matched string followed by ``token``, None if that string
        does not occur (or would be deeper than ``max_depth``)."""
        length = self.position_depth(position)
        if length >= self.max_depth:
            return None
        if type(position) is not int:
            source, start, _ = position
            if start + length < len(source) and source[start + length] == token:
                return (source, start, length + 1)  # the same occurrence goes on
        cursor, _ = self._locate(position)
        if type(cursor) is not int:
            return None  # inside a span or a tail, the only continuation is the occurrence's
        child = self._children[cursor].get(token)
        if child is None:
            return None
        if child < 0:
            tail = ~child
            return (self._tail_seq[tail], self._tail_cap[tail] - self.max_depth, length + 1)
        return (self._rep_seq[child], self._rep_start[child], length + 1)

    def find(self, tokens: Sequence[int]):
        """The position of ``tokens`` (at most ``max_depth`` of them), None if absent."""
        position = ROOT
        for token in tokens:
            position = self.advance(position, token)
            if position is None:
                return None
        return position

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of ``tokens`` in the indexed sequences (0 if absent or too long); the
        empty string occurs once per indexed token."""
        position = self.find(tokens)
        return 0 if position is None else self._locate(position)[1]

    def _ranked_children(self, node: int) -> list[tuple[int, int, int]]:
        """``(count, token, child)`` for the children with ``count >= min_token_prob *
        count(node)``, most frequent first, equal counts in the order they first occurred
        (cached until the node changes)."""
        if self._ranked_at[node] != self._count[node]:
            count = self._count
            threshold = self.min_token_prob * count[node]
            ranked = []
            for token, child in self._children[node].items():
                occurrences = count[child] if child >= 0 else 1
                if occurrences >= threshold:
                    ranked.append((occurrences, token, child))
            ranked.sort(key=_first, reverse=True)  # stable: first occurrence on ties
            self._ranked[node], self._ranked_at[node] = ranked, count[node]
        return self._ranked[node]

    def top_continuation(self, position) -> tuple[int, int]:
        """``(count, denominator)``: occurrences of the matched string's most frequent
        continuation (a next token) and of the string itself. Every token :meth:`speculate`
        drafts has at most that count, so ``max_tokens * count / denominator`` bounds the score."""
        cursor, denominator = self._locate(position)
        if type(cursor) is not int:
            return (denominator if len(cursor) == 2 or cursor[1] < cursor[2] else 0), denominator
        ranked = self._ranked_children(cursor)
        return (ranked[0][0] if ranked else 0), denominator

    def continuation_counts(self, position) -> tuple[int, int, int]:
        """``(top, together, denominator)``: :meth:`top_continuation`'s counts and between
        them the occurrences of every continuation that :meth:`speculate` may draft (next
        tokens of at least ``min_token_prob`` of the string's count) together. The tokens a
        draft has at any one depth below the string continue different ones of them, so they
        have at most ``together`` occurrences: a draft ``d`` tokens deep scores at most
        ``d * together / denominator``."""
        cursor, denominator = self._locate(position)
        if type(cursor) is not int:
            going_on = len(cursor) == 2 or cursor[1] < cursor[2]
            return (denominator, denominator, denominator) if going_on else (0, 0, denominator)
        ranked = self._ranked_children(cursor)
        if not ranked:
            return 0, 0, denominator
        return ranked[0][0], sum([count for count, _, _ in ranked]), denominator

    def speculate(self, position, max_tokens: int, *, tree: bool = True,
                  max_depth: int | None = None) -> SuffixDraft:
        """Up to ``max_tokens`` continuations of the string at ``position``, no deeper than
        ``max_depth`` tokens below it, each with probability ``>= min_token_prob`` (compared
        exactly, as counts; the public code multiplies float32 ratios, so there a probability of
        exactly ``min_token_prob`` may fall on either side).

        Tree mode: best first by count (every candidate's probability has the same
        denominator); equal counts in the order the candidates were reached, which puts
        siblings in the order they first occurred. Chain mode: the most frequent child
        (first occurred on ties), repeatedly. Example in the module docstring.
        """
        match_len = self.position_depth(position)
        cursor, denominator = self._locate(position)
        depth_limit = max_tokens if max_depth is None else min(max_tokens, max_depth)
        if depth_limit <= 0 or not denominator:
            return SuffixDraft(denominator=max(denominator, 1), match_len=match_len)
        threshold = self.min_token_prob * denominator
        grow = self._grow_tree if tree else self._grow_chain
        tokens, parents, counts = grow(cursor, threshold, max_tokens, depth_limit)
        return SuffixDraft(tuple(tokens), tuple(parents), tuple(counts), denominator, match_len)

    def _candidates(self, cursor, threshold: float) -> list[tuple[int, int, object]]:
        """``(count, token, next cursor)`` below ``cursor`` that reach ``threshold``, most
        frequent first (cursors: see :meth:`_locate`)."""
        if type(cursor) is int:
            found = []
            below = self._depth[cursor] + 1
            for count, token, child in self._ranked_children(cursor):
                if count < threshold:
                    break
                if child < 0:
                    tail = ~child
                    child = (self._tail_seq[tail], self._tail_pos[tail] + 1, self._tail_end(tail))
                elif self._depth[child] > below:
                    child = (child, below)
                found.append((count, token, child))
            return found
        if len(cursor) == 2:
            node, depth = cursor
            count = self._count[node]
            if count < threshold:
                return []
            after = node if depth + 1 == self._depth[node] else (node, depth + 1)
            return [(count, self._token_at(node, depth), after)]
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
            if not heap and type(after) is not int:
                # the only candidate left is inside a span or a tail, whose one continuation
                # would be pushed and popped at once: taken as a run instead
                index, depth, after = self._take_run(after, threshold, max_tokens, depth_limit,
                                                     tokens, parents, counts, index, depth)
                if after is None or depth >= depth_limit or len(tokens) >= max_tokens:
                    continue
            for count, child_token, child_after in self._candidates(after, threshold):
                heapq.heappush(heap, (-count, order, child_token, index, depth + 1, child_after))
                order += 1
        return tokens, parents, counts

    def _take_run(self, cursor, threshold: float, max_tokens: int, depth_limit: int,
                  tokens: list[int], parents: list[int], counts: list[int], index: int,
                  depth: int) -> tuple[int, int, object]:
        """Appends the tokens below ``cursor`` (inside a span or a tail, below draft token
        ``index`` at ``depth``) up to a node's end, the tail's end or a limit, as a chain:
        each has the one continuation of the one before. Returns the last token's ``(index,
        depth, cursor)``; the cursor is the node whose end the run reached, else None (the
        tail ended, or a limit stops the draft there anyway)."""
        room = min(max_tokens - len(tokens), depth_limit - depth)
        if len(cursor) == 2:
            node, at = cursor
            count = self._count[node]
            if count < threshold:
                return index, depth, None
            end = self._depth[node]
            take = min(room, end - at)
            start = self._rep_start[node] + at
            tokens.extend(self._rep_seq[node][start:start + take])
            after = node if at + take == end else None
        else:
            seq, at, end = cursor
            if 1 < threshold:
                return index, depth, None
            take = min(room, end - at)
            count = 1
            tokens.extend(seq[at:at + take])
            after = None
        parents.extend(range(index, index + take))
        counts.extend([count] * take)
        return index + take, depth + take, after

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


def _first(item: tuple) -> int:
    return item[0]
