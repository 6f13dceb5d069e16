"""Lookahead decoding: a 2-D Jacobi window and the verification of its n-grams in one forward
pass (:mod:`logitspec.lookahead`). ``python -m evaluation.inference_lookahead --help`` lists the
flags; the defaults are Spec-Bench's setting, N=5, W=7, G=7 (56 inputs per forward pass).

The window and the n-gram pool start over at every turn, as in the public code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel
from logitspec.lookahead import LookaheadConfig, LookaheadDrafter

from . import eval_loop
from .args import option
from .methods import Method


@dataclass(frozen=True)
class LookaheadParams:
    """Lookahead decoding's flags, named as in Spec-Bench's command."""

    level: int = option(5, "N: the n-gram size (the window has N - 1 rows)", type=int)
    window: int = option(7, "W: the window's columns (tokens looked ahead)", type=int)
    guess: int = option(7, "G: most n-grams verified per step", type=int)

    def __post_init__(self) -> None:
        self.lookahead_config()  # validates

    def lookahead_config(self) -> LookaheadConfig:
        return LookaheadConfig(level=self.level, window=self.window, guess=self.guess)


def make_decoder(loaded: LoadedModel, params: LookaheadParams) -> Decoder:
    return Decoder(loaded.model, LookaheadDrafter(params.lookahead_config()))


METHOD = Method(
    name="lookahead",
    prog="inference_lookahead",
    description="Answer a question file with Lookahead decoding.",
    params_type=LookaheadParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
