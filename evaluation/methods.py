"""The contract between the evaluation loop and a decoding method.

A method is one small file, ``evaluation/inference_<name>.py``, that declares

- a frozen params dataclass whose fields (declared with :func:`evaluation.args.option`) become
  the method's own flags and whose ``__post_init__`` validates them; its ``asdict`` is what
  answer files record as ``meta.params``;
- a :class:`Method`: the name used in model ids and ``meta.method``, the command's name, and a
  function that turns a loaded model and the params into a :class:`TurnGenerator`;
- ``main(argv)``, which hands both to :func:`evaluation.eval_loop.main`.

The loop owns one generator for the whole run: it calls ``reset()`` before every question
(and every choice; ``reset(keep_prefix=True)`` with ``--prefix-cache 1``) and never between
the turns of a conversation, so a follow-up turn reuses what the generator kept of the
previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from logitspec.decoding import GenerationConfig, GenerationResult
from logitspec.drafters import PoolConfig
from logitspec.loading import LoadedModel

from .args import option


class TurnGenerator(Protocol):
    """What the loop needs from a method; :class:`logitspec.decoding.Decoder` is one."""

    def reset(self, keep_prefix: bool = False) -> None:
        """Forgets the conversation: the next ``generate`` starts from nothing; with
        ``keep_prefix`` it may reuse what it kept of the last conversation's prefix (its
        results' ``cached_tokens`` say how much)."""

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
        """Generates one turn after ``prompt_ids``, the whole conversation so far."""


@dataclass(frozen=True)
class Method:
    """A decoding method as the evaluation loop sees it."""

    name: str  # in model ids and meta.method: "vanilla", "logitspec", "pld", ...
    prog: str  # the command, e.g. "inference_logitspec"
    description: str  # first line of --help
    params_type: type  # frozen dataclass of the method's flags
    make_generator: Callable[[LoadedModel, Any], TurnGenerator]


@dataclass(frozen=True)
class NoParams:
    """A method without flags of its own."""


@dataclass(frozen=True)
class RetrievalParams:
    """The n-gram pool flags shared by the retrieval drafters (PLD, LogitSpec)."""

    max_ngram_size: int = option(
        3, "longest n-gram suffix looked up in the pool", type=int)
    num_pred_tokens: int = option(
        20, "longest continuation retrieved for one n-gram", type=int)

    def __post_init__(self) -> None:
        self.pool_config()  # validates

    def pool_config(self) -> PoolConfig:
        return PoolConfig(max_ngram_size=self.max_ngram_size, num_pred_tokens=self.num_pred_tokens)
