"""The cost of verification: how long a forward pass of N tree tokens takes, measured, and
how that grows with the context.

A tree of N tokens over C cached tokens costs ``cost(N)`` of the curve at C; on a GPU
``cost(64)`` is close to ``cost(1)``, on a CPU it is several times more, and on both the
attention over the cache makes every step dearer as C grows. Drafters that size their trees by
this surface stay profitable on both.

:func:`measure_cost_surface` times forward passes of N tokens (with a tree mask) over caches
of a few context lengths (:data:`DEFAULT_CONTEXTS`, those the model's context allows; on the
CPU only the first two, as filling an 8,192-token cache there takes minutes, and the curve is
extrapolated along them);
:class:`CostSurface` interpolates between them. :class:`LiveCosts` corrects a surface by the
verification times a decoder really sees (the fastest of a few isolated passes is not what a
step costs once its inputs, its read-back and the rest of the loop are around it).
:func:`cost_surface_for` caches the result per model, dtype, device and torch version (plus,
on the CPU, its model name, the instruction set torch dispatches to and the thread count, as a
cache directory may outlive the machine it was measured on; none of them changes a CUDA
measurement) as JSON in the cache directory, and measures it on first use (or when
``refresh`` is set). A stored surface is checked once per process before it is used
(:func:`check_cost_surface`: a few small trees timed again at its shortest context) and
measured again when it no longer describes the machine: the same CPU model in another machine
state (another host, other load, other firmware) can price a second token quite differently.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .kv_cache import KVCache
from .model import Transformer
from .runtime import cpu_name
from .timing import synchronize

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_CONTEXTS = (512, 2048, 8192)
CPU_CONTEXTS = DEFAULT_CONTEXTS[:2]
CONTEXT_BUCKET = 256
FORMAT = "surface-1"  # part of the cache key: files of another format are not read
CHECK_SIZES = (1, 2, 4, 8)
CHECK_TOLERANCE = 0.15
FLOAT32_SIZES = (8, 12, 16, 64)  # pass sizes tried in float32 (the first that pays is kept)
FLOAT32_GAIN = 0.9  # ... when it takes at most this share of the half-precision time

log = logging.getLogger(__name__)


def rising(seconds: Iterable[float]) -> tuple[float, ...]:
    """``seconds`` made non-decreasing (a larger tree never costs less): each the largest so
    far."""
    return tuple(itertools.accumulate(seconds, max))


@dataclass(frozen=True)
class CostCurve:
    """Seconds per verify forward of ``sizes[i]`` tokens; piecewise-linear in between and
    linear extrapolation past the last size."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    context: int = 512
    device: str = "cpu"
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds), "context": self.context,
                "device": self.device}

    def cost_table(self, n: int) -> tuple[float, ...]:
        """``cost(0), cost(1), ..., cost(n)`` (made once per curve and ``n``)."""
        table = self._tables.get(n)
        if table is None:
            table = self._tables[n] = tuple(self.cost(i) for i in range(n + 1))
        return table

    def relative(self, n: int) -> float:
        return self.cost(n) / self.seconds[0]

    def table(self, sizes: Sequence[int]) -> list[float]:
        """The relative cost at each of ``sizes``."""
        return [self.relative(n) for n in sizes]

    def at(self, context: int) -> "CostCurve":
        """This curve: one measured context stands for all (as :meth:`CostSurface.at`)."""
        return self


