"""REST (He et al., NAACL 2024, arXiv 2311.08252): drafts retrieved from a datastore of text.

Datastore (:class:`Datastore`): token sequences (*entries*) concatenated into one array with its
suffix array, saved as one ``.npz`` file (:data:`DATASTORE_FORMAT`). As in the public code,
entries are joined without a separator, so a continuation may run into the next entry.

Per step (:func:`retrieve`, :func:`draft_trie`; ``context`` = the context with the step's root):

1. for ``span`` = ``max_span`` .. ``min_span`` (16 .. 2): the suffix array lists the datastore
   positions that start with ``context[-span:]``; the longest span with any occurrence wins,
   and its first ``max_matches`` (5000) occurrences per datastore, in suffix-array order,
   give their next ``continuation_length`` (10) tokens;
2. every prefix of those continuations is a trie node counted by how many continuations
   start with it; the ``max_draft`` (64) most frequent nodes are kept (low-frequency branches
   pruned): count first, then the shallower, then the one retrieved first. A node's count
   never exceeds its parent's, so the kept nodes form a tree, verified with tree attention.

Worked example, continuations ``[5, 6], [5, 6], [5, 7], [8, 9]``, ``max_draft = 3``: counts
``5: 3, 5 6: 2, 8: 1, 5 7: 1, 8 9: 1`` -> kept ``5, 5 6, 8`` (8 is shallower than the other
count-1 nodes).

The published settings (public code): spans 16 to 2, 5000 occurrences, 10-token
continuations, 64 draft tokens (a 65-node tree with the root). No match: the root alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .tree import DraftTree

if TYPE_CHECKING:
    from .decoding import GenerationConfig

DATASTORE_FORMAT = (
    "a NumPy .npz file with 'tokens' (1-D unsigned integers: the entries concatenated), "
    "'suffix_array' (1-D int64: the start positions of the suffixes of 'tokens' in "
    "lexicographic order, a shorter suffix before its extensions) and 'entry_starts' (1-D "
    "int64: where each entry begins)"
)


class DatastoreError(ValueError):
    """A datastore file that cannot be used (one-line message)."""


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of ``tokens`` in lexicographic order (int64), a suffix
    before every longer suffix it is a prefix of; prefix doubling, ``O(n log^2 n)``.

    Example: ``[2, 1, 2, 1]`` -> suffixes ``[1], [1, 2, 1], [2, 1], [2, 1, 2, 1]`` ->
    ``[3, 1, 2, 0]``.
    """
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(np.asarray(tokens), return_inverse=True)[1].astype(np.int64)
    step = 1
    while True:
        following = np.zeros(n, dtype=np.int64)  # 0: past the end, sorts first
        following[: n - step] = rank[step:] + 1
        key = rank * (n + 1) + following
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.concatenate(([0], np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        rank = new_rank
        if rank.max() == n - 1 or step >= n:
            return order.astype(np.int64)
        step *= 2


@dataclass(frozen=True)
class Datastore:
    """Entries concatenated into ``tokens``, with their suffix array (module docstring)."""

    tokens: np.ndarray
    suffix_array: np.ndarray
    entry_starts: np.ndarray

    @classmethod
    def from_entries(cls, entries: Iterable[Sequence[int]]) -> Datastore:
        arrays = [np.asarray(e, dtype=np.int64).reshape(-1) for e in entries]
        arrays = [a for a in arrays if a.size]
        if not arrays:
            raise DatastoreError("a datastore needs at least one non-empty entry")
        if min(a.min() for a in arrays) < 0:
            raise DatastoreError("token ids must be >= 0")
        tokens = np.concatenate(arrays)
        dtype = np.uint16 if tokens.max() < 2**16 else np.uint32
        starts = np.cumsum([0] + [a.size for a in arrays[:-1]]).astype(np.int64)
        return cls(tokens.astype(dtype), suffix_array(tokens), starts)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # exactly this name: np.savez would add .npz
            np.savez(f, tokens=self.tokens, suffix_array=self.suffix_array,
                     entry_starts=self.entry_starts)

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        """Reads a file written by :meth:`save`; a missing or malformed one raises
        :class:`DatastoreError`."""
        path = Path(path)
        if not path.is_file():
            raise DatastoreError(f"no datastore file at {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                tokens, order, starts = (data[k] for k in ("tokens", "suffix_array", "entry_starts"))
        except (OSError, ValueError, KeyError) as exc:
            raise DatastoreError(f"{path} is not a datastore ({DATASTORE_FORMAT}): {exc}") from None
        if (tokens.ndim != 1 or order.shape != tokens.shape or tokens.dtype.kind != "u"
                or order.dtype != np.int64 or not len(tokens)):
            raise DatastoreError(f"{path} is not a datastore ({DATASTORE_FORMAT})")
        return cls(tokens, order, starts)

    @property
    def vocab_bound(self) -> int:
        """One more than the largest token id stored."""
        return int(self.tokens.max()) + 1

    def _suffix(self, rank: int, length: int) -> list[int]:
        start = int(self.suffix_array[rank])
        return self.tokens[start:start + length].tolist()

    def _bound(self, query: list[int], upper: bool) -> int:
        """First suffix-array rank whose suffix (cut to ``len(query)``) is ``>= query``
        (``> query`` when ``upper``)."""
        lo, hi, length = 0, len(self.suffix_array), len(query)
        while lo < hi:
            mid = (lo + hi) // 2
            head = self._suffix(mid, length)
            if head < query or (upper and head == query):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def occurrences(self, query: Sequence[int]) -> np.ndarray:
        """Start positions of ``query`` in ``tokens``, in suffix-array order (binary search)."""
        query = [int(t) for t in query]
        lo = self._bound(query, upper=False)
        if lo == len(self.suffix_array) or self._suffix(lo, len(query)) != query:
            return self.suffix_array[:0]
        return self.suffix_array[lo:self._bound(query, upper=True)]

    def continuations(self, query: Sequence[int], max_matches: int, length: int) -> np.ndarray:
        """(m, ``length``) int64: the tokens after the first ``max_matches`` occurrences of
        ``query``, -1 past the end of ``tokens``."""
        ends = self.occurrences(query)[:max_matches] + len(query)
        index = ends[:, None] + np.arange(length)
        found = self.tokens[np.minimum(index, len(self.tokens) - 1)].astype(np.int64)
        return np.where(index < len(self.tokens), found, -1)


@dataclass(frozen=True)
class RestConfig:
    """REST's settings (module docstring); ``draft_tree_capacity`` counts the root:
    ``max_draft = draft_tree_capacity - 1``."""

    draft_tree_capacity: int = 65
    max_span: int = 16
    min_span: int = 2
    max_matches: int = 5000
    continuation_length: int = 10

    def __post_init__(self) -> None:
        if self.draft_tree_capacity < 1:
            raise ValueError(
                f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}")
        if self.min_span < 1 or self.max_span < self.min_span:
            raise ValueError(f"spans must satisfy 1 <= min_span <= max_span, got "
                             f"{self.min_span} and {self.max_span}")
        if self.max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {self.max_matches}")
        if self.continuation_length < 1:
            raise ValueError(f"continuation_length must be >= 1, got {self.continuation_length}")


def retrieve(datastores: Sequence[Datastore], context: Sequence[int], config: RestConfig) -> np.ndarray:
    """Continuations (m, continuation_length) of the longest span (``max_span`` down to
    ``min_span`` tokens) of ``context``'s end found in any datastore, the datastores' in
    order; (0, continuation_length) when no span occurs.

    A span that occurs makes every shorter one occur, so a binary search over the spans finds
    the same span as trying 16, 15, ... in turn, with about 4 lookups instead of 15.
    """
    def lookup(span: int) -> list[np.ndarray]:
        query = context[len(context) - span:]
        found = [d.continuations(query, config.max_matches, config.continuation_length)
                 for d in datastores]
        return [f for f in found if len(f)]

    best: list[np.ndarray] = []
    low, high = config.min_span, min(config.max_span, len(context))
    while low <= high:
        span = (low + high) // 2
        found = lookup(span)
        if found:
            best, low = found, span + 1
        else:
            high = span - 1
    if not best:
        return np.zeros((0, config.continuation_length), dtype=np.int64)
    return np.concatenate(best)


def draft_trie(continuations: np.ndarray, max_nodes: int) -> tuple[list[int], list[int]]:
    """``(tokens, parents)`` of the ``max_nodes`` most frequent prefixes of ``continuations``
    (rows, -1 = ended), parents first; parent -1 = under the root. Order: count descending,
    then depth, then the row that reached the prefix first (module docstring's example).

    Vectorized: once the rows are sorted, every prefix is a run of consecutive rows, which
    starts where a row first differs from the one before at or above that depth.
    """
    rows, width = continuations.shape
    if not rows or max_nodes <= 0:
        return [], []
    order = np.lexsort(continuations.T[::-1])  # rows sorted by their tokens, -1 first
    ranked = continuations[order]
    differs = ranked[1:] != ranked[:-1]
    first_difference = np.where(differs.any(axis=1), differs.argmax(axis=1), width)
    count, depth, first_row, parent, token = [], [], [], [], []
    node_of_run = np.zeros(1, dtype=np.int64) - 1  # depth -1: the root
    run_of_row = np.zeros(rows, dtype=np.int64)
    total = 0
    for level in range(width):
        starts_here = np.concatenate(([True], first_difference <= level))
        starts = np.flatnonzero(starts_here)
        ends = np.append(starts[1:], rows)
        alive = ranked[starts, level] >= 0
        if not alive.any():
            break
        ids = np.where(alive, total + np.cumsum(alive) - 1, -1)
        parents = node_of_run[run_of_row[starts]]
        count.append((ends - starts)[alive])
        depth.append(np.full(int(alive.sum()), level))
        first_row.append(np.minimum.reduceat(order, starts)[alive])
        parent.append(parents[alive])
        token.append(ranked[starts, level][alive])
        total += int(alive.sum())
        node_of_run, run_of_row = ids, np.cumsum(starts_here) - 1
    if not total:
        return [], []
    count, depth, first_row, parent, token = map(np.concatenate, (count, depth, first_row, parent, token))
    chosen = np.lexsort((first_row, depth, -count))[:max_nodes]
    place = {int(node): i for i, node in enumerate(chosen)}
    parents = [place[int(p)] if p >= 0 else -1 for p in parent[chosen]]
    return token[chosen].tolist(), parents


class RestDrafter:
    """REST behind the :class:`~logitspec.drafters.Drafter` protocol: per step, the trie of
    the continuations retrieved for the context's end (root included) under the root, nodes
    deeper than the step allows dropped. It keeps only the last ``max_span - 1`` tokens."""

    name = "rest"
    top_k = 0
    needs_hidden = False

    def __init__(self, datastores: Sequence[Datastore], config: RestConfig = RestConfig()) -> None:
        if not datastores:
            raise ValueError("REST needs at least one datastore")
        self.datastores = list(datastores)
        self.config = config
        self.tree_capacity = config.draft_tree_capacity
        self._recent: list[int] = []

    def configure(self, config: GenerationConfig) -> None:
        pass

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        keep = self.config.max_span - 1
        self._recent = [int(t) for t in context[max(0, len(context) - keep):]] if keep else []

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        context = self._recent + [int(root)]
        found = retrieve(self.datastores, context, self.config)
        tokens, parents = draft_trie(found, self.tree_capacity - 1)
        return _tree_within(int(root), tokens, parents, max_depth)

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        pass

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        keep = self.config.max_span - 1
        self._recent = (self._recent + [int(t) for t in tokens])[-keep:] if keep else []


def _tree_within(root: int, tokens: list[int], parents: list[int], max_depth: int) -> DraftTree:
    """The draft under ``root`` (draft node ``i`` -> tree node ``i + 1``), nodes deeper than
    ``max_depth`` dropped (their descendants are deeper still)."""
    out_tokens, out_parents, out_depths = [root], [-1], [0]
    place: dict[int, int] = {-1: 0}
    for i, (token, parent) in enumerate(zip(tokens, parents)):
        if parent not in place or out_depths[place[parent]] >= max_depth:
            continue
        place[i] = len(out_tokens)
        out_tokens.append(token)
        out_parents.append(place[parent])
        out_depths.append(out_depths[place[parent]] + 1)
    return DraftTree(tuple(out_tokens), tuple(out_parents), tuple(out_depths))
