"""Whether a costly draft source runs this step, decided by what it has measurably paid.

A draft source that costs a sizeable part of a verification pass (a draft head's passes, a
draft model's) pays only where its candidates add more accepted tokens than its passes take
time; how much that is depends on the machine (the head's passes against the target's, the
verification cost of a larger tree), the dtype and the text. :class:`SourceGate` measures it
instead of assuming it: two arms, steps with the source and steps without it, each arm's
tokens per step and seconds per step (drafting and verification) averaged over its recent
steps, and each step takes the arm with more tokens per second. The other arm is tried now and
then, so that a change (a longer context, another kind of text) is noticed: every
``explore``-th step while the two arms are close, less often the further behind it is, so that
trying it costs at most about ``regret`` of the run's speed (an arm at ``r`` times the better
one's rate is tried every ``(1 - r) / regret`` steps), and at least every ``8 * explore``
steps.

Start: the arms alternate, source first, until each has ``warmup`` steps. Averages: the plain
mean of an arm's first ``1 / smoothing`` steps, then an exponential moving average with weight
``smoothing``.

Example (``warmup = 2``, ``explore = 4``, ``regret = 0.05``): steps 1-4 alternate (on, off,
on, off); if the steps with the source gave 2.0 tokens in 60 ms (33 tokens/s) and those without
1.4 tokens in 35 ms (40 tokens/s), steps 5, 6 and 7 run without it and step 8 with it (the
source is at 0.83 of the better rate: ``0.17 / 0.05`` rounds up to 4 steps), and so on. Had the
source's steps taken 100 ms (20 tokens/s, half the better rate), it would be tried every 10th
step.

The decision depends on earlier steps' timings only, never on the current step's draws, so a
sampling verifier's output keeps its distribution whichever arm a step takes.
"""

from __future__ import annotations

import math
import time


class SourceGate:
    """Two arms, with and without a draft source; :meth:`choose` before drafting,
    :meth:`record` once the step is verified (module docstring)."""

    def __init__(self, explore: int = 16, warmup: int = 4, smoothing: float = 1 / 16,
                 regret: float = 0.005) -> None:
        if explore < 2 or warmup < 1 or not 0.0 < smoothing <= 1.0 or not 0.0 < regret < 1.0:
            raise ValueError("explore must be >= 2, warmup >= 1, smoothing in (0, 1] and "
                             "regret in (0, 1)")
        self.explore = explore
        self.warmup = warmup
        self.smoothing = smoothing
        self.regret = regret
        self.tokens = [0.0, 0.0]  # per arm (0: without the source, 1: with it)
        self.seconds = [0.0, 0.0]
        self.steps = [0, 0]
        self.step = 0
        self.source_steps = 0  # steps whose choice was the source (recorded or not)
        self.arm = 1
        self._since = 0  # steps since the worse arm was last tried
        self._start = 0.0  # when this step's drafting began
        self._pending: float | None = None  # this step's seconds so far (None: not timed)

    def rate(self, arm: int) -> float:
        """Arm ``arm``'s measured tokens per second (0 before it was measured)."""
        return self.tokens[arm] / self.seconds[arm] if self.seconds[arm] > 0 else 0.0

    def choose(self) -> bool:
        """Whether this step runs the source."""
        self.step += 1
        if min(self.steps) < self.warmup:
            self.arm = 1 if self.steps[1] <= self.steps[0] else 0
        else:
            best = 1 if self.rate(1) >= self.rate(0) else 0
            self._since += 1
            if self._since >= self.period(best):
                self._since = 0
                self.arm = 1 - best
            else:
                self.arm = best
        self.source_steps += self.arm
        return self.arm == 1

    def period(self, best: int) -> int:
        """Steps between two tries of the arm other than ``best`` (module docstring)."""
        ratio = self.rate(1 - best) / self.rate(best) if self.rate(best) > 0 else 1.0
        wanted = math.ceil((1.0 - ratio) / self.regret - 1e-9)
        return min(max(self.explore, wanted), 8 * self.explore)

    def record(self, tokens: int, seconds: float) -> None:
        """The step just verified: ``tokens`` it emitted, ``seconds`` it took."""
        arm = self.arm
        self.steps[arm] += 1
        weight = max(self.smoothing, 1.0 / self.steps[arm])
        self.tokens[arm] += weight * (tokens - self.tokens[arm])
        self.seconds[arm] += weight * (seconds - self.seconds[arm])

    def start_step(self) -> bool:
        """:meth:`choose`, and starts timing the step: the drafter calls :meth:`drafted` when
        its tree is built, :meth:`verified` with the verification's seconds, and
        :meth:`end_step` with the tokens the step emitted, which records it (a step whose
        verification was not timed, as in trace replay, is not recorded)."""
        self._start = time.perf_counter()
        self._pending = 0.0
        return self.choose()

    def drafted(self) -> None:
        self._pending += time.perf_counter() - self._start

    def verified(self, seconds: float | None) -> None:
        self._pending = None if seconds is None else self._pending + seconds

    def end_step(self, tokens: int) -> None:
        if self._pending is not None:
            self.record(tokens, self._pending)

    def share(self) -> float:
        """The fraction of recorded steps that ran the source."""
        total = self.steps[0] + self.steps[1]
        return self.steps[1] / total if total else 0.0
