"""The cost of verification: how long a forward pass of N tree tokens takes, measured.

A tree of N tokens costs ``cost(N)``; on a GPU ``cost(64)`` is close to ``cost(1)``, on a CPU it
is several times more. Drafters that size their trees by this curve stay profitable on both.

:func:`measure_cost_curve` times forward passes of N tokens (with a tree mask) over a cache of
``context`` tokens; :func:`cost_curve_for` caches the result per model, dtype, device, torch
version and thread count as JSON in the cache directory, and measures it on first use (or when
``refresh`` is set).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .model import Transformer
from .timing import synchronize

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class CostCurve:
    """Seconds per verify forward of ``sizes[i]`` tokens; piecewise-linear in between and
    linear extrapolation past the last size."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    context: int = 512
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds) or self.sizes[0] != 1:
            raise ValueError("a cost curve needs seconds for sizes starting at 1")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError("cost curve sizes must increase")

    def cost(self, n: int) -> float:
        """Seconds for a forward pass of ``n`` tokens."""
        sizes, secs = self.sizes, self.seconds
        if n <= 1 or len(sizes) == 1:
            return secs[0]
        hi = min(bisect.bisect_left(sizes, n), len(sizes) - 1)  # sizes[hi - 1] < n <= sizes[hi]
        lo = hi - 1
        slope = (secs[hi] - secs[lo]) / (sizes[hi] - sizes[lo])
        return max(secs[lo] + slope * (n - sizes[lo]), secs[0])

    def relative(self, n: int) -> float:
        return self.cost(n) / self.seconds[0]

    def table(self, sizes: Sequence[int]) -> list[float]:
        """The relative cost at each of ``sizes``."""
        return [self.relative(n) for n in sizes]


@torch.inference_mode()
def measure_cost_curve(
    model: Transformer,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    context: int = 512,
    repeats: int = 7,
    warmup: int = 2,
) -> CostCurve:
    """Times one forward pass of N random tokens (a causal tree mask) over ``context`` cached
    tokens, for each N in ``sizes``: the fastest of ``repeats`` runs (interference only ever
    adds time), then made non-decreasing in N (a larger tree never costs less)."""
    sizes = sorted(set(int(n) for n in sizes) | {1})
    device = model.device
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = model.new_cache(context + max(sizes), mask_rows=max(sizes))
    prefix = torch.randint(vocab, (context,), generator=gen).to(device)
    model.hidden(prefix, torch.arange(context, device=device), cache)
    cache.commit(context)
    seconds = []
    for n in sizes:
        tokens = torch.randint(vocab, (n,), generator=gen).to(device)
        positions = torch.arange(context, context + n, device=device)
        mask = torch.ones(n, n, dtype=torch.bool).tril_().to(device)
        runs = []
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            model(tokens, positions, cache, mask)
            synchronize(device)
            if i >= warmup:
                runs.append(time.perf_counter() - start)
        seconds.append(max(min(runs), seconds[-1] if seconds else 0.0))
    return CostCurve(tuple(sizes), tuple(seconds), context, str(device))


def cost_curve_for(
    model: Transformer, model_key: str, *, refresh: bool = False, cache_root: Path | None = None
) -> CostCurve:
    """The cached curve for this model/dtype/device (measured and stored when missing)."""
    path = _curve_path(model, model_key, cache_root)
    if path.is_file() and not refresh:
        data = json.loads(path.read_text())
        return CostCurve(tuple(data["sizes"]), tuple(data["seconds"]), data["context"], data["device"])
    curve = measure_cost_curve(model)
    store_cost_curve(model, model_key, curve, cache_root=cache_root)
    return curve


def store_cost_curve(
    model: Transformer, model_key: str, curve: CostCurve, *, cache_root: Path | None = None
) -> Path:
    """Makes ``curve`` the cached one for this model/dtype/device; returns the file."""
    path = _curve_path(model, model_key, cache_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(curve)))
    tmp.replace(path)
    return path


def _curve_path(model: Transformer, model_key: str, cache_root: Path | None) -> Path:
    from .loading import cache_dir

    return (cache_root or cache_dir()) / "costs" / f"{_curve_key(model, model_key)}.json"


def _curve_key(model: Transformer, model_key: str) -> str:
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = [model_key, str(model.dtype), name, torch.__version__, str(torch.get_num_threads())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
