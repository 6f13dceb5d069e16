"""Host time per decoding step of each drafter, without the model: recorded greedy traces
replayed through the drafters and the decoding loop's own host-side code.

    python scripts/bench_host.py --trace results/traces-bf16.pt [--budgets 8 16 32 64]
        [--family NAME=SPEC ...] [--repeats 3] [--max-turns N]

A step's host work is what the decoding loop does on the host between two forward passes:
drafting (``drafter.draft``), the verification inputs (tokens, positions and the mask,
:func:`logitspec.decoding.verification_inputs`), acceptance (:func:`greedy_accept` and the
EOS / length cut), and the drafter's bookkeeping (``observe`` and ``extend``). The target's
predictions come from the trace (:mod:`simulate_drafters`), untimed. Families are drafter specs
of ``simulate_drafters.make_drafter`` with ``{n}`` standing for the budget; the defaults:

    pld         pld:{n}                                  prompt lookup, a chain of n - 1
    recycling   recycling:{n}                            Token Recycling, n-node template
    reference   logitspec:{n}                            LogitSpec, the public code's policy
    value       logitspec:{n},value,conts=3,rec=8,recd=6,suf,branches,suftok=32
                                                         the value tree at a fixed budget
    value-auto  logitspec:auto,max={n},conts=3,rec=8,recd=6,suf,branches,suftok=32
                                                         the automatic budget, at most n
    racer       racer:{n}                                RACER, n-node trees

The automatic budget reads a cost curve: ``--cost-curve`` (a JSON file as stored under
``~/.cache/logitspec/costs``), else a fixed bfloat16 CPU-like curve (:data:`CPU_LIKE`), so
that no model is loaded. Each family and budget replays the trace ``--repeats`` times with a
fresh drafter; the figures are the smallest p50 / p90 over the repeats (interference from
other processes only ever adds time). The last stdout line is one JSON object:
``{"pld": {"8": {"p50_us": .., "p90_us": .., "mean_us": .., "steps": ..}, ...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate_drafters import TurnTrace, load_traces, make_drafter, trace_outputs  # noqa: E402

from logitspec.acceptance import TargetOutput, greedy_accept  # noqa: E402
from logitspec.cost import CostCurve  # noqa: E402
from logitspec.decoding import _cut_path, verification_inputs  # noqa: E402
from logitspec.runtime import cpu_name  # noqa: E402

FAMILIES = {
    "pld": "pld:{n}",
    "recycling": "recycling:{n}",
    "reference": "logitspec:{n}",
    "value": "logitspec:{n},value,conts=3,rec=8,recd=6,suf,branches,suftok=32",
    "value-auto": "logitspec:auto,max={n},conts=3,rec=8,recd=6,suf,branches,suftok=32",
    "racer": "racer:{n}",
}
# Relative verification cost of N tokens, shaped like a 2-core CPU's in bfloat16 (seconds per
# forward of a 135M model); only the automatic budget reads it.
CPU_LIKE = CostCurve((1, 8, 16, 32, 64), (0.040, 0.044, 0.048, 0.056, 0.080))


def replay_host_times(drafter, traces: list[TurnTrace], eos: frozenset[int]) -> list[float]:
    """Seconds of host work per verified step over every turn of ``traces``."""
    times: list[float] = []
    for trace in traces:
        out, n = trace.output, len(trace.output)
        topk = trace.topk.numpy().astype(np.int64)
        drafter.begin(trace.prompt, 0)
        context = len(trace.prompt)
        i = 0
        while i < n - 1:
            room = trace.max_new_tokens - i - 1
            start = time.perf_counter()
            tree = drafter.draft(out[i], topk[i], room)
            verification_inputs(tree, context + i)
            middle = time.perf_counter()
            pred, rows = trace_outputs(tree, out, i, topk)
            resumed = time.perf_counter()
            path = _cut_path(tree, greedy_accept(tree.tokens, tree.parents, pred), eos, room)
            drafter.observe(tree, TargetOutput(None, rows))
            drafter.extend(out[i:i + len(path)], tree, path)
            times.append(middle - start + time.perf_counter() - resumed)
            i += len(path)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    us = np.asarray(times) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p90_us": float(np.percentile(us, 90)),
            "mean_us": float(us.mean()), "steps": len(times)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="a trace file of simulate_drafters.py record")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--family", action="append", default=[], metavar="NAME=SPEC",
                        help="a drafter family, e.g. pld={n} (default: the five above)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-turns", type=int, default=None, help="replay the first N turns")
    parser.add_argument("--cost-curve", default=None, help="a stored cost curve (JSON)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(b < 1 for b in args.budgets):
        parser.error("--repeats and --budgets must be >= 1")
    return args


def families(args: argparse.Namespace) -> dict[str, str]:
    if not args.family:
        return dict(FAMILIES)
    out = {}
    for item in args.family:
        name, sep, spec = item.partition("=")
        if not sep or not name or "{n}" not in spec:
            raise SystemExit(f"bench_host.py: error: --family wants NAME=SPEC with {{n}}, got {item!r}")
        out[name] = spec
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header, traces = load_traces(args.trace)
    traces = traces[: args.max_turns]
    curve = CPU_LIKE
    if args.cost_curve:
        data = json.loads(Path(args.cost_curve).read_text())
        curve = CostCurve(tuple(data["sizes"]), tuple(data["seconds"]), data["context"], data["device"])
    eos = frozenset(t.output[-1] for t in traces if len(t.output) < t.max_new_tokens)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for name, pattern in families(args).items():
        report[name] = {}
        for budget in args.budgets:
            runs = [summarize(replay_host_times(make_drafter(pattern.format(n=budget), curve),
                                                traces, eos)) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["p50_us"])
            best["p90_us"] = min(r["p90_us"] for r in runs)
            report[name][str(budget)] = best
            print(f"{name:<12} {budget:>3}  p50 {best['p50_us']:8.1f} us  p90 {best['p90_us']:8.1f} us"
                  f"  ({best['steps']} steps)", flush=True)
    print(f"(host: {cpu_name()}, python {platform.python_version()}, "
          f"trace {args.trace}: {len(traces)} turns, {header.get('model')} {header.get('dtype')})")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
