"""Disturbed measurements: questions that took much longer than the rest of the run says they
should, because something else ran on the machine meanwhile.

A question's time on a quiet machine follows from the work its answer line records. The model
is per method (one answer file, or one method of a comparison), so the method's own speed on
this machine is its reference; every figure it needs is in the answer lines.

Work terms of a question (sums over its turns and choices):

============  ==========================================================================
steps         decoding steps: one forward pass each, with the host's drafting and bookkeeping
tree_tokens   drafted tokens verified (``draft_lengths``): a bigger tree makes a pass dearer
context       context tokens the steps attend to, per turn ``steps * (prompt_tokens +
              new_tokens / 2)``: long prompts (RAG, summarization) make attention dearer
prompt        prompt tokens prefilled: ``prompt_tokens`` less ``cached_tokens`` (those the
              cache already held: a follow-up turn's conversation so far, a prefix shared
              with the previous question under ``--prefix-cache 1``)
============  ==========================================================================

A term can enter when every measurement records it (``draft_lengths``, ``prompt_tokens``) and it
is non-zero for some; at most ``max(1, n // MEASUREMENTS_PER_TERM)`` of them get a non-zero
coefficient (n measurements), the ones that fit best, so a small run fits few coefficients
(with 3 questions: one, usually the time per step) and one disturbed question cannot be
explained away by a coefficient of its own.

Statistic: the expected time of measurement ``i`` is ``e_i = sum_j beta_j * x_ij`` with every
``beta_j >= 0``, fitted to the clean measurements ``C`` by relative least squares,
``min sum_{i in C} ((y_i - e_i) / y_i) ** 2`` (each question weighs the same whatever its
length, and a slowed one weighs less the slower it is). Its ratio is ``r_i = y_i / e_i``.
Runs of fewer than about 12 questions that mix short and long prompts are beyond a model of
one or two coefficients: there a clean long-prompt question may be flagged.

Policy: ``C`` starts as every measurement with a time; it is refitted on ``{i : r_i <=
threshold}`` until that set stops changing (at most ``MAX_ROUNDS`` fits). A measurement is
disturbed when ``r_i > threshold`` under the last fit: it took more than ``threshold`` times
(default 1.3: 30% longer than) what the method's clean questions of the run predict for its
work. A measurement without time (``y_i = 0``) is never fitted nor flagged. A slowdown that
lasts a method's whole run moves its reference too and is not seen here; interleaving the
methods (``scripts/compare.py``) spreads such drift over all of them instead.

Worked example (vanilla, 4 questions, so one term, steps): steps (100, 100, 50, 200), times
(2.0, 2.0, 1.0, 8.0) s. The first fit on all four gives ``beta = sum(x/y) / sum((x/y)**2) =
175 / 8125 = 0.0215`` s per step, ratios (0.93, 0.93, 0.93, 1.86); the last question leaves
``C``, the refit gives ``beta = 0.02`` and ratios (1, 1, 1, 2.0): the last question is
disturbed, expected 4.0 s, observed 8.0 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import numpy as np

DEFAULT_THRESHOLD = 1.3
MEASUREMENTS_PER_TERM = 4
MAX_ROUNDS = 10
WORK_TERMS = ("steps", "tree_tokens", "context", "prompt")


@dataclass(frozen=True)
class TurnWork:
    """One turn of one choice, as its answer line records it; ``None``: not recorded."""

    steps: int
    new_tokens: int
    prompt_tokens: int | None
    cached_tokens: int = 0  # of prompt_tokens, those not prefilled (0 where not recorded)


@dataclass(frozen=True)
class Measurement:
    """One question answered by one method: its time and the work behind it.

    ``tree_tokens`` is None when the answer line has no ``draft_lengths``.
    """

    wall_time: float
    turns: tuple[TurnWork, ...]
    tree_tokens: int | None

    def work(self) -> dict[str, float | None]:
        """The work terms (module docstring), None where the line does not record one."""
        prompts = [t.prompt_tokens - t.cached_tokens for t in self.turns
                   if t.prompt_tokens is not None]
        known = len(prompts) == len(self.turns)
        context = sum(t.steps * ((t.prompt_tokens or 0) + t.new_tokens / 2) for t in self.turns)
        return {
            "steps": float(sum(t.steps for t in self.turns)),
            "tree_tokens": None if self.tree_tokens is None else float(self.tree_tokens),
            "context": float(context) if known else None,
            "prompt": float(sum(prompts)) if known else None,
        }


@dataclass(frozen=True)
class Verdict:
    """One measurement under the fitted model; ``expected`` and ``ratio`` are None for a
    measurement without time or when nothing could be fitted."""

    expected: float | None
    ratio: float | None
    disturbed: bool


@dataclass(frozen=True)
class Disturbance:
    """The fitted model of one method and a verdict per measurement, in input order.

    ``coefficients``: seconds per unit of each term used (e.g. ``{"steps": 0.02}``).
    """

    threshold: float
    coefficients: dict[str, float]
    verdicts: tuple[Verdict, ...]

    @property
    def disturbed(self) -> list[int]:
        """Indices of the disturbed measurements."""
        return [i for i, v in enumerate(self.verdicts) if v.disturbed]


def usable_terms(measurements: Sequence[Measurement]) -> list[str]:
    """The work terms these measurements all record, non-zero for some (module docstring)."""
    works = [m.work() for m in measurements]
    return [
        term for term in WORK_TERMS
        if all(w[term] is not None for w in works) and any(w[term] for w in works)
    ]


def nonnegative_fit(work: np.ndarray, times: np.ndarray, max_terms: int) -> np.ndarray:
    """``beta >= 0`` with at most ``max_terms`` non-zero entries, minimizing
    ``sum(((times - work @ beta) / times) ** 2)``; work (n, k).

    Exact for the few terms here: the optimum is the least-squares solution on its own
    support, so every support of up to ``max_terms`` terms is solved and the best one with no
    negative coefficient wins (ties: the first in ``combinations`` order, fewer terms first).
    """
    scaled, ones = work / times[:, None], np.ones(len(times))
    best, best_loss = np.zeros(work.shape[1]), float(len(times))  # beta = 0: loss n
    for size in range(1, min(max_terms, work.shape[1]) + 1):
        for support in combinations(range(work.shape[1]), size):
            cols = list(support)
            beta_s, *_ = np.linalg.lstsq(scaled[:, cols], ones, rcond=None)
            if (beta_s < 0).any():
                continue
            loss = float(((ones - scaled[:, cols] @ beta_s) ** 2).sum())
            if loss < best_loss - 1e-12:
                best, best_loss = np.zeros(work.shape[1]), loss
                best[cols] = beta_s
    return best


def detect(measurements: Sequence[Measurement],
           threshold: float = DEFAULT_THRESHOLD) -> Disturbance:
    """Fits the model and flags the disturbed measurements (module docstring)."""
    if threshold <= 1.0:
        raise ValueError(f"the disturbance threshold must be above 1, got {threshold}")
    terms = usable_terms(measurements)
    max_terms = max(1, len(measurements) // MEASUREMENTS_PER_TERM)
    work = np.array([[m.work()[t] for t in terms] for m in measurements], dtype=float)
    work = work.reshape(len(measurements), len(terms))
    times = np.array([m.wall_time for m in measurements], dtype=float)
    timed = times > 0
    clean = timed.copy()
    beta = np.zeros(len(terms))
    for _ in range(MAX_ROUNDS):
        if not clean.any():
            break
        beta = nonnegative_fit(work[clean], times[clean], max_terms)
        expected = work @ beta
        ratios = np.divide(times, expected, out=np.full(len(times), np.inf), where=expected > 0)
        now_clean = timed & (ratios <= threshold)
        if (now_clean == clean).all():
            break
        clean = now_clean
    expected = work @ beta
    verdicts = tuple(
        Verdict(float(e), float(y / e), bool(y / e > threshold)) if ok and e > 0
        else Verdict(None, None, False)
        for y, e, ok in zip(times, expected, timed)
    )
    coefficients = {term: float(b) for term, b in zip(terms, beta) if b > 0}
    return Disturbance(threshold, coefficients, verdicts)
