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

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from .pool import NGramPool
from .tree import DraftTree, build_tree


class Drafter(Protocol):
    """What the decoding loop needs from a drafter."""

    name: str
    tree_capacity: int  # most nodes a tree may have, root included

    def begin(self, context: Sequence[int], reused: int) -> None:
        """A generation starts over ``context``; its first ``reused`` tokens are unchanged
        since the previous call's context."""

    def draft(self, root: int, last_logits: torch.Tensor, max_depth: int) -> DraftTree:
        """A tree under ``root``; ``last_logits`` (V,) is the target's logit that chose it.
        No path may be deeper than ``max_depth``."""

    def observe(self, tree: DraftTree, logits: torch.Tensor) -> None:
        """The target's logits (T, V) at every node of the verified ``tree`` (called before
        :meth:`extend`; drafters that learn from the target's logits use it)."""

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
    """

    pool: PoolConfig = PoolConfig()
    draft_tree_capacity: int = 64
    num_next_next: int | None = None
    rank_lengths: tuple[tuple[int, int], ...] = ((8, 4), (32, 3))
    beyond_length: int = 1
    merge_prefixes: bool = True

    def __post_init__(self) -> None:
        if self.draft_tree_capacity < 1:
            raise ValueError(
                f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}"
            )
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
    def candidates(self) -> int:
        return self.draft_tree_capacity if self.num_next_next is None else self.num_next_next


class _PoolDrafter:
    """Holds the pool and follows the context; subclasses draft."""

    name = "pool"

    def __init__(self, pool_config: PoolConfig, tree_capacity: int) -> None:
        if tree_capacity < 1:
            raise ValueError(f"draft_tree_capacity must be >= 1, got {tree_capacity}")
        self.pool = pool_config.new_pool()
        self.tree_capacity = tree_capacity

    def begin(self, context: Sequence[int], reused: int) -> None:
        self.pool.truncate(min(reused, len(self.pool)))
        self.pool.extend(context[len(self.pool):])

    def observe(self, tree: DraftTree, logits: torch.Tensor) -> None:
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

    def draft(self, root: int, last_logits: torch.Tensor, max_depth: int) -> DraftTree:
        chain = self.pool.lookup(self._query(root), max_tokens=self.tree_capacity - 1)
        return build_tree(root, [chain], self.tree_capacity, max_depth=max_depth)


class LogitSpecDrafter(_PoolDrafter):
    """LogitSpec drafting (module docstring)."""

    name = "logitspec"

    def __init__(self, config: LogitSpecConfig = LogitSpecConfig()) -> None:
        super().__init__(config.pool, config.draft_tree_capacity)
        self.config = config

    def draft(self, root: int, last_logits: torch.Tensor, max_depth: int) -> DraftTree:
        if self.tree_capacity <= 1 or max_depth <= 0:
            return build_tree(root, [], 1)
        k = min(self.config.candidates + 1, last_logits.shape[-1])
        top = last_logits.topk(k).indices.tolist() if k > 1 else []
        return build_tree(
            root, self._chains(root, top), self.tree_capacity,
            max_depth=max_depth, merge=self.config.merge_prefixes,
        )

    def _chains(self, root: int, top: list[int]) -> Iterator[list[int]]:
        yield self.pool.lookup(self._query(root), max_tokens=self.tree_capacity - 1)
        rank = 0
        for token in top:
            if token == root:
                continue
            rank += 1
            if rank > self.config.candidates:
                return
            length = self.config.chain_length(rank)
            yield [token] + self.pool.lookup(self._query(root, token), max_tokens=length - 1)
