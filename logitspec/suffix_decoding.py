"""SuffixDecoding (arXiv 2411.04975, NeurIPS 2025): drafts from suffix trees of the question
and of earlier answers, speculating more where the context matches a longer pattern.

Two :class:`~logitspec.suffix_tree.SuffixTree` indexes (:class:`SuffixCache`):

- the *per-request* tree over the request's prompt and its output so far (a new one per
  request; when a follow-up prompt extends the previous context unchanged, the old tree is
  extended instead, which indexes the same tokens);
- the *global* tree over the outputs of earlier requests of the run, the current output
  included as it grows; prompts never enter it. It keeps the last ``max_cached_answers``
  outputs (FIFO: the oldest is removed when a new request starts; 0 disables the tree).

Per step, the context (prompt + output, the step's root included) is matched in each tree.
For every match length ``m`` from 1 to ``min(max_depth, len(context)) - 1`` whose suffix
occurs, up to ``min(max_spec_tokens, floor(alpha * m + offset))`` tokens are speculated below
the match (:meth:`~logitspec.suffix_tree.SuffixTree.speculate`: frequency-scored, best first,
pruned below ``min_token_prob``, as a tree or a chain). The draft with the highest score (sum of
its tokens' probabilities) wins; equal scores go to the longer match, and between the two trees
to the per-request one. Every occurrence counts, the context's own final one too, so a pattern
seen once before and once now proposes its continuation with probability 1/2.

Worked example (alpha 1, offset 0): context ``... 5 8 9 | 1 2`` where ``1 2``
occurred once before, followed by ``3 4``, and ``2`` occurred twice more, each followed by
``7``: ``m = 2`` (count 2): budget 2, drafts ``3 (1/2), 4 (1/2)``, score 1; ``m = 1`` (count 4):
budget 1, best ``7 (2/4)``, score 1/2 -> ``3 4`` is drafted.

Longer matches are tried first and a match whose budget cannot beat the best score so far ends
the search (scores never exceed the budget); a match is skipped when its budget times its most
frequent continuation's probability cannot beat it (no deeper token is likelier), or when the
depths left below it in the tree times the probability of all its continuations cannot (a
long match has little room below it). In a long verbatim repeat, where the longest matches
have the least room, the match with the most room is drafted first and bounds the rest. All of
this gives the same draft as trying every ``m``.

Published defaults (the public implementation and its serving configuration): ``max_depth``
64, alpha (``max_spec_factor``) 1.0, offset (``max_spec_offset``) 0, ``min_token_prob`` 0.1,
100000 cached outputs, and, in the paper's simulator, tree speculation of up to ``max_depth`` =
64 tokens (a 65-node tree with the root). Siblings of equal count are ordered by first
occurrence (the public code orders some of them by most recent count change instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import chain
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .suffix_tree import ROOT, SuffixDraft, SuffixTree
from .tree import DraftTree

if TYPE_CHECKING:
    from .decoding import GenerationConfig

MODES = ("tree", "chain")


@dataclass(frozen=True)
class SuffixConfig:
    """SuffixDecoding settings (module docstring). ``draft_tree_capacity`` counts the root:
    ``max_spec_tokens = draft_tree_capacity - 1``; ``mode``: ``tree`` or ``chain``;
    ``max_spec_factor`` and ``max_spec_offset`` are the paper's alpha and the public code's
    offset."""

    draft_tree_capacity: int = 65
    mode: str = "tree"
    max_depth: int = 64
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    max_cached_answers: int = 100_000

    def __post_init__(self) -> None:
        if self.draft_tree_capacity < 1:
            raise ValueError(
                f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'tree' or 'chain', got {self.mode!r}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if not self.max_spec_factor >= 0:
            raise ValueError(f"max_spec_factor must be >= 0, got {self.max_spec_factor}")
        if not math.isfinite(self.max_spec_offset):
            raise ValueError(f"max_spec_offset must be finite, got {self.max_spec_offset}")
        if not 0 <= self.min_token_prob <= 1:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")
        if self.max_cached_answers < 0:
            raise ValueError(f"max_cached_answers must be >= 0, got {self.max_cached_answers}")

    @property
    def max_spec_tokens(self) -> int:
        return self.draft_tree_capacity - 1

    def budget(self, match_len: int) -> int:
        """Tokens to speculate after a match of ``match_len``: ``min(max_spec_tokens,
        floor(max_spec_factor * match_len + max_spec_offset))``, at least 0 (1e-6 absorbs
        rounding, as in the public code). Example: factor 1, offset 0, 64 tokens: m = 3 -> 3,
        m = 80 -> 64."""
        spec = self.max_spec_factor * match_len + self.max_spec_offset
        return min(self.max_spec_tokens, max(0, int(spec + 1e-6)))


class SuffixCache:
    """The per-request and global suffix trees of one run (module docstring).

    Usage: :meth:`start_request` with the prompt, :meth:`append` every token that joins the
    context, :meth:`speculate` for a draft after the context.
    """

    def __init__(self, config: SuffixConfig = SuffixConfig()) -> None:
        self.config = config
        self.local = SuffixTree(config.max_depth, config.min_token_prob)
        self.answers = SuffixTree(config.max_depth, config.min_token_prob)
        self.context_length = 0
        # config.budget of every match length a tree can hold
        self._budgets = [config.budget(m) for m in range(config.max_depth + 1)]
        self._tree_mode = config.mode == "tree"
        # positions in the global tree of the context's suffixes longer than the output so
        # far (they reach into the prompt), shortest first
        self._long: list[tuple[list[int], int, int]] = []

    def start_request(self, prompt: Sequence[int], reused: int = 0) -> None:
        """A request starts over ``prompt``, whose first ``reused`` tokens are unchanged since
        the previous request's context."""
        indexed = self.local.sequence
        if indexed is not None and len(indexed) <= reused:
            self.local.extend(prompt[len(indexed):])
        else:
            self.local = SuffixTree(self.config.max_depth, self.config.min_token_prob)
            self.local.start_sequence()
            self.local.extend(prompt)
        self.context_length = len(prompt)
        self._long = []
        if not self.config.max_cached_answers:
            return
        self.answers.start_sequence()
        while self.answers.num_sequences > self.config.max_cached_answers:
            self.answers.remove_oldest()
        tail = prompt[max(0, len(prompt) - self.config.max_depth + 1):]
        for token in tail:
            self._long = self._advance(self._long, token, from_root=True)

    def append(self, token: int) -> None:
        """``token`` joined the context (the output so far)."""
        self.local.append(token)
        self.context_length += 1
        if self.config.max_cached_answers:
            self.answers.append(token)
            self._long = self._advance(self._long, token, from_root=False)

    def _advance(self, positions: list, token: int, from_root: bool) -> list:
        """The matched suffixes, shortest first, after ``token``: each one extended by it
        while the extension occurs and is shorter than ``max_depth`` (a suffix that fails
        makes every longer one fail)."""
        tree = self.answers
        moved = []
        for position in chain([ROOT], positions) if from_root else positions:
            position = tree.advance(position, token)
            if position is None or tree.position_depth(position) >= self.config.max_depth:
                break
            moved.append(position)
        return moved

    def speculate(self, max_depth: int | None = None) -> SuffixDraft:
        """The best draft after the context (module docstring), no deeper than ``max_depth``."""
        best = self._best(self.local, self.local.loci, SuffixDraft(), max_depth)
        return self._best_answer(best, max_depth)

    def drafts(self, max_depth: int | None = None) -> tuple[SuffixDraft, SuffixDraft]:
        """Each tree's own best draft after the context: ``(per-request, global)`` (an empty
        draft for a disabled global tree), for callers that weigh the two sources apart."""
        local = self._best(self.local, self.local.loci, SuffixDraft(), max_depth)
        return local, self._best_answer(SuffixDraft(), max_depth)

    def branches(self, max_depth: int | None = None, skip: int = 0,
                 shortest: int = 2) -> list[SuffixDraft]:
        """The per-request tree's drafts at the other match lengths of ``shortest`` tokens or
        more (longest first), each with its own budget: one per occurrence set, none for the
        set of the match of ``skip`` tokens (the one :meth:`drafts` chose). SuffixDecoding
        keeps only its best-scored draft; a caller that values every node apart can use the
        rest, e.g. the frequent continuation of a 3-token match beside a 20-token match's rare
        one.

        A suffix that occurs exactly as often as a longer matched suffix occurs only inside
        it: the two matches continue alike, and only the one that can draft deepest is drafted
        (the least of its budget, ``max_depth`` and the tree's room below it; the longer on
        ties), with the other lengths as its ``also``. In a long verbatim repeat every shorter
        match is such a copy. Example: context ``1 2 3 4 | 1 2 3``: the matches ``1 2 3`` and
        ``2 3`` occur twice each and give one draft, at match length 3, also 2."""
        tree, longest, window = self.local, self._longest_match(), self.config.max_depth
        budgets, mode = self._budgets, self._tree_mode
        room = window if max_depth is None else max_depth
        # per occurrence count, longest first: [count, skipped, reach, match length, position,
        # every length that can draft]
        groups: list[list] = []
        for position in tree.loci:
            match_len = tree.position_depth(position)
            if match_len < shortest:
                break  # the loci are deepest first
            if match_len > longest:
                continue
            count = tree.position_count(position)
            if not groups or groups[-1][0] != count:
                groups.append([count, False, 0, 0, None, []])
            group = groups[-1]
            if match_len == skip:
                group[1] = True
                continue
            reach = min(budgets[match_len], room, window - match_len)
            if reach > 0:
                group[5].append(match_len)
            if reach > group[2]:
                group[2:5] = reach, match_len, position
        found = []
        for _, skipped, _, match_len, position, lengths in groups:
            if skipped or position is None:
                continue
            draft = tree.speculate(position, budgets[match_len], tree=mode, max_depth=max_depth)
            if draft.tokens:
                also = tuple(m for m in lengths if m != match_len)
                found.append(replace(draft, also=also) if also else draft)
        return found

    def _longest_match(self) -> int:
        """The longest match a draft may start from: shorter than ``max_depth`` and than the
        context (the whole context is no earlier occurrence of itself)."""
        return min(self.config.max_depth, self.context_length) - 1

    def _best_answer(self, best: SuffixDraft, max_depth: int | None) -> SuffixDraft:
        """``best`` or a draft of the global tree that beats it."""
        if not self.config.max_cached_answers:
            return best
        return self._best(self.answers, self._long[::-1] + self.answers.loci, best, max_depth)

    def _best(
        self, tree: SuffixTree, matches: list, best: SuffixDraft, max_depth: int | None
    ) -> SuffixDraft:
        """``best`` or a draft from ``matches`` (longest first) that beats it strictly.

        A draft's score is at most its budget times its most probable first token's
        probability (no deeper token is likelier), and at most the depths it can reach (its
        budget, ``max_depth - m`` in the tree, the caller's ``max_depth``) times the
        probability of all its first tokens together (the tokens at one depth continue
        different ones of them; :meth:`~logitspec.suffix_tree.SuffixTree.continuation_counts`);
        a match whose bound cannot beat the best so far is passed over. When a shorter match
        can reach deeper than the longest one (in a long verbatim repeat, every match of over
        ``max_depth / 2`` tokens has less room below it than its budget), the match that
        reaches deepest is drafted first, and every match whose bound is below that draft's
        score is passed over too: it cannot be the winner, so the result is the same as
        drafting each in turn (the first of the best scores)."""
        longest, window = self._longest_match(), self.config.max_depth
        budgets, mode = self._budgets, self._tree_mode
        depth_of = tree.position_depth
        levels = window if max_depth is None else min(window, max_depth)
        score, denominator = sum(best.counts), best.denominator
        if not matches:
            return best
        probe, probe_draft, floor, below = None, None, 0, 1  # the probe's score: floor / below
        m = depth_of(matches[0])
        if window - m < budgets[m] and window - m < levels:  # the longest lacks room below it
            probe = self._deepest(tree, matches, longest, levels)
            if probe is not None:
                position = matches[probe]
                probe_draft = tree.speculate(position, budgets[depth_of(position)], tree=mode,
                                             max_depth=max_depth)
                floor, below = sum(probe_draft.counts), probe_draft.denominator
        for index, position in enumerate(matches):
            match_len = depth_of(position)
            if match_len > longest:
                continue
            budget = budgets[match_len]
            if budget * denominator <= score:
                break  # shorter matches have no larger budget
            room = window - match_len
            if room < budget or levels < budget:  # it cannot draft its budget's depth
                depths = min(room, levels)
                if depths * denominator <= score or depths * below < floor:
                    continue  # not even one sure token per depth could beat it
                top, together, total = tree.continuation_counts(position)
                most = min(budget * top, depths * together)
            else:
                top, total = tree.top_continuation(position)
                most = budget * top  # over total: the most this draft can score
            if most * denominator <= score * total or (floor and most * below < floor * total):
                continue
            if index == probe and probe_draft is not None:
                draft = probe_draft
            else:
                draft = tree.speculate(position, budget, tree=mode, max_depth=max_depth)
            if draft.beats(best):
                best = draft
                score, denominator = sum(best.counts), best.denominator
        return best

    def _deepest(self, tree: SuffixTree, matches: list, longest: int, levels: int) -> int | None:
        """The index of the first of ``matches`` (longest first; none longer than ``longest``
        counts) whose draft can reach the most depths (its budget, the room below it in the
        tree, ``levels``), None if none can draft. Going shorter, the room grows and the
        budget never does: past the first match with room for its budget, none reaches
        deeper."""
        window, budgets = self.config.max_depth, self._budgets
        deepest, found = 0, None
        for index, position in enumerate(matches):
            m = tree.position_depth(position)
            if m > longest:
                continue
            reach = min(budgets[m], window - m, levels)
            if reach > deepest:
                deepest, found = reach, index
            if window - m >= min(budgets[m], levels):
                break
        return found


