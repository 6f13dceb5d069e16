"""Lossless speculative sampling: the draw-and-match walk, and recursive rejection sampling.

1. Drafts without a draft distribution (``tree.draft_probs is None``). Retrieval drafts (PLD,
LogitSpec, Token Recycling) are deterministic guesses: they carry no probability of their own.
For them the verifier walks the tree from the root:

    node = root
    loop: draw x from the target's processed distribution at node
          if x is the token of one of node's children: accept that child, node = child
          else: stop; x is carried as the next step's root

Why the output distribution is exactly vanilla sampling's: at every node on the walk the
context (prefix + root + accepted nodes) is exactly the text emitted so far, and the node's
logits were computed on exactly that context (tree attention). The walk draws the next token
from the target's conditional given that context with fresh randomness, as vanilla sampling
would; the tree only decides whether the *following* conditional is already computed (a child
with that token exists) or needs the next forward pass (no child: the token is carried).
Which draft tokens exist never changes what is drawn, only how many draws one forward pass
serves. Children with equal tokens (unmerged trees) share the same context, so taking the
first is exact too.

2. Drafts with a draft distribution (``tree.draft_probs``, from draft models): recursive
rejection sampling. At a node with the target's processed distribution ``p`` and children
``c_1 .. c_m`` (index order), child ``c_i``'s token ``x_i`` having been drawn from ``q_i`` (its
row of ``draft_probs``)::

    for i in 1..m: accept c_i with probability min(1, p(x_i) / q_i(x_i)) -> descend into c_i
                   else p = normalize(max(0, p - q_i))
    all rejected (or no child): draw the carried token from p

A chain (one child per node) is standard speculative sampling: accept with ``min(1, p/q)``,
on rejection draw from the residual ``normalize(max(0, p - q))``, and when every draft is
accepted the carried token is drawn from ``p`` at the last node.

Why the output is exactly vanilla sampling's: one try is the speculative sampling lemma (``x ~
q``, accepted with probability ``min(1, p(x)/q(x))``, else a draw from the residual: the
result is distributed as ``p``, whatever ``q``). By induction from the last child backwards,
the tries from child ``i`` on produce a token distributed as the current ``p`` whatever it is,
provided ``x_i``, given everything before it (earlier children, their acceptance coins), is
distributed as ``q_i``. Draft tokens are drawn before verification with the drafter's own
randomness, so the coins never influence them; what remains is to record for each child the
distribution its token had given that it became that child. The draft-model drafter
(:mod:`logitspec.draft_model`) merges chains into a trie: a draw equal to an existing sibling
joins that sibling (its continuation goes below it) and is not a try of its own; a draw that
becomes a new child is recorded with the draft distribution restricted to tokens not yet among
its siblings, renormalized, which is exactly its conditional distribution. A joined draw
leaves ``p`` as it is, and the walk from there is exact either way, so the mixture is exact.
Below an accepted child, its children were drawn from the draft given that child's context,
independently of the coins above: the argument repeats at every depth. (Recording a new
child with the unrestricted ``q``, as a naively deduplicated trie would, is biased.)

A deterministic proposal (a retrieved chain in a tree that mixes both kinds) is the point mass
``q = delta_x``, marked by a row with ``q(x) = 0``: accepted with probability ``p(x)``, its
residual is ``p`` without ``x``. With point masses only, this is the draw-and-match walk spelled
as tries, so retrieval and draft-model chains mix in one tree losslessly; trees without
``draft_probs`` keep the walk of part 1 (one draw per emitted token).

Processing (:func:`sampling_probs`): divide logits by the temperature; ``top_k`` keeps the
``k`` largest (ties at the k-th value kept); ``top_p`` keeps the smallest set of most probable
tokens whose mass reaches ``top_p`` (the token that crosses the threshold is kept). The same
function serves vanilla and speculative sampling.
"""

from __future__ import annotations

import numpy as np
import torch

from .acceptance import read_back
from .tree import DraftTree


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities (..., V) in float32 after temperature, top-k and top-p."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class SamplingVerifier:
    """Speculative sampling by tree walk (module docstring). Seeded: same seed, same device,
    same output."""

    def __init__(
        self, temperature: float, top_k: int = 0, top_p: float = 1.0, *, seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def draw(self, logits: torch.Tensor) -> int:
        """One token from the processed distribution of ``logits`` (V,)."""
        probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def read(self, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, np.ndarray]:
        """The logits themselves (the walk draws from them lazily) and the drafters' top-k."""
        return logits, read_back(logits, top_k, with_greedy=False)[1]

    def first_token(self, logits: torch.Tensor) -> int:
        return self.draw(logits[-1])

    def accept(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        if tree.draft_probs is not None:
            return self._rejection_walk(tree, logits)
        children = _children(tree)
        path = [0]
        while True:
            token = self.draw(logits[path[-1]])
            child = children.get((path[-1], token))
            if child is None:
                return path, token
            path.append(child)

    def _rejection_walk(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        """Recursive rejection sampling down ``tree`` (module docstring, part 2)."""
        children = _child_lists(tree)
        draft_probs = tree.draft_probs.to(logits.device)
        path = [0]
        while True:
            p = sampling_probs(logits[path[-1]], self.temperature, self.top_k, self.top_p)
            for child in children[path[-1]]:
                token, q = tree.tokens[child], draft_probs[child]
                if self._try(p, q, token):
                    path.append(child)
                    break
                p = residual(p, q, token)
            else:
                return path, int(torch.multinomial(p, 1, generator=self.generator))

    def _try(self, p: torch.Tensor, q: torch.Tensor, token: int) -> bool:
        """Accepts ``token`` drawn from ``q`` (a point mass when ``q[token] == 0``) against
        ``p`` with probability ``min(1, p[token] / q[token])``."""
        q_token = float(q[token])
        ratio = float(p[token]) / q_token if q_token > 0 else float(p[token])
        uniform = float(torch.rand((), generator=self.generator, device=p.device))
        return uniform < ratio


def residual(p: torch.Tensor, q: torch.Tensor, token: int) -> torch.Tensor:
    """``normalize(max(0, p - q))`` after ``token`` (drawn from ``q``) was rejected; for a
    point mass (``q[token] == 0``), ``p`` without ``token``. Falls back to ``p`` when nothing is
    left (a rejection of probability 0 in exact arithmetic, reachable only by rounding)."""
    if float(q[token]) > 0:
        rest = (p - q).clamp_(min=0.0)
    else:
        rest = p.clone()
        rest[token] = 0.0
    total = float(rest.sum())
    return rest / total if total > 0 else p


def _child_lists(tree: DraftTree) -> list[list[int]]:
    """Children of every node, in index order."""
    children: list[list[int]] = [[] for _ in range(len(tree))]
    for node in range(1, len(tree)):
        children[tree.parents[node]].append(node)
    return children


def _children(tree: DraftTree) -> dict[tuple[int, int], int]:
    """(parent node, token) -> the first child with that token."""
    children: dict[tuple[int, int], int] = {}
    for node in range(len(tree) - 1, 0, -1):
        children[(tree.parents[node], tree.tokens[node])] = node
    return children