@torch.inference_mode()
def measure_cost_curve(
    model: Transformer,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    context: int = 512,
    repeats: int = 7,
    warmup: int = 2,
    cache: KVCache | None = None,
) -> CostCurve:
    """Times one forward pass of N random tokens (a causal tree mask) over ``context`` cached
    tokens, for each N in ``sizes``: round after round, each round one pass of every size (the
    first ``warmup`` rounds untimed), keeping per size the fastest of its ``repeats`` (a burst
    of interference only ever adds time, and in rounds it slows one pass of each size rather
    than every pass of one), then made non-decreasing in N (a larger tree never costs less).
    ``cache``: one to reuse (its committed tokens are kept and topped up to ``context`` with
    random ones)."""
    sizes = sorted(set(int(n) for n in sizes) | {1})
    device = model.device
    gen = torch.Generator().manual_seed(context)
    vocab = model.config.vocab_size
    if cache is None:
        cache = model.new_cache(context + max(sizes), mask_rows=max(sizes))
    fill_cache(model, cache, context, gen)
    inputs = []
    for n in sizes:
        tokens = torch.randint(vocab, (n,), generator=gen).to(device)
        positions = torch.arange(context, context + n, device=device)
        inputs.append((tokens, positions, torch.ones(n, n, dtype=torch.bool).tril_().to(device)))
    best = [float("inf")] * len(sizes)
    for i in range(warmup + repeats):
        for j, (tokens, positions, mask) in enumerate(inputs):
            synchronize(device)
            start = time.perf_counter()
            model(tokens, positions, cache, mask)
            synchronize(device)
            if i >= warmup:
                best[j] = min(best[j], time.perf_counter() - start)
    return CostCurve(tuple(sizes), rising(best), context, str(device))


@torch.inference_mode()
def fill_cache(
    model: Transformer, cache: KVCache, context: int, gen: torch.Generator | None = None
) -> None:
    """Commits random tokens to ``cache`` until it holds ``context`` (cutting it when it holds
    more), a prefill chunk at a time."""
    from .decoding import PREFILL_CHUNK

    cache.truncate(min(cache.length, context))
    while cache.length < context:
        start, end = cache.length, min(cache.length + PREFILL_CHUNK, context)
        tokens = torch.randint(model.config.vocab_size, (end - start,), generator=gen)
        model.hidden(tokens.to(model.device), torch.arange(start, end, device=model.device), cache)
        cache.commit(end - start)


@dataclass(frozen=True)
class CostSurface:
    """Verify cost over tree size and context length: one :class:`CostCurve` per measured
    context (increasing contexts, the same sizes).

    :meth:`at` gives the curve at any context length: linear in the context between the two
    nearest measured curves, extrapolated along the last two past the longest (attention over
    the cache grows linearly with it), the first curve below the shortest. It is evaluated at
    the end of the context's bucket of ``bucket`` tokens and kept per bucket, so a drafter can
    ask at every step for the same curve object until the context crosses a bucket boundary::

        curve = surface.at(len(context))  # one dict lookup while in the same bucket
        cost = curve.cost(n)

    Example: curves at 512 (``cost(1) = 10 ms``) and 2048 (``14 ms``): ``at(1000).cost(1)`` is
    the value at 1024, ``10 + 4 * (1024 - 512) / 1536 = 11.33 ms``.

    ``cost(n)``, ``relative(n)`` and ``table(sizes)`` are those of the shortest context's
    curve: what a caller that does not follow the context gets.
    """

    curves: tuple[CostCurve, ...]
    bucket: int = CONTEXT_BUCKET
    _memo: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.curves:
            raise ValueError("a cost surface needs at least one curve")
        contexts = [c.context for c in self.curves]
        if any(b <= a for a, b in zip(contexts, contexts[1:])):
            raise ValueError("cost surface contexts must increase")
        if any(c.sizes != self.curves[0].sizes for c in self.curves):
            raise ValueError("every curve of a cost surface needs the same sizes")
        if self.bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {self.bucket}")

    @property
    def contexts(self) -> tuple[int, ...]:
        return tuple(c.context for c in self.curves)

    def at(self, context: int) -> CostCurve:
        """The curve at ``context`` cached tokens (class docstring)."""
        key = max(context, 0) // self.bucket
        curve = self._memo.get(key)
        if curve is None:
            curve = self._memo[key] = self._interpolated((key + 1) * self.bucket)
        return curve

    def _interpolated(self, context: int) -> CostCurve:
        curves = self.curves
        if len(curves) == 1 or context <= curves[0].context:
            return curves[0]
        hi = min(bisect.bisect_left(self.contexts, context), len(curves) - 1)
        lo, up = curves[hi - 1], curves[hi]
        if context == up.context:
            return up
        weight = (context - lo.context) / (up.context - lo.context)
        seconds, floor = [], 0.0
        for a, b in zip(lo.seconds, up.seconds):
            value = a + weight * (b - a)
            floor = max(value, b, floor) if weight > 1 else max(value, floor)
            seconds.append(floor)  # a larger tree never costs less
        return CostCurve(up.sizes, tuple(seconds), context, up.device)

    def cost(self, n: int) -> float:
        return self.curves[0].cost(n)

    def relative(self, n: int) -> float:
        return self.curves[0].relative(n)

    def table(self, sizes: Sequence[int]) -> list[float]:
        return self.curves[0].table(sizes)

    def to_json(self) -> dict:
        return {"format": FORMAT, "bucket": self.bucket, "curves": [c.to_dict() for c in self.curves]}

    @classmethod
    def from_json(cls, data: dict) -> "CostSurface":
        curves = tuple(
            CostCurve(tuple(c["sizes"]), tuple(c["seconds"]), c["context"], c["device"])
            for c in data["curves"]
        )
        return cls(curves, data["bucket"])