def draft_tree(root: int, draft: SuffixDraft) -> DraftTree:
    """``draft`` hung under ``root``: draft token ``i`` is tree node ``i + 1``."""
    parents = (-1,) + tuple(p + 1 for p in draft.parents)
    depths = (0,) + tuple(draft.depths())
    return DraftTree((int(root),) + draft.tokens, parents, depths)


class SuffixDecodingDrafter:
    """SuffixDecoding behind the :class:`~logitspec.drafters.Drafter` protocol. The cache
    lives as long as the drafter: the answers of a run teach the later questions. The root is
    indexed when drafted (it is the context's last token then); the final token of a
    generation, never drafted from, is not indexed."""

    name = "suffix"
    top_k = 0
    needs_hidden = False

    def __init__(self, config: SuffixConfig = SuffixConfig()) -> None:
        self.config = config
        self.tree_capacity = config.draft_tree_capacity
        self.cache = SuffixCache(config)
        self._root_indexed = False

    def configure(self, config: GenerationConfig) -> None:
        pass

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        self.cache.start_request([int(t) for t in context], reused)
        self._root_indexed = False

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        self.cache.append(root)
        self._root_indexed = True
        return draft_tree(root, self.cache.speculate(max_depth))

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        pass

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        for token in tokens[1 if self._root_indexed else 0:]:
            self.cache.append(token)
        self._root_indexed = False
