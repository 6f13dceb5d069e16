"""The verification cost curve and surface: interpolation over tree size and context,
measurement and its cache."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from logitspec import cost as cost_module
from logitspec.config import ModelConfig
from logitspec.cost import (
    CostCurve,
    CostSurface,
    LiveCosts,
    SurfaceCheck,
    check_cost_surface,
    cost_surface_for,
    measure_cost_curve,
    measure_cost_surface,
    store_cost_surface,
    usable_contexts,
)
from logitspec.model import Transformer

CURVE = CostCurve((1, 2, 8, 64), (1.0, 1.1, 1.4, 3.2))


@pytest.mark.parametrize(
    "n,expected",
    [(0, 1.0), (1, 1.0), (2, 1.1), (5, 1.25), (8, 1.4), (36, 2.3), (64, 3.2), (92, 4.1)],
    ids=["below", "one", "point", "between", "point8", "between-far", "last", "extrapolated"],
)
def test_cost_interpolates_and_extrapolates(n, expected):
    assert CURVE.cost(n) == pytest.approx(expected)
    assert CURVE.relative(n) == pytest.approx(expected)


@pytest.mark.parametrize(
    "sizes,seconds",
    [((2, 4), (1.0, 2.0)), ((1, 4, 2), (1.0, 2.0, 3.0)), ((1, 2), (1.0,)), ((), ())],
    ids=["no-one", "unsorted", "lengths", "empty"],
)
def test_invalid_curves_are_refused(sizes, seconds):
    with pytest.raises(ValueError):
        CostCurve(sizes, seconds)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    model = Transformer(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.eval()


def test_measure_gives_one_positive_time_per_size():
    curve = measure_cost_curve(tiny_model(), (4, 1, 2), context=16, repeats=2, warmup=1)
    assert curve.sizes == (1, 2, 4) and len(curve.seconds) == 3
    assert all(s > 0 for s in curve.seconds) and curve.context == 16


class ClockedModel:
    """Stands in for a model under :func:`measure_cost_curve`: a pass of N tokens takes N ms
    on a synthetic clock, plus 50 ms for the passes numbered in ``burst`` (a busy moment of
    the machine)."""

    def __init__(self, burst=()):
        self.config = SimpleNamespace(vocab_size=50)
        self.device = torch.device("cpu")
        self.burst, self.calls, self.now = set(burst), 0, 0.0

    def __call__(self, tokens, positions, cache, mask):
        self.now += 0.001 * len(tokens) + (0.05 if self.calls in self.burst else 0.0)
        self.calls += 1


@pytest.mark.parametrize("first", [4, 9, 13])
def test_a_burst_of_interference_does_not_reach_the_curve(monkeypatch, first):
    """Four sizes, one warm-up round and three timed: a burst as long as a round (four
    consecutive passes) slows one pass of each size at most, and the fastest of three is
    kept. Timing every repeat of one size before the next would put the whole burst on one
    size."""
    model = ClockedModel(burst=range(first, first + 4))
    monkeypatch.setattr(cost_module, "fill_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(cost_module, "time", SimpleNamespace(perf_counter=lambda: model.now))
    curve = measure_cost_curve(model, (1, 2, 4, 8), context=16, repeats=3, warmup=1, cache=object())
    assert model.calls == 16
    assert curve.seconds == pytest.approx((0.001, 0.002, 0.004, 0.008))


def test_measure_surface_over_contexts():
    model = tiny_model()  # context 512: 4 new tokens leave room for 508 cached ones
    surface = measure_cost_surface(model, (1, 4), (16, 64, 600), repeats=1, warmup=0)
    assert surface.contexts == (16, 64, 508)
    assert all(c.sizes == (1, 4) and all(t > 0 for t in c.seconds) for c in surface.curves)


@pytest.mark.parametrize(
    "contexts, largest, expected",
    [((512, 2048, 8192), 128, [512, 2048, 3968]), ((512, 2048), 64, [512, 2048]),
     ((8192,), 128, [3968]), ((100, 100, 50), 1, [50, 100]), ((512,), 5000, [1])],
    ids=["longest-too-long", "all-fit", "none-fit", "duplicates", "tiny-context"],
)
def test_usable_contexts(contexts, largest, expected):
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    assert usable_contexts(model, contexts, largest) == expected


SURFACE = CostSurface((CostCurve((1, 64), (10.0, 20.0), 512), CostCurve((1, 64), (14.0, 40.0), 2048)),
                      bucket=256)


@pytest.mark.parametrize(
    "context, expected",
    [(0, (10.0, 20.0)), (300, (10.0, 20.0)), (1000, (10.0 + 4 * 512 / 1536, 20.0 + 20 * 512 / 1536)),
     (2047, (14.0, 40.0)), (3583, (18.0, 60.0))],
    ids=["empty", "below-first", "between", "second", "extrapolated"],
)
def test_surface_interpolates_in_context(context, expected):
    """The curve at the end of the context's 256-token bucket: first curve below the shortest
    context, linear between, along the last two past the longest (3584: 2048 + 1536)."""
    curve = SURFACE.at(context)
    assert curve.seconds == pytest.approx(expected)
    assert SURFACE.at(context) is curve  # the same object while in the bucket


def test_surface_and_curve_are_interchangeable():
    """Callers that do not follow the context get the surface's shortest context's curve;
    callers that do can ask a single curve too."""
    assert SURFACE.cost(64) == 20.0 and SURFACE.relative(64) == 2.0 and SURFACE.table([1]) == [1.0]
    assert CURVE.at(100_000) is CURVE


def test_surface_extrapolation_stays_non_decreasing_in_size():
    surface = CostSurface((CostCurve((1, 8), (10.0, 30.0), 100), CostCurve((1, 8), (20.0, 21.0), 200)),
                          bucket=100)
    assert surface.at(350).seconds == (40.0, 40.0)  # 10 + 3 * 10 = 40; 30 - 3 * 9 = 3 -> 40


@pytest.mark.parametrize(
    "curves, message",
    [((), "at least one curve"),
     ((CostCurve((1,), (1.0,), 600), CostCurve((1,), (1.0,), 500)), "contexts must increase"),
     ((CostCurve((1,), (1.0,), 500), CostCurve((1, 2), (1.0, 2.0), 600)), "the same sizes")],
    ids=["empty", "unsorted", "sizes"],
)
def test_invalid_surfaces_are_refused(curves, message):
    with pytest.raises(ValueError, match=message):
        CostSurface(curves)


def test_cached_per_model_key_and_dtype(tmp_path, monkeypatch):
    calls = []

    def fake_measure(model, *args, **kwargs):
        calls.append(model.dtype)
        seconds = (0.01, 0.02 if model.dtype == torch.float32 else 0.015)
        return CostSurface((CostCurve((1, 8), seconds),))

    monkeypatch.setattr(cost_module, "measure_cost_surface", fake_measure)
    model = tiny_model()
    unchecked = partial(cost_surface_for, check=False)
    first = unchecked(model, "m", cache_root=tmp_path)
    again = unchecked(model, "m", cache_root=tmp_path)
    assert first == again and len(calls) == 1
    unchecked(model, "other", cache_root=tmp_path)
    unchecked(model.to(torch.bfloat16), "m", cache_root=tmp_path)
    assert len(calls) == 3
    unchecked(model, "m", cache_root=tmp_path, refresh=True)
    assert len(calls) == 4


def test_the_cpu_and_its_threads_are_part_of_the_key(monkeypatch):
    """A cache directory that outlives its machine (another CPU, another instruction set,
    another thread count) is measured again, not read."""
    model = tiny_model()
    keys = {cost_module._surface_key(model, "m")}
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    keys.add(cost_module._surface_key(model, "m"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX-like")
    keys.add(cost_module._surface_key(model, "m"))
    monkeypatch.setattr(cost_module, "cpu_name", lambda: "Another CPU")
    keys.add(cost_module._surface_key(model, "m"))
    assert len(keys) == 4


def test_store_replaces_the_cached_surface(tmp_path):
    model = tiny_model()
    stored = CostSurface((CostCurve((1, 4), (0.5, 0.75), 512), CostCurve((1, 4), (0.6, 0.9), 900)))
    store_cost_surface(model, "m", stored, cache_root=tmp_path)
    assert cost_surface_for(model, "m", cache_root=tmp_path, check=False) == stored


def test_a_surface_check_by_hand():
    """The class docstring's example: 2 tokens stored at 1.23x one token, measured at 1.52x;
    one token's time is not judged."""
    check = SurfaceCheck(512, (1, 2), (1.23,), (1.52,), (0.010, 0.0102))
    assert check.deviation == pytest.approx(1.52 / 1.23 - 1)
    assert not check.holds
    assert SurfaceCheck(512, (1, 2), (1.23,), (1.30,), (0.010, 0.020)).holds  # 5.7%


