"""A draft head's candidates in LogitSpec's value tree: EAGLE-2's dynamic tree beside retrieval.

Per step, under the root, the head (:mod:`logitspec.draft_head`) grows its own candidate tree
level by level, as EAGLE-2 (arXiv 2406.16858) does:

1. the exact pairs up to ``(h_{n-1}, root)`` give the head's distribution after the root; its
   ``top_k`` tokens are the depth-1 candidates;
2. at each depth, the ``expand`` most valuable candidates of that depth (not end-of-sequence
   tokens, not below ``min_value``, and only those the tree could still keep) are expanded
   together in one forward pass of the head: each gets its ``top_k`` children; at most
   ``depth`` levels, and never deeper than the step allows.

A candidate's value is its estimated probability of being accepted, as everywhere in the value
tree (:mod:`logitspec.value_tree`): its parent's value times the acceptance rate learned
online for head nodes of its depth and of its head probability's bucket
(``("head", depth bucket, probability bucket)``). The rates start from the bucket's own
probability and follow what the target accepts, so the head's confidences are calibrated as
it runs. EAGLE-2 values nodes by the product of raw confidences; calibration lets the head's
candidates compete fairly with the retrieved ones.

The head's whole candidate tree is then offered to the value tree beside LogitSpec's retrieved
chains (next-token chains, next-next chains, recycled successor chains) and the tree keeps the
most probable nodes of all sources, ``draft_tree_capacity`` of them or as many as the cost
curve says pay (EAGLE-2's rerank, over both sources). Without retrieval
(``EagleConfig.retrieval = False``) the tree holds the head's candidates alone.

Example (``top_k = 2``, ``expand = 1``, rates equal to the head's probabilities): the head gives
``a .6, b .3`` after the root; ``a`` (the best of depth 1) is expanded: ``c .5, d .4`` (values
.30, .24). With a budget of 4 nodes (the root included) the tree is root, a, b and c
(.6, .3, .3: c ties b and comes later), unless a retrieved chain offers a node worth more.

At the automatic budget the head runs only while it pays (``EagleConfig.gate``): a
:class:`~logitspec.gate.SourceGate` compares the measured tokens per second of steps with the
head and of steps without it (retrieval alone; with ``retrieval`` off, no draft), and each step
takes the better, the other tried now and then. Where the head's passes cost more time than
its candidates save, the hybrid falls back to LogitSpec's retrieval alone; where they save more,
the head runs on nearly every step. The head's cache catches up on the skipped steps' pairs in
its next pass. Fixed budgets, which compare acceptance rather than speed, run the head every step.

Sampling: the head's candidates are deterministic (its top tokens), so the tree is verified by
the draw-and-match walk (:mod:`logitspec.sampling`, part 1): lossless whatever the head. The
gate decides from earlier steps' timings only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .cost import CostCurve, CostSurface
from .draft_head import DraftHead, HeadState
from .drafters import LogitSpecConfig, ValueTreeDrafter, value_prior
from .gate import SourceGate
from .tree import DraftTree
from .value_tree import (
    DEPTH_BUCKETS, AcceptanceStats, BestFirstTree, Candidate, bucket,
)

if TYPE_CHECKING:
    from .decoding import GenerationConfig

PROB_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class EagleConfig:
    """The hybrid's settings: ``logitspec`` (value policy) for retrieval, the budget and the
    cost curve; ``retrieval`` off leaves the head alone. Head tree (module docstring):
    ``top_k`` children per expanded node, ``expand`` nodes expanded per depth, ``depth``
    levels at most, nodes below ``min_value`` never expanded (EAGLE-2's settings for 7B
    models: top-k 10, depth 6, 60 tokens); ``prune``: expand only candidates that could still
    be kept (:meth:`EagleDrafter._head_tree`; the same trees with fewer head passes), off for
    EAGLE-2's full expansion. ``gate``: at the automatic budget, run the head only while it
    pays (module docstring); off runs it every step."""

    logitspec: LogitSpecConfig = LogitSpecConfig(tree_policy="value")
    retrieval: bool = True
    top_k: int = 10
    expand: int = 10
    depth: int = 6
    min_value: float = 0.01
    prune: bool = True
    gate: bool = True

    def __post_init__(self) -> None:
        if self.logitspec.tree_policy != "value":
            raise ValueError("the draft head's candidates need tree_policy='value'")
        if self.top_k < 1 or self.expand < 1 or self.depth < 1:
            raise ValueError("head top_k, expand and depth must be >= 1")
        if not 0.0 <= self.min_value < 1.0:
            raise ValueError(f"min_value must be in [0, 1), got {self.min_value}")

    @property
    def tree_slots(self) -> int:
        """The most drafted pairs one step feeds the head."""
        return (self.depth - 1) * self.expand


def head_prior(feature: tuple) -> float:
    """Acceptance rates assumed before any step was observed: a head node's bucket's middle
    probability (``("head", depth, 0.3)`` -> 0.25); other kinds as the value tree's."""
    if feature[0] != "head":
        return value_prior(feature)
    edge = feature[2]
    index = PROB_BUCKETS.index(edge)
    return (edge + (PROB_BUCKETS[index - 1] if index else 0.0)) / 2


@dataclass
class _Frontier:
    """A head candidate during expansion: its node, value, parent's tree slot and the input
    feature of its pair (the parent's output)."""

    node: Candidate
    value: float
    parent_slot: int
    input: torch.Tensor


