"""Draft token trees: built from chains by a pure function, verified in one forward pass.

A tree has ``T`` nodes; node 0 is the root (the token the target already chose), every other
node's parent has a smaller index. A node attends to the cached prefix, to itself and to its
ancestors (``tree_mask``); its position is the root's position plus its depth.

Example: root 7 with chains [1, 2], [1, 3], [4] (merged into a trie)::

    node    0  1  2  3  4
    token   7  1  2  3  4
    parent -1  0  1  1  0
    depth   0  1  2  2  1
    retrieve_paths: [0, 1, 2], [0, 1, 3], [0, 4]

Without merging, the second chain would add its own copy of token 1.

Trees proposed by a draft model also carry ``draft_probs`` (T, V): row ``i`` is the
distribution node ``i``'s token was drawn from (row 0, the root's, is unused), which lossless
speculative sampling needs (:mod:`logitspec.sampling`). A row that gives its own node's token
probability 0 could not have produced it: such rows (zeros) mark deterministic proposals
(retrieved chains) in a tree that mixes both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class DraftTree:
    """Nodes in creation order; see the module docstring."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    draft_probs: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not n or len(self.parents) != n or len(self.depths) != n:
            raise ValueError("a tree needs a root and one parent and depth per node")
        if self.parents[0] != -1 or any(
            not 0 <= p < i for i, p in enumerate(self.parents) if i
        ):
            raise ValueError(f"parents must point to earlier nodes: {self.parents}")
        if self.draft_probs is not None and (
            self.draft_probs.dim() != 2 or self.draft_probs.shape[0] != n
        ):
            raise ValueError(
                f"draft_probs must be (T, V) with T = {n} nodes, got {tuple(self.draft_probs.shape)}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_draft_tokens(self) -> int:
        return len(self.tokens) - 1

    def tree_mask(self) -> np.ndarray:
        """(T, T) bool: ``mask[i, j]`` iff node j is node i or one of its ancestors."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i] = mask[parent]
            mask[i, i] = True
        return mask

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def retrieve_paths(self) -> list[list[int]]:
        """Root-to-leaf paths, ordered by leaf index."""
        has_child = set(self.parents[1:])
        return [self.path_to(i) for i in range(len(self.tokens)) if i not in has_child]


def build_tree(
    root: int,
    chains: Iterable[Sequence[int]],
    capacity: int,
    *,
    max_depth: int | None = None,
    merge: bool = True,
) -> DraftTree:
    """Hangs ``chains`` under ``root``, in order, until ``capacity`` nodes (root included).

    Each chain is cut at ``max_depth`` tokens and where the node budget runs out; with
    ``merge`` a chain first follows the nodes it shares with earlier chains (a trie), which
    cost nothing. ``chains`` may be a lazy iterable: it is not consumed past the budget.
    """
    if capacity < 1:
        raise ValueError(f"tree capacity must be >= 1 (the root), got {capacity}")
    tokens, parents, depths = [int(root)], [-1], [0]
    children: dict[tuple[int, int], int] = {}
    depth_limit = capacity if max_depth is None else max_depth
    if len(tokens) >= capacity or depth_limit <= 0:
        return DraftTree(tuple(tokens), tuple(parents), tuple(depths))
    for chain in chains:
        node = 0
        for token in chain[:depth_limit]:
            token = int(token)
            child = children.get((node, token)) if merge else None
            if child is None:
                if len(tokens) >= capacity:
                    break
                child = len(tokens)
                tokens.append(token)
                parents.append(node)
                depths.append(depths[node] + 1)
                if merge:
                    children[(node, token)] = child
            node = child
        if len(tokens) >= capacity:
            break
    return DraftTree(tuple(tokens), tuple(parents), tuple(depths))
