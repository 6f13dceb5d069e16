"""Forward cost of N new tokens over caches of a few context lengths, relative to N = 1 at
the shortest, for one model/dtype/device.

    python scripts/bench_step_cost.py [--model-path P | --random-shape llama-2-7b] [--dtype bfloat16]
        [--device cpu] [--contexts 512 2048 8192] [--sizes 1 2 4 8 16 32 64 128] [--repeats 7]
    python scripts/bench_step_cost.py --check [--model-path P] [--dtype bfloat16]

``--random-shape`` builds a model of a known architecture with random weights, directly in the
dtype on the device (:func:`logitspec.loading.random_model`): the cost of a forward pass depends
on the shapes, not on the values, so it gives the cost surface of a checkpoint that is not at
hand. Contexts that leave no room for the largest size in the model's context are replaced by
the longest that does. Prints a table; the last stdout line is one JSON object.

``--check`` measures no surface: it times the few small trees that a decoder's automatic budget
checks a stored surface with (:func:`logitspec.cost.check_cost_surface`) and prints how far the
stored surface is from them, and whether a decoder would keep it or measure it again.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from logitspec.cost import (
    DEFAULT_SIZES,
    check_cost_surface,
    float32_from_for,
    measure_cost_surface,
    parse_float32_from,
    store_cost_surface,
    stored_cost_surface,
)
from logitspec.loading import DTYPES, RANDOM_SHAPES, ModelLoadError, load, parse_dtype, random_model
from logitspec.model import Transformer
from logitspec.runtime import cpu_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="HF folder, GGUF file or default name")
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                        help="random weights in this architecture's shape instead of a checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--float32-from", type=parse_float32_from, default="auto",
                        help="passes of at least N tokens in float32 against float32 copies of "
                             "half-precision weights: N, off, or auto (measured per machine, as "
                             "the inference commands do)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="cached tokens before the step, one curve each (default: 512 2048 "
                             "8192; 512 2048 on cpu)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--store", action="store_true",
                        help="store the curve as the one automatic tree budgets use for this "
                             "model, dtype and device (replacing the cached one)")
    parser.add_argument("--check", action="store_true",
                        help="check the stored surface against a few timed passes instead of "
                             "measuring one")
    args = parser.parse_args(argv)
    if args.check and (args.store or args.random_shape is not None):
        parser.error("--check reads the stored surface of a real model: no --store, no "
                     "--random-shape")
    if isinstance(args.float32_from, int) and args.dtype == "float32":
        parser.error("--float32-from widens half-precision passes; the dtype is float32")
    if min(args.contexts or [1]) < 1 or args.repeats < 1 or min(args.sizes) < 1:
        parser.error("--contexts, --repeats and --sizes must be positive")
    return args


def build_model(args: argparse.Namespace) -> tuple[str, Transformer, str]:
    """The model, its display name and its cost-curve key."""
    if args.random_shape is None:
        lm = load(args.model_path, dtype=args.dtype, device=args.device)
        return lm.name, lm.model, str(lm.path)
    model = random_model(RANDOM_SHAPES[args.random_shape], dtype=parse_dtype(args.dtype),
                         device=args.device)
    return f"random {args.random_shape}", model, ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        name, model, model_key = build_model(args)
    except ModelLoadError as exc:
        print(f"bench_step_cost.py: error: {exc}", file=sys.stderr)
        return 2
    float32_from_for(model, model_key or name, args.float32_from)
    if args.check:
        return check(name, model, model_key, args)
    surface = measure_cost_surface(model, args.sizes, args.contexts, repeats=args.repeats)
    if args.store:
        if args.random_shape is not None:
            print("bench_step_cost.py: error: --store needs a real model", file=sys.stderr)
            return 2
        store_cost_surface(model, model_key, surface)
    contexts = surface.contexts
    wide = "" if model.float32_from is None else f", float32 from {model.float32_from} tokens"
    print(f"{name} {args.dtype} on {args.device} ({where()}{wide}): ms per forward pass of N "
          f"tokens, (x N=1 at {contexts[0]} cached tokens)")
    print(f"{'N':>5}" + "".join(f"{f'ctx {c}':>20}" for c in contexts))
    base = surface.curves[0].seconds[0]
    for i, n in enumerate(surface.curves[0].sizes):
        cells = "".join(f"{c.seconds[i] * 1e3:>12.2f} ({c.seconds[i] / base:>5.2f})"
                        for c in surface.curves)
        print(f"{n:>5}{cells}")
    print(json.dumps({
        "model": name, "dtype": args.dtype, "device": args.device, "contexts": list(contexts),
        "float32_from": model.float32_from,
        "threads": torch.get_num_threads(), "sizes": list(surface.curves[0].sizes),
        "ms": [[round(s * 1e3, 3) for s in c.seconds] for c in surface.curves],
        "relative": [[round(s / base, 3) for s in c.seconds] for c in surface.curves],
    }))
    return 0


def where() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def check(name: str, model: Transformer, model_key: str, args: argparse.Namespace) -> int:
    surface = stored_cost_surface(model, model_key)
    if surface is None:
        print(f"bench_step_cost.py: error: no cost surface is stored for {name} {args.dtype} on "
              f"{args.device} here (run this script with --store, or any automatic budget)",
              file=sys.stderr)
        return 2
    result = check_cost_surface(model, surface)
    print(f"{name} {args.dtype} on {args.device} ({where()}): stored surface against passes "
          f"timed now at {result.context} cached tokens")
    print(f"{'N':>5}{'stored':>12}{'now':>12}")
    stored_ms, now_ms = (1e3 * v for v in result.seconds)
    print(f"{1:>5}{stored_ms:>10.2f}ms{now_ms:>10.2f}ms   (one token's time: shown, not judged)")
    for n, before, now in zip(result.sizes[1:], result.stored, result.measured):
        print(f"{n:>5}{before:>11.3f}x{now:>11.3f}x")
    verdict = "holds" if result.holds else "is off: a decoder would measure it again"
    deviation = round(result.deviation, 4)  # the line and the JSON show one number
    print(f"deviation {100 * deviation:.1f}% (tolerance {100 * result.tolerance:.0f}%): "
          f"the stored surface {verdict}")
    print(json.dumps({
        "model": name, "dtype": args.dtype, "device": args.device, "context": result.context,
        "sizes": list(result.sizes), "seconds": [round(v, 6) for v in result.seconds],
        "stored": [round(v, 4) for v in result.stored],
        "measured": [round(v, 4) for v in result.measured],
        "deviation": deviation, "holds": result.holds,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
