"""evaluation/disturbance.py: the model of a question's expected time, its fit, and the flags."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.disturbance import (
    DEFAULT_THRESHOLD, Measurement, TurnWork, detect, nonnegative_fit, usable_terms,
)


def vanilla(steps: int, wall: float, prompt: int | None = None) -> Measurement:
    return Measurement(wall, (TurnWork(steps, steps, prompt),), 0)


def test_the_docstring_example() -> None:
    found = detect([vanilla(s, y) for s, y in zip((100, 100, 50, 200), (2.0, 2.0, 1.0, 8.0))])
    assert found.coefficients == {"steps": pytest.approx(0.02)}
    assert [v.ratio for v in found.verdicts] == pytest.approx([1.0, 1.0, 1.0, 2.0])
    assert found.verdicts[3].expected == pytest.approx(4.0) and found.disturbed == [3]


@pytest.mark.parametrize("drafted, prompt, terms", [
    (5, 40, ["steps", "tree_tokens", "context", "prompt"]),
    (0, 40, ["steps", "context", "prompt"]),  # nothing drafted (vanilla): no tree term
    (None, 40, ["steps", "context", "prompt"]),  # no draft_lengths recorded
    (5, None, ["steps", "tree_tokens"]),  # no prompt_tokens recorded (older files)
])
def test_usable_terms(drafted: int | None, prompt: int | None, terms: list[str]) -> None:
    measurements = [Measurement(1.0, (TurnWork(10 + i, 20, prompt),), drafted) for i in range(4)]
    assert usable_terms(measurements) == terms


@pytest.mark.parametrize("count, nonzero", [(3, 1), (7, 1), (8, 2), (12, 3), (40, 4)])
def test_a_small_run_fits_few_coefficients(count: int, nonzero: int) -> None:
    """Times that need every term: the fit keeps at most ``count // 4`` of them."""
    runs = [Measurement(0.02 * (10 + i) + 0.001 * (i % 3) * 10 + 1e-5 * (10 + i) * (40 * (i % 5) + 10)
                        + 0.003 * 40 * (i % 5), (TurnWork(10 + i, 20, 40 * (i % 5)),), 10 * (i % 3))
            for i in range(count)]
    assert len(detect(runs).coefficients) == min(nonzero, 4)


def test_work_terms_of_two_turns() -> None:
    m = Measurement(1.0, (TurnWork(10, 30, 100), TurnWork(5, 10, 200)), 7)
    assert m.work() == {"steps": 15.0, "tree_tokens": 7.0,
                        "context": 10 * (100 + 15) + 5 * (200 + 5), "prompt": 300.0}
    assert Measurement(1.0, (TurnWork(10, 30, 100), TurnWork(5, 10, None)), None).work() == {
        "steps": 15.0, "tree_tokens": None, "context": None, "prompt": None}


def test_nonnegative_fit_recovers_exact_coefficients() -> None:
    work = np.array([[10, 1], [20, 5], [30, 2], [40, 9]], dtype=float)
    times = work @ np.array([0.5, 0.25])
    assert nonnegative_fit(work, times, 2) == pytest.approx([0.5, 0.25])
    assert np.count_nonzero(nonnegative_fit(work, times, 1)) == 1


@pytest.mark.parametrize("seed", range(20))
def test_nonnegative_fit_meets_the_optimality_conditions(seed: int) -> None:
    """KKT of min sum((1 - A beta)^2), beta >= 0, A = work / times: the gradient vanishes
    on the support and is non-negative off it (random data, often with a negative
    unconstrained solution)."""
    rng = np.random.default_rng(seed)
    work = rng.uniform(0, 10, size=(12, 3))
    times = work @ rng.uniform(-0.5, 1.0, size=3) + rng.uniform(1, 3, size=12)
    beta = nonnegative_fit(work, times, 3)
    scaled = work / times[:, None]
    gradient = -2 * scaled.T @ (1 - scaled @ beta)
    assert (beta >= 0).all()
    assert np.allclose(gradient[beta > 0], 0, atol=1e-8)
    assert (gradient[beta == 0] >= -1e-8).all()


def realistic_run(count: int, seed: int = 0) -> list[Measurement]:
    """A clean run whose cost is not the model's: a concave tree cost, attention that grows
    with the context, a prefill superlinear in the prompt, and +-5% noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for i in range(count):
        prompt = [40, 120, 700, 1600][i % 4]
        steps, tokens = 30 + 7 * (i % 5), 64
        tree = int(steps * rng.uniform(0, 20))
        per_step = 0.02 * (1 + tree / steps / 20) ** 0.8 * (1 + (prompt + tokens / 2) / 3000)
        wall = (steps * per_step + 2e-5 * prompt ** 1.1) * rng.uniform(0.95, 1.05)
        runs.append(Measurement(wall, (TurnWork(steps, tokens, prompt),), tree))
    return runs


def test_a_clean_run_flags_nothing_where_time_per_step_would() -> None:
    runs = realistic_run(48)
    per_step = [m.wall_time / m.turns[0].steps for m in runs]
    assert max(per_step) / float(np.median(per_step)) > DEFAULT_THRESHOLD  # a bare rule's flag
    found = detect(runs)
    assert found.disturbed == []
    assert max(v.ratio for v in found.verdicts) < 1.15


def test_planted_disturbances_are_exactly_the_flags() -> None:
    runs = realistic_run(48, seed=1)
    planted = {5: 1.45, 17: 5.0, 30: 2.0}  # the slowdowns of the example
    disturbed = [Measurement(m.wall_time * planted.get(i, 1.0), m.turns, m.tree_tokens)
                 for i, m in enumerate(runs)]
    found = detect(disturbed)
    assert found.disturbed == sorted(planted)
    clean = detect(runs)
    for i, slowdown in planted.items():  # the expected time is the clean run's
        assert found.verdicts[i].expected == pytest.approx(clean.verdicts[i].expected, rel=0.05)
        assert found.verdicts[i].ratio == pytest.approx(slowdown * clean.verdicts[i].ratio, rel=0.05)


def test_a_slowdown_of_the_whole_run_is_not_a_disturbance() -> None:
    runs = realistic_run(12)
    slower = [Measurement(3 * m.wall_time, m.turns, m.tree_tokens) for m in runs]
    assert detect(slower).disturbed == []


def test_measurements_without_time_are_neither_fitted_nor_flagged() -> None:
    found = detect([vanilla(10, 0.0), vanilla(10, 1.0), vanilla(10, 1.0), vanilla(10, 5.0)])
    assert found.verdicts[0].ratio is None and not found.verdicts[0].disturbed
    assert found.disturbed == [3]
    assert detect([]).verdicts == ()


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_threshold_must_be_above_one(threshold: float) -> None:
    with pytest.raises(ValueError, match="above 1"):
        detect([vanilla(10, 1.0)], threshold)
