"""SuffixDecoding: drafts from a suffix tree of the question (prompt + output so far) and one
of the run's earlier answers, speculating alpha x match length tokens, frequency-scored.
``python -m evaluation.inference_suffix --help`` lists the flags.

Defaults are the published settings (:mod:`logitspec.suffix_decoding`): suffix trees 64 deep,
alpha 1, offset 0, ``min_token_prob`` 0.1, the last 100000 answers in the global tree, tree
speculation of up to 64 tokens (``--draft-tree-capacity 65`` with the root). ``--mode chain``
drafts one path, as the serving integration does.

The global tree lives as long as the run: every answer, the untimed warm-up's included,
teaches the later questions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel
from logitspec.suffix_decoding import MODES, SuffixConfig, SuffixDecodingDrafter

from . import eval_loop
from .args import option
from .methods import Method


@dataclass(frozen=True)
class SuffixParams:
    """SuffixDecoding's flags, one per :class:`~logitspec.suffix_decoding.SuffixConfig` field."""

    draft_tree_capacity: int = option(
        65, "most tokens verified per step, the root included (max_spec_tokens + 1)", type=int)
    mode: str = option("tree", "'tree': best-first speculation tree; 'chain': one path",
                       choices=list(MODES))
    max_depth: int = option(64, "longest suffix kept in the trees (also the longest match)",
                            type=int)
    max_spec_factor: float = option(
        1.0, "alpha: tokens speculated per matched token", type=float)
    max_spec_offset: float = option(
        0.0, "added to alpha x match length (negative: speculate less)", type=float)
    min_token_prob: float = option(
        0.1, "drop continuations whose estimated probability is lower", type=float)
    max_cached_answers: int = option(
        100_000, "answers kept in the global tree, oldest removed first (0: no global tree)",
        type=int)

    def __post_init__(self) -> None:
        self.suffix_config()  # validates

    def suffix_config(self) -> SuffixConfig:
        return SuffixConfig(
            draft_tree_capacity=self.draft_tree_capacity, mode=self.mode, max_depth=self.max_depth,
            max_spec_factor=self.max_spec_factor, max_spec_offset=self.max_spec_offset,
            min_token_prob=self.min_token_prob, max_cached_answers=self.max_cached_answers,
        )


def make_decoder(loaded: LoadedModel, params: SuffixParams) -> Decoder:
    return Decoder(loaded.model, SuffixDecodingDrafter(params.suffix_config()))


METHOD = Method(
    name="suffix",
    prog="inference_suffix",
    description="Answer a question file with SuffixDecoding speculative decoding.",
    params_type=SuffixParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
