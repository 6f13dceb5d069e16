"""Lossless speculative sampling for drafts without a draft distribution.

Retrieval drafts (PLD, LogitSpec, Token Recycling) are deterministic guesses: they carry no
probability of their own. For them the verifier walks the tree from the root:

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

Processing (:func:`sampling_probs`): divide logits by the temperature; ``top_k`` keeps the
``k`` largest (ties at the k-th value kept); ``top_p`` keeps the smallest set of most probable
tokens whose mass reaches ``top_p`` (the token that crosses the threshold is kept). The same
function serves vanilla and speculative sampling.
"""

from __future__ import annotations

import torch

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

    def first_token(self, logits: torch.Tensor) -> int:
        return self.draw(logits)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def accept(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        children = _children(tree)
        path = [0]
        while True:
            token = self.draw(logits[path[-1]])
            child = children.get((path[-1], token))
            if child is None:
                return path, token
            path.append(child)


def _children(tree: DraftTree) -> dict[tuple[int, int], int]:
    """(parent node, token) -> the first child with that token."""
    children: dict[tuple[int, int], int] = {}
    for node in range(len(tree) - 1, 0, -1):
        children[(tree.parents[node], tree.tokens[node])] = node
    return children
