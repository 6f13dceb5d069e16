"""Retrieval drafters: prompt lookup (PLD) and LogitSpec, behind one interface.

A drafter follows the decoding context (``begin`` with the prompt, ``extend`` with every step's
accepted tokens) and proposes a :class:`~logitspec.tree.DraftTree` under the step's root
token. The decoding loop never looks inside.

LogitSpec, per step (``root`` = the token the target chose, ``ctx`` = the context so far):

1. next-token chain: the pool's continuation of the longest suffix of ``ctx + [root]``;
2. next-next chains: for the other tokens ``t`` of ``topk(last_logits)``, in rank order,
   ``[t] + continuation(ctx + [root, t])``, cut to a length that shrinks with the rank
   (:attr:`LogitSpecConfig.rank_lengths`);
3. all chains hang under the root, merged into a trie, until ``draft_tree_capacity`` nodes
   (root included) are used.

PLD is step 1 alone: LogitSpec without the next-next chains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .cost import CostCurve, CostSurface, LiveCosts
from .pool import NGramPool
from .recycling import prompt_logit_rows
from .tree import DraftTree, build_tree
from .suffix_decoding import SuffixCache, SuffixConfig
from .suffix_tree import SuffixDraft
from .value_tree import (DEPTH_BUCKETS, RANK_BUCKETS, AcceptanceStats, BestFirstTree, Candidate, Chain,
                         Feature, bucket, entry_value)

# Match lengths of a next-token chain's occurrence, bucketed (``match_lengths``); the last edge
# is as far as a match is measured.
MATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# A suffix-tree continuation's share of its parent's occurrences, bucketed (``suffix_trees``).
SHARE_BUCKETS = (0.25, 0.5, 0.75, 0.99, 1.0)
# bucket(m, MATCH_BUCKETS) for m = 0 .. the last edge (longer matches: the last entry)
_MATCH_LAST = MATCH_BUCKETS[-1]
_MATCH_BUCKET = tuple(bucket(m, MATCH_BUCKETS) for m in range(_MATCH_LAST + 1))

if TYPE_CHECKING:
    from .decoding import GenerationConfig


class Drafter(Protocol):
    """What the decoding loop needs from a drafter.

    The loop reads the target's outputs back to the host once per step; a drafter sees them as
    top-k id rows (at most ``top_k`` wide) and, if it sets ``needs_hidden``, the target's final
    hidden states (on the device). Drafters never read logits on the device themselves.

    Optional: a drafter that runs a costly draft source on some steps only exposes it as
    ``gate`` (a :class:`~logitspec.gate.SourceGate`, or None); the loop then reports how many
    steps of each generation ran the source (``GenerationResult.source_steps``).
    """

    name: str
    tree_capacity: int  # most inputs verified per step: tree nodes (root included) + aux inputs
    top_k: int  # how many of each logit's top token ids the drafter reads (0: none)
    needs_hidden: bool  # whether begin/observe must carry the target's hidden states

    def configure(self, config: GenerationConfig) -> None:
        """A generation with ``config`` starts (called before :meth:`begin`); drafters that
        draw tokens follow its sampling settings and seed, the others ignore it."""

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        """A generation starts over ``context``; its first ``reused`` tokens are unchanged
        since the previous call's context. ``hidden``: the target's final hidden states
        (len(context) - reused, H) of the newly prefilled tokens, when ``needs_hidden``."""

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        """A tree under ``root``; ``root_topk`` (k,) int64, k >= ``top_k``, holds the top-k
        token ids, best first, of the target's logit that chose it. No path may be deeper
        than ``max_depth``."""

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        """The target's outputs at every input of the verified ``tree`` (called before
        :meth:`extend`; drafters that learn from the target use it)."""

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        """``tokens`` (the root and the accepted drafts, nodes ``path`` of ``tree``) joined
        the context."""


@dataclass(frozen=True)
class PoolConfig:
    """Shared n-gram pool settings (see :mod:`logitspec.pool`)."""

    max_ngram_size: int = 3
    num_pred_tokens: int = 20
    max_continuations: int = 1

    def __post_init__(self) -> None:
        if self.max_ngram_size < 1:
            raise ValueError(f"max_ngram_size must be >= 1, got {self.max_ngram_size}")
        if self.num_pred_tokens < 1:
            raise ValueError(f"num_pred_tokens must be >= 1, got {self.num_pred_tokens}")
        if self.max_continuations < 1:
            raise ValueError(f"max_continuations must be >= 1, got {self.max_continuations}")

    def new_pool(self) -> NGramPool:
        return NGramPool(self.max_ngram_size, self.num_pred_tokens, self.max_continuations)


@dataclass(frozen=True)
class LogitSpecConfig:
    """LogitSpec drafting settings.

    ``num_next_next``: how many top-k tokens of the last logit (besides the root) are tried as
    next-next tokens; ``None`` = ``draft_tree_capacity`` (the reference). ``rank_lengths``:
    ``((8, 4), (32, 3))`` means ranks 1-8 keep chains of up to 4 tokens, ranks 9-32 up to 3,
    and later ranks ``beyond_length`` tokens (the reference policy).

    ``tree_policy``: ``reference`` hangs the chains in the order above until the budget is
    spent; ``value`` ranks every candidate node by its estimated acceptance probability
    (:mod:`logitspec.value_tree`) and keeps the best ones. ``draft_tree_capacity=None`` (auto,
    value policy only) sizes each tree by the verification cost curve, up to
    ``max_auto_capacity`` nodes. ``match_lengths`` (value policy): next-token chains are
    valued by how long their occurrence's match with the context is, not by the n-gram order
    that found it (:class:`ValueTreeDrafter`). ``live_costs`` (automatic budget): the cost
    curve is corrected by the verification times the decoder observes
    (:class:`~logitspec.cost.LiveCosts`). ``recycle_breadth`` (with recycled chains): below the
    first level, each remembered successor's own ``recycle_breadth`` best successors are
    candidates, not only its first (a copy-logit tree, expanded only where the value tree pops).
    ``successor_children`` (with recycled chains): below every node of another source, its
    ``successor_children`` best remembered successors are candidates, and theirs, down to
    ``successor_hops`` levels (RACER's copy-logit expansion of its retrieved chains): a chain
    that ends, or goes wrong, still has the target's own guesses below it. ``agreement``
    (value policy): a token that several sources propose right below the root is valued by
    how many of them do (:class:`ValueTreeDrafter`), not only by the best of their features.
    """

    pool: PoolConfig = PoolConfig()
    draft_tree_capacity: int | None = 64
    num_next_next: int | None = None
    rank_lengths: tuple[tuple[int, int], ...] = ((8, 4), (32, 3))
    beyond_length: int = 1
    merge_prefixes: bool = True
    tree_policy: str = "reference"
    max_auto_capacity: int = 64
    value_chain_length: int = 8
    recycle_chains: int = 0
    recycle_depth: int = 4
    recycle_breadth: int = 1
    successor_children: int = 0
    successor_hops: int = 2
    match_lengths: bool = False
    suffix_trees: bool = False
    suffix_tokens: int = 32
    suffix_branches: bool = False
    suffix_grow: bool = False
    live_costs: bool = False
    agreement: bool = False

    def __post_init__(self) -> None:
        if self.tree_policy not in ("reference", "value"):
            raise ValueError(f"tree_policy must be 'reference' or 'value', got {self.tree_policy!r}")
        if self.draft_tree_capacity is None and self.tree_policy != "value":
            raise ValueError("an automatic draft_tree_capacity needs tree_policy='value'")
        if self.capacity < 1:
            raise ValueError(f"draft_tree_capacity must be >= 1 (the root), got {self.capacity}")
        if self.value_chain_length < 1:
            raise ValueError(f"value_chain_length must be >= 1, got {self.value_chain_length}")
        if self.recycle_chains < 0 or self.recycle_depth < 1:
            raise ValueError("recycle_chains must be >= 0 and recycle_depth >= 1")
        if self.recycle_chains and self.tree_policy != "value":
            raise ValueError("recycled chains need tree_policy='value'")
        if self.recycle_breadth < 1 or (self.recycle_breadth > 1 and not self.recycle_chains):
            raise ValueError(f"recycle_breadth must be >= 1, and 1 without recycled chains, "
                             f"got {self.recycle_breadth}")
        if self.successor_children < 0 or self.successor_hops < 1:
            raise ValueError(f"successor_children must be >= 0 and successor_hops >= 1, got "
                             f"{self.successor_children} and {self.successor_hops}")
        if self.successor_children and not self.recycle_chains:
            raise ValueError("successor_children needs recycled chains (the successor table)")
        if self.match_lengths and self.tree_policy != "value":
            raise ValueError("match-length features need tree_policy='value'")
        if self.suffix_trees and self.tree_policy != "value":
            raise ValueError("suffix-tree candidates need tree_policy='value'")
        if self.suffix_tokens < 1:
            raise ValueError(f"suffix_tokens must be >= 1, got {self.suffix_tokens}")
        if self.suffix_branches and not self.suffix_trees:
            raise ValueError("suffix_branches needs suffix_trees")
        if self.suffix_grow and not self.suffix_trees:
            raise ValueError("suffix_grow needs suffix_trees")
        if self.agreement and self.tree_policy != "value":
            raise ValueError("agreement features need tree_policy='value'")
        if self.live_costs and self.draft_tree_capacity is not None:
            raise ValueError("live_costs corrects the cost of an automatic draft_tree_capacity")
        if self.num_next_next is not None and self.num_next_next < 0:
            raise ValueError(f"num_next_next must be >= 0, got {self.num_next_next}")
        if self.beyond_length < 1 or any(n < 1 for _, n in self.rank_lengths):
            raise ValueError("chain lengths must be >= 1")

    def chain_length(self, rank: int) -> int:
        """Longest next-next chain (its first token included) at ``rank`` (1-based)."""
        for last_rank, length in self.rank_lengths:
            if rank <= last_rank:
                return length
        return self.beyond_length

    @property
    def capacity(self) -> int:
        """The largest tree (root included) this configuration may build."""
        return self.max_auto_capacity if self.draft_tree_capacity is None else self.draft_tree_capacity

    @property
    def candidates(self) -> int:
        return self.capacity if self.num_next_next is None else self.num_next_next


def next_next_candidates(root: int, top: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """``(rank, token)`` for the top-k tokens other than the root, ranks from 1, at most
    ``limit``. Example: root 5, top [5, 9, 2] -> (1, 9), (2, 2)."""
    rank = 0
    for token in top:
        if token == root:
            continue
        rank += 1
        if rank > limit:
            return
        yield rank, token


class _PoolDrafter:
    """Holds the pool and follows the context; subclasses draft."""

    name = "pool"
    top_k = 0
    needs_hidden = False

    def __init__(self, pool_config: PoolConfig, tree_capacity: int) -> None:
        if tree_capacity < 1:
            raise ValueError(f"draft_tree_capacity must be >= 1, got {tree_capacity}")
        self.pool = pool_config.new_pool()
        self.tree_capacity = tree_capacity

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        self.pool.truncate(min(reused, len(self.pool)))
        self.pool.extend(context[len(self.pool):])

    def configure(self, config: GenerationConfig) -> None:
        pass

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        pass

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        self.pool.extend(tokens)

    def _query(self, *tokens: int) -> list[int]:
        """The last ``max_ngram_size`` tokens of ``context + tokens``."""
        n = self.pool.max_ngram_size
        return (self.pool.tokens[-n:] + list(tokens))[-n:]


class PromptLookupDrafter(_PoolDrafter):
    """Prompt lookup decoding: one chain, the pool's continuation after the root."""

    name = "pld"

    def __init__(self, pool_config: PoolConfig = PoolConfig(), draft_tree_capacity: int = 64):
        super().__init__(pool_config, draft_tree_capacity)

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        chain = self.pool.lookup(self._query(root), max_tokens=self.tree_capacity - 1)
        return build_tree(root, [chain], self.tree_capacity, max_depth=max_depth)


class LogitSpecDrafter(_PoolDrafter):
    """LogitSpec drafting (module docstring)."""

    name = "logitspec"

    def __init__(self, config: LogitSpecConfig = LogitSpecConfig()) -> None:
        if config.tree_policy != "reference":
            raise ValueError("LogitSpecDrafter implements the reference policy; use ValueTreeDrafter")
        super().__init__(config.pool, config.capacity)
        self.config = config
        self.top_k = config.candidates + 1

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        if self.tree_capacity <= 1 or max_depth <= 0:
            return build_tree(root, [], 1)
        top = root_topk[: self.top_k].tolist()
        return build_tree(
            root, self._chains(root, top), self.tree_capacity,
            max_depth=max_depth, merge=self.config.merge_prefixes,
        )

    def _chains(self, root: int, top: list[int]) -> Iterator[list[int]]:
        yield self.pool.lookup(self._query(root), max_tokens=self.tree_capacity - 1)
        for rank, token in next_next_candidates(root, top, self.config.candidates):
            length = self.config.chain_length(rank)
            yield [token] + self.pool.lookup(self._query(root, token), max_tokens=length - 1)


def value_prior(feature: tuple) -> float:
    """Acceptance rates assumed before any step was observed."""
    kind = feature[0]
    if kind == "agree":  # v sources that would each be right with probability p
        return 1.0 - (1.0 - value_prior(feature[2])) ** feature[1]
    if kind == "first":
        return 0.3 / feature[1]
    if kind == "alt":
        return 0.2
    if kind == "rec" or kind == "succ":
        return 0.3 / feature[1] if feature[1] else 0.5
    if kind == "match":  # a match of m tokens: m / (m + 1), as if each had been a trial
        return feature[1] / (feature[1] + 1.0)
    if kind == "suf":  # its share of the occurrences, discounted by the match length as above
        return feature[3] * feature[2] / (feature[2] + 1.0)
    return 0.5 if feature[-1] == 1 else 0.7


class ValueTreeDrafter(_PoolDrafter):
    """LogitSpec's candidates (next-token chains, next-next chains from the top-k of the last
    logit), ranked by estimated acceptance probability learned online, the tree sized by the
    budget or, with a cost curve and ``draft_tree_capacity=None``, by expected tokens per
    second (:mod:`logitspec.value_tree`). A :class:`~logitspec.cost.CostSurface` is read at the
    current context length (attention over a long context makes large trees dearer).

    Features: ``("next", n, depth)`` for the next-token chain retrieved by an n-gram of order
    ``n``, ``("alt", n, depth)`` for older stored continuations (``max_continuations > 1``);
    with ``match_lengths``, ``("match", m, depth)`` and ``("alt", m, depth)`` instead, ``m`` the
    bucketed length (:data:`MATCH_BUCKETS`) of the match that the chain's occurrence really has
    with the context (it may reach far beyond the pool's n-gram: a long match is a strong sign
    that the copy goes on; its prior rate ``m / (m + 1)`` lets long copies be drafted before any
    was observed);
    ``("first", rank)`` for a next-next token of that rank, ``("cont", n, depth)`` for its
    retrieved continuation (depth buckets :data:`DEPTH_BUCKETS`, ranks :data:`RANK_BUCKETS`).

    With ``suffix_trees``, two more sources: the best drafts of SuffixDecoding's suffix trees
    (:class:`~logitspec.suffix_decoding.SuffixCache`, alpha 1: a match of ``m`` tokens drafts
    at most ``m``, here at most ``suffix_tokens``), one over the question (prompt and output so
    far) and one over the run's earlier answers, each node with the feature
    ``("suf", source, m, share)`` of :func:`suffix_candidates`: how long the match is and what
    share of its occurrences went on with the node's token, so that a long verbatim repeat is
    drafted at length where verification is dear and a weak pattern is not. With
    ``suffix_branches``, the question's tree also offers its draft at every other match length
    of two tokens or more (:meth:`~logitspec.suffix_decoding.SuffixCache.branches`), source
    ``"branch"``: SuffixDecoding's score prefers the longest match with room to draft, which
    may go on rarely, while a shorter match's frequent continuation is often the next token.

    With an automatic budget, candidates that no tree under this step's cost could keep
    (:func:`~logitspec.value_tree.entry_value`) are dropped as they are offered; with
    ``live_costs`` the cost is corrected by the verification times seen so far.

    ``prompt_head`` (the target's LM head: final hidden states (T, H) -> logits (T, V)), with
    recycled chains: when a generation begins, the successor table also copies the logit after
    every newly prefilled prompt token, as RACER's copy-logit trees do
    (:func:`~logitspec.recycling.prompt_logit_rows`), so that the recycled chains know the
    prompt's tokens before any of them was verified; the drafter then asks for the prompt's
    hidden states. It costs one LM-head pass over each prompt.
    """

    name = "logitspec-value"

    def __init__(
        self, config: LogitSpecConfig, cost_curve: CostCurve | CostSurface | None = None,
        successors=None, prompt_head=None,
    ) -> None:
        if config.tree_policy != "value":
            raise ValueError("ValueTreeDrafter needs tree_policy='value'")
        if config.draft_tree_capacity is None and cost_curve is None:
            raise ValueError("an automatic draft_tree_capacity needs a cost curve")
        super().__init__(config.pool, config.capacity)
        self.config = config
        self.costs = cost_curve if config.draft_tree_capacity is None else None
        self.live = LiveCosts(cost_curve) if self.costs is not None and config.live_costs else None
        if self.live is not None:
            self.costs = self.live
        self._context = 0  # the context length of the last draft
        self.stats = AcceptanceStats(value_prior)
        self.overhead = 0.0
        self._cost: Sequence[float] | None = None  # this step's cost table (automatic budget)
        self.successors = successors
        recycled = successors.k if successors is not None and config.recycle_chains else 0
        self.top_k = max(config.candidates + 1, recycled)
        self._features: list = []
        self._feature_cache: dict = {}
        self._entry_values: dict = {}
        self._rank_features = [None] + [("first", bucket(rank, RANK_BUCKETS))
                                        for rank in range(1, self.config.candidates + 1)]
        # the first rank of each rank's bucket
        self._bucket_starts = [0] * len(self._rank_features)
        for rank in range(1, len(self._rank_features)):
            same = rank > 1 and self._rank_features[rank] == self._rank_features[rank - 1]
            self._bucket_starts[rank] = self._bucket_starts[rank - 1] if same else rank
        # the features a next-next tail's first node can have: ("cont", n, 2), n the order
        # of the pool's match
        self._tail_firsts = [self._depth_features("cont", n, 2)[0]
                             for n in range(1, config.pool.max_ngram_size + 1)]
        # (feature, first rank, last rank) of each bucket
        starts = sorted(set(self._bucket_starts[1:]))
        ends = [start - 1 for start in starts[1:]] + [len(self._rank_features) - 1]
        self._rank_runs = [(self._rank_features[s], s, e) for s, e in zip(starts, ends)]
        self.suffixes = (SuffixCache(SuffixConfig(draft_tree_capacity=config.suffix_tokens + 1))
                         if config.suffix_trees else None)
        self._root_indexed = False
        self.prompt_head = prompt_head if recycled else None
        self._successor_rows = config.successor_children if recycled else 0
        self._succ_features = [
            tuple(("succ", bucket(rank, RANK_BUCKETS) if rank > 1 else 0, hop)
                  for rank in range(1, self._successor_rows + 1))
            for hop in range(config.successor_hops + 1)]  # indexed by hop, 1..successor_hops
        self._hop_of: dict = {}  # feature -> _hop_below(feature), for the per-node bound
        self._votes: dict[int, int] | None = None  # this step's agreed first tokens (agreement)
        if self.prompt_head is not None:
            self.needs_hidden = True

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        super().begin(context, reused, hidden)
        if self.prompt_head is not None and hidden is not None:
            rows = prompt_logit_rows(self.prompt_head, hidden, context[reused:], self.successors.k)
            for tokens, topk, _ in rows:
                self.successors.update(tokens, topk)
        if self.suffixes is not None:
            self.suffixes.start_request([int(t) for t in context], reused)
            self._root_indexed = False

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        start = time.perf_counter()
        if self.suffixes is not None:
            self.suffixes.append(root)  # the context's last token now
            self._root_indexed = True
        self._cost = None
        self._context = len(self.pool)
        if self.costs is not None:
            self._cost = self.costs.at(self._context).cost_table(self.tree_capacity)
        # candidates below the entry value could never be kept: they are dropped when offered
        if self._successor_rows:  # asked for lazily, below a bound of the successors' rates
            rate = self.stats.rate
            bounds = [0.0] + [max(map(rate, hop)) for hop in self._succ_features[1:]]
            hop_of, hop_below = self._hop_of, self._hop_below

            def expand_bound(feature: Feature) -> float:
                hop = hop_of.get(feature)
                if hop is None:
                    hop = hop_of[feature] = hop_below(feature)
                return bounds[hop]

            tree = BestFirstTree(root, rate, max_depth, self._entry_value(), self._expand,
                                 expand_bound, self._successor_rows)
        else:
            tree = BestFirstTree(root, self.stats.rate, max_depth, self._entry_value())
        if self.tree_capacity > 1 and max_depth > 0:
            self._offer_candidates(tree, root, root_topk, max_depth)
        draft, self._features = tree.grow(self.tree_capacity, self._cost, self.overhead)
        self.overhead = 0.9 * self.overhead + 0.1 * (time.perf_counter() - start)
        return draft

    def _entry_value(self) -> float:
        """:func:`entry_value` of this step's cost table (0 without one), with the drafting
        overhead rounded up to a 64th of a one-token pass (a larger overhead gives a smaller,
        still valid bound) so that it is computed once per table and grid point."""
        cost = self._cost
        if cost is None or len(cost) < 3:
            return 0.0
        grid = cost[1] / 64 if cost[1] > 0 else 1.0
        key = (cost, math.ceil(self.overhead / grid))
        value = self._entry_values.get(key)
        if value is None:
            if len(self._entry_values) > 256:
                self._entry_values.clear()
            value = self._entry_values[key] = entry_value(cost, key[1] * grid)
        return value

    def _offer_candidates(self, tree: BestFirstTree, root: int, root_topk: np.ndarray,
                          max_depth: int) -> None:
        """Offers every candidate source's chains under ``root``."""
        pool = self.pool
        occurrences = pool.occurrences(self._query(root))
        ranks = self._ranks_reaching(tree.floor)
        top = root_topk[: ranks + 1].tolist() if ranks else []
        recycled = (self.successors.successors_of(root)[: self.config.recycle_chains].tolist()
                    if self.successors is not None and self.config.recycle_chains else [])
        suffix_drafts = []
        if self.suffixes is not None:
            local, answers = self.suffixes.drafts(max_depth)
            suffix_drafts = [(local, "local"), (answers, "answers")]
            if self.config.suffix_branches:
                suffix_drafts += [(draft, "branch") for draft in
                                  self.suffixes.branches(max_depth, skip=local.match_len)]
        self._votes = None
        if self.config.agreement:
            self._votes = self._first_token_votes(root, occurrences, top, ranks, recycled,
                                                  suffix_drafts)
        self._offer_next_chains(tree, root, occurrences)
        if ranks:
            self._offer_next_next_chains(tree, root, top, ranks)
        if recycled:
            self._offer_recycled_chains(tree, root, recycled)
        rate, floor, grow = self.stats.rate, tree.floor, self.config.suffix_grow
        for draft, source in suffix_drafts:
            tree.offer_nodes(self._agreed_nodes(suffix_candidates(draft, source, rate, floor, grow)))

    def _first_token_votes(self, root: int, occurrences, top: list[int], ranks: int,
                           recycled: list[int], suffix_drafts: list) -> dict[int, int]:
        """How many sources propose each token right below ``root`` (the tokens two or more
        propose): the pool's continuations, the last logit's next-next ranks, the remembered
        successors, the question's suffix tree (its branches included) and the run's."""
        sources: dict[int, int] = {}
        tokens, limit = self.pool.tokens, min(self.tree_capacity - 1, self.pool.num_pred_tokens)
        firsts = [
            [tokens[pos + 1] for pos in occurrences[1] if pos + 1 < len(tokens)] if limit else [],
            [t for t in top if t != root][:ranks],
            [t for t in recycled if t >= 0],
            [int(t) for d, source in suffix_drafts if source != "answers"
             for t, parent in zip(d.tokens, d.parents) if parent < 0],
            [int(t) for d, source in suffix_drafts if source == "answers"
             for t, parent in zip(d.tokens, d.parents) if parent < 0],
        ]
        for bit, proposed in enumerate(firsts):
            for token in proposed:
                sources[token] = sources.get(token, 0) | (1 << bit)
        return {token: min(bin(bits).count("1"), 3) for token, bits in sources.items()
                if bits & (bits - 1)}

    def _agreed(self, token: int, feature: Feature) -> Feature:
        """``feature`` of a node right below the root, or ``("agree", v, feature)`` when ``v``
        >= 2 sources propose its token (``v`` capped at 3)."""
        votes = self._votes.get(token) if self._votes else None
        return feature if votes is None else ("agree", votes, feature)

    def _agreed_nodes(self, nodes: list[Candidate]) -> list[Candidate]:
        if self._votes:
            for node in nodes:
                node.feature = self._agreed(node.token, node.feature)
        return nodes

    def _depth_features(self, kind: str, order: int, first_depth: int) -> tuple:
        """``(kind, order, depth bucket)`` for depths ``first_depth, first_depth + 1, ...``
        up to the longest chain (made once per key)."""
        key = (kind, order, first_depth)
        features = self._feature_cache.get(key)
        if features is None:
            last = first_depth + max(self.config.pool.num_pred_tokens, self.config.recycle_depth)
            features = tuple((kind, order, bucket(d, DEPTH_BUCKETS)) for d in range(first_depth, last))
            self._feature_cache[key] = features
        return features

    def _offer_next_chains(self, tree: BestFirstTree, root: int, occurrences) -> None:
        pool = self.pool
        limit = min(self.tree_capacity - 1, pool.num_pred_tokens)
        n, stored = occurrences
        tokens, lengths = pool.tokens, self.config.match_lengths
        for j, pos in enumerate(stored):
            order = bucket(pool.agreement(pos, (root,), MATCH_BUCKETS[-1]), MATCH_BUCKETS) if lengths else n
            cont = tokens[pos + 1:pos + 1 + limit]
            kind = "alt" if j else "match" if lengths else "next"
            features = self._depth_features(kind, order, 1)
            if self._votes and cont and cont[0] in self._votes:
                features = (self._agreed(cont[0], features[0]),) + features[1:]
            tree.offer(zip(cont, features))

    def _ranks_reaching(self, floor: float) -> int:
        """How many next-next ranks to offer: up to the last whose rate reaches ``floor`` (the
        tree drops a head below it when offered); every rank without a floor."""
        ranks = self.config.candidates
        if floor <= 0:
            return ranks
        rate, features, starts = self.stats.rate, self._rank_features, self._bucket_starts
        while ranks and rate(features[ranks]) < floor:
            ranks = starts[ranks] - 1  # the ranks of one bucket share a rate
        return ranks

    def _offer_next_next_chains(self, tree: BestFirstTree, root: int, top: list[int],
                                ranks: int) -> None:
        keep = self.pool.max_ngram_size - 1  # the tokens a query keeps before the candidate
        prefix = (self.pool.tokens[-keep:] + [root])[-keep:] if keep else []
        # next_next_candidates(root, top, ranks), in runs of ranks that share a bucket
        tokens = [token for token in top if token != root][:ranks]
        runs = [(feature, tokens[start - 1:end]) for feature, start, end in self._rank_runs
                if start <= ranks]
        if self._votes:  # agreed tokens leave their rank's run for a run of their own
            votes = self._votes
            split = []
            for feature, run in runs:
                split.append((feature, [t for t in run if t not in votes]))
                for v in (3, 2):
                    agreed = [t for t in run if votes.get(t) == v]
                    if agreed:
                        split.append((self._agreed(agreed[0], feature), agreed))
            runs = [(feature, run) for feature, run in split if run]
        rate = self.stats.rate
        bound = max([rate(feature) for feature in self._tail_firsts])
        tree.offer_runs(runs, self._tail_argument, tail_bound=bound,
                        make_tail=partial(self._next_next_tail, prefix))

    def _tail_argument(self, token: int) -> int | None:
        """What :meth:`_next_next_tail` makes the tail of a next-next head from: its token,
        or None (no tail) for a token the pool never saw followed (its lookup finds nothing)."""
        return token if self.pool.continues(token) else None

    def _next_next_tail(self, prefix: list[int], token: int) -> Chain:
        """The rest of a next-next chain, made only once ``token`` made the cut: the pool's
        continuation of ``context + [root, token]``."""
        n, cont = self.pool.first_match(prefix + [token], self.config.value_chain_length - 1)
        return zip(cont, self._depth_features("cont", n, 2)) if cont else iter(())

    def _offer_recycled_chains(self, tree: BestFirstTree, root: int, first: list[int]) -> None:
        """Chains through the target's remembered successors: the ``j``-th successor of the
        root (``first``, the root's row), then each token's first successor; with
        ``recycle_breadth`` b > 1, each node's b best successors below the first level
        (:class:`_Successors`)."""
        breadth = self.config.recycle_breadth
        for rank, token in enumerate(first, start=1):
            if token < 0:
                break
            feature = self._agreed(token, ("rec", bucket(rank, RANK_BUCKETS), 1))
            if breadth > 1:
                tree.offer_nodes([Candidate(token, feature, _Successors(self, token, 2))])
            else:
                tree.offer(self._recycled_chain(feature, token))

    def _hop_below(self, feature: Feature) -> int:
        """The successor level a node's children would be at (0: it has none): 1 below a
        node of another source, one more below a successor node; none below recycled chains'
        nodes, nor past ``successor_hops``."""
        kind = feature[0]
        if kind == "agree":
            return self._hop_below(feature[2])
        if kind == "rec":
            return 0
        hop = feature[2] + 1 if kind == "succ" else 1
        return hop if hop <= self.config.successor_hops else 0

    def _expand(self, token: int, feature: Feature) -> list[tuple[int, Feature]] | None:
        """The remembered successors of a node that no recycled chain made, as its children
        (and of theirs, ``successor_hops`` levels below it)."""
        hop = self._hop_below(feature)
        if not hop:
            return None
        row = self.successors.table[token, : self._successor_rows].tolist()
        return [(t, f) for t, f in zip(row, self._succ_features[hop]) if t >= 0]

    def _successor_features(self, depth: int) -> tuple:
        """The features of a node's successors of ranks 1..breadth at ``depth``: rank 1 as in a
        chain, ``("rec", 0, depth bucket)``; rank r > 1 ``("rec", r bucket, depth bucket)``."""
        key = ("rec-breadth", depth)
        features = self._feature_cache.get(key)
        if features is None:
            at = bucket(depth, DEPTH_BUCKETS)
            features = tuple(("rec", bucket(rank, RANK_BUCKETS) if rank > 1 else 0, at)
                             for rank in range(1, self.config.recycle_breadth + 1))
            self._feature_cache[key] = features
        return features

    def _recycled_chain(self, first: Feature, token: int) -> Chain:
        yield token, first
        table = self.successors.table
        for feature in self._depth_features("rec", 0, 2)[: self.config.recycle_depth - 1]:
            token = int(table[token, 0])
            if token < 0:
                return
            yield token, feature

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        if self.successors is not None and self.config.recycle_chains:
            self.successors.observe(tree, out)
        if self.live is not None and out.seconds is not None:
            self.live.record(tree.num_inputs, self._context, out.seconds)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        self.stats.update(self._features, tree.parents, set(path))
        self.pool.extend(tokens)
        if self.suffixes is not None:
            for token in tokens[1 if self._root_indexed else 0:]:
                self.suffixes.append(token)
            self._root_indexed = False


class _Successors:
    """The children of a recycled node at ``depth``: its remembered successors of ranks
    1..``recycle_breadth``, each with its own such children down to ``recycle_depth``; read
    from the table only when the value tree pops the node (:meth:`BestFirstTree.offer_nodes`
    iterates it then)."""

    __slots__ = ("drafter", "token", "depth")

    def __init__(self, drafter: ValueTreeDrafter, token: int, depth: int) -> None:
        self.drafter, self.token, self.depth = drafter, token, depth

    def __bool__(self) -> bool:
        return self.depth <= self.drafter.config.recycle_depth

    def __iter__(self):
        drafter, depth = self.drafter, self.depth
        if depth > drafter.config.recycle_depth:
            return
        row = drafter.successors.table[self.token, : drafter.config.recycle_breadth].tolist()
        for token, feature in zip(row, drafter._successor_features(depth)):
            if token < 0:
                return
            yield Candidate(token, feature, _Successors(drafter, token, depth + 1))


def suffix_candidates(draft: SuffixDraft, source: str,
                      rate: Callable[[Feature], float] | None = None,
                      floor: float = 0.0, grow: bool = False) -> list[Candidate]:
    """A suffix tree's draft as value-tree candidates (the draft's first tokens, each with its
    subtree). Feature ``("suf", source, m, share)``: ``m`` the bucketed match length
    (:data:`MATCH_BUCKETS`), ``share`` the bucketed fraction of the parent's occurrences that
    go on with this token (:data:`SHARE_BUCKETS`); for the first tokens, of the matched
    string's earlier occurrences (the draft's denominator counts the context's own, which has
    no continuation yet). Example: matched string seen 5 times (now included), 3 times
    followed by token 7, then twice by 8: ``7`` has share 3/4, ``8`` 2/3 (bucket 0.75).

    With ``rate`` and a ``floor`` above 0: nodes whose probability (the product of the rates on
    their path) is below ``floor`` are left out with their subtrees, as
    :meth:`~logitspec.value_tree.BestFirstTree.offer_nodes` of a tree with that floor would
    drop them (the same tree, fewer candidates made).

    With ``grow``, ``m`` is the match a node extends once its ancestors in the draft are
    accepted: the matched length plus the node's depth less one (a first token follows a
    match of ``m`` tokens, its child one of ``m + 1``, ...), so that deep nodes of a long copy
    are valued apart from the first ones.

    A draft that stands for other match lengths too (``draft.also``: the same occurrences, so
    the same continuations) gives each node, of the match buckets of all of them, the one whose
    feature ``rate`` values highest: as when each length's draft was offered apart and the
    trie kept the most probable of the copies of a node.
    """
    match = bucket(draft.match_len, MATCH_BUCKETS)
    matches = lengths = ()
    if draft.also and rate is not None:
        matches = tuple(sorted({match} | {bucket(m, MATCH_BUCKETS) for m in draft.also},
                               reverse=True))
        if len(matches) == 1:
            matches = ()
        if grow:  # below the first tokens, lengths of one bucket may grow into two
            lengths = tuple(sorted({draft.match_len, *draft.also}, reverse=True))
    depths: list[int] = []  # with grow: each node's depth in the draft (first tokens 0)
    choose = rate
    if floor <= 0:
        rate = None  # nothing can fall below it: no probabilities to compute
    nodes: list[Candidate | None] = []
    probs: list[float] = []
    top: list[Candidate] = []
    counts = draft.counts
    earlier = max(draft.denominator - 1, 1)  # the context's own occurrence has no continuation
    for token, parent, count in zip(draft.tokens, draft.parents, counts):
        if grow:
            depth = 0 if parent < 0 else depths[parent] + 1
            depths.append(depth)
        above = top if parent < 0 else nodes[parent]
        if above is None:  # its parent was left out
            nodes.append(None)
            probs.append(0.0)
            continue
        share = bucket(count / (earlier if parent < 0 else counts[parent]), SHARE_BUCKETS)
        if grow and depth:
            grown = _MATCH_BUCKET[min(draft.match_len + depth, _MATCH_LAST)]
            feature = ("suf", source, grown, share)
            if len(lengths) > 1:
                feature = max((("suf", source, _MATCH_BUCKET[min(m + depth, _MATCH_LAST)], share)
                               for m in lengths), key=choose)
        else:
            feature = ("suf", source, match, share)
            if matches:  # the longest match on ties
                feature = max((("suf", source, m, share) for m in matches), key=choose)
        prob = 1.0
        if rate is not None:
            prob = (1.0 if parent < 0 else probs[parent]) * rate(feature)
            if prob < floor:
                nodes.append(None)
                probs.append(0.0)
                continue
        node = Candidate(int(token), feature)
        nodes.append(node)
        probs.append(prob)
        (top if parent < 0 else above.children).append(node)
    return top


def make_logitspec_drafter(
    config: LogitSpecConfig, cost_curve: CostCurve | None = None, successors=None,
    prompt_head=None,
) -> Drafter:
    """The drafter for ``config.tree_policy``; ``successors`` (a
    :class:`~logitspec.recycling.SuccessorTable`) feeds the value tree's recycled chains, and
    with ``prompt_head`` also learns the prompt's logits (:class:`ValueTreeDrafter`)."""
    if config.tree_policy == "value":
        return ValueTreeDrafter(config, cost_curve, successors, prompt_head)
    return LogitSpecDrafter(config)