class LiveCosts:
    """A cost surface (or curve) corrected by observed verification times.

    Every :meth:`record` compares a verification pass of ``n`` tokens with the surface's
    prediction at its context; per size of the surface (``n`` counts toward the first size
    ``>= n``) the median ratio of the last ``window`` passes is that size's factor, once it
    has ``min_samples`` of them. A size not yet seen takes the factor of the nearest seen
    size below it (above it when none is below; 1 when nothing was seen): a size that is
    never drafted keeps a plausible correction. :meth:`at` gives the corrected curve (the
    surface's seconds times the factors, made non-decreasing in ``n``). Factors change only
    every ``refresh`` records and are rounded to ``1 / 64``, so that the corrected curves and
    the cost tables made from them repeat (drafters memoize per table).

    Example: the surface says 40 ms for 1 token and 48 ms for 2; passes of 1 token take 38 ms
    and of 2 tokens 56 ms: factors 0.95 and 1.17 (rounded), corrected costs 38 and 56 ms, and
    every larger size takes 2 tokens' factor until it is seen itself.
    """

    def __init__(self, surface: "CostSurface | CostCurve", *, window: int = 16,
                 min_samples: int = 4, refresh: int = 16, resolution: float = 1 / 64) -> None:
        if window < 1 or not 1 <= min_samples <= window or refresh < 1 or resolution <= 0:
            raise ValueError("window >= min_samples >= 1, refresh >= 1 and resolution > 0 needed")
        self.surface = surface
        self.sizes = surface.curves[0].sizes if isinstance(surface, CostSurface) else surface.sizes
        self.min_samples = min_samples
        self.refresh = refresh
        self.resolution = resolution
        self._ratios = [deque(maxlen=window) for _ in self.sizes]
        self._factors = (1.0,) * len(self.sizes)
        self._pending = 0
        self._memo: dict[int, tuple[CostCurve, CostCurve]] = {}

    @property
    def factors(self) -> tuple[float, ...]:
        """The correction per size of :attr:`sizes` (1.0: the surface as measured)."""
        return self._factors

    def record(self, tokens: int, context: int, seconds: float) -> None:
        """A verification pass of ``tokens`` inputs over ``context`` cached tokens took
        ``seconds``."""
        predicted = self.surface.at(context).cost(tokens)
        if predicted <= 0 or not seconds > 0:
            return
        index = min(bisect.bisect_left(self.sizes, tokens), len(self.sizes) - 1)
        self._ratios[index].append(seconds / predicted)
        self._pending += 1
        if self._pending >= self.refresh:
            self._pending = 0
            self._refresh()

    def _refresh(self) -> None:
        measured = [statistics.median(r) if len(r) >= self.min_samples else None
                    for r in self._ratios]
        seen = [m for m in measured if m is not None]
        if not seen:
            return
        factors, last = [], seen[0]
        for ratio in measured:
            last = ratio if ratio is not None else last
            factors.append(max(round(last / self.resolution), 1) * self.resolution)
        if tuple(factors) != self._factors:
            self._factors = tuple(factors)
            self._memo.clear()

    def at(self, context: int) -> CostCurve:
        """The corrected curve at ``context`` (equal to the surface's while nothing was seen)."""
        curve = self.surface.at(context)
        memo = self._memo.get(id(curve))
        if memo is not None and memo[0] is curve:
            return memo[1]
        seconds = rising(curve.cost(size) * f for size, f in zip(curve.sizes, self._factors))
        corrected = CostCurve(curve.sizes, seconds, curve.context, curve.device)
        self._memo[id(curve)] = (curve, corrected)
        return corrected