def _fake_rounds(monkeypatch, rounds):
    """measure_cost_curve answers with each of ``rounds`` (seconds per size) in turn."""
    calls = []

    def fake_curve(model, sizes, *, context, cache, **kwargs):
        calls.append((tuple(sizes), context, cache))
        return CostCurve(tuple(sizes), rounds[len(calls) - 1], context)

    monkeypatch.setattr(cost_module, "measure_cost_curve", fake_curve)
    return calls


STORED = CostSurface((CostCurve((1, 2, 4, 8), (0.010, 0.015, 0.020, 0.030), 256),
                      CostCurve((1, 2, 4, 8), (0.020, 0.030, 0.040, 0.060), 480)))


def test_the_check_times_the_shortest_context_and_stops_when_the_first_round_agrees(
        monkeypatch):
    calls = _fake_rounds(monkeypatch, [(0.0105, 0.0157, 0.021, 0.031)])
    check = check_cost_surface(tiny_model(), STORED, (2, 8, 4))
    assert check.holds and check.sizes == (1, 2, 4, 8) and check.context == 256
    assert check.stored == pytest.approx((1.5, 2.0, 3.0))
    assert check.seconds == pytest.approx((0.010, 0.0105))
    assert len(calls) == 1 and calls[0][:2] == ((1, 2, 4, 8), 256)


