"""Value-ranked draft trees: spend the node budget where acceptance is likely.

Every candidate node gets an estimated probability of being accepted,
``P(node) = P(parent) * q(feature)``, where ``q`` is the acceptance rate observed so far for
nodes of the same kind (:class:`AcceptanceStats`). In a trie, distinct nodes at the same depth
spell different texts, so at most one of them is accepted, and the expected number of tokens a
step emits is exactly ``1 + sum(P(node))`` over the tree. The best tree of ``n`` nodes is
therefore the ``n`` most probable candidates (a prefix-closed set, because a child is never
more probable than its parent), and with a cost curve the best ``n`` maximizes

    (1 + sum of the n largest P) / (cost(n + 1) + overhead)      (:func:`select_nodes`)

i.e. expected tokens per second of verification. Example: P = [0.9, 0.5, 0.2, 0.05] and a cost
of 1.0, 1.02, 1.05, 1.1, 1.4 for 1..5 tree tokens gives ratios 1.00, 1.86, 2.29, 2.36, 1.89:
four nodes (root + three drafts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from .tree import DraftTree

Feature = Hashable
DEPTH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
RANK_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def bucket(value: int, edges: Sequence[int]) -> int:
    """The first edge >= ``value`` (the last edge past them all)."""
    for edge in edges:
        if value <= edge:
            return edge
    return edges[-1]


@dataclass
class AcceptanceStats:
    """Online acceptance rates per node feature, with a Beta prior.

    ``rate(f) = (successes + prior_mean * strength) / (trials + strength)``. A node is a trial
    when its parent was accepted; a success when it was accepted too. Counts are halved past
    ``horizon`` trials so the estimates follow the text.
    """

    prior: Callable[[Feature], float]
    strength: float = 2.0
    horizon: float = 2000.0
    counts: dict = field(default_factory=dict)

    def rate(self, feature: Feature) -> float:
        succ, trials = self.counts.get(feature, (0.0, 0.0))
        return (succ + self.prior(feature) * self.strength) / (trials + self.strength)

    def update(self, features: Sequence[Feature], parents: Sequence[int], accepted: set[int]) -> None:
        for node in range(1, len(parents)):
            if parents[node] in accepted:
                succ, trials = self.counts.get(features[node], (0.0, 0.0))
                succ, trials = succ + (node in accepted), trials + 1
                if trials > self.horizon:
                    succ, trials = succ / 2, trials / 2
                self.counts[features[node]] = (succ, trials)


class CandidateTrie:
    """Candidate nodes with their acceptance probabilities (node 0 = the root, P = 1)."""

    def __init__(self, root: int) -> None:
        self.tokens = [root]
        self.parents = [-1]
        self.probs = [1.0]
        self.features: list[Feature] = [None]
        self._children: dict[tuple[int, int], int] = {}

    def add_chain(self, tokens: Sequence[int], features: Sequence[Feature], rates: Sequence[float]) -> None:
        """Hangs a chain under the root; shared prefixes keep the higher probability."""
        node, prob = 0, 1.0
        for token, feature, rate in zip(tokens, features, rates):
            prob *= rate
            child = self._children.get((node, token))
            if child is None:
                child = len(self.tokens)
                self._children[(node, token)] = child
                self.tokens.append(token)
                self.parents.append(node)
                self.probs.append(prob)
                self.features.append(feature)
            elif prob > self.probs[child]:
                self.probs[child] = prob
                self.features[child] = feature
            node, prob = child, self.probs[child]

    def to_tree(self, nodes: Sequence[int]) -> tuple[DraftTree, list[Feature]]:
        """The tree of the chosen candidate ``nodes`` (prefix-closed, root included), in
        creation order, with each node's feature."""
        chosen = sorted(nodes)
        index = {old: new for new, old in enumerate(chosen)}
        depths: list[int] = []
        parents: list[int] = []
        for old in chosen:
            parent = index[self.parents[old]] if old else -1
            parents.append(parent)
            depths.append(depths[parent] + 1 if old else 0)
        tree = DraftTree(tuple(self.tokens[i] for i in chosen), tuple(parents), tuple(depths))
        return tree, [self.features[i] for i in chosen]


def select_nodes(
    trie: CandidateTrie,
    capacity: int,
    cost: Callable[[int], float] | None = None,
    overhead: float = 0.0,
    max_depth: int | None = None,
) -> list[int]:
    """The candidates to verify (root first): the most probable ones, at most ``capacity``
    nodes in all; with ``cost`` the count that maximizes expected tokens per second."""
    probs = list(trie.probs)
    depth = [0] * len(probs)
    for node in range(1, len(probs)):  # a child is never more probable than its parent
        parent = trie.parents[node]
        probs[node] = min(probs[node], probs[parent])
        depth[node] = depth[parent] + 1
    order = [n for n in range(1, len(probs)) if max_depth is None or depth[n] <= max_depth]
    order.sort(key=lambda n: (-probs[n], n))
    order = order[: max(capacity - 1, 0)]
    if cost is None:
        return [0] + order
    best_n, best_ratio, gain = 0, 1.0 / (cost(1) + overhead), 1.0
    for n, node in enumerate(order, start=1):
        gain += probs[node]
        ratio = gain / (cost(n + 1) + overhead)
        if ratio > best_ratio:
            best_n, best_ratio = n, ratio
    return [0] + order[:best_n]
