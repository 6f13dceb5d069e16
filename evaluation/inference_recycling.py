"""Token Recycling: drafts from the target's own top-k predictions of earlier steps, expanded
along a static tree. ``python -m evaluation.inference_recycling --help`` lists the flags.

The successor table lives as long as the run (a hot start, as in the paper): every question,
and the untimed warm-up, teaches the next ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel
from logitspec.recycling import RecyclingConfig, TokenRecyclingDrafter

from . import eval_loop
from .args import option
from .methods import Method


@dataclass(frozen=True)
class RecyclingParams:
    """Token Recycling's flags; the tree's shape follows from the budget
    (:func:`logitspec.recycling.static_template`)."""

    draft_tree_capacity: int = option(
        64, "most tokens verified per step, the step's root included", type=int)
    recycling_k: int = option(8, "successors remembered per token (the table's width)", type=int)

    def __post_init__(self) -> None:
        self.recycling_config()  # validates

    def recycling_config(self) -> RecyclingConfig:
        return RecyclingConfig(draft_tree_capacity=self.draft_tree_capacity, k=self.recycling_k)


def make_decoder(loaded: LoadedModel, params: RecyclingParams) -> Decoder:
    return Decoder(loaded.model, TokenRecyclingDrafter(params.recycling_config()))


METHOD = Method(
    name="recycling",
    prog="inference_recycling",
    description="Answer a question file with Token Recycling speculative decoding.",
    params_type=RecyclingParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
