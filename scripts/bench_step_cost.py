"""Forward cost of N new tokens over a cache, relative to N = 1, for one model/dtype/device.

    python scripts/bench_step_cost.py [--model-path P | --random-shape llama-2-7b] [--dtype bfloat16]
        [--device cpu] [--context 512] [--sizes 1 2 4 8 16 32 64 128] [--repeats 7]

``--random-shape`` builds a model of a known architecture with random weights on the device:
the cost of a forward pass depends on the shapes, not on the values, so it gives the cost curve
of a checkpoint that is not at hand. Prints a table; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from logitspec.config import ModelConfig
from logitspec.cost import DEFAULT_SIZES, measure_cost_curve, store_cost_curve
from logitspec.loading import DTYPES, ModelLoadError, load, parse_dtype
from logitspec.model import Transformer

SHAPES = {
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                              max_position_embeddings=4096),
    "llama-2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                               num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                               max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=8192),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="HF folder, GGUF file or default name")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), default=None,
                        help="random weights in this architecture's shape instead of a checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the step")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--store", action="store_true",
                        help="store the curve as the one automatic tree budgets use for this "
                             "model, dtype and device (replacing the cached one)")
    args = parser.parse_args(argv)
    if args.context < 1 or args.repeats < 1 or min(args.sizes) < 1:
        parser.error("--context, --repeats and --sizes must be positive")
    return args


def build_model(args: argparse.Namespace) -> tuple[str, Transformer, str]:
    """The model, its display name and its cost-curve key."""
    if args.random_shape is None:
        lm = load(args.model_path, dtype=args.dtype, device=args.device)
        return lm.name, lm.model, str(lm.path)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(SHAPES[args.random_shape]).to(parse_dtype(args.dtype))
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    return f"random {args.random_shape}", model.eval().requires_grad_(False), ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        name, model, model_key = build_model(args)
    except ModelLoadError as exc:
        print(f"bench_step_cost.py: error: {exc}", file=sys.stderr)
        return 2
    curve = measure_cost_curve(model, args.sizes, context=args.context, repeats=args.repeats)
    if args.store:
        if args.random_shape is not None:
            print("bench_step_cost.py: error: --store needs a real model", file=sys.stderr)
            return 2
        store_cost_curve(model, model_key, curve)
    print(f"{name} {args.dtype} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {args.context} cached tokens")
    print(f"{'N':>5} {'ms':>9} {'x N=1':>7}")
    for n, sec in zip(curve.sizes, curve.seconds):
        print(f"{n:>5} {sec * 1e3:>9.2f} {curve.relative(n):>7.2f}")
    print(json.dumps({
        "model": name, "dtype": args.dtype, "device": args.device, "context": args.context,
        "threads": torch.get_num_threads(), "sizes": list(curve.sizes),
        "ms": [round(s * 1e3, 3) for s in curve.seconds],
        "relative": [round(curve.relative(n), 3) for n in curve.sizes],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
