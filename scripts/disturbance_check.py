"""Disturbance detection end to end: a planted CPU-bound load, flagged and measured away.

    python scripts/disturbance_check.py --bench-name spec_bench --questions-per-category 2 \\
        --max-new-tokens 256 --methods vanilla pld:21 logitspec

Runs ``scripts/compare.py`` twice on the same questions, in this process:

1. undisturbed: the reference figures, and the time of every (question, method) pair;
2. disturbed, with ``--rerun-disturbed``: when ``--disturb-method`` starts its turn of
   ``--disturb-question`` (default: the middle question of the selection), a timer starts
   ``--busy-per-core`` busy-loop processes (default 1) on each core this process may use
   (pinned to it) after half that pair's undisturbed time; they are stopped when the pair's
   answer is done. Only the first answer of the pair is disturbed, so its re-run is not.

Prints whether the disturbed run's report flagged the pair, and each method's overall speedup:
disturbed (before the re-runs), after the re-runs, and undisturbed, with the relative gap of
the last two; ``within_5_percent`` says whether every gap is at most 5%. A warning says when
the undisturbed run has disturbed measurements of its own (the machine was not quiet). The
last stdout line is one JSON object; the two runs' reports and answer files are in
``--out-dir``. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import compare  # noqa: E402
from evaluation.args import OneLineParser  # noqa: E402
from evaluation.speed import align, load_answers  # noqa: E402

PROG = "disturbance_check.py"
TOLERANCE = 0.05
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
FORWARDED = ("model_path", "dtype", "device", "bench_name", "question_file", "question_begin",
             "question_end", "questions_per_category", "max_new_tokens", "warmup")


class CheckError(Exception):
    """Bad input: one line on stderr, exit code 2."""


class BusyLoad:
    """``per_core`` CPU-bound processes on each core this process may use, pinned to it;
    started at most once (from a timer thread), never after :meth:`stop`."""

    def __init__(self, per_core: int = 1) -> None:
        self.cores = sorted(os.sched_getaffinity(0)) * per_core
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started = False
        self.stopped = False
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            if self.stopped or self.started:
                return
            self.started = True
            self.processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)])
                              for core in self.cores]

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for process in self.processes:
                process.terminate()
            for process in self.processes:
                process.wait()


def disturbing(answer_question: Callable[..., dict[str, Any]], method: str, question: str,
               delay: float, load: BusyLoad) -> Callable[..., dict[str, Any]]:
    """``answer_question`` that, the first time ``method`` answers ``question``, starts
    ``load`` after ``delay`` seconds and stops it when the answer is done."""
    done = False

    def answer(ctx: Any, q: Any) -> dict[str, Any]:
        nonlocal done
        if done or q.key != question or ctx.meta["params"]["spec"] != method:
            return answer_question(ctx, q)
        done = True
        timer = threading.Timer(delay, load.start)
        timer.start()
        try:
            return answer_question(ctx, q)
        finally:
            timer.cancel()
            load.stop()

    return answer


def run_compare(argv: list[str], out_dir: Path) -> dict[str, Any]:
    """``compare.main`` with its stdout kept in ``out_dir/stdout.txt``; its JSON line."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = compare.main([*argv, "--out-dir", str(out_dir)])
    (out_dir / "stdout.txt").write_text(stdout.getvalue())
    if code not in (0, compare.EXIT_QUESTIONS_FAILED):
        raise CheckError(f"compare.py exited with {code} (its message is above)")
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


def pair_time(result: dict[str, Any], method: str, question: str) -> float:
    """The undisturbed run's wall time of ``method`` on ``question``."""
    record = load_answers(result["answer_files"][method]).by_key().get(question)
    if record is None or record.error is not None:
        raise CheckError(f"question {question} has no answer by {method} in the undisturbed run")
    return sum(sum(c.wall_time) for c in record.choices)