def test_one_busy_round_does_not_throw_a_good_surface_away(monkeypatch):
    """The first round's 2-token pass was disturbed (+40%); the second round's is not, and
    each size keeps its faster time: the surface holds. The cache is filled once."""
    calls = _fake_rounds(monkeypatch, [(0.010, 0.021, 0.020, 0.030),
                                       (0.0102, 0.0151, 0.024, 0.031)])
    check = check_cost_surface(tiny_model(), STORED)
    assert check.holds and len(calls) == 2 and calls[0][2] is calls[1][2]
    assert check.measured == pytest.approx((1.51, 2.0, 3.0))


def test_a_surface_that_no_longer_describes_the_machine_does_not_hold(monkeypatch):
    """Both rounds price a second token at 1.9x one token where the surface says 1.5x."""
    _fake_rounds(monkeypatch, [(0.010, 0.019, 0.020, 0.030)] * 2)
    check = check_cost_surface(tiny_model(), STORED)
    assert not check.holds and check.deviation == pytest.approx(1.9 / 1.5 - 1)


def test_a_real_check_refuses_a_surface_made_up_for_another_machine():
    """Measured for real on a tiny model: a surface claiming that 2 tokens cost 1000x one
    token is refused. The measured ratio is at least 1 (the check makes the curve rising) and
    far from 1000 even on a loaded machine (a 10x claim was once met at 12x under load)."""
    made_up = CostSurface((CostCurve((1, 2), (1.0, 1000.0), 64),))
    check = check_cost_surface(tiny_model(), made_up, (1, 2), repeats=2)
    assert not check.holds and 1.0 <= check.measured[0] < 100.0


def test_a_stored_surface_is_checked_once_per_process_and_measured_again_when_off(
        tmp_path, monkeypatch):
    monkeypatch.setattr(cost_module, "_checked", {})
    measured, checked = [], []
    verdict = {"holds": True}

    def fake_measure(model, *args, **kwargs):
        measured.append(1)
        return CostSurface((CostCurve((1, 2), (0.01, 0.01 + 0.001 * len(measured))),))

    def fake_check(model, surface, *args, **kwargs):
        checked.append(surface)
        stored = (surface.relative(2),)
        return SurfaceCheck(512, (1, 2), stored, stored if verdict["holds"] else (stored[0] * 2,))

    monkeypatch.setattr(cost_module, "measure_cost_surface", fake_measure)
    monkeypatch.setattr(cost_module, "check_cost_surface", fake_check)
    model = tiny_model()
    stored = CostSurface((CostCurve((1, 2), (0.5, 0.75)),))
    store_cost_surface(model, "m", stored, cache_root=tmp_path)
    assert cost_surface_for(model, "m", cache_root=tmp_path) == stored
    assert cost_surface_for(model, "m", cache_root=tmp_path) == stored
    assert len(checked) == 1 and not measured  # checked once, held
    cost_surface_for(model, "m", cache_root=tmp_path, check=False)
    assert len(checked) == 1

    cost_module._checked.clear()  # another process, and the machine changed
    verdict["holds"] = False
    again = cost_surface_for(model, "m", cache_root=tmp_path)
    assert len(checked) == 2 and len(measured) == 1 and again != stored
    assert cost_surface_for(model, "m", cache_root=tmp_path, check=False) == again  # stored
    assert cost_surface_for(model, "m", cache_root=tmp_path) == again  # measured: not checked
    assert len(checked) == 2 and len(measured) == 1


