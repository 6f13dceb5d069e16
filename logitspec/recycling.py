"""Token Recycling: draft from the target's own past top-k predictions.

Every verified tree node ``i`` gives the target's logits after its token, whether or not the
node was accepted. Token Recycling keeps, for every token, the top-k successors the target
predicted the last time that token was verified (:class:`SuccessorTable`, an adjacency matrix
``(V, k)``), and drafts by walking that table from the step's root along a fixed tree shape
(:func:`static_template`): node ``(r1, r2, ...)`` is the ``r1``-th successor of the root, then
the ``r2``-th successor of that token, and so on. Nothing is trained and nothing is retrieved
from the text: the candidates the target rejected are "recycled" as next step's guesses.

Policies:

- The table is shared across generations (a hot start: questions teach each other, as in the
  paper); a token verified again overwrites its row (last write wins).
- A node whose parent's row is unknown (-1) is dropped with its subtree; so is a node deeper
  than the step's ``max_depth``.
- Siblings come from one table row, whose top-k ids are distinct: the tree is a trie without
  merging, and any verifier (greedy or the sampling walk) stays lossless.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput, read_back
from .tree import DraftTree

if TYPE_CHECKING:
    from .decoding import GenerationConfig

UNKNOWN = -1
DEFAULT_RANK_PROBS = (0.6, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)
RankPath = tuple[int, ...]
# at most this many rows are written one by one (SuccessorTable.update)
_ROW_BY_ROW = 5


PROMPT_CHUNK = 256  # prompt positions whose logits are computed at once (memory: CHUNK x V)


def prompt_logit_rows(head, hidden: torch.Tensor, tokens: Sequence[int],
                      k: int) -> Iterator[tuple[Sequence[int], np.ndarray, int]]:
    """RACER's copy-logit rows for the prompt ``tokens`` (hidden states ``hidden``, one row
    each): ``(chunk tokens, topk, V)`` per :data:`PROMPT_CHUNK` of them, ``topk`` (T, k) the
    best ids of ``head`` over their hidden states (the target's logit after each token), ``V``
    the logits' width. ``head``: final hidden states (T, H) -> logits (T, V)."""
    for start in range(0, hidden.shape[0], PROMPT_CHUNK):
        logits = head(hidden[start:start + PROMPT_CHUNK])
        _, topk = read_back(logits, k, greedy=False)
        yield tokens[start:start + len(topk)], topk, logits.shape[-1]


class SuccessorTable:
    """Each token's top-``k`` successors (int32 ``(V, k)``, best first, -1 = unknown), from the
    target's logits the last time that token was verified.

    Example (``k = 2``): verifying tokens ``[5, 7, 5]`` whose logits rank ``[3, 4]``, ``[5, 1]``
    and ``[9, 8]`` first leaves row 5 = ``[9, 8]`` (the later write wins), row 7 = ``[5, 1]``.
    """

    def __init__(self, vocab_size: int, k: int = 8) -> None:
        if vocab_size < 1 or k < 1:
            raise ValueError(f"vocab_size and k must be >= 1, got {vocab_size} and {k}")
        self.k = k
        self.table = np.full((vocab_size, k), UNKNOWN, dtype=np.int32)

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def successors_of(self, token: int) -> np.ndarray:
        """Row ``token`` (k,), best first; -1 where unknown. A view: do not modify it."""
        return self.table[token]

    def update(self, tokens: Sequence[int], successors: np.ndarray) -> None:
        """Overwrites the rows of ``tokens`` with ``successors`` (T, k); for a token listed
        twice the later row wins. Rows narrower than ``k`` are padded with -1."""
        ids = tokens.tolist() if isinstance(tokens, np.ndarray) else [int(t) for t in tokens]
        if not ids:
            return
        rows = successors if isinstance(successors, np.ndarray) else np.asarray(successors)
        if rows.ndim != 2 or rows.shape[0] != len(ids) or rows.shape[1] > self.k:
            raise ValueError(f"successors must be (T={len(ids)}, <= k={self.k}), got {rows.shape}")
        if rows.dtype.kind not in "iu":
            raise ValueError(f"successors must be integer ids, got {rows.dtype}")
        if rows.shape[1] < self.k:
            pad = np.full((rows.shape[0], self.k - rows.shape[1]), UNKNOWN, dtype=np.int32)
            rows = np.concatenate([rows.astype(np.int32), pad], axis=1)
        table = self.table
        if len(ids) <= _ROW_BY_ROW:
            # a few rows: one plain row write each (in order, so the later row wins) is
            # cheaper than numpy's fancy indexing
            for i, token in enumerate(ids):
                table[token] = rows[i]
        elif len(set(ids)) == len(ids):
            table[ids] = rows
        else:
            # a dict keeps each token's last row: one write per row (numpy leaves the winner
            # of repeated indices in one assignment unspecified)
            last = dict(zip(ids, range(len(ids))))
            table[list(last)] = rows[list(last.values())]

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        """Records the top-k ids of every tree node (``out.topk``, read back by the decoding
        loop; aux inputs are not learned from). Rows whose first id is -1 (unknown, in trace
        replay) are skipped."""
        n = len(tree.tokens)
        rows = out.topk[:n, : self.k]
        if not rows.shape[1]:
            return
        firsts = rows[:, 0].tolist()
        if min(firsts) >= 0:
            self.update(tree.tokens, rows)
            return
        known = [i for i, first in enumerate(firsts) if first >= 0]
        if known:
            self.update([tree.tokens[i] for i in known], rows[known])


def static_template(capacity: int, rank_probs: Sequence[float] = DEFAULT_RANK_PROBS) -> list[RankPath]:
    """The draft tree's shape: ``capacity`` rank paths, root ``()`` first, parents first.

    A path's weight is the product of ``rank_probs[r]`` over its ranks (``rank_probs[r]``: a
    prior that the ``r``-th successor is the next token); the shape is the root and the
    ``capacity - 1`` heaviest paths, heaviest first, ties by path order (shorter first, then
    lexicographic). Weights are exact (fractions), so ties do not depend on rounding. Every
    ``rank_probs`` value is in (0, 1], so a child never outweighs its parent: the shape is a tree.

    Example, ``rank_probs = (0.5, 0.3, 0.2)``, capacity 6: weights (0,) .5, (1,) .3, (0, 0) .25,
    (2,) .2, (0, 1) .15 (then (1, 0) .15 ties with (0, 1), which comes first)::

        [(), (0,), (1,), (0, 0), (2,), (0, 1)]

    With the defaults (:data:`DEFAULT_RANK_PROBS`: 0.6 for the best successor, 0.15, 0.08,
    0.05, 0.04, 0.03, 0.02, 0.02), capacity 64 has 8 nodes at depth 1, then 18, 16, 9, 6, 4, 1
    and 1 at depths 2-8: wide near the root, deep along rank 0, as in Token Recycling's tree.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 (the root), got {capacity}")
    if not rank_probs or not all(0 < p <= 1 for p in rank_probs):
        raise ValueError(f"rank_probs must be non-empty values in (0, 1], got {tuple(rank_probs)}")
    probs = [Fraction(p) for p in rank_probs]
    # heap of (-weight, depth, path): popped heaviest first, ties by path order
    heap = [(-p, 1, (r,)) for r, p in enumerate(probs)]
    heapq.heapify(heap)
    shape: list[RankPath] = [()]
    while len(shape) < capacity:
        weight, depth, path = heapq.heappop(heap)
        shape.append(path)
        for r, p in enumerate(probs):
            heapq.heappush(heap, (weight * p, depth + 1, path + (r,)))
    return shape


@dataclass(frozen=True)
class TemplateArrays:
    """A template as arrays over its nodes (node 0 = the root): each node's parent index,
    last rank and depth, and the nodes of each depth (``levels[d - 1]`` = depth ``d``)."""

    parents: np.ndarray  # (N,) int64, -1 for the root
    ranks: np.ndarray  # (N,) int64, 0 for the root (unused)
    depths: np.ndarray  # (N,) int64
    levels: tuple[np.ndarray, ...]

    @classmethod
    def from_paths(cls, paths: Sequence[RankPath]) -> "TemplateArrays":
        index = {path: i for i, path in enumerate(paths)}
        parents = np.array([index[p[:-1]] if p else -1 for p in paths], dtype=np.int64)
        ranks = np.array([p[-1] if p else 0 for p in paths], dtype=np.int64)
        depths = np.array([len(p) for p in paths], dtype=np.int64)
        levels = tuple(np.flatnonzero(depths == d) for d in range(1, int(depths.max()) + 1))
        return cls(parents, ranks, depths, levels)


@dataclass(frozen=True)
class RecyclingConfig:
    """Token Recycling settings: the tree budget (root included), the successors kept per
    token, and the rank priors that shape the static tree (:func:`static_template`; ranks
    past ``k`` are never drafted)."""

    draft_tree_capacity: int = 64
    k: int = 8
    rank_probs: tuple[float, ...] = DEFAULT_RANK_PROBS

    def __post_init__(self) -> None:
        if self.draft_tree_capacity < 1:
            raise ValueError(f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        self.template()  # validates rank_probs

    def template(self) -> list[RankPath]:
        return static_template(self.draft_tree_capacity, self.rank_probs[: self.k])


class TokenRecyclingDrafter:
    """Token Recycling behind the :class:`~logitspec.drafters.Drafter` protocol.

    ``table``: a :class:`SuccessorTable` to share (e.g. with another drafter); by default one
    is created on the first :meth:`observe`, sized by the model's vocabulary (its logits).
    Until then every tree is the root alone.
    """

    name = "recycling"
    needs_hidden = False

    def __init__(self, config: RecyclingConfig = RecyclingConfig(),
                 table: SuccessorTable | None = None) -> None:
        self.config = config
        self.tree_capacity = config.draft_tree_capacity
        self.top_k = config.k
        if table is not None and table.k < config.k:
            raise ValueError(f"the shared table keeps {table.k} successors, fewer than k={config.k}")
        self.shape = TemplateArrays.from_paths(config.template())
        self.table = table

    def configure(self, config: GenerationConfig) -> None:
        pass

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        """Keeps the table: the prompt brings no target logits to learn from (only its last
        position is computed), and the successors learned earlier stay useful (hot start)."""

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        """The template filled from the table under ``root``; unknown or too deep nodes dropped.

        Example: k = 2, rows 7 -> [3, 4], 3 -> [9, -1], 4 unknown; template
        [(), (0,), (1,), (0, 0), (0, 1), (1, 0)] under root 7 gives tokens 7, 3, 4, 9 (the
        (0, 1) and (1, 0) nodes are unknown), parents -1, 0, 0, 1.
        """
        if self.table is None or max_depth <= 0 or self.tree_capacity == 1:
            return DraftTree((int(root),), (-1,), (0,))
        tokens = self._fill(int(root))
        keep = (tokens >= 0) & (self.shape.depths <= max_depth)
        new_index = np.cumsum(keep) - 1
        parents = self.shape.parents[keep]
        parents = np.where(parents >= 0, new_index[np.maximum(parents, 0)], -1)
        return DraftTree(
            tuple(tokens[keep].tolist()), tuple(parents.tolist()),
            tuple(self.shape.depths[keep].tolist()),
        )

    def _fill(self, root: int) -> np.ndarray:
        """Every template node's token (-1 where its own or an ancestor's row is unknown),
        filled depth by depth with one table gather per depth."""
        shape, table = self.shape, self.table.table
        tokens = np.full(len(shape.depths), UNKNOWN, dtype=np.int64)
        tokens[0] = root
        for nodes in shape.levels:
            parent_tokens = tokens[shape.parents[nodes]]
            known = parent_tokens >= 0
            found = table[np.where(known, parent_tokens, 0), shape.ranks[nodes]]
            tokens[nodes] = np.where(known, found, UNKNOWN)
        return tokens

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        """Learns from every verified node, accepted or not (the "recycling")."""
        if self.table is None:
            self.table = SuccessorTable(out.logits.shape[-1], self.config.k)
        self.table.observe(tree, out)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        pass
