"""LogitSpec decoding: retrieval for the next token and for the top-k next-next tokens, verified
as one tree. ``python -m evaluation.inference_logitspec --help`` lists the flags.

Defaults: the value-ranked tree sized by the measured verification cost (``auto``), with three
stored continuations per n-gram and chains through the target's remembered successors.
``--match-lengths 1`` values the next-token chain by the length of its match with the context.
Suffix trees over the question and over the run's earlier answers (SuffixDecoding's) add their
drafts, each node valued by its match length and how often it followed (``--suffix-trees 0``
turns them off); the question's tree offers its draft at every match length of two tokens or
more, not only its best-scored one (``--suffix-branches 0``: the best only). ``--prompt-logits 1``
lets the remembered successors learn the logit after every prompt token too, at the cost of
an LM-head pass over each prompt. The public code's behaviour is ``--tree-policy reference
--draft_tree_capacity 64``.

The cost curves (over tree size, at a few context lengths) are measured on first use and
cached per model, dtype, device and torch version (and thread count on the CPU);
``python scripts/bench_step_cost.py --store`` measures them again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.cost import cost_surface_for
from logitspec.decoding import Decoder
from logitspec.drafters import LogitSpecConfig, PoolConfig, make_logitspec_drafter
from logitspec.loading import LoadedModel
from logitspec.recycling import SuccessorTable

from . import eval_loop
from .args import option
from .methods import Method, RetrievalParams


def capacity_arg(text: str) -> int | str:
    """``auto`` or a whole number (validated by the config)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


@dataclass(frozen=True)
class ValueTreeParams(RetrievalParams):
    """The value tree's flags (shared with the methods that add candidates to it)."""

    draft_tree_capacity: int | str = option(
        "auto", "most tokens verified per step, the root included, or 'auto': sized per step by "
        "the measured cost of verification (needs --tree-policy value)", type=capacity_arg)
    num_continuations: int = option(
        3, "stored continuations per n-gram, newest first (value policy)", type=int)
    recycle_chains: int = option(
        8, "chains through the root's remembered successors (value policy; 0: off)", type=int)
    recycle_depth: int = option(6, "longest chain of remembered successors", type=int)
    recycle_breadth: int = option(
        1, "below the first level, each remembered successor's N best successors are "
        "candidates (a copy-logit tree; 1: its first only, chains)", type=int)
    successor_children: int = option(
        0, "below every node that no recycled chain made, its N best remembered successors are "
        "candidates, and theirs, --successor-hops levels down (0: off; needs recycled chains)",
        type=int)
    successor_hops: int = option(2, "levels of remembered successors below a node", type=int)
    max_auto_capacity: int = option(64, "largest tree an automatic budget may build", type=int)
    match_lengths: int = option(
        0, "1: value the next-token chain by how long its occurrence matches the context (value "
        "policy); 0: by the n-gram order that found it", type=int, choices=[0, 1])
    suffix_trees: int = option(
        1, "1: also offer the drafts of suffix trees over the question and over the run's earlier "
        "answers, valued by match length and frequency (value policy); 0: off", type=int,
        choices=[0, 1])
    suffix_tokens: int = option(32, "most tokens of one suffix-tree draft", type=int)
    suffix_branches: int = option(
        1, "1: with --suffix-trees 1, also the question's suffix tree's drafts at its other "
        "match lengths (every matched suffix of 2 tokens or more); 0: its best draft only",
        type=int, choices=[0, 1])
    suffix_grow: int = option(
        0, "1: with --suffix-trees 1, value each node of a suffix-tree draft by the match it "
        "extends (the matched length plus its depth in the draft); 0: by the draft's match",
        type=int, choices=[0, 1])
    live_costs: int = option(
        0, "1: correct the measured cost curve by the verification times seen during the run "
        "(automatic budget); 0: use it as measured", type=int, choices=[0, 1])
    agreement: int = option(
        0, "1: value a token that several sources propose right below the root by how many "
        "do (value policy); 0: by the best of their features", type=int, choices=[0, 1])

    def __post_init__(self) -> None:
        for name in ("match_lengths", "suffix_trees", "suffix_branches", "suffix_grow",
                     "live_costs", "agreement"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1, got {getattr(self, name)}")
        self.logitspec_config()  # validates

    def logitspec_config(self, tree_policy: str = "value") -> LogitSpecConfig:
        value = tree_policy == "value"
        return LogitSpecConfig(
            pool=PoolConfig(self.max_ngram_size, self.num_pred_tokens,
                            self.num_continuations if value else 1),
            draft_tree_capacity=None if self.draft_tree_capacity == "auto" else self.draft_tree_capacity,
            tree_policy=tree_policy,
            max_auto_capacity=self.max_auto_capacity,
            recycle_chains=self.recycle_chains if value else 0,
            recycle_depth=self.recycle_depth,
            recycle_breadth=self.recycle_breadth if value else 1,
            successor_children=self.successor_children if value else 0,
            successor_hops=self.successor_hops,
            match_lengths=bool(self.match_lengths) and value,
            suffix_trees=bool(self.suffix_trees) and value,
            suffix_tokens=self.suffix_tokens,
            suffix_branches=bool(self.suffix_branches and self.suffix_trees) and value,
            suffix_grow=bool(self.suffix_grow and self.suffix_trees) and value,
            live_costs=bool(self.live_costs) and value and self.draft_tree_capacity == "auto",
            agreement=bool(self.agreement) and value,
        )


@dataclass(frozen=True)
class LogitSpecParams(ValueTreeParams):
    """LogitSpec's flags (see the module docstring for the defaults)."""

    tree_policy: str = option(
        "value", "'value': keep the candidates most likely to be accepted (learned online); "
        "'reference': the public code's rank-length chains", choices=["value", "reference"])
    prompt_logits: int = option(
        0, "1: the remembered successors also learn the logit after every prompt token (one "
        "LM-head pass over each new prompt, as RACER's copy-logit trees; with recycled chains); "
        "0: from verified tokens only", type=int, choices=[0, 1])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_logits not in (0, 1):
            raise ValueError(f"prompt_logits must be 0 or 1, got {self.prompt_logits}")
        if self.prompt_logits and not self.logitspec_config().recycle_chains:
            raise ValueError("--prompt-logits 1 needs recycled chains (--recycle-chains > 0, "
                             "value policy)")

    def logitspec_config(self, tree_policy: str | None = None) -> LogitSpecConfig:
        return super().logitspec_config(tree_policy or self.tree_policy)


def make_decoder(loaded: LoadedModel, params: LogitSpecParams) -> Decoder:
    config = params.logitspec_config()
    curve = None
    if config.draft_tree_capacity is None:
        curve = cost_surface_for(loaded.model, str(loaded.path))
    successors = SuccessorTable(loaded.model.config.vocab_size) if config.recycle_chains else None
    head = loaded.model.lm_head if params.prompt_logits else None
    return Decoder(loaded.model, make_logitspec_drafter(config, curve, successors, head))


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
