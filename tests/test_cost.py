"""The verification cost curve: interpolation, measurement and its cache."""

from __future__ import annotations

import pytest
import torch

from logitspec import cost as cost_module
from logitspec.config import ModelConfig
from logitspec.cost import CostCurve, cost_curve_for, measure_cost_curve, store_cost_curve
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


def test_cached_per_model_key_and_dtype(tmp_path, monkeypatch):
    calls = []

    def fake_measure(model, *args, **kwargs):
        calls.append(model.dtype)
        return CostCurve((1, 8), (0.01, 0.02 if model.dtype == torch.float32 else 0.015))

    monkeypatch.setattr(cost_module, "measure_cost_curve", fake_measure)
    model = tiny_model()
    first = cost_curve_for(model, "m", cache_root=tmp_path)
    again = cost_curve_for(model, "m", cache_root=tmp_path)
    assert first == again and len(calls) == 1
    cost_curve_for(model, "other", cache_root=tmp_path)
    cost_curve_for(model.to(torch.bfloat16), "m", cache_root=tmp_path)
    assert len(calls) == 3
    cost_curve_for(model, "m", cache_root=tmp_path, refresh=True)
    assert len(calls) == 4


def test_store_replaces_the_cached_curve(tmp_path):
    model = tiny_model()
    stored = CostCurve((1, 4), (0.5, 0.75))
    store_cost_curve(model, "m", stored, cache_root=tmp_path)
    assert cost_curve_for(model, "m", cache_root=tmp_path) == stored
