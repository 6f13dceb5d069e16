"""How many tokens a draft model proposes per step, and the acceptance-prediction head.

Schedules (:class:`DraftLengthConfig`, ``schedule``):

- ``constant``: ``num_draft_tokens`` every step.
- ``heuristic``: starts at ``num_draft_tokens``; after a step where a whole draft was accepted
  the length grows by 2, after a rejection it shrinks by 1, always within ``bounds``::

      k = 4: all 4 accepted -> 6; 2 of 6 accepted -> 5; ... ; 0 of 1 accepted -> 1 (at least 1)

- ``confidence`` (SpecDec++): draft one token at a time and stop as soon as the predicted
  probability that at least one drafted token is rejected exceeds ``stop_threshold``::

      1 - a_1 * a_2 * ... * a_i > stop_threshold   (the i-th token is kept, then stop)

  never before ``bounds[0]`` tokens, never past ``bounds[1]``. ``a_i`` is the predicted
  probability that token ``i`` is accepted given the earlier ones were: by default the draft's
  own probability of the token it proposed (greedy: its largest probability), or the output of
  a trained :class:`AcceptanceHead` on the draft's final hidden state at the position that
  proposed it. Example, threshold 0.5, bounds (1, 8): ``a = 0.9, 0.8, 0.6`` gives
  ``1 - 0.9 = 0.1``, ``1 - 0.72 = 0.28``, ``1 - 0.432 = 0.568 > 0.5``: three tokens.

- ``cost``: the length that pays on this machine. Before each token is drawn, with the draft's
  distribution for it at hand, the token is drafted only if a longer draft is expected to give
  more tokens per second than stopping there (:func:`worth_drafting`), from the measured
  verification cost ``C(n)`` of ``n`` tokens (:mod:`logitspec.cost`) and the measured seconds
  of the draft's first pass and of each further pass. With ``d`` tokens drafted whose predicted
  acceptances (as in ``confidence``) multiply to ``keep`` and add up, over their prefixes, to
  ``E`` (expected accepted drafted tokens), the step is worth::

      R(d) = (1 + E) / (C(1 + d) + first + (d - 1) * per_pass),   R(0) = 1 / (C(1) + first)

  and the next ``k`` tokens are expected to add ``keep * (e + e^2 + ... + e^k)``, each accepted
  at the rate ``e`` (the i.i.d. model of speculative decoding's analysis), ``e`` the next
  token's predicted acceptance read from its distribution before the draw (greedy: its largest
  probability; sampling: the probability that a draw from it repeats itself, ``sum q^2``; or the
  acceptance head's). Nothing drafted is ever dropped, so the length depends on earlier draws
  only and sampling stays exact. It may draft nothing; ``bounds[1]`` caps it.

  Example: costs 1.0, 1.6, 1.7, 1.8 for 1..4 tokens (no drafting time), every ``e`` and
  acceptance 0.9: ``R(0) = 1`` and one token gives ``1.9 / 1.6 = 1.19``: drafted; a second
  ``(1.9 + 0.81) / 1.7 = 1.59``: drafted; a third ``3.44 / 1.8 = 1.91``: drafted (the cost
  table ends there). With costs 1.0, 1.95, 2.9, 3.85 nothing is drafted: no length reaches
  ``R(0) = 1`` (``1.9 / 1.95``, ``2.71 / 2.9``, ``3.44 / 3.85``). One chain only (one draft
  model, ``num_drafts`` 1): the tree it sizes is that chain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

SCHEDULES = ("constant", "heuristic", "confidence", "cost")


@dataclass(frozen=True)
class DraftLengthConfig:
    """A draft-length schedule (module docstring)."""

    schedule: str = "constant"
    num_draft_tokens: int = 4
    stop_threshold: float = 0.5
    bounds: tuple[int, int] = (1, 16)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if not 0.0 <= self.stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {self.stop_threshold}")
        low, high = self.bounds
        if not 1 <= low <= high:
            raise ValueError(f"draft length bounds need 1 <= MIN <= MAX, got {low} {high}")

    @property
    def initial(self) -> int:
        """The first step's length (constant: always)."""
        if self.schedule == "constant":
            return self.num_draft_tokens
        low, high = self.bounds
        if self.schedule in ("confidence", "cost"):
            return high
        return min(max(self.num_draft_tokens, low), high)

    @property
    def longest(self) -> int:
        """The most tokens one draft may ever have."""
        return self.num_draft_tokens if self.schedule == "constant" else self.bounds[1]


def heuristic_update(length: int, fully_accepted: bool, bounds: tuple[int, int]) -> int:
    """The next length: +2 after a step whose whole draft was accepted, else -1; clipped to
    ``bounds``."""
    grown = length + 2 if fully_accepted else length - 1
    return min(max(grown, bounds[0]), bounds[1])


