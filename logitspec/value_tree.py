"""Value-ranked draft trees: spend the node budget where acceptance is likely.

Every candidate node gets an estimated probability of being accepted,
``P(node) = P(parent) * q(feature)``, where ``q`` is the acceptance rate observed so far for
nodes of the same kind (:class:`AcceptanceStats`). In a trie, distinct nodes at the same depth
spell different texts, so at most one of them is accepted, and the expected number of tokens a
step emits is exactly ``1 + sum(P(node))`` over the tree. The best tree of ``n`` nodes is
therefore the ``n`` most probable candidates (a prefix-closed set, because a child is never
more probable than its parent), and with a cost curve the best ``n`` maximizes

    (1 + sum of the n largest P) / (cost(n + 1) + overhead)

i.e. expected tokens per second of verification. Example: P = [0.9, 0.5, 0.2, 0.05] and a cost
of 1.0, 1.02, 1.05, 1.1, 1.4 for 1..5 tree tokens gives ratios 1.00, 1.86, 2.29, 2.36, 1.89:
four nodes (root + three drafts).

:class:`BestFirstTree` finds those nodes without valuing every candidate: the candidate
sources offer *lazy* chains (iterators of ``(token, feature)``), and the tree pops the most
probable frontier node, adds it, and only then asks its chain for the next node. A retrieval
that a chain needs for its second node (a pool lookup, a successor walk) runs only if its
first node made the cut. Chains that share a prefix merge into one trie node, valued by the
most probable chain through it (the first to reach it: pops come in non-increasing order);
each chain goes on below it with its own probability, so the order stays non-increasing and
the nodes popped first are exactly the most probable ones. Ties pop in the order the
candidates were offered.

Ways to leave work undone without changing a pop: candidates of one value (first
nodes that share a feature) may wait in the heap as a *run*, only the next of them present
(the rest would pop right after it, in offer order), and a chain whose rest is costly to
make waits as a *placeholder* valued with a bound on its next node, made only when that
placeholder is popped; either takes the offer order its node would have had. Children that a
source gives every added node (``expand``, e.g. remembered successors) wait the same way.

A source that has already computed a whole subtree (a draft head expanded level by level)
offers it as :class:`Candidate` nodes instead (:meth:`BestFirstTree.offer_nodes`): a node's
children are offered below it when it is popped, like a chain's next node.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Sequence

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


_NO_TRIALS = (0.0, 0.0)


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
    _rates: dict = field(default_factory=dict, repr=False, compare=False)

    def rate(self, feature: Feature) -> float:
        rate = self._rates.get(feature)
        if rate is None:
            succ, trials = self.counts.get(feature, (0.0, 0.0))
            rate = (succ + self.prior(feature) * self.strength) / (trials + self.strength)
            self._rates[feature] = rate
        return rate

    def update(self, features: Sequence[Feature], parents: Sequence[int], accepted: set[int]) -> None:
        counts, get, forget, horizon = self.counts, self.counts.get, self._rates.pop, self.horizon
        # the trials: nodes whose parent was accepted (the root's parent, -1, never is)
        for node in [node for node, parent in enumerate(parents) if parent in accepted]:
            feature = features[node]
            succ, trials = get(feature, _NO_TRIALS)
            succ, trials = succ + (node in accepted), trials + 1
            if trials > horizon:
                succ, trials = succ / 2, trials / 2
            counts[feature] = (succ, trials)
            forget(feature, None)


Chain = Iterator[tuple[int, Feature]]
Tail = Callable[[], Chain] | None


def _call(tail: Callable[[], Chain]) -> Chain:
    return tail()


# the chain slot of a run's head: its tail is asked for when it is popped
_ASK = object()


# the chain slot of a placeholder for a node's children from ``expand``, not yet asked for
_EXPAND = object()


class _Run:
    """The heads of :meth:`BestFirstTree.offer_runs` not yet in the heap."""

    __slots__ = ("tokens", "feature", "first")

    def __init__(self, tokens: Sequence[int], feature: Feature, first: int) -> None:
        self.tokens, self.feature, self.first = tokens, feature, first

    def entry(self, neg_value: float, order: int) -> tuple:
        """The heap entry of the head with offer order ``order`` (the run's next)."""
        index = order - self.first
        more = self if index + 1 < len(self.tokens) else ()
        return (neg_value, order, 0, self.tokens[index], self.feature, _ASK, more)


@dataclass
class Candidate:
    """A candidate node whose children are already known (offered when it is popped)."""

    token: int
    feature: Feature
    children: list["Candidate"] = field(default_factory=list)


def entry_value(cost: Sequence[float], overhead: float = 0.0) -> float:
    """The least probability a node can have and still be kept by :meth:`BestFirstTree.grow`
    under ``cost`` (``cost[n]`` for ``n`` tree tokens, ``cost[0]`` unused) and ``overhead``:
    a candidate below it, and so its whole subtree, may be left unvalued.

    Why: nodes are popped in non-increasing probability. Say the node that makes the tree
    ``a + 1`` tokens has probability ``p`` and is kept in the tree of ``b > a`` tokens. That
    tree beats the one of ``a`` tokens, whose gain is ``G >= 1 + (a - 1) p`` (the root and
    ``a - 1`` nodes at least as probable), and gains at most ``p`` per node beyond it:
    ``(G + (b - a) p) / C(b) >= G / C(a)`` with ``C = cost + overhead``, so ``p >= G s`` for the
    slope ``s = (C(b) / C(a) - 1) / (b - a)``, i.e. ``p >= s / (1 - (a - 1) s)`` (no ``p`` at all
    when ``(a - 1) s >= 1``). The bound is the least of these over every ``a < b``. Example:
    costs 1.0, 1.3, 1.8 for 1..3 tokens: ``a = 1`` gives 0.3 and 0.4, ``a = 2`` gives 0.63:
    nothing below 0.3 is ever kept."""
    totals = [c + overhead for c in cost[1:]]
    least = float("inf")
    for a, low in enumerate(totals, 1):
        if low <= 0:
            return 0.0
        for span, high in enumerate(totals[a:], 1):
            slope = (high / low - 1.0) / span
            if (a - 1) * slope < 1.0:
                least = min(least, slope / (1.0 - (a - 1) * slope))
    return max(least, 0.0) if least != float("inf") else 0.0


_least_steps: dict[int, tuple[Sequence[float], float]] = {}


def least_step(cost: Sequence[float], capacity: int) -> float:
    """The least increase of ``cost`` from one node count to the next, up to ``capacity``
    (0 when it ever falls); remembered for the last table of each capacity."""
    known = _least_steps.get(capacity)
    if known is not None and known[0] is cost:
        return known[1]
    step = max(0.0, min((cost[n + 1] - cost[n] for n in range(1, capacity)), default=0.0))
    _least_steps[capacity] = (cost, step)
    return step


def _no_larger_tree_wins(gain: float, prob: float, first: float, step: float, room: int,
                         best: float) -> bool:
    """Whether no tree of ``k = 1 .. room`` more nodes can beat the ratio ``best``: each gains
    at most ``prob`` per node (pops come in non-increasing order) and costs at least ``first +
    (k - 1) * step`` (``first``: the cost of one more node, overhead included). The bound
    ``(gain + k prob) / (first + (k - 1) step)`` is monotone in ``k``, so its largest value is
    at ``k = 1`` or ``k = room``. Example: gain 2, prob 0.1, first 1.5, step 0.5, room 3,
    best 1.45: 2.1 / 1.5 = 1.4 and 2.3 / 2.5 = 0.92, so no larger tree wins."""
    if (gain + prob) / first > best:
        return False
    return (gain + room * prob) / (first + (room - 1) * step) <= best


class BestFirstTree:
    """A draft tree grown best-first from lazy candidate chains (module docstring).

    ``rate(feature)`` values a node relative to its parent; ``max_depth`` bounds every path
    (deeper chain nodes are never asked for). ``floor``: candidates less probable than it are
    dropped when offered, and their chains are not asked for more (rates are at most 1, so
    nothing below them is more probable); with ``floor <= entry_value(cost, overhead)`` of the
    cost that :meth:`grow` then gets, the grown tree is the same. ``expand(token, feature)``:
    children for every node the tree adds (``(token, feature)`` pairs, or None), offered below
    it as a popped :class:`Candidate`'s children are (a node that a later chain merges into is
    not asked again). With ``expand_bound(feature)`` (at least the rate of every child
    ``expand`` can give a node of that feature; 0 when it gives none) and ``expand_width``
    (the most children it gives), a node's children are asked for only when a placeholder of
    the node's probability times its bound is popped; the placeholder takes the offer orders
    the children would have had, so the pops are the same. Offer chains with :meth:`offer`,
    then :meth:`grow` once.

    Example: chains [(1, "a"), (2, "b")] and [(1, "c"), (3, "d")] under the root, rates
    a .9, b .5, c .6, d .8. Pops: token 1 from the first chain (P .9: node 1), token 1 from
    the second (.6: merged into node 1), then below node 1 token 3 (.6 x .8 = .48, the second
    chain's own probability) before token 2 (.9 x .5 = .45). Nodes: 1, 3, 2.
    """

    def __init__(self, root: int, rate: Callable[[Feature], float], max_depth: int | None = None,
                 floor: float = 0.0,
                 expand: Callable[[int, Feature], Sequence[tuple[int, Feature]] | None] | None = None,
                 expand_bound: Callable[[Feature], float] | None = None,
                 expand_width: int = 0) -> None:
        if expand_bound is not None and expand_width < 1:
            raise ValueError("a lazy expansion needs expand_width >= 1 (its most children)")
        self.floor = floor
        self.expand = expand
        self.expand_bound = expand_bound
        self.expand_width = expand_width
        self.tokens = [root]
        self.parents = [-1]
        self.depths = [0]
        self.probs = [1.0]
        self.features: list[Feature] = [None]
        self.rate = rate
        self.max_depth = max_depth
        self._children: dict[tuple[int, int], int] = {}
        # (-P, offer order, parent node, token, feature, chain or tail, known children)
        self._heap: list = []
        self._order = 0
        self._tail_bound: float | None = None
        self._make_tail: Callable[[object], Chain] | None = None
        self._tail_of: Callable[[int], object] | None = None

    def offer(self, chain: Chain, parent: int = 0, prob: float = 1.0) -> None:
        """Hangs ``chain`` (lazy) under node ``parent``, whose probability is ``prob``."""
        if self.max_depth is not None and self.depths[parent] >= self.max_depth:
            return
        item = next(chain, None)
        if item is not None:
            token, feature = item
            value = prob * self.rate(feature)
            if value >= self.floor:
                heapq.heappush(self._heap, (-value, self._order, parent, token, feature, chain, ()))
                self._order += 1

    def offer_nodes(self, nodes: Sequence[Candidate], parent: int = 0, prob: float = 1.0) -> None:
        """Hangs ``nodes`` (with their subtrees) under node ``parent`` of probability ``prob``."""
        if self.max_depth is not None and self.depths[parent] >= self.max_depth:
            return
        floor = self.floor
        for node in nodes:
            value = prob * self.rate(node.feature)
            if value >= floor:
                heapq.heappush(self._heap, (-value, self._order, parent, node.token, node.feature,
                                            None, node.children))
                self._order += 1

    def offer_heads(self, heads: Iterable[tuple[int, Feature, Tail]],
                    tail_bound: float | None = None) -> None:
        """Offers many first nodes under the root at once: ``(token, feature, tail)`` where
        ``tail`` makes the rest of the chain (called only if the node is popped) or is None.
        Equivalent to one :meth:`offer` per head, without building a chain per candidate.

        ``tail_bound``: at least the rate of every tail's first node. With it, a popped
        head's tail is made only once a node of the head's probability times the bound is
        the most probable candidate; until then a placeholder of that value (and of the
        order the node would have had) waits in its place, so the pops are the same."""
        self._tail_bound = tail_bound
        self._make_tail = None
        if self.max_depth is not None and self.max_depth <= 0:
            return
        rate, order, floor = self.rate, self._order, self.floor
        entries = []
        for token, feature, tail in heads:
            value = rate(feature)
            if value >= floor:
                entries.append((-value, order, 0, token, feature, tail, ()))
                order += 1
        self._order = order
        self._heap.extend(entries)
        heapq.heapify(self._heap)

    def offer_runs(self, runs: Iterable[tuple[Feature, Sequence[int]]],
                   tail_of: Callable[[int], object], tail_bound: float | None = None,
                   make_tail: Callable[[object], Chain] | None = None) -> None:
        """Offers first nodes under the root in runs that share a feature: ``(feature,
        tokens)``, each run's tokens in offer order; ``tail_of(token)`` is what
        ``make_tail`` makes the head's tail from (None: no tail; without ``make_tail``, the
        tail itself, as in :meth:`offer_heads`), asked for only when the head is popped;
        ``tail_bound`` as in :meth:`offer_heads`. Equivalent to :meth:`offer_heads` with
        every run's heads in a row, but a run waits in the heap as its next head alone: its
        heads have one value, so they pop in offer order, and the next one enters the heap
        (with the order it was given) when the one before it is popped. Heads that are never
        reached cost nothing."""
        self._tail_bound = tail_bound
        self._make_tail = make_tail
        self._tail_of = tail_of
        if self.max_depth is not None and self.max_depth <= 0:
            return
        rate, order, floor = self.rate, self._order, self.floor
        for feature, tokens in runs:
            if not tokens:
                continue
            value = rate(feature)
            if value >= floor:
                run = _Run(tokens, feature, order) if len(tokens) > 1 else ()
                self._heap.append((-value, order, 0, tokens[0], feature, _ASK, run))
                order += len(tokens)
        self._order = order
        heapq.heapify(self._heap)

    def grow(self, capacity: int, cost: Callable[[int], float] | Sequence[float] | None = None,
             overhead: float = 0.0) -> tuple[DraftTree, list[Feature]]:
        """Pops candidates, most probable first, until ``capacity`` nodes (root included); with
        ``cost`` (a function of the node count, or a table of it: ``cost[n]`` for ``n`` up to
        ``capacity``) keeps the first ``n`` that maximize expected tokens per second
        (stopping as soon as no larger tree can beat the best so far). Returns the tree and
        each node's feature.

        A chain's next node is taken at once, without a round trip through the heap, when it
        is strictly more probable than every waiting candidate (``heappushpop``): the pops
        come in exactly the same order."""
        if callable(cost):
            cost = [0.0] + [cost(n) for n in range(1, capacity + 1)]
        tokens, parents, depths, probs, features = (
            self.tokens, self.parents, self.depths, self.probs, self.features)
        children, rate, heap, floor = self._children, self.rate, self._heap, self.floor
        expand, expand_bound = self.expand, self.expand_bound
        max_depth = capacity if self.max_depth is None else self.max_depth
        pushpop, pop = heapq.heappushpop, heapq.heappop
        size = len(tokens)
        gain, best_n = 1.0, 1
        best_ratio = 1.0 / (cost[1] + overhead) if cost is not None else 0.0
        step = least_step(cost, capacity) if cost is not None else 0.0
        tail_bound = self._tail_bound
        make = self._make_tail or _call
        next_order = self._order  # written back before offer_nodes and at the end
        item = pop(heap) if heap else None
        while item is not None and size < capacity:
            neg_prob, order, parent, token, feature, chain, known = item
            if token is None:
                if chain is _EXPAND:
                    # a node's children, asked for now; they take the orders kept for them
                    # (``feature`` holds the node's probability)
                    kids = expand(tokens[parent], features[parent]) or ()
                    if len(kids) > self.expand_width:
                        raise ValueError(f"expand gave {len(kids)} children, more than "
                                         f"expand_width={self.expand_width}")
                    for kid, kid_feature in kids:
                        if (value := feature * rate(kid_feature)) >= floor:
                            heapq.heappush(heap, (-value, order, parent, kid, kid_feature, None, ()))
                        order += 1
                    item = pop(heap) if heap else None
                    continue
                # a placeholder of a tail's first node: the tail is made now, its node takes
                # the placeholder's order (``feature`` holds the chain's own probability)
                chain = make(chain)
                nxt = next(chain, None)
                item = None
                if nxt is not None and (value := feature * rate(nxt[1])) >= floor:
                    item = (-value, order, parent, nxt[0], nxt[1], chain, ())
                    item = pushpop(heap, item) if heap else item
                elif heap:
                    item = pop(heap)
                continue
            prob = -neg_prob
            key = (parent, token)
            node = children.get(key)
            if node is None:
                node = size
                children[key] = node
                tokens.append(token)
                parents.append(parent)
                depths.append(depths[parent] + 1)
                probs.append(prob)
                features.append(feature)
                size += 1
                if cost is not None:
                    gain += prob
                    ratio = gain / (cost[size] + overhead)
                    if ratio > best_ratio:
                        best_n, best_ratio = size, ratio
                    elif size == capacity or _no_larger_tree_wins(
                            gain, prob, cost[size + 1] + overhead, step, capacity - size, best_ratio):
                        break
            item = None
            if depths[node] < max_depth:
                if chain is _ASK:  # a head of a run: its tail is asked for now
                    chain = self._tail_of(token)
                if chain is not None:
                    nxt = None
                    if hasattr(chain, "__next__"):
                        nxt = next(chain, None)
                    elif tail_bound is None:
                        chain = make(chain)
                        nxt = next(chain, None)
                    elif (value := prob * tail_bound) >= floor:
                        item = (-value, next_order, node, None, prob, chain, ())
                        next_order += 1
                    if nxt is not None and (value := prob * rate(nxt[1])) >= floor:
                        item = (-value, next_order, node, nxt[0], nxt[1], chain, ())
                        next_order += 1
                if known and type(known) is not _Run:
                    self._order = next_order
                    self.offer_nodes(known, node, prob)
                    next_order = self._order
                if expand is None or node != size - 1:
                    pass
                elif expand_bound is not None:
                    if (value := prob * expand_bound(feature)) >= floor and value > 0.0:
                        heapq.heappush(heap, (-value, next_order, node, None, prob, _EXPAND, ()))
                        next_order += self.expand_width
                elif kids := expand(token, feature):
                    for kid, kid_feature in kids:
                        if (value := prob * rate(kid_feature)) >= floor:
                            heapq.heappush(heap, (-value, next_order, node, kid, kid_feature,
                                                  None, ()))
                            next_order += 1
            if known and type(known) is _Run:  # the run's next head enters the heap
                heapq.heappush(heap, known.entry(neg_prob, order + 1))
            if item is not None:
                item = pushpop(heap, item) if heap else item
            elif heap:
                item = pop(heap)
        self._order = next_order
        n = size if cost is None else best_n
        # parents come before their children by construction
        tree = DraftTree.of_valid(tuple(tokens[:n]), tuple(parents[:n]), tuple(depths[:n]))
        return tree, features[:n]
