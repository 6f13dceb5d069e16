"""RACER (arXiv 2604.14885): copy-logit trees merged with an n-gram automaton's retrieval tree.

Two candidate sources fill one draft trie under the step's root ``r`` (the token the target
just chose), ``draft_tree_capacity`` nodes in all, the root included:

1. **Retrieval** (:class:`~logitspec.automaton.NGramAutomaton`): every window of ``ngram``
   (10) context tokens is kept in a trie of at most ``max_nodes`` (10 000) nodes, the least
   recently used evicted; the continuations of every suffix of ``context + [r]`` that the trie
   holds (at least one context token matched) are taken best first, by window count, until the
   tree is full or they run out. Retrieval comes first and may use the whole budget.
2. **Copy-logit tree**: each token's top-``max_breadth`` (8) successors, copied from the
   target's logit that followed the token's last earlier occurrence (a
   :class:`~logitspec.recycling.SuccessorTable`), grown breadth-first from ``r``
   (:func:`grow_copy_logit_tree`) into the nodes retrieval left.

Both hang under the same root and merge into one trie: a candidate whose path is already in the
tree costs nothing. The tree is laid out breadth-first (depth by depth; within a depth,
retrieval nodes in rank order, then copy-logit nodes in the order grown).

Which logits fill the successor table: when a generation begins, the prompt's logits at every
newly prefilled position (:meth:`RacerDrafter.begin`: the row of token ``x_i`` becomes the
top-k of the logit after ``x_i``, the last occurrence winning; this needs the target's LM
head, which the command passes); after every step, the target's top-k at every verified tree
node, accepted or not, written in node order, so a token at several nodes keeps the deepest
one's (:meth:`RacerDrafter.observe`, the last write wins). The automaton follows the context:
the prompt's windows when a generation begins, then one window per accepted token
(:meth:`RacerDrafter.extend`). The table and the automaton live as long as the drafter:
questions teach the next ones, as in the public code (one automaton for the whole run).

In trace replay (``scripts/simulate_drafters.py``) the table learns only the rows the trace
knows: the target's top-k on the recorded path, not at rejected nodes or prompt positions.

Where this engine's version departs from the public code (github.com/hkr04/RACER), and why:

- *Matching is exact.* The public automaton computes Aho-Corasick fail links once per question,
  gives nodes created later a fail link to the root, and resets the fail links of every path it
  touches to the root; its matcher therefore usually sees one border (or none) where several
  suffixes of the context are in the trie. Here the state lists every held suffix, kept
  incrementally (:mod:`logitspec.automaton`), which is what its fail-chain walk collects when
  the links are right.
- *Only leaves are evicted.* Using a node uses its ancestors, so the least recently used node
  is a leaf; the public code may recycle an inner node, which orphans its subtree.
- *Budget.* The public code gives the copy-logit tree ``capacity - (retrieval nodes selected,
  one per border and per path before merging)`` nodes and charges it for nodes that merge, so
  its trees often fall short of the capacity; here a node is charged only when it adds a node
  to the merged tree, so the tree is full whenever the sources have enough candidates.
- *Ties.* Retrieval ties (equal counts) go to the shallower node, then the longer match, then
  the order found; the public code breaks them by heap order, pointer order and hash-map order.
- *Unknown rows.* A token never seen has no successors here (its subtree is dropped); the
  public table starts at zeros and drafts token 0 there.
- *Multi-turn prompts.* A follow-up turn inserts only the windows of the new tokens (each
  occurrence counts once) and copies only the new positions' logits, as the engine prefills
  only them; the public code re-prefills and re-inserts the whole conversation every turn.
- The public code's chain mode (one path per source) is not its default and is not built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .automaton import DEFAULT_MAX_NGRAM, DEFAULT_MAX_NODES, Continuation, NGramAutomaton
from .recycling import SuccessorTable, prompt_logit_rows
from .tree import DraftTree

if TYPE_CHECKING:
    from .decoding import GenerationConfig

DEFAULT_BREADTH = 8
MIN_MATCH = 1  # context tokens a retrieval match needs besides the root (the public min_depth 2)


@dataclass(frozen=True)
class RacerConfig:
    """RACER's settings, published defaults: a 64-node tree (root included), windows of
    ``ngram`` = 10 tokens (the longest n-gram), an automaton of at most 10 000 nodes, 8
    successors per token."""

    draft_tree_capacity: int = 64
    ngram: int = DEFAULT_MAX_NGRAM
    max_nodes: int = DEFAULT_MAX_NODES
    max_breadth: int = DEFAULT_BREADTH

    def __post_init__(self) -> None:
        if self.draft_tree_capacity < 1:
            raise ValueError(f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}")
        if self.ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {self.ngram}")
        if self.max_nodes <= self.ngram:
            raise ValueError(f"max_nodes must be > ngram={self.ngram}, got {self.max_nodes}")
        if self.max_breadth < 1:
            raise ValueError(f"max_breadth must be >= 1, got {self.max_breadth}")


class TrieBuilder:
    """A draft trie under a root, grown node by node; adding an existing path costs nothing."""

    def __init__(self, root: int) -> None:
        self.tokens = [int(root)]
        self.parents = [-1]
        self.depths = [0]
        self._children: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, capacity: int) -> int:
        """The child of ``parent`` with ``token``, created if the trie has fewer than
        ``capacity`` nodes; -1 if it would have to be created past that."""
        key = (parent, token)
        child = self._children.get(key, -1)
        if child >= 0 or len(self.tokens) >= capacity:
            return child
        child = len(self.tokens)
        self._children[key] = child
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        return child

    def to_tree(self) -> DraftTree:
        """The trie breadth-first: by depth, ties in creation order."""
        order = sorted(range(len(self.tokens)), key=self.depths.__getitem__)
        place = [0] * len(order)
        for new, old in enumerate(order):
            place[old] = new
        parents = self.parents
        return DraftTree(
            tuple([self.tokens[i] for i in order]),
            tuple([place[parents[i]] if i else -1 for i in order]),
            tuple([self.depths[i] for i in order]),
        )


def add_retrieval_tree(
    trie: TrieBuilder, continuations: Iterable[Continuation], capacity: int, max_depth: int
) -> None:
    """Hangs ``continuations`` (parents first, best first) under the root until the trie has
    ``capacity`` nodes; those deeper than ``max_depth`` are skipped with their subtrees."""
    placed: list[int] = []
    for item in continuations:
        if len(trie) >= capacity:
            return
        parent = 0 if item.parent < 0 else placed[item.parent]
        if parent < 0 or item.depth > max_depth:
            placed.append(-1)
            continue
        placed.append(trie.add(parent, item.token, capacity))


def child_breadths(breadth: int, depth: int) -> list[int]:
    """The breadths of the children of a copy-logit node of ``breadth`` at ``depth``: the
    node expands its top ``breadth`` successors; the first child gets ``breadth`` at depth 1
    and ``breadth // 2`` elsewhere, each next child half its predecessor's, at least 1.

    Examples: the root (depth 0) of breadth 8 -> [4, 2, 1, 1, 1, 1, 1, 1]; depth 1, breadth 4
    -> [4, 2, 1, 1]; depth 2, breadth 4 -> [2, 1, 1, 1]; any depth, breadth 1 -> [1].
    """
    first = breadth if depth == 1 else breadth >> 1
    return [max(1, first >> i) for i in range(breadth)]


def grow_copy_logit_tree(
    trie: TrieBuilder, successors: SuccessorTable, capacity: int, max_depth: int, breadth: int
) -> None:
    """Grows the copy-logit tree from the root breadth-first until the trie has ``capacity``
    nodes: node ``x`` of breadth ``b`` expands the first ``b`` tokens of ``x``'s successor
    row (:func:`child_breadths` gives theirs), the root with ``breadth``. Nodes already in the
    trie are followed without charge; unknown successors (-1) end a row; nothing is grown past
    ``max_depth``.

    Example (breadth 2, rows 7 -> [3, 4], 3 -> [5, 6], 4 -> [8, 9], 5 -> [1, 2]), capacity 6
    under root 7: depth 1 gets 3 and 4 (breadths 1 and 1), depth 2 gets 5 (under 3) and 8
    (under 4), depth 3 gets 1 (under 5): tokens 7, 3, 4, 5, 8, 1.
    """
    table, tokens = successors.table, trie.tokens
    breadths: dict[tuple[int, int], list[int]] = {}
    level, depth = [(0, breadth)], 0
    while level and depth < max_depth:
        rows = table[[tokens[node] for node, _ in level]].tolist()  # one gather per level
        upcoming = []
        for (node, width), row in zip(level, rows):
            key = (width, min(depth, 2))  # breadths differ only between depth 1 and the rest
            widths = breadths.get(key)
            if widths is None:
                widths = breadths[key] = child_breadths(width, depth)
            for token, child_width in zip(row, widths):
                if token < 0:
                    break
                child = trie.add(node, token, capacity)
                if child < 0:
                    return
                upcoming.append((child, child_width))
        level, depth = upcoming, depth + 1


class RacerDrafter:
    """RACER behind the :class:`~logitspec.drafters.Drafter` protocol (module docstring).

    ``successors``: a table to share; by default one is created on the first rows learned,
    sized by the vocabulary of the logits they came from. ``head``: the target's LM head
    (final hidden states (T, H) -> logits (T, V)); with it the drafter asks for the prompt's
    hidden states and copies the prompt's logits when a generation begins (the public code's
    policy: the prompt is prefilled with logits at every position). Without it (trace replay)
    the table learns from verified nodes only.
    """

    name = "racer"

    def __init__(self, config: RacerConfig = RacerConfig(), successors: SuccessorTable | None = None,
                 head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if successors is not None and successors.k < config.max_breadth:
            raise ValueError(f"the shared table keeps {successors.k} successors, fewer than "
                             f"max_breadth={config.max_breadth}")
        self.config = config
        self.tree_capacity = config.draft_tree_capacity
        self.top_k = config.max_breadth
        self.needs_hidden = head is not None
        self.head = head
        self.automaton = NGramAutomaton(config.ngram, config.max_nodes)
        self.successors = successors

    def configure(self, config: GenerationConfig) -> None:
        pass

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        """Follows the new context (the automaton and the table are kept); with the prompt's
        hidden states (len(context) - reused, H), copies the logit after each new prompt token,
        computed and read back :data:`~logitspec.recycling.PROMPT_CHUNK` positions at a time."""
        self.automaton.resume(context, reused)
        if hidden is None or self.head is None:
            return
        for tokens, topk, vocab_size in prompt_logit_rows(self.head, hidden, context[reused:],
                                                          self.top_k):
            self.learn(tokens, topk, vocab_size)

    def learn(self, tokens: Sequence[int], topk: np.ndarray, vocab_size: int) -> None:
        """Copies the logits that followed ``tokens``: row ``tokens[i]`` becomes ``topk[i]``
        (T, >= max_breadth) int ids, best first; a repeated token keeps its last row."""
        if self.successors is None:
            self.successors = SuccessorTable(vocab_size, self.config.max_breadth)
        self.successors.update(tokens, np.asarray(topk)[:, : self.successors.k])

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        """Retrieval first, then the copy-logit tree, merged (module docstring). ``root_topk``
        (the logit before the root) is not used."""
        trie = TrieBuilder(root)
        capacity = self.tree_capacity
        if capacity > 1 and max_depth > 0:
            limit = (capacity - 1) * (self.config.ngram - 1)  # enough to fill after merges
            found = self.automaton.continuations(int(root), limit, MIN_MATCH)
            add_retrieval_tree(trie, found, capacity, max_depth)
            if self.successors is not None:
                grow_copy_logit_tree(trie, self.successors, capacity, max_depth, self.config.max_breadth)
        return trie.to_tree()

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        """Every verified node's top-k ids, accepted or not, in node order; unknown rows
        (trace replay) are skipped."""
        if self.successors is None:
            self.successors = SuccessorTable(out.logits.shape[-1], self.config.max_breadth)
        self.successors.observe(tree, out)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        self.automaton.extend(tokens)
