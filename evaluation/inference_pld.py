"""Prompt lookup decoding (PLD): one retrieved chain per step, LogitSpec without the
next-next chains. ``python -m evaluation.inference_pld --help`` lists the flags."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.drafters import PromptLookupDrafter
from logitspec.loading import LoadedModel

from . import eval_loop
from .args import option
from .methods import Method, RetrievalParams


@dataclass(frozen=True)
class PLDParams(RetrievalParams):
    """PLD's flags. Unset, the tree budget is ``num_pred_tokens + 1``: the whole retrieved
    chain under the root; the resolved value is what answer files record."""

    draft_tree_capacity: int | None = option(
        None, "most tokens verified per step, the root included (default: num_pred_tokens + 1)",
        type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft_tree_capacity is None:
            object.__setattr__(self, "draft_tree_capacity", self.num_pred_tokens + 1)
        if self.draft_tree_capacity < 1:
            raise ValueError(
                f"draft_tree_capacity must be >= 1 (the root), got {self.draft_tree_capacity}"
            )


def make_decoder(loaded: LoadedModel, params: PLDParams) -> Decoder:
    drafter = PromptLookupDrafter(params.pool_config(), params.draft_tree_capacity)
    return Decoder(loaded.model, drafter)


METHOD = Method(
    name="pld",
    prog="inference_pld",
    description="Answer a question file with prompt lookup decoding (PLD).",
    params_type=PLDParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
