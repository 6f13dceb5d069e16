"""LogitSpec decoding: retrieval for the next token and for the top-k next-next tokens, verified
as one tree. ``python -m evaluation.inference_logitspec --help`` lists the flags."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.drafters import LogitSpecConfig, LogitSpecDrafter
from logitspec.loading import LoadedModel

from . import eval_loop
from .args import option
from .methods import Method, RetrievalParams


@dataclass(frozen=True)
class LogitSpecParams(RetrievalParams):
    """LogitSpec's flags; the tree budget defaults to the public code's 64 (a GPU setting:
    on a small CPU about 8 pays, see the README)."""

    draft_tree_capacity: int = option(
        64, "most tokens verified per step, the step's root included", type=int)

    def __post_init__(self) -> None:
        self.logitspec_config()  # validates

    def logitspec_config(self) -> LogitSpecConfig:
        return LogitSpecConfig(
            pool=self.pool_config(), draft_tree_capacity=self.draft_tree_capacity
        )


def make_decoder(loaded: LoadedModel, params: LogitSpecParams) -> Decoder:
    return Decoder(loaded.model, LogitSpecDrafter(params.logitspec_config()))


METHOD = Method(
    name="logitspec",
    prog="inference_logitspec",
    description="Answer a question file with LogitSpec speculative decoding.",
    params_type=LogitSpecParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
