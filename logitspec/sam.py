"""SAM-Decoding (Hu et al., ACL 2025): drafts from suffix automata, Token Recycling below a
match threshold (SAMD[T]).

Per step, with ``root`` the token the target chose and ``ctx`` the context so far:

1. *dynamic* match: the longest suffix of ``ctx + [root]`` that occurred in ``ctx``, from the
   automaton of the context (:mod:`logitspec.suffix_automaton`), whose match state is the
   automaton's own longest repeated suffix: nothing is rescanned, each accepted token is one
   amortized O(1) :meth:`~logitspec.suffix_automaton.SuffixAutomaton.append`;
2. *static* match (with a corpus): the longest suffix of ``ctx + [root]`` found in the corpus's
   automaton, from a match state advanced by every token that joins the context;
3. the source (:func:`choose_source`): the static match length is lowered by ``static_bias``
   (``l_bias``); the longer of the two wins, ties to the dynamic one; when even the longer is
   below ``threshold`` (``l_threshold``) and the fallback is on, Token Recycling drafts the
   step (:class:`~logitspec.recycling.TokenRecyclingDrafter`, the engine's own);
4. an automaton draft is one chain: the tokens after the earliest occurrence of the match,
   ``draft_size`` nodes with the root (the public code's 40). For the dynamic automaton the
   public code first moves to shorter suffixes while fewer than the draft's tokens follow the
   earliest occurrence (:meth:`~logitspec.suffix_automaton.SuffixAutomaton.roomier_suffix`,
   ``roomier_suffix``); for the static one it does not.

``fallback=False`` is SAM-Decoding alone: no threshold, every step drafts from the automaton
that wins step 3 (a root-only tree when nothing matches). Its public code sizes each draft by
the match, ``min(draft_size, 1 + floor(match_scale * match))`` nodes (``match_scale`` 4;
``None``: always ``draft_size``), the static match counted after the bias, and continues a
context match at its earliest occurrence without the walk (``roomier_suffix=False``).

Where this differs from the public code, by design of this engine: a draft shorter than
``draft_size`` is verified as it is (the public code pads it with token 0); the walk to shorter
suffixes asks for the draft's tokens (``draft_size - 1``), the public code for one more; Token
Recycling learns from every verified node but, as everywhere in this engine, not from the
prompt's positions (the prefill computes only its last logit); the static automaton drafts a
chain in both modes (the public SAM-alone code grows a count-weighted tree from it).

The automata live as long as the drafter: the corpus's for the whole run; the context's is
extended while a conversation grows (``begin`` with a context that extends the last one) and
rebuilt over the whole context when the conversation is reset or diverges (O(context), once).

Example (threshold 5, bias 5, no corpus): context ``[3, 18, 41, 7, 9, 30, 2, 18, 41, 7]``,
root 9: the longest earlier match is ``[18, 41, 7, 9]``, 4 tokens: Token Recycling drafts.
With ``2`` instead of ``3`` first, the match ``[2, 18, 41, 7, 9]`` has 5 tokens: the draft is
the root and what followed, ``[30, 2, 18, 41, 7]``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .acceptance import TargetOutput
from .recycling import RecyclingConfig, SuccessorTable, TokenRecyclingDrafter
from .suffix_automaton import CorpusAutomaton, Match, SuffixAutomaton, SuffixMatcher
from .tree import DraftTree

if TYPE_CHECKING:
    from .decoding import GenerationConfig

DYNAMIC, STATIC, RECYCLING = "dynamic", "static", "recycling"
TOKEN_ID_SUFFIX = ".ids"


@dataclass(frozen=True)
class SamConfig:
    """SAM-Decoding settings (module docstring); the defaults are the public SAMD[T] ones
    (``n_predicts`` 40, ``len_threshold`` 5, ``len_bias`` 5) with the engine's Token
    Recycling tree of 64 nodes."""

    draft_size: int = 40
    threshold: int = 5
    static_bias: int = 5
    fallback: bool = True
    recycling: RecyclingConfig = RecyclingConfig(64)
    match_scale: float | None = None
    roomier_suffix: bool = True

    def __post_init__(self) -> None:
        if self.draft_size < 1:
            raise ValueError(f"draft_size must be >= 1 (the root), got {self.draft_size}")
        if self.threshold < 0 or self.static_bias < 0:
            raise ValueError(f"threshold and static_bias must be >= 0, got {self.threshold} "
                             f"and {self.static_bias}")
        if self.match_scale is not None and not self.match_scale > 0:
            raise ValueError(f"match_scale must be > 0, got {self.match_scale}")

    @property
    def tree_capacity(self) -> int:
        """The most nodes of a step: the longer of an automaton draft and a recycled tree."""
        if self.fallback:
            return max(self.draft_size, self.recycling.draft_tree_capacity)
        return self.draft_size

    def draft_nodes(self, match_length: int) -> int:
        """Nodes of an automaton draft (root included) for a match of ``match_length``.
        Example: scale 4, size 40: match 0 -> 1, 2 -> 9, 10 -> 40; no scale -> 40."""
        if self.match_scale is None:
            return self.draft_size
        return min(self.draft_size, 1 + math.floor(self.match_scale * max(match_length, 0)))


def choose_source(dynamic: int, static: int | None, config: SamConfig) -> str:
    """Which source drafts the step, from the two match lengths (``static`` None: no corpus).

    The static length counts ``static_bias`` less; the longer wins, ties to the dynamic one;
    with the fallback on, a longer one below ``threshold`` means Token Recycling.

    Example (threshold 5, bias 5): (5, None) -> dynamic; (4, None) -> recycling;
    (4, 9) -> recycling (9 - 5 = 4); (4, 10) -> static; (5, 10) -> dynamic (tie).
    """
    score = -config.static_bias if static is None else static - config.static_bias
    if config.fallback and max(dynamic, score) < config.threshold:
        return RECYCLING
    return DYNAMIC if dynamic >= score else STATIC


@dataclass
class SourceStats:
    """Steps drafted by each source and the tokens those steps emitted (root included)."""

    steps: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)

    def record(self, source: str, emitted: int) -> None:
        self.steps[source] += 1
        self.tokens[source] += emitted

    def summary(self) -> dict[str, dict[str, float]]:
        """Per source: its share of the steps and its mean accepted tokens per step."""
        total = sum(self.steps.values()) or 1
        return {s: {"share": n / total, "mat": self.tokens[s] / n} for s, n in sorted(self.steps.items())}


def chain_tree(root: int, chain: Sequence[int]) -> DraftTree:
    """``root`` followed by ``chain``, one path."""
    n = len(chain)
    return DraftTree((int(root), *chain), tuple(range(-1, n)), tuple(range(n + 1)))


class SuffixSources:
    """SAM-Decoding's retrieval sources, usable by any drafter: the suffix automaton of the
    context and, with ``corpus``, a match state in the corpus's automaton that follows the same
    context. :meth:`begin` and :meth:`extend` follow the context; :meth:`matches` gives the
    longest matches of ``context + [root]`` (the match length is the source's evidence), the
    ``*_continuation`` methods their drafts, :meth:`CorpusAutomaton.next_counts` the corpus's
    frequencies.

    The context's automaton is extended while a conversation grows (``begin`` over a context
    whose first ``reused`` tokens cover all it holds) and rebuilt over the whole context
    otherwise (a reset or a diverging prompt: O(context), once per turn).
    """

    def __init__(self, corpus: CorpusAutomaton | None = None) -> None:
        self.context = SuffixAutomaton()
        self.corpus = corpus
        self.corpus_match = SuffixMatcher(corpus.automaton) if corpus is not None else None

    def begin(self, context: Sequence[int], reused: int) -> None:
        if reused >= len(self.context):
            fresh = context[len(self.context):]
            self.context.extend(fresh)
        else:
            self.context = SuffixAutomaton(context)
            fresh = context
            if self.corpus_match is not None:
                self.corpus_match.reset()
        if self.corpus_match is not None:
            self.corpus_match.advance(fresh)

    def extend(self, tokens: Sequence[int]) -> None:
        self.context.extend(tokens)
        if self.corpus_match is not None:
            self.corpus_match.advance(tokens)

    def matches(self, root: int) -> tuple[Match, Match | None]:
        """The longest suffix of ``context + [root]`` that occurred in the context (the
        dynamic match) and in the corpus (the static one; ``None`` without a corpus)."""
        dynamic = self.context.step(self.context.repeat(), root)
        static = self.corpus_match.peek(root) if self.corpus_match is not None else None
        return dynamic, static

    def dynamic_continuation(self, match: Match, max_tokens: int, roomier: bool) -> list[int]:
        """What followed the match's earliest occurrence in the context; with ``roomier``, at a
        shorter suffix when fewer than ``max_tokens`` follow (the public code's policy)."""
        state = self.context.roomier_suffix(match.state, max_tokens) if roomier else match.state
        return self.context.continuation(state, max_tokens)

    def static_continuation(self, match: Match, max_tokens: int) -> list[int]:
        """What followed the match's earliest occurrence in the corpus."""
        return self.corpus.automaton.continuation(match.state, max_tokens)


class SamDrafter:
    """SAM-Decoding behind the :class:`~logitspec.drafters.Drafter` protocol (module
    docstring). ``corpus``: a static automaton to match as well (shared, read only);
    ``successors``: the fallback's successor table (by default made on its first observation,
    sized by the target's logits)."""

    name = "sam"
    needs_hidden = False

    def __init__(self, config: SamConfig = SamConfig(), corpus: CorpusAutomaton | None = None,
                 successors: SuccessorTable | None = None) -> None:
        self.config = config
        self.tree_capacity = config.tree_capacity
        self.sources = SuffixSources(corpus)
        self.fallback = None
        if config.fallback:
            self.fallback = TokenRecyclingDrafter(config.recycling, successors)
        self.top_k = self.fallback.top_k if self.fallback is not None else 0
        self.source_stats = SourceStats()
        self.last_source = RECYCLING

    def configure(self, config: GenerationConfig) -> None:
        if self.fallback is not None:
            self.fallback.configure(config)

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        self.sources.begin(context, reused)
        if self.fallback is not None:
            self.fallback.begin(context, reused)

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        dynamic, static = self.sources.matches(root)
        self.last_source = choose_source(dynamic.length, None if static is None else static.length,
                                     self.config)
        if self.last_source == RECYCLING:
            return self.fallback.draft(root, root_topk, max_depth)
        if self.last_source == DYNAMIC:
            needed = self.config.draft_nodes(dynamic.length) - 1
            chain = self.sources.dynamic_continuation(dynamic, needed, self.config.roomier_suffix)
        else:
            needed = self.config.draft_nodes(static.length - self.config.static_bias) - 1
            chain = self.sources.static_continuation(static, needed)
        return chain_tree(root, chain[:max(max_depth, 0)])

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        """Token Recycling learns from every verified tree, whichever source drafted it."""
        if self.fallback is not None:
            self.fallback.observe(tree, out)

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        self.source_stats.record(self.last_source, len(tokens))
        self.sources.extend(tokens)
        if self.fallback is not None:
            self.fallback.extend(tokens, tree, path)


class CorpusError(ValueError):
    """A corpus file that cannot be read: the message is one line."""


def read_corpus(path: str | Path, encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """The documents of a corpus file, as token ids.

    Formats: a file named ``*.ids`` holds token ids, one document per non-empty line, ids
    separated by white space, each in ``[0, vocab_size)``; any other file is UTF-8 text,
    tokenized whole by ``encode`` as one document. Example: ``"5 6 7\\n\\n8 9\\n"`` in
    ``c.ids`` -> ``[[5, 6, 7], [8, 9]]``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"corpus {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus {path}: not UTF-8 text (byte {exc.start})") from None
    if path.name.endswith(TOKEN_ID_SUFFIX):
        documents = [_token_ids(line, n, path, vocab_size)
                     for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        documents = [list(encode(text))] if text.strip() else []
    if not any(documents):
        raise CorpusError(f"corpus {path}: no tokens")
    return documents


def _token_ids(line: str, number: int, path: Path, vocab_size: int) -> list[int]:
    ids = []
    for word in line.split():
        if not (word.isascii() and word.isdigit()):
            raise CorpusError(f"corpus {path}, line {number}: {word!r} is not a token id")
        if int(word) >= vocab_size:
            raise CorpusError(f"corpus {path}, line {number}: token id {word} is outside the "
                              f"vocabulary of {vocab_size}")
        ids.append(int(word))
    return ids
