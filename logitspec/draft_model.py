"""Draft-model speculative decoding: small models propose, the target verifies in one pass.

A :class:`DraftModelDrafter` holds one or more draft models (any model sharing the target's
tokenizer: a smaller one of the same family, or the target's first L layers,
``target.truncated(L)``), each with its own KV cache that follows the decoding context. Per
step, under the carried root:

1. each draft model consumes what it has not seen yet, the tokens accepted since its last call
   and the root, in one forward pass;
2. it proposes ``num_drafts`` chains, one forward pass per drafted token (several chains: one
   per depth, over the nodes drafted so far). Greedy runs take the argmax (several drafts: the
   i-th most likely first token, then the argmax); sampling runs draw from the draft's
   processed distribution (the target's temperature, top-k and top-p,
   :func:`~logitspec.sampling.sampling_probs`) with the drafter's own seeded generator, and
   record it. Each chain's length follows the schedule (:mod:`logitspec.draft_length`) and
   ends at an end-of-sequence token;
3. the chains are merged into one token trie (:func:`merge_chains`) and verified by the
   target in one forward pass.

Draft cache policy: a single chain is committed to the cache as it is drafted; after the step
the cache is cut (:meth:`KVCache.truncate`) to the longest prefix that agrees with the context.
It then holds exactly the context except the tokens it never consumed (the last token of a
fully accepted draft, or accepted tokens of another drafter's chain), which the next step
feeds together with the root. Several chains from one model form a tree: its nodes are re-fed
each depth with a tree mask and never committed.

Losslessness: greedy verification accepts only the target's own argmax path, whatever the
tree. Sampling verification is recursive rejection sampling against the recorded draft
distributions (:mod:`logitspec.sampling`, part 2); :func:`merge_chains` records for every node
the distribution its token had given that it became a new child, which makes it exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .draft_length import AcceptanceHead, DraftLength, DraftLengthConfig, worth_drafting
from .gate import SourceGate
from .kv_cache import KVCache
from .sampling import sampling_probs
from .tree import DraftTree

if TYPE_CHECKING:
    from .cost import CostCurve, CostSurface
    from .decoding import GenerationConfig
    from .drafters import Drafter
    from .loading import LoadedModel

DRAFT_SEED_OFFSET = 0x5DEECE66D  # the draft's generator never replays the verifier's stream
# The layer-skip self-draft's depth when none is given. Untrained early exits of
# SmolLM2-135M agree with the full model on about 3% (4 or 8 layers) to 6% (12) of greedy
# tokens, so the cheapest depth is the least costly.
DEFAULT_DRAFT_LAYERS = 4


class DraftMismatchError(ValueError):
    """Target and draft do not share a tokenizer."""


@dataclass(frozen=True)
class DraftChain:
    """One proposed continuation: ``tokens`` (n,) and, for drawn tokens, ``probs`` (n, V)
    whose row ``i`` is the distribution ``tokens[i]`` was drawn from; ``None`` marks a
    deterministic proposal (a retrieved chain)."""

    tokens: tuple[int, ...]
    probs: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {self.probs.shape[0]} probability rows")


def merge_chains(
    root: int,
    chains: Iterable[DraftChain],
    capacity: int,
    *,
    max_depth: int | None = None,
    with_probs: bool = False,
) -> DraftTree:
    """Hangs ``chains`` under ``root`` as a trie, in order, until ``capacity`` nodes.

    A token equal to an existing child of its parent joins that child; otherwise it becomes a
    new child. With ``with_probs``, the new child's ``draft_probs`` row is its chain's row
    restricted to tokens that are not yet children of that parent, renormalized (the
    distribution of a draw given that it became a new child: exact recursive rejection
    sampling, :mod:`logitspec.sampling`); deterministic chains get zero rows (point masses).

    Example: root 5, chains ``[1, 2]`` then ``[1, 3]``, then ``[4]``: nodes 5, 1, 2, 3, 4 with
    parents -1, 0, 1, 1, 0; node 3's row is the second chain's second row with token 2 zeroed
    and renormalized; node 4's row is the third chain's row with token 1 zeroed.
    """
    if capacity < 1:
        raise ValueError(f"tree capacity must be >= 1 (the root), got {capacity}")
    tokens, parents, depths = [int(root)], [-1], [0]
    rows: list[torch.Tensor | None] = [None]
    children: dict[int, dict[int, int]] = {0: {}}
    limit = capacity if max_depth is None else max_depth
    for chain in chains:
        node = 0
        for i, token in enumerate(chain.tokens[:limit]):
            siblings = children[node]
            child = siblings.get(token)
            if child is None:
                if len(tokens) >= capacity:
                    break
                child = len(tokens)
                rows.append(_new_child_row(chain, i, siblings) if with_probs else None)
                tokens.append(token)
                parents.append(node)
                depths.append(depths[node] + 1)
                siblings[token] = child
                children[child] = {}
            node = child
    return DraftTree(tuple(tokens), tuple(parents), tuple(depths), _stack_rows(rows))


def _new_child_row(chain: DraftChain, i: int, siblings: dict[int, int]) -> torch.Tensor | None:
    if chain.probs is None:
        return None
    row = chain.probs[i].float().clone()
    if siblings:
        row[list(siblings)] = 0.0
        row /= row.sum()
    return row


def _stack_rows(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """(T, V) with zero rows for ``None``; ``None`` when no row was drawn."""
    drawn = [row for row in rows if row is not None]
    if not drawn:
        return None
    out = drawn[0].new_zeros(len(rows), drawn[0].shape[-1])
    for i, row in enumerate(rows):
        if row is not None:
            out[i] = row
    return out


def check_same_tokenizer(target: Any, draft: Any, *, samples: int = 512) -> None:
    """Raises :class:`DraftMismatchError` unless the two tokenizers have the same size and
    map ``samples`` ids spread over the vocabulary (and the special tokens) alike."""
    size, draft_size = len(target), len(draft)
    if size != draft_size:
        raise DraftMismatchError(
            f"the draft's tokenizer has {draft_size} tokens, the target's {size}: "
            "draft and target must share a tokenizer"
        )
    ids = sorted(set(range(0, size, max(1, size // samples))) | set(target.all_special_ids))
    for token_id in ids:
        if target.convert_ids_to_tokens(token_id) != draft.convert_ids_to_tokens(token_id):
            raise DraftMismatchError(
                f"token id {token_id} is {target.convert_ids_to_tokens(token_id)!r} for the "
                f"target but {draft.convert_ids_to_tokens(token_id)!r} for the draft: draft "
                "and target must share a tokenizer"
            )


def check_same_vocabulary(target_vocab_size: int, draft_vocab_size: int) -> None:
    """Raises :class:`DraftMismatchError` when the models' output sizes differ."""
    if target_vocab_size != draft_vocab_size:
        raise DraftMismatchError(
            f"the draft model's vocabulary has {draft_vocab_size} entries, the target's "
            f"{target_vocab_size}: draft and target must share a tokenizer"
        )