def usable_contexts(model: Transformer, contexts: Sequence[int], largest_size: int) -> list[int]:
    """``contexts`` that leave room for ``largest_size`` new tokens in the model's context,
    plus that room's limit when some did not fit (so long contexts are still covered; at
    least 1). Example: contexts 512, 2048, 8192 and 128 new tokens on a 4,096-token model ->
    512, 2048, 3968."""
    limit = max(model.config.max_position_embeddings - largest_size, 1)
    kept = sorted({c for c in contexts if 1 <= c <= limit})
    if len(kept) < len(set(contexts)) and (not kept or kept[-1] < limit):
        kept.append(limit)
    return kept


@torch.inference_mode()
def measure_cost_surface(
    model: Transformer,
    sizes: Sequence[int] = DEFAULT_SIZES,
    contexts: Sequence[int] | None = None,
    *,
    repeats: int = 7,
    warmup: int = 2,
) -> CostSurface:
    """:func:`measure_cost_curve` at each of :func:`usable_contexts` (default:
    :data:`DEFAULT_CONTEXTS`, :data:`CPU_CONTEXTS` on the CPU), over one cache filled once in
    prefill-sized chunks up to each context in turn."""
    if contexts is None:
        contexts = CPU_CONTEXTS if model.device.type == "cpu" else DEFAULT_CONTEXTS
    sizes = sorted(set(int(n) for n in sizes) | {1})
    contexts = usable_contexts(model, contexts, sizes[-1])
    cache = model.new_cache(contexts[-1] + sizes[-1], mask_rows=sizes[-1])
    curves = [
        measure_cost_curve(model, sizes, context=c, repeats=repeats, warmup=warmup, cache=cache)
        for c in contexts
    ]
    return CostSurface(tuple(curves))


@dataclass(frozen=True)
class SurfaceCheck:
    """A stored surface against a few passes timed again (:func:`check_cost_surface`).

    ``stored`` and ``measured`` hold, for each size of ``sizes`` past the first (which is 1),
    its cost relative to one token, as the stored curve at ``context`` and the new passes give
    them; ``seconds`` is one token's time, stored and measured (shown, not judged: how fast a
    shared machine runs one pass drifts by more than a fifth within an hour, while relative
    costs decide the trees). ``deviation`` is the largest relative difference between the two;
    the surface ``holds`` while it is at most ``tolerance``.

    Example: 2 tokens stored at 1.23x one token and measured at 1.52x: deviation
    ``1.52 / 1.23 - 1 = 0.24``, which a 0.15 tolerance does not let hold.
    """

    context: int
    sizes: tuple[int, ...]
    stored: tuple[float, ...]
    measured: tuple[float, ...]
    seconds: tuple[float, float] = (0.0, 0.0)
    tolerance: float = CHECK_TOLERANCE

    @property
    def deviation(self) -> float:
        return max(abs(m / s - 1.0) for s, m in zip(self.stored, self.measured))

    @property
    def holds(self) -> bool:
        return self.deviation <= self.tolerance


def _relative(curve: CostCurve, sizes: Sequence[int]) -> tuple[float, ...]:
    return tuple(curve.relative(n) for n in sizes[1:])


