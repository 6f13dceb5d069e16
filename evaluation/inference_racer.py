"""RACER: copy-logit trees merged with the retrieval tree of an n-gram automaton with
least-recently-used eviction (:mod:`logitspec.racer`). ``python -m evaluation.inference_racer
--help`` lists the flags; the defaults are the published settings.

The automaton and the successor table live as long as the run, as in the public code: every
question, and the untimed warm-up, teaches the next ones. ``--prompt-logits off`` skips the
LM-head pass over each prompt (on a CPU it costs about a third of the prefill for a few
percent of mean accepted tokens; on a GPU it is nearly free).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel
from logitspec.racer import RacerConfig, RacerDrafter
from logitspec.recycling import SuccessorTable

from . import eval_loop
from .args import option
from .methods import Method


@dataclass(frozen=True)
class RacerParams:
    """RACER's flags (:class:`logitspec.racer.RacerConfig`)."""

    draft_tree_capacity: int = option(
        64, "most tokens verified per step, the step's root included", type=int)
    ngram: int = option(10, "tokens per n-gram window kept by the automaton", type=int)
    max_nodes: int = option(
        10_000, "most automaton nodes; the least recently used are evicted", type=int)
    max_breadth: int = option(
        8, "successors copied per token; the copy-logit tree's root expands this many", type=int)
    prompt_logits: str = option(
        "on", "copy the logits of every prompt position when a turn begins (the published "
        "policy; one LM-head pass over the new prompt tokens)", choices=("on", "off"))

    def __post_init__(self) -> None:
        self.racer_config()  # validates
        if self.prompt_logits not in ("on", "off"):
            raise ValueError(f"prompt_logits must be 'on' or 'off', got {self.prompt_logits!r}")

    def racer_config(self) -> RacerConfig:
        return RacerConfig(
            draft_tree_capacity=self.draft_tree_capacity, ngram=self.ngram,
            max_nodes=self.max_nodes, max_breadth=self.max_breadth,
        )


def make_decoder(loaded: LoadedModel, params: RacerParams) -> Decoder:
    """One successor table over the vocabulary; with ``prompt_logits`` on, the drafter copies
    the prompt's logits through the model's LM head."""
    config = params.racer_config()
    model = loaded.model
    table = SuccessorTable(model.config.vocab_size, config.max_breadth)
    head = model.lm_head if params.prompt_logits == "on" else None
    return Decoder(model, RacerDrafter(config, table, head=head))


METHOD = Method(
    name="racer",
    prog="inference_racer",
    description="Answer a question file with RACER speculative decoding.",
    params_type=RacerParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