class DraftSource:
    """Where a :class:`DraftModelDrafter` gets its draft distributions: a draft model with its
    own KV cache (:class:`ModelSource`), or anything else that follows the decoding context
    the same way (a draft head reading the target's hidden states,
    :class:`logitspec.draft_head.HeadSource`).

    Per step the drafter calls :meth:`root` once, then :meth:`expand` once per depth; after
    verification :meth:`observe`, then :meth:`extend`. ``hidden_size``: the width of the
    hidden states :meth:`root` and :meth:`expand` return (what an acceptance head reads).
    """

    needs_hidden = False  # whether begin/observe must carry the target's hidden states
    vocab_size: int
    hidden_size: int | None  # None: unknown (no acceptance head can check it)
    device: torch.device

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None, room: int) -> None:
        """A generation starts over ``context`` (``reused``, ``hidden``: as the drafter's
        ``begin``); ``room``: the most tokens the context will hold, drafts included."""
        raise NotImplementedError

    def root(self, context: Sequence[int], root: int, room: int) -> torch.Tensor:
        """Consumes ``context`` (what is not consumed yet) and ``root``; returns the hidden
        state (1, hidden) whose distribution proposes the token after ``root``."""
        raise NotImplementedError

    def expand(self, trie: "_DraftTrie", frontier: list[int], chain: bool) -> torch.Tensor:
        """Hidden states (len(frontier), hidden) at the ``frontier`` nodes of ``trie`` (each
        drafted under an expanded parent); ``chain``: one draft, its nodes may be committed."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's logits (N, vocab_size) at ``hidden`` (N, hidden)."""
        raise NotImplementedError

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        """The target's outputs on the verified ``tree``."""

    def extend(self, context: Sequence[int], known: int, path: Sequence[int]) -> None:
        """``context`` grew by the accepted ``path`` of the tree just observed (root first);
        its first ``known`` tokens are unchanged."""