@torch.inference_mode()
def check_cost_surface(
    model: Transformer,
    surface: CostSurface,
    sizes: Sequence[int] = CHECK_SIZES,
    *,
    tolerance: float = CHECK_TOLERANCE,
    repeats: int = 5,
    warmup: int = 1,
) -> SurfaceCheck:
    """Times passes of ``sizes`` tokens again over the surface's shortest context (in a cache
    laid out as :func:`measure_cost_surface` lays out its own) and compares their costs
    relative to one token with the surface's there (:class:`SurfaceCheck`). A first round that
    disagrees gets a second over the same cache, and each size keeps the faster of its two
    times (interference only ever adds time), so that one busy moment does not throw a good
    surface away. Costs one prefill of that context plus a few dozen small passes."""
    sizes = sorted(set(int(n) for n in sizes) | {1})
    if len(sizes) < 2:
        raise ValueError("a check needs a size above 1")
    stored = surface.curves[0]
    largest = max(stored.sizes[-1], sizes[-1])
    cache = model.new_cache(surface.curves[-1].context + largest, mask_rows=largest)
    fresh = measure_cost_curve(model, sizes, context=stored.context, repeats=repeats,
                               warmup=warmup, cache=cache)

    def judged(curve: CostCurve) -> SurfaceCheck:
        return SurfaceCheck(stored.context, tuple(sizes), _relative(stored, sizes),
                            _relative(curve, sizes), (stored.cost(1), curve.cost(1)), tolerance)

    check = judged(fresh)
    if check.holds:
        return check
    again = measure_cost_curve(model, sizes, context=stored.context, repeats=repeats,
                               warmup=warmup, cache=cache)
    best = rising(map(min, fresh.seconds, again.seconds))
    return judged(CostCurve(fresh.sizes, best, stored.context, fresh.device))


_checked: dict[Path, CostSurface] = {}  # stored surfaces this process has checked (or measured)


def cost_surface_for(
    model: Transformer,
    model_key: str,
    *,
    refresh: bool = False,
    check: bool = True,
    cache_root: Path | None = None,
) -> CostSurface:
    """The cached surface for this model/dtype/device (measured and stored when missing).
    With ``check`` a stored surface is first checked (:func:`check_cost_surface`, once per
    process and file) and measured again when it does not hold."""
    path = _surface_path(model, model_key, cache_root)
    surface = None if refresh else stored_cost_surface(model, model_key, cache_root=cache_root)
    if surface is not None:
        if not check or _checked.get(path) == surface:
            return surface
        result = check_cost_surface(model, surface)
        if result.holds:
            log.info("cost surface %s holds (deviation %.3f)", path.name, result.deviation)
            _checked[path] = surface
            return surface
        log.warning("cost surface %s is off by %.0f%% (sizes %s relative to one token: stored "
                    "%s, measured %s): measuring it again", path.name, 100 * result.deviation,
                    list(result.sizes[1:]), _rounded(result.stored), _rounded(result.measured))
    surface = measure_cost_surface(model)
    store_cost_surface(model, model_key, surface, cache_root=cache_root)
    _checked[path] = surface
    return surface


@torch.inference_mode()
def measure_float32_from(
    model: Transformer, sizes: Sequence[int] = FLOAT32_SIZES, *, repeats: int = 3
) -> int | None:
    """The smallest of ``sizes`` whose pass (over 128 cached tokens) takes at most
    :data:`FLOAT32_GAIN` of its half-precision time when run in float32 (see
    :mod:`logitspec.model`), or None when none does. Leaves the model without the copies."""
    sizes = sorted(set(sizes))
    cache = model.new_cache(128 + sizes[-1], mask_rows=sizes[-1])
    half = measure_cost_curve(model, sizes, context=128, repeats=repeats, warmup=1, cache=cache)
    model.set_float32_from(1)
    try:
        wide = measure_cost_curve(model, sizes, context=128, repeats=repeats, warmup=1,
                                  cache=cache)
    finally:
        model.set_float32_from(None)
    for n in sizes:
        if wide.cost(n) <= FLOAT32_GAIN * half.cost(n):
            return n
    return None