def speedups(undisturbed: dict[str, Any], disturbed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: the overall speedup disturbed, after the re-runs and undisturbed."""
    before = disturbed["before_rerun"] or disturbed["rows"]["overall"]
    table = {}
    for label, figures in undisturbed["rows"]["overall"].items():
        after, reference = disturbed["rows"]["overall"][label]["speedup"], figures["speedup"]
        table[label] = {
            "disturbed": before[label]["speedup"], "after_rerun": after, "undisturbed": reference,
            "gap": None if after is None or not reference else after / reference - 1.0,
        }
    return table


def speedup_table(table: dict[str, dict[str, Any]]) -> list[list[str]]:
    def fmt(value: float | None, spec: str, suffix: str) -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    header = ["method", "disturbed", "after re-runs", "undisturbed", "gap"]
    return [header, *([label, fmt(row["disturbed"], ".2f", "x"), fmt(row["after_rerun"], ".2f", "x"),
                       fmt(row["undisturbed"], ".2f", "x"),
                       fmt(None if row["gap"] is None else 100 * row["gap"], "+.1f", "%")]
                      for label, row in table.items())]


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("Runs ")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", nargs="+", default=["vanilla", "pld:21", "logitspec"],
        help="compare.py method specs (default: %(default)s)")
    add("--disturb-method", default="vanilla", help="the method whose turn is disturbed")
    add("--disturb-question", default=None,
        help="the question id whose turn is disturbed (default: the middle one selected)")
    add("--busy-per-core", type=int, default=1,
        help="busy-loop processes per core (more: a load that stands out on a busy machine)")
    add("--model-path", default=None)
    add("--dtype", default="bfloat16")
    add("--device", default="cpu")
    add("--bench-name", default="spec_bench")
    add("--question-file", default=None)
    add("--question-begin", type=int, default=None)
    add("--question-end", type=int, default=None)
    add("--questions-per-category", type=int, default=2)
    add("--max-new-tokens", type=int, default=256)
    add("--warmup", type=int, default=1)
    add("--out-dir", type=Path, default=None,
        help="default: results/disturbance-check-<timestamp>/")
    return parser


def compare_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--methods", *args.methods]
    for name in FORWARDED:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def target_question(args: argparse.Namespace, argv: list[str]) -> str:
    """``--disturb-question``, checked against the selection, or the middle one selected."""
    settings = compare.eval_config(compare.build_parser().parse_args(argv))
    keys = [q.key for q in compare.select(settings)]
    if args.disturb_question is None:
        return keys[len(keys) // 2]
    if args.disturb_question not in keys:
        raise CheckError(f"--disturb-question {args.disturb_question} is not among the selected "
                         f"questions ({', '.join(keys)})")
    return args.disturb_question


def run_disturbed(argv: list[str], out_dir: Path, method: str, question: str, delay: float,
                  load: BusyLoad) -> dict[str, Any]:
    """The disturbed run, with ``--rerun-disturbed``: ``compare.answer_question`` disturbs the
    pair for the length of this call."""
    original = compare.answer_question
    compare.answer_question = disturbing(original, method, question, delay, load)
    try:
        return run_compare([*argv, "--rerun-disturbed"], out_dir)
    finally:
        compare.answer_question = original


def print_outcome(outcome: dict[str, Any], busy_loops: int) -> None:
    """The human-readable lines before the JSON one."""
    print(f"disturbed: {outcome['method']} on question {outcome['question']}, {busy_loops} busy "
          f"loops from {outcome['delay_s']:.2f} s into its turn"
          + ("" if outcome["load_started"] else " (its turn ended before the load started)"))
    print(f"flagged: {'yes' if outcome['flagged'] else 'no'} ({len(outcome['found'])} disturbed "
          "measurements found)")
    print("\n".join(align(speedup_table(outcome["speedups"]))))
    print(f"every speedup after the re-runs within {100 * TOLERANCE:.0f}% of the undisturbed "
          f"run's: {'yes' if outcome['within_5_percent'] else 'no'}")
    if outcome["undisturbed_found"]:
        pairs = ", ".join(f"{f['method']} on {f['question']} ({f['ratio']:.2f}x)"
                          for f in outcome["undisturbed_found"])
        print("warning: the undisturbed run has disturbed measurements of its own, so the "
              f"machine was not quiet: {pairs}")


def run(args: argparse.Namespace) -> int:
    if args.disturb_method not in args.methods:
        raise CheckError(f"--disturb-method {args.disturb_method} is not in --methods")
    if args.busy_per_core < 1:
        raise CheckError(f"--busy-per-core must be at least 1, got {args.busy_per_core}")
    argv = compare_argv(args)
    question = target_question(args, argv)
    out_dir = args.out_dir or ROOT / "results" / f"disturbance-check-{time.strftime('%Y%m%d-%H%M%S')}"
    undisturbed = run_compare(argv, out_dir / "undisturbed")
    delay = pair_time(undisturbed, args.disturb_method, question) / 2
    load = BusyLoad(args.busy_per_core)
    disturbed = run_disturbed(argv, out_dir / "disturbed", args.disturb_method, question, delay,
                              load)
    found = disturbed["disturbance"]["found"]
    table = speedups(undisturbed, disturbed)
    outcome = {
        "question": question, "method": args.disturb_method, "delay_s": delay,
        "load_started": load.started,
        "flagged": any(f["question"] == question and f["method"] == args.disturb_method
                       for f in found),
        "found": found, "reruns": disturbed["reruns"], "speedups": table,
        "within_5_percent": all(row["gap"] is not None and abs(row["gap"]) <= TOLERANCE
                                for row in table.values()),
        "undisturbed_found": undisturbed["disturbance"]["found"],
        "runs": {"undisturbed": undisturbed["out_dir"], "disturbed": disturbed["out_dir"]},
    }
    print_outcome(outcome, len(load.cores))
    print(json.dumps(outcome, allow_nan=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckError, compare.CompareError, compare.QuestionFileError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
