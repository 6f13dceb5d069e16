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

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
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


@dataclass(frozen=True)
class TargetOutput:
    """What the target computed for every verified input, as the drafters see it.

    ``logits`` (N, V) and ``hidden`` (N, H, only when a drafter asked for it) stay on the
    device; ``topk`` (N, k) int64 is on the host: each input's top-k token ids, best first
    (``topk[:, 0]`` is its greedy token, ties aside), read back with the verifier's own tokens
    in one device-to-host transfer (:func:`read_back`). N counts tree nodes, then aux inputs.
    A row of -1 marks an input whose top-k is unknown (trace replay). ``seconds``: how long
    the verification pass took, from its inputs' transfer to the read-back (None when not
    timed, as in trace replay); drafters that size trees by cost learn from it.
    """

    logits: torch.Tensor | None
    topk: np.ndarray
    hidden: torch.Tensor | None = None
    seconds: float | None = None


class Verifier(Protocol):
    """Turns the target's logits into tokens: the first token after the prompt, and per step
    the accepted path and the carried (bonus) token.

    ``read`` is the step's one synchronization point: it moves to the host, in one transfer,
    what ``accept`` needs and the top-k rows the drafters read. ``accept`` decides on the host.
    The decoding loop times them as the verify and accept phases.
    """

    def read(self, logits: torch.Tensor, top_k: int, positions: np.ndarray) -> tuple[Any, np.ndarray]:
        """What :meth:`accept` needs from the logits (N, V) of inputs at ``positions`` (N,),
        and their top-``top_k`` ids (N, top_k) int64 on the host."""

    def first_token(self, predicted: Any) -> int:
        """The token after the prompt, from :meth:`read` of the last prompt input's logit."""

    def accept(self, tree: DraftTree, predicted: Any) -> tuple[list[int], int]:
        """The accepted path (node indices, root first) and the token to carry next."""


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dimension, the first index on ties. ``max(dim).indices`` has the
    same tie rule as ``argmax`` and is several times faster on CPU in bfloat16."""
    return logits.max(dim=-1).indices


def read_back(logits: torch.Tensor, top_k: int, *, tokens: torch.Tensor | None = None,
              greedy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One token per input (N,) and the top-``top_k`` ids (N, top_k) of logits (N, V), int64
    on the host, computed on the logits' device and copied back in one transfer.

    The token column is ``tokens`` (a device tensor, e.g. sampled tokens) when given, else the
    greedy token (``greedy``; with ``greedy=False`` the column is empty). The greedy token
    keeps :func:`greedy_tokens`' rule (the first index among tied maxima), derived from the
    top-k when there is one, so a single pass over the logits serves both: the smallest id
    among the top-k entries equal to the maximum. A row whose k entries all tie (more tied
    maxima than k) falls back to :func:`greedy_tokens`. Example, k = 3, a row with values 2 at
    ids 9 and 4 and 1 elsewhere: topk may list (9, 4, x) or (4, 9, x); the greedy token is 4
    either way.
    """
    rows, k = logits.shape[0], min(top_k, logits.shape[-1])
    values, ids = logits.topk(k, dim=-1) if k else (None, None)  # (N, k), best first
    if tokens is None and greedy:
        tokens = _greedy(logits, values, ids)
    columns = [c for c in ((None if tokens is None else tokens[:, None]), ids) if c is not None]
    if not columns:
        return np.zeros(0, dtype=np.int64), np.zeros((rows, 0), dtype=np.int64)
    packed = _to_host(torch.cat(columns, dim=1) if len(columns) > 1 else columns[0])
    if tokens is None:
        return np.zeros(0, dtype=np.int64), packed
    return packed[:, 0], packed[:, 1:]


def _greedy(logits: torch.Tensor, values: torch.Tensor | None, ids: torch.Tensor | None) -> torch.Tensor:
    """The greedy tokens (N,), from the sorted top-k ``values``/``ids`` when k >= 2."""
    if values is None or values.shape[-1] < 2:
        return greedy_tokens(logits)
    tied = values == values[:, :1]
    greedy = torch.where(tied, ids, logits.shape[-1]).min(dim=-1).values
    overflow = tied[:, -1]
    if logits.device.type != "cpu" or bool(overflow.any()):
        greedy = torch.where(overflow, greedy_tokens(logits), greedy)
    return greedy


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """int64 numpy copy of ``tensor``; from a GPU through pinned memory, one synchronization."""
    tensor = tensor.to(torch.int64)
    if tensor.device.type == "cpu":
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=torch.int64, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


class GreedyVerifier:
    """Greedy decoding: argmax everywhere, :func:`greedy_accept` for the path."""

    def read(self, logits: torch.Tensor, top_k: int, positions: np.ndarray) -> tuple[list[int], np.ndarray]:
        greedy, topk = read_back(logits, top_k)
        return greedy.tolist(), topk

    def first_token(self, predicted: list[int]) -> int:
        return predicted[-1]

    def accept(self, tree: DraftTree, predicted: list[int]) -> tuple[list[int], int]:
        path = greedy_accept(tree.tokens, tree.parents, predicted)
        return path, predicted[path[-1]]
