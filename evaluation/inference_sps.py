"""Draft-model speculative decoding (SpS): draft models propose, the target verifies.

Draft models: ``--draft-model-path`` (checkpoint folders, GGUF files or the default model's
name; each must share the target's tokenizer), ``--draft-layers`` (layer-skip self-drafts:
the target's first L blocks) and ``--draft-head`` (a trained EAGLE-style head reading the
target's hidden states, :mod:`logitspec.draft_head`; alone, the one trained for the target);
without any, one self-draft of ``DEFAULT_DRAFT_LAYERS``.
Several drafts (``--num-drafts`` per model, or several models) are merged into one token tree;
``--combine-logitspec`` adds LogitSpec's retrieved chains to the same tree.
``--draft-schedule cost`` sizes each draft by the target's measured verification cost (the cost
surface of :mod:`logitspec.cost`, measured once per model, dtype and device and cached) and the
draft's measured pass times; it drafts one chain of one draft model.
``python -m evaluation.inference_sps --help`` lists the flags.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.cost import cost_surface_for
from logitspec.decoding import Decoder
from logitspec.draft_length import SCHEDULES, DraftLengthConfig, load_acceptance_head
from logitspec.draft_model import (
    DEFAULT_DRAFT_LAYERS, CombinedDrafter, DraftMismatchError, DraftModelConfig, DraftModelDrafter,
    load_draft_models,
)
from logitspec.draft_head import HeadSource
from logitspec.drafters import LogitSpecConfig, LogitSpecDrafter
from logitspec.loading import LoadedModel, ModelLoadError

from . import eval_loop
from .args import option
from .inference_eagle import find_head
from .methods import Method, RetrievalParams

CACHED_HEAD = "cached"  # --draft-head without a path: the head trained for the target


@dataclass(frozen=True)
class SPSParams(RetrievalParams):
    """SpS flags. List values are stored as lists (answer files record them as JSON)."""

    draft_model_path: list[str] | None = option(
        None, "draft model(s): HF folders, GGUF files or the default model's name", nargs="+")
    draft_layers: list[int] | None = option(
        None, "layer-skip self-draft(s) with the target's first L layers (default: "
        f"{DEFAULT_DRAFT_LAYERS} when no --draft-model-path or --draft-head)", type=int, nargs="+")
    draft_head: str | None = option(
        None, "a trained draft head as a draft (.safetensors; without a path: the head trained "
        "for the target under the model cache, scripts/train_draft_head.py)",
        nargs="?", const=CACHED_HEAD)
    num_draft_tokens: int = option(
        4, "tokens per draft (constant schedule; the heuristic's start)", type=int)
    draft_schedule: str = option(
        "constant", "draft length schedule (cost: the length that pays by the target's measured "
        "verification cost)", choices=SCHEDULES)
    stop_threshold: float = option(
        0.5, "confidence schedule: stop once P(some drafted token is rejected) exceeds this",
        type=float)
    draft_length_bounds: list[int] | None = option(
        None, "MIN MAX tokens per draft for the heuristic and confidence schedules, MAX for cost "
        "(default: 1 16)", type=int, nargs=2, metavar=("MIN", "MAX"))
    acceptance_head: str | None = option(
        None, "a trained acceptance head (.safetensors, scripts/train_acceptance_head.py) "
        "for the confidence schedule")
    draft_always: bool = option(
        False, "cost schedule: a draft pass every step (default: steps without the draft "
        "compete, and each step takes whichever has given more tokens per second)",
        action="store_true")
    num_drafts: int = option(1, "drafts per draft model, merged into one tree", type=int)
    combine_logitspec: bool = option(
        False, "add LogitSpec's retrieved chains to the draft tree", action="store_true")
    draft_tree_capacity: int | None = option(
        None, "most tokens verified per step, the root included (default: room for every "
        "draft; with --combine-logitspec, that plus 8 retrieved tokens)", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.draft_model_path and not self.draft_layers and not self.draft_head:
            object.__setattr__(self, "draft_layers", [DEFAULT_DRAFT_LAYERS])
        if self.draft_head not in (None, CACHED_HEAD) and not self.draft_head.endswith(".safetensors"):
            raise ValueError("--draft-head must be a .safetensors file (no pickle)")
        if self.draft_length_bounds is None:
            object.__setattr__(self, "draft_length_bounds", [1, 16])
        if self.draft_schedule == "cost":
            if self.num_draft_models * self.num_drafts > 1 or self.combine_logitspec:
                raise ValueError("--draft-schedule cost sizes one chain: one draft model, "
                                 "--num-drafts 1, no --combine-logitspec")
        if self.draft_always and self.draft_schedule != "cost":
            raise ValueError("--draft-always applies to --draft-schedule cost (the other "
                             "schedules draft every step)")
        if self.acceptance_head is not None and not self.acceptance_head.endswith(".safetensors"):
            raise ValueError("--acceptance-head must be a .safetensors file (no pickle)")
        if self.draft_tree_capacity is None:
            drafts = 1 + self.num_draft_models * self.num_drafts * self.length_config().longest
            object.__setattr__(self, "draft_tree_capacity", drafts + 8 * self.combine_logitspec)
        self.draft_config()  # validates

    @property
    def num_draft_models(self) -> int:
        """Draft models, layer-skip self-drafts and the head, together."""
        return (len(self.draft_model_path or ()) + len(self.draft_layers or ())
                + (self.draft_head is not None))

    def length_config(self) -> DraftLengthConfig:
        low, high = self.draft_length_bounds
        return DraftLengthConfig(self.draft_schedule, self.num_draft_tokens, self.stop_threshold,
                                 (low, high))

    def draft_config(self) -> DraftModelConfig:
        """The draft model's settings (with --combine-logitspec the budget is the tree's)."""
        capacity = None if self.combine_logitspec else self.draft_tree_capacity
        return DraftModelConfig(self.length_config(), self.num_drafts, capacity,
                                gate=not self.draft_always)


def make_decoder(loaded: LoadedModel, params: SPSParams) -> Decoder:
    model = loaded.model
    try:
        drafts = load_draft_models(loaded, params.draft_model_path or (), params.draft_layers or (),
                                   dtype=model.dtype, device=model.device)
        if params.draft_head is not None:
            path = None if params.draft_head == CACHED_HEAD else params.draft_head
            drafts.insert(0, HeadSource(find_head(loaded, path)))
        head = load_acceptance_head(params.acceptance_head, model.device) if params.acceptance_head else None
        curve = None
        if params.draft_schedule == "cost":
            curve = cost_surface_for(model, str(loaded.path))
        drafter = DraftModelDrafter(drafts, params.draft_config(), acceptance_head=head,
                                    cost_curve=curve)
    except (ModelLoadError, DraftMismatchError, ValueError) as exc:
        raise eval_loop.RunError(str(exc)) from None
    if not params.combine_logitspec:
        return Decoder(model, drafter)
    capacity = params.draft_tree_capacity
    retrieval = LogitSpecDrafter(LogitSpecConfig(pool=params.pool_config(), draft_tree_capacity=capacity))
    return Decoder(model, CombinedDrafter(drafter, retrieval, capacity))


METHOD = Method(
    name="sps",
    prog="inference_sps",
    description="Answer a question file with draft-model speculative decoding.",
    params_type=SPSParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