def test_default_contexts_follow_the_device(monkeypatch):
    """The CPU measures at 512 and 2,048 cached tokens; other devices at 8,192 as well."""
    seen = []

    def fake_curve(model, sizes, *, context, **kwargs):
        seen.append(context)
        return CostCurve(tuple(sizes), tuple(1.0 for _ in sizes), context)

    monkeypatch.setattr(cost_module, "measure_cost_curve", fake_curve)
    monkeypatch.setattr(cost_module, "fill_cache", lambda *args, **kwargs: None)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=32768),
                            device=torch.device("cpu"), new_cache=lambda *a, **k: None)
    assert measure_cost_surface(model, (1, 2)).contexts == (512, 2048)
    model.device = torch.device("meta")
    assert measure_cost_surface(model, (1, 2)).contexts == (512, 2048, 8192)


LIVE_SURFACE = CostSurface((CostCurve((1, 2, 4, 8), (0.040, 0.048, 0.060, 0.080), 512),
                            CostCurve((1, 2, 4, 8), (0.050, 0.060, 0.075, 0.100), 2048)))


def test_live_costs_correct_each_seen_size_and_lend_it_to_unseen_ones():
    """The class docstring's example: 1-token passes at 0.95x the surface, 2-token passes at
    1.17x; sizes 3..8 were never seen and take size 2's factor; nothing changes before
    ``refresh`` records."""
    live = LiveCosts(LIVE_SURFACE, refresh=8, min_samples=4)
    for _ in range(4):
        live.record(1, 300, 0.038)
    for _ in range(3):
        live.record(2, 300, 0.048 * 1.17)
    assert live.factors == (1.0, 1.0, 1.0, 1.0)  # 7 records
    live.record(2, 300, 0.048 * 1.17)  # the 8th: refreshed
    assert live.factors == pytest.approx((61 / 64, 75 / 64, 75 / 64, 75 / 64))
    curve = live.at(300)
    assert curve.cost(1) == pytest.approx(0.040 * 61 / 64)
    assert curve.cost(2) == pytest.approx(0.048 * 75 / 64)
    assert curve.cost(8) == pytest.approx(0.080 * 75 / 64)
    # at a longer context the same factors apply to that context's curve
    assert live.at(1900).cost(4) == pytest.approx(LIVE_SURFACE.at(1900).cost(4) * 75 / 64)
    assert live.at(300) is curve  # memoized while the factors stand


def test_live_costs_keep_the_surface_until_a_size_has_enough_passes_and_ignore_a_spike():
    live = LiveCosts(LIVE_SURFACE, refresh=1, min_samples=4, window=16)
    for _ in range(3):
        live.record(4, 300, 0.120)
    assert live.factors == (1.0,) * 4 and live.at(300).cost(4) == pytest.approx(0.060)
    for _ in range(12):
        live.record(4, 300, 0.060)
    live.record(4, 300, 0.600)  # one pass disturbed tenfold: the median does not move
    assert live.factors == (1.0,) * 4
    # sizes below the only seen one take its factor; larger trees never cost less
    live = LiveCosts(LIVE_SURFACE, refresh=1, min_samples=1)
    live.record(8, 300, 0.040)
    assert live.factors == (0.5,) * 4
    costs = [live.at(300).cost(n) for n in range(1, 9)]
    assert costs == sorted(costs) and costs[0] == pytest.approx(0.020)


def test_live_costs_count_a_size_toward_the_next_measured_one():
    live = LiveCosts(CostCurve((1, 8, 64), (1.0, 2.0, 8.0)), refresh=1, min_samples=1)
    live.record(1, 0, 1.0)
    live.record(5, 0, 2 * (1.0 + 4 / 7))  # 5 tokens: predicted 1.571, seen at twice that
    assert live.factors == pytest.approx((1.0, 2.0, 2.0))
    with pytest.raises(ValueError):
        LiveCosts(CURVE, window=2, min_samples=3)


