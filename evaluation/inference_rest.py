"""REST: drafts retrieved from a datastore (a suffix array over text the user provides) for the
longest matching end of the context, merged into a frequency-pruned trie and verified as one
tree. ``python -m evaluation.inference_rest --datastore FILE... --help`` lists the flags.

Build a datastore first (``python scripts/build_rest_datastore.py --out FILE INPUT...``: text,
JSONL, token or .npy files, tokenized with the model's tokenizer). Defaults are the published
settings (:mod:`logitspec.rest`): spans of 16 down to 2 tokens, 5000 occurrences, 10-token
continuations, 64 draft tokens (``--draft-tree-capacity 65`` with the root).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from logitspec.decoding import Decoder
from logitspec.loading import LoadedModel
from logitspec.rest import Datastore, DatastoreError, RestConfig, RestDrafter

from . import eval_loop
from .args import option
from .methods import Method


@dataclass(frozen=True)
class RestParams:
    """REST's flags, one per :class:`~logitspec.rest.RestConfig` field, and the datastores."""

    datastore: tuple[str, ...] | None = option(
        None, "datastore files (.npz, from scripts/build_rest_datastore.py), required", nargs="+")
    draft_tree_capacity: int = option(
        65, "most tokens verified per step, the root included (draft tokens + 1)", type=int)
    max_span: int = option(16, "longest end of the context looked up", type=int)
    min_span: int = option(2, "shortest end of the context looked up", type=int)
    max_matches: int = option(5000, "occurrences retrieved per datastore", type=int)
    continuation_length: int = option(10, "tokens retrieved after each occurrence", type=int)

    def __post_init__(self) -> None:
        paths = (self.datastore,) if isinstance(self.datastore, str) else tuple(self.datastore or ())
        object.__setattr__(self, "datastore", paths)
        if not paths:
            raise ValueError("--datastore is required (build one with "
                             "scripts/build_rest_datastore.py)")
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"no datastore file at {path}")
        self.rest_config()  # validates

    def rest_config(self) -> RestConfig:
        return RestConfig(
            draft_tree_capacity=self.draft_tree_capacity, max_span=self.max_span,
            min_span=self.min_span, max_matches=self.max_matches,
            continuation_length=self.continuation_length,
        )


def load_datastores(paths: Sequence[str], vocab_size: int) -> list[Datastore]:
    """The datastores, checked against the model's vocabulary; errors end the run."""
    stores = []
    for path in paths:
        try:
            store = Datastore.load(path)
        except DatastoreError as exc:
            raise eval_loop.RunError(str(exc)) from None
        if store.vocab_bound > vocab_size:
            raise eval_loop.RunError(
                f"datastore {path} holds token id {store.vocab_bound - 1}, beyond the model's "
                f"vocabulary of {vocab_size}: was it built with another tokenizer?")
        stores.append(store)
    return stores


def make_decoder(loaded: LoadedModel, params: RestParams) -> Decoder:
    stores = load_datastores(params.datastore, loaded.model.config.vocab_size)
    return Decoder(loaded.model, RestDrafter(stores, params.rest_config()))


METHOD = Method(
    name="rest",
    prog="inference_rest",
    description="Answer a question file with REST (retrieval from a datastore) speculative decoding.",
    params_type=RestParams,
    make_generator=make_decoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    return eval_loop.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
