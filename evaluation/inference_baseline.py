"""Vanilla greedy (or sampled) decoding: one token per forward pass, the baseline of every
speed report. ``python -m evaluation.inference_baseline --help`` lists the flags."""

from __future__ import annotations

import sys
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel

from . import eval_loop
from .methods import Method, NoParams


def make_decoder(loaded: LoadedModel, params: NoParams) -> Decoder:
    return Decoder(loaded.model, None)


METHOD = Method(
    name="vanilla",
    prog="inference_baseline",
    description="Answer a question file with vanilla decoding (the baseline).",
    params_type=NoParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
