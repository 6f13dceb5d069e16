"""The source gate (logitspec/gate.py): its warm-up, its choice by measured tokens per second,
its exploration, a change of the better arm, and bad settings."""

from __future__ import annotations

import pytest

from logitspec.gate import SourceGate


def run(gate: SourceGate, steps: int, measured: dict[int, tuple[int, float]]) -> list[int]:
    """The arms ``gate`` takes over ``steps`` steps, each arm's step measuring as ``measured``."""
    arms = []
    for _ in range(steps):
        arm = int(gate.choose())
        gate.record(*measured[arm])
        arms.append(arm)
    return arms


def test_docstring_example():
    """Warm-up on, off, on, off; then the faster arm (without the source: 40 against 33
    tokens/s), the other every fourth step; a source at half the better rate every 10th."""
    gate = SourceGate(explore=4, warmup=2, regret=0.05)
    arms = run(gate, 12, {1: (2, 0.060), 0: (1.4, 0.035)})
    assert arms == [1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert gate.rate(1) == pytest.approx(2 / 0.060) and gate.rate(0) == pytest.approx(40.0)
    assert gate.share() == pytest.approx(4 / 12)
    assert gate.source_steps == 4
    slow = SourceGate(explore=4, warmup=2, regret=0.05)
    arms = run(slow, 34, {1: (2, 0.100), 0: (1.4, 0.035)})
    assert [i + 1 for i, arm in enumerate(arms) if arm] == [1, 3, 14, 24, 34]


def test_a_source_that_pays_runs_and_its_rival_is_explored():
    gate = SourceGate(explore=5, warmup=1, regret=0.5)
    arms = run(gate, 11, {1: (3, 0.050), 0: (1, 0.030)})
    assert arms == [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1]


def test_exploration_is_rarer_the_further_behind_and_capped():
    """The default regret (0.5%): an arm at 0.97 of the better one's rate is tried every
    ``explore`` steps, one at 0.8 every 40, one at a tenth every 8 * explore."""
    for other, period in ((0.97, 16), (0.8, 40), (0.1, 128)):
        gate = SourceGate()
        run(gate, 8, {1: (1, 1.0), 0: (other, 1.0)})
        arms = run(gate, 2 * period, {1: (1, 1.0), 0: (other, 1.0)})
        assert [i + 1 for i, arm in enumerate(arms) if not arm] == [period, 2 * period], other


def test_source_steps_counts_every_choice_of_the_source_recorded_or_not():
    """A step whose verification was not timed (trace replay) is not recorded, but it ran the
    source if the gate chose it: ``source_steps`` counts choices, ``share`` records."""
    gate = SourceGate(warmup=1)
    assert gate.start_step()
    gate.drafted()
    gate.verified(None)
    gate.end_step(3)
    assert gate.source_steps == 1 and gate.steps == [0, 0] and gate.share() == 0.0
    assert gate.start_step()  # still warming up the source's arm: nothing recorded for it
    gate.drafted()
    gate.verified(0.01)
    gate.end_step(2)
    assert not gate.start_step()
    assert gate.source_steps == 2 and gate.steps == [0, 1]


def test_the_gate_follows_a_change():
    """The source pays, then stops paying (its steps get slow): the moving average lets the
    gate leave it within a few explorations."""
    gate = SourceGate(explore=4, warmup=2, smoothing=0.5, regret=0.5)
    assert run(gate, 12, {1: (3, 0.05), 0: (1, 0.03)})[4:] == [1, 1, 1, 0, 1, 1, 1, 0]
    later = run(gate, 16, {1: (3, 0.20), 0: (1, 0.03)})
    assert later[-8:] == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("kw", [dict(explore=1), dict(warmup=0), dict(smoothing=0.0),
                                dict(smoothing=1.5), dict(regret=0.0), dict(regret=1.0)])
def test_bad_settings(kw):
    with pytest.raises(ValueError, match="explore must be"):
        SourceGate(**kw)


def test_step_timing_records_drafting_and_verification_and_skips_untimed_steps():
    gate = SourceGate(warmup=1)
    assert gate.start_step()
    gate.drafted()
    gate.verified(0.5)
    gate.end_step(3)
    assert gate.steps == [0, 1] and gate.tokens[1] == 3
    assert 0.5 <= gate.seconds[1] < 0.6  # the verification plus the (short) drafting
    assert not gate.start_step()
    gate.drafted()
    gate.verified(None)  # not timed (trace replay): nothing recorded
    gate.end_step(1)
    assert gate.steps == [0, 1]
