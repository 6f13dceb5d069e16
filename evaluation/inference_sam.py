"""SAM-Decoding: drafts from a suffix automaton over the context (and optionally one over a
corpus), Token Recycling when the match is short (SAMD[T]). ``python -m evaluation.inference_sam
--help`` lists the flags.

Defaults are the public SAMD[T] settings: automaton drafts of 40 tokens (root included), match
threshold 5, corpus bias 5, Token Recycling's tree on 64 nodes. ``--fallback none
--match-scale 4 --dynamic-position earliest`` is SAM-Decoding alone as its public code runs it
(drafts sized by the match, continued at the match's earliest occurrence).

``--corpus PATH``: a static automaton built once, when the run starts (about 6 microseconds and
450 bytes of memory per token). A file named ``*.ids`` holds token ids of the model's
vocabulary, one document per line, separated by white space; any other file is UTF-8 text,
tokenized whole with the model's tokenizer as one document.

The Token Recycling table and the corpus automaton live as long as the run (every question, and
the untimed warm-up, teaches the table); the context's automaton follows each conversation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel
from logitspec.recycling import RecyclingConfig, SuccessorTable
from logitspec.sam import CorpusError, SamConfig, SamDrafter, read_corpus
from logitspec.suffix_automaton import CorpusAutomaton

from . import eval_loop
from .args import option
from .methods import Method

FALLBACKS = ("recycling", "none")
POSITIONS = ("roomier", "earliest")


@dataclass(frozen=True)
class SamParams:
    """SAM-Decoding's flags (module docstring); ``draft_size`` is capped by the budget."""

    draft_tree_capacity: int = option(
        64, "most tokens verified per step, the root included: Token Recycling's tree and the "
        "cap of an automaton draft", type=int)
    draft_size: int = option(
        40, "tokens of an automaton draft, the root included (n_predicts)", type=int)
    match_threshold: int = option(
        5, "shortest match drafted from an automaton (l_threshold); shorter ones fall back to "
        "Token Recycling", type=int)
    static_bias: int = option(
        5, "tokens a corpus match counts less than a context match (l_bias)", type=int)
    fallback: str = option(
        "recycling", "below the threshold: 'recycling' (SAMD[T]) or 'none' (SAM alone: every "
        "step drafts from an automaton)", choices=FALLBACKS)
    match_scale: float | None = option(
        None, "size each automaton draft 1 + scale x match length, at most --draft-size (the "
        "public SAM-alone code: 4; unset: always --draft-size)", type=float)
    dynamic_position: str = option(
        "roomier", "where a context match is continued: 'roomier' (the public code: a shorter "
        "suffix when too few tokens follow the earliest occurrence) or 'earliest'",
        choices=POSITIONS)
    corpus: str | None = option(
        None, "a static corpus: *.ids (token ids, a document per line) or UTF-8 text")
    recycling_k: int = option(8, "successors remembered per token (Token Recycling)", type=int)

    def __post_init__(self) -> None:
        self.sam_config()  # validates
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise ValueError(f"corpus {self.corpus}: no such file")

    def sam_config(self) -> SamConfig:
        if self.fallback not in FALLBACKS or self.dynamic_position not in POSITIONS:
            raise ValueError(f"fallback must be one of {FALLBACKS} and dynamic_position one of "
                             f"{POSITIONS}, got {self.fallback!r} and {self.dynamic_position!r}")
        if self.draft_tree_capacity < 1:
            raise ValueError(f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}")
        return SamConfig(
            draft_size=min(self.draft_size, self.draft_tree_capacity),
            threshold=self.match_threshold,
            static_bias=self.static_bias,
            fallback=self.fallback == "recycling",
            recycling=RecyclingConfig(self.draft_tree_capacity, self.recycling_k),
            match_scale=self.match_scale,
            roomier_suffix=self.dynamic_position == "roomier",
        )


def load_corpus(loaded: LoadedModel, path: str) -> CorpusAutomaton:
    """The corpus automaton of ``path``; a bad file stops the run (one line, exit code 2)."""
    def encode(text: str) -> list[int]:
        return loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    try:
        documents = read_corpus(path, encode, loaded.model.config.vocab_size)
    except CorpusError as exc:
        raise eval_loop.RunError(str(exc)) from None
    return CorpusAutomaton(documents)


def make_decoder(loaded: LoadedModel, params: SamParams) -> Decoder:
    config = params.sam_config()
    corpus = load_corpus(loaded, params.corpus) if params.corpus is not None else None
    successors = SuccessorTable(loaded.model.config.vocab_size, config.recycling.k)
    return Decoder(loaded.model, SamDrafter(config, corpus, successors))


METHOD = Method(
    name="sam",
    prog="inference_sam",
    description="Answer a question file with SAM-Decoding (suffix automata, Token Recycling "
    "fallback).",
    params_type=SamParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