def test_bench_step_cost_stores_a_surface_and_checks_it(tmp_path, monkeypatch, capsys):
    """``--store`` then ``--check`` on a tiny checkpoint: the check reads the stored surface,
    times the check's sizes at its context and says whether it holds; without a stored
    surface it is a one-line error."""
    from cli_helpers import load_script, save_tiny_llama

    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cost_module, "_checked", {})
    folder = save_tiny_llama(tmp_path / "tiny")
    script = load_script("bench_step_cost")
    common = ["--model-path", str(folder), "--dtype", "float32", "--device", "cpu"]
    assert script.main(common + ["--check"]) == 2
    assert "no cost surface is stored" in capsys.readouterr().err
    assert script.main(common + ["--contexts", "48", "--sizes", "1", "2", "4", "8",
                                 "--repeats", "2", "--store"]) == 0
    stored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert script.main(common + ["--check"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    checked = json.loads(out[-1])
    assert checked["context"] == 48 and checked["sizes"] == [1, 2, 4, 8]
    assert checked["seconds"][0] == pytest.approx(stored["ms"][0][0] / 1e3, rel=1e-3)
    assert checked["stored"] == pytest.approx(stored["relative"][0][1:], rel=1e-2)
    assert all(v >= 1.0 for v in checked["measured"]) and checked["seconds"][1] > 0
    assert checked["holds"] == (checked["deviation"] <= cost_module.CHECK_TOLERANCE)
    assert out[-2].startswith(f"deviation {100 * checked['deviation']:.1f}%")


# ------------------------------------------------------------------ float32 wide passes


def test_float32_from_settings_parse_and_reject():
    assert cost_module.parse_float32_from("auto") == "auto"
    assert cost_module.parse_float32_from(" OFF ") is None
    assert cost_module.parse_float32_from(None) is None
    assert cost_module.parse_float32_from("16") == 16
    for bad in ("0", "-4", "x", "1.5", ""):
        with pytest.raises(ValueError, match="float32_from must be"):
            cost_module.parse_float32_from(bad)


def fake_pass_times(model, sizes, **kwargs):
    """Half-precision passes cost 10 per token, float32 passes 60 plus 1 per token."""
    sizes = sorted(set(sizes) | {1})
    wide = model.float32_from is not None
    return CostCurve(tuple(sizes), tuple((60.0 + n) if wide else 10.0 * n for n in sizes), 128)


def test_measure_float32_from_keeps_the_first_size_that_pays(monkeypatch):
    model = tiny_model().to(torch.bfloat16)
    monkeypatch.setattr(cost_module, "measure_cost_curve", fake_pass_times)
    # 8 tokens: 68 against 80 (0.85, pays); 4 tokens: 64 against 40
    assert cost_module.measure_float32_from(model, (4, 8, 16)) == 8
    assert cost_module.measure_float32_from(model, (2, 4)) is None
    assert model.float32_from is None  # measured, not applied


def test_float32_from_auto_measures_once_per_machine_and_applies(monkeypatch, tmp_path):
    calls = []

    def measured(model, *args, **kwargs):
        calls.append(model.dtype)
        return 12

    monkeypatch.setattr(cost_module, "measure_float32_from", measured)
    model = tiny_model()
    assert cost_module.float32_from_for(model, "m", cache_root=tmp_path) is None  # float32
    half = model.to(torch.bfloat16)
    assert cost_module.float32_from_for(half, "m", cache_root=tmp_path) == 12
    assert half.float32_from == 12 and calls == [torch.bfloat16]
    half.set_float32_from(None)
    assert cost_module.float32_from_for(half, "m", "auto", cache_root=tmp_path) == 12
    assert len(calls) == 1  # read back, not measured again
    assert cost_module.float32_from_for(half, "m", "off", cache_root=tmp_path) is None
    assert half.float32_from is None
    assert cost_module.float32_from_for(half, "m", 32, cache_root=tmp_path) == 32
    monkeypatch.setattr(cost_module, "_copy_fits", lambda model: False)
    assert cost_module.float32_from_for(half, "other", cache_root=tmp_path) is None
    assert len(calls) == 1 and half.float32_from is None


def test_a_surface_is_stored_per_float32_setting():
    """A surface measured with wide passes in float32 prices other passes than one without."""
    model = tiny_model().to(torch.bfloat16)
    plain = cost_module._surface_key(model, "m")
    model.set_float32_from(16)
    assert cost_module._surface_key(model, "m") != plain
    model.set_float32_from(None)
    assert cost_module._surface_key(model, "m") == plain


def test_float32_copies_only_where_memory_allows(monkeypatch):
    model = tiny_model().to(torch.bfloat16)
    copy_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert cost_module._available_memory() > 0  # /proc/meminfo or sysconf on this system
    monkeypatch.setattr(cost_module, "_available_memory", lambda: 2 * copy_bytes)
    assert cost_module._copy_fits(model)
    monkeypatch.setattr(cost_module, "_available_memory", lambda: 2 * copy_bytes - 1)
    assert not cost_module._copy_fits(model)