class EagleDrafter(ValueTreeDrafter):
    """The draft head's dynamic tree and LogitSpec's retrieved chains in one value tree
    (module docstring)."""

    name = "eagle"
    needs_hidden = True

    def __init__(self, head: DraftHead, config: EagleConfig = EagleConfig(),
                 cost_curve: CostCurve | CostSurface | None = None, successors=None) -> None:
        super().__init__(config.logitspec, cost_curve, successors if config.retrieval else None)
        self.eagle = config
        self.head = head
        self.state = HeadState(head)
        self.stats = AcceptanceStats(head_prior)
        self.vocab_size = head.config.vocab_size
        self.eos: frozenset[int] = frozenset()
        self.max_new_tokens = 0
        self._verified: torch.Tensor | None = None
        self._head_features = tuple(
            tuple(("head", bucket(d, DEPTH_BUCKETS), edge) for edge in PROB_BUCKETS)
            for d in range(config.depth + 1)
        )
        if not config.retrieval:
            self.top_k = 0
        automatic = config.logitspec.draft_tree_capacity is None
        self.gate = SourceGate() if config.gate and automatic and cost_curve is not None else None
        self._use_head = True
        self._overheads = [0.0, 0.0]  # drafting seconds, averaged, of steps without / with it

    def configure(self, config: GenerationConfig) -> None:
        self.eos = frozenset(config.eos_token_ids)
        self.max_new_tokens = config.max_new_tokens

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        super().begin(context, reused, hidden)
        self.state.reserve(len(context) + self.max_new_tokens + self.eagle.tree_slots + 2)
        self.state.begin(context, reused, hidden)

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        if self.gate is None:
            return super().draft(root, root_topk, max_depth)
        self._use_head = self.gate.start_step()
        arm = int(self._use_head)
        self.overhead = self._overheads[arm]  # each arm's trees sized by its own drafting time
        tree = super().draft(root, root_topk, max_depth)
        self._overheads[arm] = self.overhead
        self.gate.drafted()
        return tree

    def _offer_candidates(self, tree: BestFirstTree, root: int, root_topk: np.ndarray,
                          max_depth: int) -> None:
        if self.eagle.retrieval:
            super()._offer_candidates(tree, root, root_topk, max_depth)
        if self._use_head:
            tree.offer_nodes(self._head_tree(root, max_depth))

    def _head_tree(self, root: int, max_depth: int) -> list[Candidate]:
        """The head's candidate tree under ``root`` (module docstring): its depth-1 nodes.

        A candidate is expanded only if it could still be kept, since its children are
        never more probable than itself: not below the least value the cost curve lets into
        a tree (:func:`~logitspec.value_tree.entry_value`), and not below ``capacity - 1``
        head candidates that are more probable (each is a distinct node, popped first). So
        the kept tree is the one full expansion would give, at a fraction of the head's
        passes where verification is dear or the tree is full."""
        out = self.state.advance(self.pool.tokens, root)
        (roots,) = self._children(out, 1)
        level = [_Frontier(node, self.stats.rate(node.feature), -1, out[0]) for node in roots]
        prune = self.eagle.prune
        floor = max(self.eagle.min_value, self._entry_value() if prune else 0.0)
        room = self.tree_capacity - 1
        values = [f.value for f in level]
        for depth in range(2, min(self.eagle.depth, max_depth) + 1):
            if prune and len(values) >= room:
                floor = max(floor, heapq.nlargest(room, values)[-1])
            picked = self._pick(level, floor)
            if not picked:
                break
            out, slots = self.state.expand([f.parent_slot for f in picked],
                                           torch.stack([f.input for f in picked]),
                                           [f.node.token for f in picked])
            level = []
            for parent, kids, slot, row in zip(picked, self._children(out, depth), slots, out):
                parent.node.children = kids
                level += [_Frontier(kid, parent.value * self.stats.rate(kid.feature), slot, row)
                          for kid in kids]
            values += [f.value for f in level]
        self.state.drop_tree()
        return roots

    def _pick(self, level: list[_Frontier], floor: float) -> list[_Frontier]:
        """The ``expand`` most valuable candidates worth expanding: not end-of-sequence
        tokens, not below ``floor`` (ties: offer order)."""
        worth = [f for f in level if f.value >= floor and f.node.token not in self.eos]
        worth.sort(key=lambda f: -f.value)
        return worth[: self.eagle.expand]

    def _children(self, out: torch.Tensor, depth: int) -> list[list[Candidate]]:
        """Per row of the head's outputs ``out`` (N, H): its ``top_k`` tokens as candidates
        at ``depth``, best first."""
        tokens, probs = self.head.top(out, self.eagle.top_k)
        features = self._head_features[depth]
        return [[Candidate(t, features[_prob_index(q)]) for t, q in zip(row_tokens, row_probs)]
                for row_tokens, row_probs in zip(tokens.tolist(), probs.tolist())]

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        super().observe(tree, out)
        self._verified = out.hidden
        if self.gate is not None:
            self.gate.verified(out.seconds)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        super().extend(tokens, tree, path)
        self.state.add_features(self._verified[list(path)])
        if self.gate is not None:
            self.gate.end_step(len(path))


def _prob_index(q: float) -> int:
    """The index of ``q``'s bucket in :data:`PROB_BUCKETS`."""
    for i, edge in enumerate(PROB_BUCKETS):
        if q <= edge:
            return i
    return len(PROB_BUCKETS) - 1