def parse_float32_from(value: str | int | None) -> str | int | None:
    """A ``--float32-from`` value: ``"auto"``, None (``"off"``) or a positive pass size."""
    text = "off" if value is None else str(value).strip().lower()
    if text in ("auto", "off"):
        return None if text == "off" else text
    rows = int(text) if text.isdigit() else 0
    if rows < 1:
        raise ValueError(f"float32_from must be 'auto', 'off' or a positive number of tokens, "
                         f"got {value!r}")
    return rows


def float32_from_for(
    model: Transformer,
    model_key: str,
    setting: str | int | None = "auto",
    *,
    cache_root: Path | None = None,
) -> int | None:
    """Sets and returns the pass size from which ``model`` runs in float32
    (:meth:`~logitspec.model.Transformer.set_float32_from`).

    ``setting``: ``"auto"`` (the default) measures it (:func:`measure_float32_from`) for a
    half-precision model on the CPU, when a float32 copy of its weights fits in half the
    available memory, and caches the answer like a cost surface; ``"off"`` or None: never; a
    number: from that many tokens. On CUDA and for float32 models ``"auto"`` is None:
    half-precision kernels are native there, or there is nothing to widen."""
    setting = parse_float32_from(setting)
    if setting != "auto":
        model.set_float32_from(setting)
        return setting
    if model.device.type != "cpu" or model.dtype == torch.float32 or not _copy_fits(model):
        model.set_float32_from(None)
        return None
    path = _surface_path(model, model_key, cache_root, kind="float32-from")
    if path.is_file():
        rows = json.loads(path.read_text())["float32_from"]
    else:
        rows = measure_float32_from(model)
        _write_json(path, {"float32_from": rows})
        log.info("float32 wide passes from %s tokens (measured)", rows)
    model.set_float32_from(rows)
    return rows


def _copy_fits(model: Transformer) -> bool:
    """Whether float32 copies of the weights take at most half the available memory."""
    weights = sum(p.numel() for p in model.parameters()) * 4
    return 2 * weights <= _available_memory()


def _available_memory() -> int:
    """Bytes the system can still give (``MemAvailable``: free memory plus the page cache it
    can drop), else the free pages; 0 when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.3g}") for v in values]


def stored_cost_surface(
    model: Transformer, model_key: str, *, cache_root: Path | None = None
) -> CostSurface | None:
    """The surface cached for this model/dtype/device, as stored (None when there is none)."""
    path = _surface_path(model, model_key, cache_root)
    return CostSurface.from_json(json.loads(path.read_text())) if path.is_file() else None


def store_cost_surface(
    model: Transformer, model_key: str, surface: CostSurface, *, cache_root: Path | None = None
) -> Path:
    """Makes ``surface`` the cached one for this model/dtype/device; returns the file."""
    path = _surface_path(model, model_key, cache_root)
    _write_json(path, surface.to_json())
    return path


def _write_json(path: Path, data: dict) -> None:
    """Writes ``data`` to ``path`` whole or not at all (a concurrent reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _surface_path(
    model: Transformer, model_key: str, cache_root: Path | None, kind: str = "surface"
) -> Path:
    from .loading import cache_dir

    name = _surface_key(model, model_key, kind)
    return (cache_root or cache_dir()) / "costs" / f"{name}.json"


def _surface_key(model: Transformer, model_key: str, kind: str = "surface") -> str:
    """A surface depends on which passes run in float32; the float32 decision does not."""
    device = model.device
    parts = [FORMAT, model_key, str(model.dtype), torch.__version__]
    if kind == "surface":
        if model.float32_from is not None:
            parts.append(f"float32-from-{model.float32_from}")
    else:
        parts.append(kind)
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    else:
        parts += ["cpu", cpu_name(), torch.backends.cpu.get_cpu_capability(),
                  str(torch.get_num_threads())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
