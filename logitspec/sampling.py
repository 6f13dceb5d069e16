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

Processing (:func:`sampling_scores`, :func:`sampling_probs`): divide logits by the
temperature; ``top_k`` keeps the ``k`` largest (ties at the k-th value kept); ``top_p`` keeps
the smallest set of most probable tokens whose mass reaches ``top_p`` (the token that crosses
the threshold is kept). The same functions serve vanilla and speculative sampling.

3. How a token is drawn (:class:`SamplingVerifier`): by the Gumbel-max rule, ``argmax(scores +
G)`` with ``G`` i.i.d. standard Gumbel noise over the vocabulary, which is an exact draw from
``softmax(scores)``. The noise for the token at position ``i + 1`` (drawn from the logits of
the input at position ``i``) comes from a generator seeded with ``(seed, i)`` alone. Every
emitted token sits at its own position, so the draws of one output use independent noise, as
exactness needs; nodes at the same depth share their noise, which is harmless since the walk
visits one node per depth. And the draw at a position does not depend on how many tokens one
forward pass verifies or which nodes a tree holds: with the same seed, speculative sampling
emits vanilla sampling's tokens (up to floating-point differences between a tree pass and a
one-token pass). Being keyed by position, the draws can be made lazily, one walked node at a
time (cheapest on a CPU), or all at once for every node on the device, read back with the
drafters' top-k in the step's one transfer (a GPU): both give the same tokens. The rejection
walk of part 2 draws its coins and residual tokens from one sequential seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .acceptance import read_back
from .tree import DraftTree


def sampling_scores(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Scores (..., V) in float32 whose softmax is the processed distribution: logits over the
    temperature, ``-inf`` for tokens that top-k or top-p remove."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = scores.softmax(dim=-1).sort(dim=-1, descending=True)
        removed = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        scores = scores.scatter(-1, order, scores.gather(-1, order).masked_fill(removed, float("-inf")))
    return scores


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities (..., V) in float32 after temperature, top-k and top-p."""
    return sampling_scores(logits, temperature, top_k, top_p).softmax(dim=-1)


def position_seed(seed: int, position: int) -> int:
    """The noise generator's seed for the token drawn at ``position`` (a 64-bit mix of both,
    kept below 2**63)."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


@dataclass
class SampledOutputs:
    """The target's logits (N, V) at inputs at ``positions`` (N,), and the tokens drawn
    there when they were drawn all at once (else drawn on demand)."""

    logits: torch.Tensor
    positions: np.ndarray
    tokens: list[int] | None = None


class SamplingVerifier:
    """Speculative sampling by tree walk (module docstring). Seeded: same seed, same device,
    same output. ``eager`` draws every node's token on the device in :meth:`read` (default on
    CUDA); otherwise tokens are drawn as the walk reaches their node."""

    def __init__(
        self, temperature: float, top_k: int = 0, top_p: float = 1.0, *, seed: int = 0,
        device: torch.device | str = "cpu", eager: bool | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.device = torch.device(device)
        self.eager = self.device.type == "cuda" if eager is None else eager
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._noise_generator = torch.Generator(device=self.device)

    def gumbel(self, position: int, vocab_size: int) -> torch.Tensor:
        """The Gumbel noise (V,) of the token drawn after the input at ``position``."""
        self._noise_generator.manual_seed(position_seed(self.seed, position))
        uniform = torch.rand(vocab_size, generator=self._noise_generator, device=self.device)
        return -torch.log(-torch.log(uniform))

    def draw(self, logits: torch.Tensor, position: int) -> int:
        """The token drawn from the processed distribution of ``logits`` (V,) at ``position``."""
        scores = sampling_scores(logits, self.temperature, self.top_k, self.top_p)
        return int((scores + self.gumbel(position, scores.shape[-1])).argmax())

    def read(self, logits: torch.Tensor, top_k: int, positions: np.ndarray) -> tuple[SampledOutputs, np.ndarray]:
        """The logits and positions (and, eager, every input's drawn token) and the drafters'
        top-k, in one transfer."""
        if not self.eager:
            return SampledOutputs(logits, positions), read_back(logits, top_k, greedy=False)[1]
        tokens, topk = read_back(logits, top_k, tokens=self._draw_all(logits, positions))
        return SampledOutputs(logits, positions, tokens.tolist()), topk

    def _draw_all(self, logits: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """Every input's token (N,) on the device, one noise row per distinct position."""
        distinct, row = np.unique(positions, return_inverse=True)
        noise = torch.stack([self.gumbel(int(p), logits.shape[-1]) for p in distinct])
        scores = sampling_scores(logits, self.temperature, self.top_k, self.top_p)
        return (scores + noise[torch.from_numpy(row).to(noise.device)]).argmax(dim=-1)

    def token(self, out: SampledOutputs, node: int) -> int:
        """The token drawn at input ``node``."""
        if out.tokens is not None:
            return out.tokens[node]
        return self.draw(out.logits[node], int(out.positions[node]))

    def first_token(self, out: SampledOutputs) -> int:
        return self.token(out, len(out.positions) - 1)

    def accept(self, tree: DraftTree, out: SampledOutputs) -> tuple[list[int], int]:
        if tree.draft_probs is not None:
            return self._rejection_walk(tree, out.logits)
        children = _children(tree)
        path = [0]
        while True:
            token = self.token(out, path[-1])
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
