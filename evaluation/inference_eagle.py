"""A trained draft head (EAGLE-style) in LogitSpec's value tree, beside its retrieved chains.
``python -m evaluation.inference_eagle --help`` lists the flags.

Default: the hybrid, the head's dynamic tree (EAGLE-2) and LogitSpec's retrieved chains
(next-token, next-next and recycled successor chains) ranked together, the tree sized by the
measured cost of verification (``auto``). ``--no-retrieval``: the head's candidates alone.

``--draft-head PATH`` picks a head file (``.safetensors`` with its ``.json``); without it the
head trained for the target is looked up under the model cache
(``logitspec.draft_head.default_head_path``), where ``scripts/train_draft_head.py`` writes it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from logitspec.cost import cost_surface_for
from logitspec.decoding import Decoder
from logitspec.draft_head import DraftHead, DraftHeadError, default_head_path, load_draft_head
from logitspec.eagle import EagleConfig, EagleDrafter
from logitspec.loading import LoadedModel
from logitspec.recycling import SuccessorTable

from . import eval_loop
from .args import option
from .inference_logitspec import ValueTreeParams
from .methods import Method

TRAIN_COMMAND = "python scripts/train_draft_head.py"


@dataclass(frozen=True)
class EagleParams(ValueTreeParams):
    """The value tree's flags, the head file and the shape of the head's tree."""

    draft_head: str | None = option(
        None, "the draft head (.safetensors; default: the one trained for the target under "
        "the model cache)")
    no_retrieval: bool = option(
        False, "the head's candidates alone (no retrieved chains)", action="store_true")
    head_top_k: int = option(10, "children of each expanded head node", type=int)
    head_expand: int = option(10, "head nodes expanded per depth", type=int)
    head_depth: int = option(6, "most levels of the head's tree", type=int)
    head_min_value: float = option(
        0.01, "head nodes less likely to be accepted than this are not expanded", type=float)
    head_full_expansion: bool = option(
        False, "expand every head candidate, as EAGLE-2 does (default: only those the tree "
        "could still keep; the same trees, fewer head passes)", action="store_true")
    head_always: bool = option(
        False, "run the head every step at the automatic budget too (default: only while "
        "steps with it give more tokens per second than steps without it, measured as it runs)",
        action="store_true")

    def __post_init__(self) -> None:
        if self.draft_head is not None and not self.draft_head.endswith(".safetensors"):
            raise ValueError("--draft-head must be a .safetensors file (no pickle)")
        super().__post_init__()
        if self.head_always and self.draft_tree_capacity != "auto":
            raise ValueError("--head-always applies at the automatic budget "
                             "(--draft-tree-capacity auto), where the head may be skipped")
        self.eagle_config()  # validates

    def eagle_config(self) -> EagleConfig:
        return EagleConfig(self.logitspec_config(), retrieval=not self.no_retrieval,
                           top_k=self.head_top_k, expand=self.head_expand, depth=self.head_depth,
                           min_value=self.head_min_value, prune=not self.head_full_expansion,
                           gate=not self.head_always)


def find_head(loaded: LoadedModel, path: str | None) -> DraftHead:
    """The head at ``path``, else the one trained for the target; a clear error otherwise."""
    model = loaded.model
    if path is None:
        default = default_head_path(model, loaded.name)
        if not default.is_file():
            raise eval_loop.RunError(
                f"no draft head trained for {loaded.name} (looked for {default}): train one with "
                f"`{TRAIN_COMMAND}`, or pass --draft-head PATH")
        path = str(default)
    if not Path(path).is_file():
        raise eval_loop.RunError(f"draft head {path} does not exist")
    try:
        return load_draft_head(path, model, loaded.name)
    except DraftHeadError as exc:
        raise eval_loop.RunError(str(exc)) from None


def make_decoder(loaded: LoadedModel, params: EagleParams) -> Decoder:
    head = find_head(loaded, params.draft_head)
    config = params.eagle_config()
    curve = None
    if config.logitspec.draft_tree_capacity is None:
        curve = cost_surface_for(loaded.model, str(loaded.path))
    recycled = config.retrieval and config.logitspec.recycle_chains
    successors = SuccessorTable(loaded.model.config.vocab_size) if recycled else None
    return Decoder(loaded.model, EagleDrafter(head, config, curve, successors))


METHOD = Method(
    name="eagle",
    prog="inference_eagle",
    description="Answer a question file with a trained draft head in LogitSpec's value tree.",
    params_type=EagleParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