class ModelSource(DraftSource):
    """One draft model, its KV cache and the tokens that cache holds (committed)."""

    def __init__(self, model: Any, mask_rows: int) -> None:
        self.model = model
        self.mask_rows = mask_rows
        self.vocab_size = model.config.vocab_size
        self.hidden_size = getattr(model.config, "hidden_size", None)
        self.device = model.device
        self.cache: KVCache | None = None
        self.tokens: list[int] = []

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None, room: int) -> None:
        self.reserve(room)
        self.sync(context)
        if len(self.tokens) < len(context):
            self.feed(context[len(self.tokens):])

    def root(self, context: Sequence[int], root: int, room: int) -> torch.Tensor:
        self.reserve(room)
        return self.feed(list(context[len(self.tokens):]) + [root])[-1:]

    def expand(self, trie: "_DraftTrie", frontier: list[int], chain: bool) -> torch.Tensor:
        """A chain's node is fed and committed; several chains' nodes are re-fed each depth
        with the nodes on their paths, under a tree mask, and never committed."""
        if chain:
            (node,) = frontier
            return self.feed([trie.tokens[node]])
        nodes, tree_mask = trie.subtree(frontier)
        hidden = self.feed_tree([trie.tokens[n] for n in nodes],
                                [trie.depths[n] for n in nodes], tree_mask)
        return hidden[[nodes.index(n) for n in frontier]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def extend(self, context: Sequence[int], known: int, path: Sequence[int]) -> None:
        self.sync(context, min(known, len(self.tokens)))

    def reserve(self, capacity: int) -> None:
        """Makes room for ``capacity`` tokens (a new buffer, the committed part copied)."""
        if self.cache is not None and self.cache.capacity >= capacity:
            return
        old = self.cache
        size = max(capacity, 2 * old.capacity if old is not None else 0)
        self.cache = self.model.new_cache(size, mask_rows=self.mask_rows)
        if old is not None:
            self.cache.buffer[:, :, :, : old.length] = old.buffer[:, :, :, : old.length]
            self.cache.length = old.length

    def sync(self, context: Sequence[int], start: int = 0) -> None:
        """Drops cached tokens past the longest prefix shared with ``context`` (the first
        ``start`` are known to agree)."""
        n = start
        limit = min(len(self.tokens), len(context))
        while n < limit and self.tokens[n] == context[n]:
            n += 1
        if n < len(self.tokens):
            del self.tokens[n:]
        self.cache.truncate(n)

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Consumes ``tokens`` (committed); returns their final hidden states (T, hidden)."""
        device = self.model.device
        start = len(self.tokens)
        ids = torch.tensor(list(tokens), device=device)
        positions = torch.arange(start, start + len(tokens), device=device)
        hidden = self.model.hidden(ids, positions, self.cache)
        self.cache.commit(len(tokens))
        self.tokens.extend(tokens)
        return hidden

    def feed_tree(self, tokens: Sequence[int], depths: Sequence[int], tree_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (T, hidden) of tree nodes below the last cached token (depth 1 = its
        child), attending as ``tree_mask`` (T, T) says; nothing is committed."""
        device = self.model.device
        base = len(self.tokens) - 1
        ids = torch.tensor(list(tokens), device=device)
        positions = torch.tensor([base + d for d in depths], device=device)
        return self.model.hidden(ids, positions, self.cache, tree_mask.to(device))


@dataclass
class _Chain:
    """A chain being drafted: where it is in the draft's trie, what it drew."""

    node: int = 0
    tokens: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    keep_prob: float = 1.0
    expected: float = 0.0  # the sum of keep_prob over its prefixes: expected accepted tokens
    active: bool = True


@dataclass(frozen=True)
class DraftModelConfig:
    """Draft-model drafting: the length schedule, ``num_drafts`` chains per draft model, and
    the tree budget (root included; ``None``: room for every chain). ``gate``: under the
    ``cost`` schedule, each step drafts or not by which of the two has given more tokens per
    second (:class:`~logitspec.gate.SourceGate`); a step without the draft skips its passes
    (the draft's cache catches up on the next step that drafts). Off: every step drafts."""

    length: DraftLengthConfig = DraftLengthConfig()
    num_drafts: int = 1
    tree_capacity: int | None = None
    gate: bool = True  # the cost schedule: steps without the draft compete (logitspec.gate)

    def __post_init__(self) -> None:
        if self.num_drafts < 1:
            raise ValueError(f"num_drafts must be >= 1, got {self.num_drafts}")
        if self.tree_capacity is not None and self.tree_capacity < 1:
            raise ValueError(f"tree_capacity must be >= 1 (the root), got {self.tree_capacity}")


class DraftModelDrafter:
    """Speculative decoding with draft models (module docstring). ``acceptance_head``
    predicts acceptance for the ``confidence`` schedule instead of the draft's probability."""

    name = "sps"
    top_k = 0
    needs_hidden = False

    def __init__(
        self,
        draft_models: Any | Sequence[Any],
        config: DraftModelConfig = DraftModelConfig(),
        *,
        acceptance_head: AcceptanceHead | None = None,
        cost_curve: CostCurve | CostSurface | None = None,
    ) -> None:
        """``draft_models``: draft models (each gets a :class:`ModelSource`) or
        :class:`DraftSource` objects, one or a list. ``cost_curve``: the target's measured
        verification cost, which the ``cost`` schedule needs."""
        drafts = list(draft_models) if isinstance(draft_models, (list, tuple)) else [draft_models]
        if not drafts:
            raise ValueError("at least one draft model is needed")
        chains = len(drafts) * config.num_drafts
        if config.length.schedule == "cost":
            if cost_curve is None:
                raise ValueError("the cost schedule needs the target's cost curve")
            if chains > 1:
                raise ValueError("the cost schedule sizes one chain: one draft model, num_drafts=1")
        self.costs = cost_curve
        use_gate = config.gate and config.length.schedule == "cost"
        self.gate = SourceGate() if use_gate else None
        self._first = self._per_pass = 0.0  # seconds of the draft's passes, averaged
        self._cost: Sequence[float] = ()
        self._limit = 0
        rows = max(64, chains * config.length.longest + 2)
        self.sources = [d if isinstance(d, DraftSource) else ModelSource(d, rows) for d in drafts]
        self.vocab_size = self.sources[0].vocab_size
        for source in self.sources[1:]:
            check_same_vocabulary(self.vocab_size, source.vocab_size)
        _check_head(acceptance_head, self.sources)
        self.config = config
        self.head = acceptance_head
        self.needs_hidden = any(source.needs_hidden for source in self.sources)
        self.tree_capacity = config.tree_capacity or 1 + chains * config.length.longest
        self.length = DraftLength(config.length)
        self.context: list[int] = []
        self.chains: list[DraftChain] = []
        self.generator = torch.Generator(device=self.sources[0].device)
        self.greedy, self.eos, self.max_new_tokens = True, frozenset(), 0
        self.sampling = (1.0, 0, 1.0)

    def configure(self, config: GenerationConfig) -> None:
        """Follows ``config``: greedy or sampling (its temperature, top-k, top-p), a generator
        seeded from its seed, its end-of-sequence tokens; the schedule starts over."""
        self.greedy = config.greedy
        self.eos = frozenset(config.eos_token_ids)
        self.max_new_tokens = config.max_new_tokens
        if not self.greedy:
            self.sampling = (config.temperature, config.top_k, config.top_p)
        self.generator.manual_seed((config.seed + DRAFT_SEED_OFFSET) % 2**63)
        self.length.reset()

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        self.context = [int(t) for t in context]
        room = len(self.context) + self.max_new_tokens + self.tree_capacity + 1
        for source in self.sources:
            source.begin(self.context, reused, hidden, room)

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        drafting = self.gate is None or self.gate.start_step()
        chains = self.propose(root, max_depth if drafting else 0)
        tree = merge_chains(
            root, chains, self.tree_capacity, max_depth=max_depth, with_probs=not self.greedy
        )
        if self.gate is not None:
            self.gate.drafted()
        return tree

    def propose(self, root: int, max_depth: int) -> list[DraftChain]:
        """Every draft model's chains under ``root`` (at most ``max_depth`` tokens each)."""
        self.chains = []
        limit = min(max_depth, self.config.length.longest)
        if limit > 0:
            for source in self.sources:
                self.chains += self._draft_source(source, root, limit)
        return self.chains

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        for source in self.sources:
            source.observe(tree, out)
        if self.gate is not None:
            self.gate.verified(out.seconds)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        known = len(self.context)
        self.context.extend(int(t) for t in tokens)
        for source in self.sources:
            source.extend(self.context, known, path)
        if self.gate is not None:
            self.gate.end_step(len(path))
        accepted = list(tokens[1:])
        if self.chains:
            full = any(list(c.tokens) == accepted[: len(c.tokens)] for c in self.chains)
            self.length.update(full)

    def _draft_source(self, source: DraftSource, root: int, limit: int) -> list[DraftChain]:
        start = time.perf_counter()
        hidden = source.root(self.context, root, len(self.context) + 1 + self.config.num_drafts * limit)
        trie = _DraftTrie(root)
        trie.expanded(0, self._distribution(source, hidden)[0], hidden[0])
        self._first = 0.9 * self._first + 0.1 * (time.perf_counter() - start)
        if self.costs is not None:
            self._cost = self.costs.at(len(self.context)).cost_table(limit + 1)
            self._limit = limit
        chains = [_Chain() for _ in range(self.config.num_drafts)]
        for depth in range(1, limit + 1):
            for rank, chain in enumerate(c for c in chains if c.active):
                self._extend_chain(trie, chain, rank if depth == 1 else 0, depth)
            active = [c for c in chains if c.active]
            if not active or depth == limit:
                break
            start = time.perf_counter()
            self._expand(source, trie, sorted({c.node for c in active}))
            self._per_pass = 0.9 * self._per_pass + 0.1 * (time.perf_counter() - start)
        return [
            DraftChain(tuple(c.tokens), None if self.greedy else torch.stack(c.rows))
            for c in chains if c.tokens
        ]

    def _extend_chain(self, trie: "_DraftTrie", chain: _Chain, rank: int, depth: int) -> None:
        """Draws ``chain``'s next token at its node (greedy: the ``rank``-th most likely);
        under the ``cost`` schedule, only if drafting it may pay (decided before the draw)."""
        probs, hidden = trie.dist[chain.node], trie.hidden[chain.node]
        expected = None
        if self.config.length.schedule == "cost":
            expected = self._expected_acceptance(probs, hidden)
            if not worth_drafting(chain.expected, chain.keep_prob, depth - 1, expected,
                                  self._limit, self._cost, self._first, self._per_pass):
                chain.active = False
                return
        if self.greedy:
            token = int(probs.argmax()) if rank == 0 else int(probs.topk(rank + 1).indices[rank])
        else:
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        chain.tokens.append(token)
        chain.rows.append(probs)
        # the head's prediction, or greedy's largest probability, is the drawn token's: reused
        known = expected is not None and (self.head is not None or self.greedy)
        chain.keep_prob *= expected if known else self._acceptance(probs, hidden, token)
        chain.expected += chain.keep_prob
        chain.node = trie.child(chain.node, token)
        if token in self.eos or self.length.stop(depth, chain.keep_prob):
            chain.active = False

    def _acceptance(self, probs: torch.Tensor, hidden: torch.Tensor, token: int) -> float:
        """Predicted probability that ``token`` is accepted (module :mod:`draft_length`)."""
        if self.config.length.schedule not in ("confidence", "cost"):
            return 1.0
        if self.head is not None:
            return float(self.head.probability(hidden))
        return float(probs[token])

    def _expected_acceptance(self, probs: torch.Tensor, hidden: torch.Tensor) -> float:
        """The next token's predicted acceptance before it is drawn: the acceptance head's,
        else the largest probability (greedy) or that of a draw repeating itself (sampling)."""
        if self.head is not None:
            return float(self.head.probability(hidden))
        return float(probs.max()) if self.greedy else float((probs * probs).sum())

    def _expand(self, source: DraftSource, trie: "_DraftTrie", frontier: list[int]) -> None:
        """Computes the draft's distribution at the ``frontier`` nodes."""
        hidden = source.expand(trie, frontier, chain=self.config.num_drafts == 1)
        for node, probs, h in zip(frontier, self._distribution(source, hidden), hidden):
            trie.expanded(node, probs, h)

    def _distribution(self, source: DraftSource, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's distributions (N, V) at ``hidden`` (N, hidden): processed as the run
        samples, or the plain softmax for greedy runs."""
        logits = source.logits(hidden)
        if self.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return sampling_probs(logits, *self.sampling)


def _check_head(head: AcceptanceHead | None, sources: list[DraftSource]) -> None:
    if head is None:
        return
    for source in sources:
        size = source.hidden_size
        if size is not None and size != head.hidden_size:
            raise ValueError(
                f"the acceptance head reads hidden states of size {head.hidden_size}, "
                f"the draft model has {size}"
            )


class _DraftTrie:
    """The draft's own token trie during one step: node 0 is the root; per expanded node, the
    draft's distribution and final hidden state there."""

    def __init__(self, root: int) -> None:
        self.tokens, self.parents, self.depths = [root], [-1], [0]
        self.kids: dict[tuple[int, int], int] = {}
        self.dist: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}

    def child(self, node: int, token: int) -> int:
        """The child of ``node`` with ``token``, created when missing."""
        key = (node, token)
        if key not in self.kids:
            self.kids[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(node)
            self.depths.append(self.depths[node] + 1)
        return self.kids[key]

    def expanded(self, node: int, probs: torch.Tensor, hidden: torch.Tensor) -> None:
        self.dist[node] = probs
        self.hidden[node] = hidden

    def subtree(self, frontier: list[int]) -> tuple[list[int], torch.Tensor]:
        """The non-root nodes on the paths to ``frontier`` (index order) and their tree
        mask (each sees itself and its ancestors among them)."""
        keep: set[int] = set()
        for node in frontier:
            while node > 0 and node not in keep:
                keep.add(node)
                node = self.parents[node]
        nodes = sorted(keep)
        where = {n: i + 1 for i, n in enumerate(nodes)}
        sub = DraftTree(
            (self.tokens[0],) + tuple(self.tokens[n] for n in nodes),
            (-1,) + tuple(where.get(self.parents[n], 0) for n in nodes),
            (0,) + tuple(self.depths[n] for n in nodes),
        )
        return nodes, torch.from_numpy(sub.tree_mask()[1:, 1:])


class CombinedDrafter:
    """A draft model's chains and a retrieval drafter's chains (LogitSpec, PLD) in one tree
    of ``tree_capacity`` nodes: the draft model's first, the retrieved paths after them.

    Greedy runs accept the longest path the target agrees with; sampling runs verify the mixed
    tree by recursive rejection, the retrieved nodes as point masses (:mod:`logitspec.sampling`,
    part 2). The retrieval drafter sees its own tree and the accepted path within it."""

    def __init__(self, draft_model: DraftModelDrafter, retrieval: Drafter, tree_capacity: int) -> None:
        if tree_capacity < 1:
            raise ValueError(f"tree_capacity must be >= 1 (the root), got {tree_capacity}")
        self.name = f"{draft_model.name}+{retrieval.name}"
        self.draft_model = draft_model
        self.retrieval = retrieval
        self.tree_capacity = tree_capacity
        self.top_k = max(draft_model.top_k, retrieval.top_k)
        self.needs_hidden = draft_model.needs_hidden or retrieval.needs_hidden
        self.vocab_size = draft_model.vocab_size
        self._retrieved: DraftTree | None = None

    def configure(self, config: GenerationConfig) -> None:
        self.draft_model.configure(config)
        self.retrieval.configure(config)

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        self.draft_model.begin(context, reused, hidden)
        self.retrieval.begin(context, reused, hidden)

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        chains = self.draft_model.propose(root, max_depth)
        self._retrieved = self.retrieval.draft(root, root_topk, max_depth)
        tree = self._retrieved
        chains += [
            DraftChain(tuple(tree.tokens[i] for i in path[1:]))
            for path in tree.retrieve_paths() if len(path) > 1
        ]
        return merge_chains(root, chains, self.tree_capacity, max_depth=max_depth,
                            with_probs=not self.draft_model.greedy)

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        self.draft_model.observe(tree, out)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        self.draft_model.extend(tokens, tree, path)
        own = self._retrieved
        self.retrieval.extend(tokens, own, _follow(own, tokens))


def _follow(tree: DraftTree, tokens: Sequence[int]) -> list[int]:
    """The path of ``tree`` that spells the longest prefix of ``tokens`` (root first)."""
    kids = {(tree.parents[i], tree.tokens[i]): i for i in range(len(tree) - 1, 0, -1)}
    path = [0]
    for token in tokens[1:]:
        child = kids.get((path[-1], int(token)))
        if child is None:
            break
        path.append(child)
    return path


def load_draft_models(
    target: LoadedModel,
    draft_paths: Sequence[str] = (),
    draft_layers: Sequence[int] = (),
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> list[Any]:
    """The draft models: each of ``draft_paths`` (a folder, a GGUF file or the default
    model's name; its tokenizer checked against the target's), then a layer-skip self-draft
    (the target's first L blocks, its norm and LM head, shared weights) per L in
    ``draft_layers``."""
    from .loading import load

    models = []
    for path in draft_paths:
        draft = load(path, dtype=dtype, device=device)
        check_same_vocabulary(target.model.config.vocab_size, draft.model.config.vocab_size)
        check_same_tokenizer(target.tokenizer, draft.tokenizer)
        models.append(draft.model)
    models += [target.model.truncated(n) for n in draft_layers]
    return models
