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

*Aux inputs* (``aux_tokens``, ``aux_depths``, ``aux_mask``) ride along in the tree's forward
pass without being candidates: the target computes their outputs (a drafter reads them, e.g.
Lookahead's Jacobi window), their keys/values are dropped afterwards, and acceptance looks at
the ``T`` tree nodes only. Aux input ``a`` sits at the root's position plus ``aux_depths[a]``
and attends to the cached prefix and to the inputs ``aux_mask[a]`` marks among the ``T + A``
verified inputs (tree nodes first); tree nodes never attend to aux inputs. Example: root 7, one
draft 1, and two aux inputs 5, 6 forming a chain of their own after the root::

    inputs        7  1  5  6      (tokens + aux_tokens)
    position      0  1  1  2      (depths + aux_depths, relative to the root)
    input_mask()  1  0  0  0
                  1  1  0  0
                  1  0  1  0      (aux_mask rows)
                  1  0  1  1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class DraftTree:
    """Nodes in creation order, then the aux inputs; see the module docstring."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    draft_probs: torch.Tensor | None = field(default=None, compare=False, repr=False)
    aux_tokens: tuple[int, ...] = ()
    aux_depths: tuple[int, ...] = ()
    aux_mask: np.ndarray | None = field(default=None, compare=False, repr=False)

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
        aux = len(self.aux_tokens)
        if len(self.aux_depths) != aux or (aux > 0) != (self.aux_mask is not None):
            raise ValueError("aux inputs need one depth each and a mask")
        if aux and (self.aux_mask.shape != (aux, n + aux) or not self.aux_mask[:, n:].diagonal().all()):
            raise ValueError(f"aux_mask must be (A={aux}, T + A={n + aux}) and let every aux "
                             "input see itself")

    @classmethod
    def of_valid(cls, tokens: tuple[int, ...], parents: tuple[int, ...],
                 depths: tuple[int, ...]) -> DraftTree:
        """A tree of nodes only, from a builder that guarantees what ``__post_init__``
        checks (every parent earlier than its child, one parent and depth per node): the
        checks are skipped (they cost a pass over the nodes every step)."""
        tree = object.__new__(cls)
        tree.__dict__.update(tokens=tokens, parents=parents, depths=depths, draft_probs=None,
                             aux_tokens=(), aux_depths=(), aux_mask=None)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_draft_tokens(self) -> int:
        return len(self.tokens) - 1

    @property
    def num_inputs(self) -> int:
        """Tokens in the verification pass: tree nodes and aux inputs."""
        return len(self.tokens) + len(self.aux_tokens)

    @property
    def is_chain(self) -> bool:
        """A single path from the root and no aux inputs: causal order is its mask."""
        return not self.aux_tokens and self.depths[-1] == len(self.tokens) - 1

    def input_tokens(self) -> tuple[int, ...]:
        return self.tokens + self.aux_tokens

    def input_depths(self) -> tuple[int, ...]:
        """Position offsets from the root of every input."""
        return self.depths + self.aux_depths

    def tree_mask(self) -> np.ndarray:
        """(T, T) bool: ``mask[i, j]`` iff node j is node i or one of its ancestors (built
        from per-node ancestor bitsets: a parent's set plus the node's own bit)."""
        n = len(self.tokens)
        ancestors = [0] * n
        for i, parent in enumerate(self.parents):
            # the root's parent, -1, reads the last entry, not yet written (0)
            ancestors[i] = ancestors[parent] | (1 << i)
        if n <= 64:  # one little-endian uint64 per row
            packed = np.array(ancestors, dtype="<u8").view(np.uint8).reshape(n, 8)
        else:
            width = (n + 7) // 8
            packed = np.frombuffer(b"".join(a.to_bytes(width, "little") for a in ancestors),
                                   dtype=np.uint8).reshape(n, width)
        return np.unpackbits(packed, axis=1, count=n, bitorder="little").view(bool)

    def input_mask(self) -> np.ndarray:
        """(T + A, T + A) bool over every input: the tree mask, then the aux rows."""
        if not self.aux_tokens:
            return self.tree_mask()
        n, total = len(self.tokens), self.num_inputs
        mask = np.zeros((total, total), dtype=bool)
        mask[:n, :n] = self.tree_mask()
        mask[n:] = self.aux_mask
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
