"""Forward cost of N new tokens over a cache, relative to N = 1, for one model/dtype/device.

    python scripts/bench_step_cost.py [--model-path P] [--dtype bfloat16] [--device cpu]
        [--context 512] [--sizes 1 2 4 8 16 32 64 128] [--repeats 5]

Prints a table; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from logitspec.cost import DEFAULT_SIZES, measure_cost_curve
from logitspec.loading import DTYPES, ModelLoadError, load


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="HF folder, GGUF file or default name")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the step")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.context < 1 or args.repeats < 1 or min(args.sizes) < 1:
        parser.error("--context, --repeats and --sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lm = load(args.model_path, dtype=args.dtype, device=args.device)
    except ModelLoadError as exc:
        print(f"bench_step_cost.py: error: {exc}", file=sys.stderr)
        return 2
    curve = measure_cost_curve(lm.model, args.sizes, context=args.context, repeats=args.repeats)
    print(f"{lm.name} {args.dtype} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {args.context} cached tokens")
    print(f"{'N':>5} {'ms':>9} {'x N=1':>7}")
    for n, sec in zip(curve.sizes, curve.seconds):
        print(f"{n:>5} {sec * 1e3:>9.2f} {curve.relative(n):>7.2f}")
    print(json.dumps({
        "model": lm.name, "dtype": args.dtype, "device": args.device, "context": args.context,
        "threads": torch.get_num_threads(), "sizes": list(curve.sizes),
        "ms": [round(s * 1e3, 3) for s in curve.seconds],
        "relative": [round(curve.relative(n), 3) for n in curve.sizes],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