def confidence_stop(drafted: int, keep_prob: float, threshold: float, bounds: tuple[int, int]) -> bool:
    """Whether to stop after ``drafted`` tokens whose predicted acceptance probabilities
    multiply to ``keep_prob`` (module docstring)."""
    if drafted >= bounds[1]:
        return True
    return drafted >= bounds[0] and 1.0 - keep_prob > threshold


def step_ratio(expected: float, drafted: int, cost: Sequence[float], first: float,
               per_pass: float) -> float:
    """Expected tokens per second of a step that verifies the root and ``drafted`` tokens
    that are expected to give ``expected`` accepted ones (module docstring, ``cost``):
    ``cost[n]`` seconds to verify ``n`` tokens, ``first`` for the draft's first pass and
    ``per_pass`` for each further one."""
    return (1.0 + expected) / (cost[1 + drafted] + first + max(drafted - 1, 0) * per_pass)


def worth_drafting(expected: float, keep: float, drafted: int, gain: float, limit: int,
                   cost: Sequence[float], first: float, per_pass: float) -> bool:
    """Whether to draft token ``drafted + 1``: whether a draft of ``drafted + k`` tokens
    (``k = 1 .. limit - drafted``) whose further tokens are each accepted at the rate ``gain``
    (adding ``keep * gain``, ``keep * gain^2``, ...) has a higher :func:`step_ratio` than
    stopping at ``drafted`` (module docstring). ``cost`` must cover ``1 + limit`` tokens."""
    now = step_ratio(expected, drafted, cost, first, per_pass)
    for k in range(1, limit - drafted + 1):
        keep *= gain
        expected += keep
        if step_ratio(expected, drafted + k, cost, first, per_pass) > now:
            return True
    return False


class DraftLength:
    """The schedule's state over one generation: the length to draft, when to stop early."""

    def __init__(self, config: DraftLengthConfig) -> None:
        self.config = config
        self.length = config.initial

    def reset(self) -> None:
        self.length = self.config.initial

    def stop(self, drafted: int, keep_prob: float) -> bool:
        """Whether a draft of ``drafted`` tokens (acceptance probabilities multiplying to
        ``keep_prob``) is complete (the ``cost`` schedule decides before each draw instead,
        :func:`worth_drafting`; here only its cap)."""
        if self.config.schedule == "confidence":
            return confidence_stop(drafted, keep_prob, self.config.stop_threshold, self.config.bounds)
        return drafted >= self.length

    def update(self, fully_accepted: bool) -> None:
        """A step verified a draft; ``fully_accepted``: every drafted token of some chain."""
        if self.config.schedule == "heuristic":
            self.length = heuristic_update(self.length, fully_accepted, self.config.bounds)


class AcceptanceHead(nn.Module):
    """Predicts whether a drafted token is accepted, from the draft's final hidden state
    (..., hidden_size) at the position that proposed it: one linear layer, or with
    ``hidden_units > 0`` an MLP with one SiLU hidden layer. ``forward`` returns logits (...);
    :meth:`probability` the sigmoid."""

    def __init__(self, hidden_size: int, hidden_units: int = 0) -> None:
        super().__init__()
        if hidden_size < 1 or hidden_units < 0:
            raise ValueError(f"bad acceptance head shape: {hidden_size} -> {hidden_units}")
        self.hidden_size = hidden_size
        self.hidden_units = hidden_units
        if hidden_units:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden_units), nn.SiLU(), nn.Linear(hidden_units, 1)
            )
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)

    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(hidden))


def head_config_path(path: Path) -> Path:
    """The JSON file beside a head's safetensors file."""
    return path.with_suffix(".json")


def save_acceptance_head(head: AcceptanceHead, path: str | Path, info: dict | None = None) -> Path:
    """Writes the weights to ``path`` (``.safetensors``) and its shape (plus ``info``) to the
    JSON file beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an acceptance head is saved as .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().float().contiguous().cpu() for name, t in head.state_dict().items()}
    save_file(state, str(path))
    config = {"hidden_size": head.hidden_size, "hidden_units": head.hidden_units, **(info or {})}
    head_config_path(path).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_acceptance_head(path: str | Path, device: str | torch.device = "cpu") -> AcceptanceHead:
    """Loads a head written by :func:`save_acceptance_head`; safetensors only (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"acceptance head {path}: only .safetensors files are loaded (no pickle)")
    config_path = head_config_path(path)
    try:
        config = json.loads(config_path.read_text())
        state = load_file(str(path))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ValueError(f"cannot read acceptance head {path} (+ {config_path.name}): {exc}") from exc
    head = AcceptanceHead(int(config["hidden_size"]), int(config.get("hidden_units", 0)))
    head.load_state_dict(state)
    return head.to(device).eval().requires_grad_(False)
