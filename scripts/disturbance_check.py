"""Disturbance detection end to end: a planted CPU-bound load, flagged and measured away.

    python scripts/disturbance_check.py --bench-name spec_bench --questions-per-category 2 \\
        --max-new-tokens 256 --methods vanilla pld:21 logitspec

Runs ``scripts/compare.py`` twice on the same questions, in this process:

1. undisturbed: the reference figures, and the time of every (question, method) pair;
2. disturbed, with ``--rerun-disturbed``: when ``--disturb-method`` starts its turn of
   ``--disturb-question`` (default: the middle question of the selection), a timer starts one
   busy-loop process per core this process may use (each pinned to its core) after half that
   pair's undisturbed time; they are stopped when the pair's answer is done. Only the first
   answer of the pair is disturbed, so its re-run is not.

Prints whether the disturbed run's report flagged the pair, and each method's overall speedup:
disturbed (before the re-runs), after the re-runs, and undisturbed, with the relative gap of
the last two; ``within_5_percent`` says whether every gap is at most 5%. The last stdout line
is one JSON object; the two runs' reports and answer files are in ``--out-dir``. The figures
mean something on a quiet machine only. Bad input is one line on stderr and exit code 2.
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
    """One CPU-bound process per core this process may use, each pinned to its core; started
    at most once (from a timer thread), never after :meth:`stop`."""

    def __init__(self) -> None:
        self.cores = sorted(os.sched_getaffinity(0))
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


def run(args: argparse.Namespace) -> int:
    if args.disturb_method not in args.methods:
        raise CheckError(f"--disturb-method {args.disturb_method} is not in --methods")
    argv = compare_argv(args)
    question = target_question(args, argv)
    out_dir = args.out_dir or ROOT / "results" / f"disturbance-check-{time.strftime('%Y%m%d-%H%M%S')}"
    undisturbed = run_compare(argv, out_dir / "undisturbed")
    delay = pair_time(undisturbed, args.disturb_method, question) / 2
    load = BusyLoad()
    original = compare.answer_question
    compare.answer_question = disturbing(original, args.disturb_method, question, delay, load)
    try:
        disturbed = run_compare([*argv, "--rerun-disturbed"], out_dir / "disturbed")
    finally:
        compare.answer_question = original
    found = disturbed["disturbance"]["found"]
    flagged = any(f["question"] == question and f["method"] == args.disturb_method for f in found)
    table = speedups(undisturbed, disturbed)
    gaps = [row["gap"] for row in table.values()]
    within = all(gap is not None and abs(gap) <= TOLERANCE for gap in gaps)
    print(f"disturbed: {args.disturb_method} on question {question}, a busy loop on "
          f"{len(load.cores)} cores from {delay:.2f} s into its turn"
          + ("" if load.started else " (its turn ended before the load started)"))
    print(f"flagged: {'yes' if flagged else 'no'} ({len(found)} disturbed measurements found)")
    print("\n".join(align(speedup_table(table))))
    print(f"every speedup after the re-runs within {100 * TOLERANCE:.0f}% of the undisturbed "
          f"run's: {'yes' if within else 'no'}")
    print(json.dumps({
        "question": question, "method": args.disturb_method, "delay_s": delay,
        "load_started": load.started, "flagged": flagged, "found": found,
        "reruns": disturbed["reruns"], "speedups": table, "within_5_percent": within,
        "runs": {"undisturbed": undisturbed["out_dir"], "disturbed": disturbed["out_dir"]},
    }, allow_nan=False))
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
