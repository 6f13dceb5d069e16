"""Acceptance of a verified draft tree: the rule and the verifier the decoding loop calls.

Rule: the root is always accepted (the target chose it). A non-root node is accepted when its
parent is accepted and its token equals the target's greedy prediction at its parent. The
accepted path ends at the deepest accepted node; among equally deep ones, the first (lowest
index). Every accepted path spells the target's own greedy continuation, so which of several
equally long paths is taken never changes the output.

Example (tree of :mod:`logitspec.tree`'s docstring, predictions ``pred`` per node)::

    token   7  1  2  3  4
    parent -1  0  1  1  0
    pred    1  3  .  .  .     node 1 ok (1 == pred[0]); node 2 no (2 != 3); node 3 ok
    -> path [0, 1, 3]; the bonus token is pred[3], carried as the next root
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from .tree import DraftTree


def greedy_accept(tokens: Sequence[int], parents: Sequence[int], pred: Sequence[int]) -> list[int]:
    """Node indices of the accepted path, root first. ``pred[i]`` = argmax at node ``i``."""
    depth = [0] * len(tokens)  # accepted depth + 1, 0 = not accepted
    depth[0] = 1
    best = 0
    for i in range(1, len(tokens)):
        parent = parents[i]
        if depth[parent] and tokens[i] == pred[parent]:
            depth[i] = depth[parent] + 1
            if depth[i] > depth[best]:
                best = i
    path = []
    node = best
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


class Verifier(Protocol):
    """Turns the target's logits into tokens: the first token after the prompt, and per step
    the accepted path and the carried (bonus) token.

    ``predict`` may move data to the host (the step's synchronization point); ``accept`` decides
    on the host. The decoding loop times them as the verify and accept phases.
    """

    def first_token(self, logits: torch.Tensor) -> int:
        """The token after the prompt, from the last prompt logit (V,)."""

    def predict(self, logits: torch.Tensor) -> Any:
        """What :meth:`accept` needs from the tree's logits (T, V)."""

    def accept(self, tree: DraftTree, predicted: Any) -> tuple[list[int], int]:
        """The accepted path (node indices, root first) and the token to carry next."""


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dimension, the first index on ties. ``max(dim).indices`` has the
    same tie rule as ``argmax`` and is several times faster on CPU in bfloat16."""
    return logits.max(dim=-1).indices


class GreedyVerifier:
    """Greedy decoding: argmax everywhere, :func:`greedy_accept` for the path."""

    def first_token(self, logits: torch.Tensor) -> int:
        return int(greedy_tokens(logits))

    def predict(self, logits: torch.Tensor) -> list[int]:
        return greedy_tokens(logits).tolist()

    def accept(self, tree: DraftTree, predicted: list[int]) -> tuple[list[int], int]:
        path = greedy_accept(tree.tokens, tree.parents, predicted)
        return path, predicted[path[-1]]
