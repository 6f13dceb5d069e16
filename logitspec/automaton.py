"""An n-gram automaton with least-recently-used eviction: RACER's retrieval source.

Patterns. Every window of ``max_ngram`` consecutive context tokens is inserted into a trie
once, when its last token joins the context (the prompt's windows when a generation begins,
then one window per accepted token). A window ``[a, b, c, ...]`` adds the path root -> a ->
ab -> abc -> ..., and every node on it counts one more window: a node's ``count`` is the number
of inserted windows that start with its string, since the node was created. Contexts shorter
than ``max_ngram`` tokens insert nothing. The trie outlives generations: a new question
(``resume`` with ``reused = 0``) only resets the context, so n-grams of earlier questions stay
until evicted.

Memory. The trie holds at most ``max_nodes`` nodes, the root included. Nodes are kept in
least-recently-used order, and a node is *used* when a window is inserted through it or when
it lies on the path of a match found by :meth:`NGramAutomaton.continuations`; using a node uses
its ancestors too, after it, so a parent is never less recent than its children. When a new
node is needed and the trie is full, the least recently used node is evicted: by that order it
is a leaf, so the trie stays prefix-closed (no orphaned subtrees) and a count is lost only with
its node.

Matching. The automaton's state is the Aho-Corasick dictionary chain made explicit: for every
match length ``m`` in ``1 .. max_ngram - 1``, the trie node spelling the context's last ``m``
tokens, or none. One token ``t`` advances it by goto transitions (``state[m + 1] =
child(state[m], t)``, ``state[1] = child(root, t)``), O(``max_ngram``) whatever the context
length; nodes created by the insertion of ``t``'s own window are added where they spell a
suffix (periodic text such as ``a b a b``), so the state is exact: it lists every suffix of
the context that the trie holds. A suffix of full length ``max_ngram`` is left out: such a
node has no children.

Retrieval (:meth:`NGramAutomaton.continuations`). For the next token ``r`` (the step's root),
the *borders* are the nodes spelling ``suffix + [r]`` for every matched suffix of at least
``min_match`` tokens. The candidates are the nodes below the borders (one subtree per border;
a node below a border of match length ``m`` is a continuation seen after the same ``m`` context
tokens and ``r``); they are yielded best first: the largest count, then the shallower, then the
longer match, then the order found (borders longest first, children oldest first). A child never outranks its parent (its count is at most
the parent's), so any prefix of the sequence is a prefix-closed forest under the root.

Worked example, ``max_ngram = 3`` over the context ``1 2 3 1 2 4 1 2``: the windows ``123,
231, 312, 124, 241, 412`` are inserted, so ``1`` counts 2 (``123``, ``124``), ``12`` 2,
``123`` 1, ``124`` 1. The state holds ``2`` (match length 1) and ``12`` (length 2). With the
root ``r = 3`` the only border is ``23``, from ``2`` (``12`` would give ``123``, a whole
window, which has no children), and the only continuation is ``231``'s ``1`` (count 1,
match 1).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterator, NamedTuple, Sequence

ROOT = 0
NONE = -1
DEFAULT_MAX_NGRAM = 10
DEFAULT_MAX_NODES = 10_000


class Continuation(NamedTuple):
    """One candidate node of a retrieval tree under the step's root.

    ``parent``: the index of the continuation it extends (an earlier one in the same lookup),
    -1 when it hangs directly under the root. ``token``: its token; ``depth``: tokens after the
    root (1 for the root's children). ``count``: windows starting with the matched suffix, the
    root and the tokens down to this one; ``parent_count``: the same for its parent (the border
    for depth 1), so ``count / parent_count`` is the empirical probability of this token after
    its parent. ``match``: how many context tokens were matched before the root.
    """

    parent: int
    token: int
    depth: int
    count: int
    parent_count: int
    match: int


class NGramAutomaton:
    """See the module docstring. ``max_nodes`` counts the root; it must leave room for one
    whole window besides the nodes that may be evicted (``max_nodes > max_ngram``)."""

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, max_nodes: int = DEFAULT_MAX_NODES) -> None:
        if max_ngram < 2:
            raise ValueError(f"max_ngram must be >= 2, got {max_ngram}")
        if max_nodes <= max_ngram:
            raise ValueError(f"max_nodes must be > max_ngram={max_ngram}, got {max_nodes}")
        self.max_ngram = max_ngram
        self.max_nodes = max_nodes
        self._children: list[dict[int, int]] = [{}]
        self._parent = [NONE]
        self._token = [NONE]
        self._depth = [0]
        self._count = [0]
        self._free: list[int] = []
        self._lru: OrderedDict[int, None] = OrderedDict()  # non-root nodes, least recent first
        self._recent: list[int] = []  # the context's last max_ngram tokens
        self._state = [NONE] * max_ngram  # _state[m]: node of the last m tokens (m >= 1)
        self._state[0] = ROOT

    # ------------------------------------------------------------------ inspection

    def __len__(self) -> int:
        """Nodes in the trie, the root included."""
        return len(self._lru) + 1

    def node(self, path: Sequence[int]) -> int:
        """The node spelling ``path`` (the root for ``[]``), or -1."""
        node = ROOT
        for token in path:
            node = self._children[node].get(int(token), NONE)
            if node == NONE:
                return NONE
        return node

    def count(self, path: Sequence[int]) -> int:
        """Windows inserted through ``path`` (0 if the trie does not hold it)."""
        node = self.node(path)
        return self._count[node] if node > ROOT else 0

    def matched_lengths(self) -> list[int]:
        """The suffix lengths ``m`` of the context held by the trie (``m < max_ngram``), longest first."""
        return [m for m in range(self.max_ngram - 1, 0, -1) if self._state[m] != NONE]

    def paths(self) -> list[tuple[int, ...]]:
        """Every node's string, the root's ``()`` first, in least-recently-used order."""
        return [()] + [self._path_of(node) for node in self._lru]

    def _path_of(self, node: int) -> tuple[int, ...]:
        path = []
        while node != ROOT:
            path.append(self._token[node])
            node = self._parent[node]
        return tuple(reversed(path))

    # ------------------------------------------------------------------ following the context

    def resume(self, context: Sequence[int], reused: int) -> None:
        """Follows ``context``, whose first ``reused`` tokens were already seen (their windows
        inserted): inserts the windows ending at the later positions and recomputes the state.
        ``reused = 0`` starts a new context; the trie is kept."""
        start = max(0, min(reused, len(context)))
        self._recent = [int(t) for t in context[max(0, start - self.max_ngram):start]]
        self._state = [NONE] * self.max_ngram
        self._state[0] = ROOT
        for token in self._recent[-(self.max_ngram - 1):]:
            self._advance(token, ())
        self.extend(context[start:])

    def extend(self, tokens: Sequence[int]) -> None:
        """Appends ``tokens``: per token, inserts the window ending at it, then advances the state."""
        n = self.max_ngram
        for token in tokens:
            token = int(token)
            self._recent.append(token)
            if len(self._recent) > n:
                del self._recent[0]
            created = self._insert(self._recent) if len(self._recent) == n else ()
            self._advance(token, created)

    def _advance(self, token: int, created: Sequence[int]) -> None:
        """Goto transitions of every matched suffix, plus created nodes that spell a suffix."""
        state, children = self._state, self._children
        for m in range(self.max_ngram - 1, 0, -1):
            prev = state[m - 1]
            state[m] = children[prev].get(token, NONE) if prev != NONE else NONE
        recent = self._recent
        for node in created:
            m = self._depth[node]
            if m < self.max_ngram and state[m] == NONE and recent[:m] == recent[-m:]:
                state[m] = node

    # ------------------------------------------------------------------ trie and LRU

    def _insert(self, window: Sequence[int]) -> list[int]:
        """Inserts ``window`` (counts +1 along it); returns the nodes it created, shallowest first."""
        node, path = ROOT, []
        children = self._children
        for token in window:
            child = children[node].get(token, NONE)
            if child == NONE:
                break
            node = child
            path.append(node)
        if len(self._lru) + len(window) - len(path) >= self.max_nodes:
            self._touch(path)  # evictions ahead: the existing part first becomes most recent
        created = []
        for token in window[len(path):]:
            node = self._new_node(node, token)
            created.append(node)
            path.append(node)
        for node in path:
            self._count[node] += 1
        self._touch(path)
        return created

    def _touch(self, path: Sequence[int]) -> None:
        """Marks a root-to-node path used: deepest first, so each parent ends more recent."""
        move = self._lru.move_to_end
        for node in reversed(path):
            move(node)

    def _new_node(self, parent: int, token: int) -> int:
        if len(self._lru) + 1 >= self.max_nodes:
            self._evict()
        if self._free:
            node = self._free.pop()
            self._children[node] = {}
            self._parent[node], self._token[node] = parent, token
            self._depth[node], self._count[node] = self._depth[parent] + 1, 0
        else:
            node = len(self._parent)
            self._children.append({})
            self._parent.append(parent)
            self._token.append(token)
            self._depth.append(self._depth[parent] + 1)
            self._count.append(0)
        self._children[parent][token] = node
        self._lru[node] = None
        return node

    def _evict(self) -> None:
        """Removes the least recently used node (a leaf, by the order's invariant)."""
        node, _ = self._lru.popitem(last=False)
        assert not self._children[node], "the least recently used node must be a leaf"
        del self._children[self._parent[node]][self._token[node]]
        depth = self._depth[node]
        if depth < self.max_ngram and self._state[depth] == node:
            self._state[depth] = NONE
        self._free.append(node)

    # ------------------------------------------------------------------ retrieval

    def borders(self, token: int, min_match: int = 1) -> list[tuple[int, int]]:
        """``(node, match)`` for every matched suffix of at least ``min_match`` tokens that
        ``token`` continues in the trie, longest match first (``min_match = 0`` includes the
        root's own child ``token``)."""
        if min_match < 0:
            raise ValueError(f"min_match must be >= 0, got {min_match}")
        state, children = self._state, self._children
        found = []
        for m in range(self.max_ngram - 2, min_match - 1, -1):
            if state[m] != NONE:
                border = children[state[m]].get(token, NONE)
                if border != NONE:
                    found.append((border, m))
        return found

    def continuations(self, token: int, limit: int, min_match: int = 1) -> Iterator[Continuation]:
        """Up to ``limit`` candidate nodes after ``token`` (the next token, not yet in the
        context), best first (module docstring); the borders' paths are marked used."""
        if limit <= 0:
            return
        count, children = self._count, self._children
        heap: list[tuple[int, int, int, int, int, int, int]] = []
        order = 0
        for border, match in self.borders(token, min_match):
            self._touch(self._path_nodes(border))
            for child in self._best_children(border, limit):
                heap.append((-count[child], 1, -match, order, child, -1, count[border]))
                order += 1
        heapq.heapify(heap)
        yielded = 0
        while heap and yielded < limit:
            neg_count, depth, neg_match, _, node, parent, parent_count = heapq.heappop(heap)
            yield Continuation(parent, self._token[node], depth, -neg_count, parent_count, -neg_match)
            for child in self._best_children(node, limit - yielded):
                heapq.heappush(heap, (-count[child], depth + 1, neg_match, order, child, yielded, -neg_count))
                order += 1
            yielded += 1

    def _best_children(self, node: int, limit: int) -> list[int]:
        """The node's children, or its ``limit`` most counted ones (ties: older first)."""
        kids = list(self._children[node].values())
        if len(kids) <= limit:
            return kids
        count = self._count
        return heapq.nsmallest(limit, kids, key=lambda c: -count[c])

    def _path_nodes(self, node: int) -> list[int]:
        path = []
        while node != ROOT:
            path.append(node)
            node = self._parent[node]
        path.reverse()
        return path
