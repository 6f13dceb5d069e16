"""scripts/disturbance_check.py: the planted load and the figures it reports (the end-to-end
run needs a quiet machine and minutes; it is not run here)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from cli_helpers import load_script

check = load_script("disturbance_check")


class FakeLoad:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.started = threading.Event()

    def start(self) -> None:
        self.events.append("start")
        self.started.set()

    def stop(self) -> None:
        self.events.append("stop")


def test_only_the_first_answer_of_the_pair_is_disturbed() -> None:
    load = FakeLoad()

    def answer_question(ctx, question):
        if not load.events:  # the first answer of the pair: the timer fires while it runs
            load.started.wait(10 if (ctx.meta["params"]["spec"], question.key) == ("vanilla", "7")
                              else 0.05)
        return {"question_id": question.key}

    wrapped = check.disturbing(answer_question, "vanilla", "7", 0.0, load)

    def ask(spec: str, key: str) -> dict:
        return wrapped(SimpleNamespace(meta={"params": {"spec": spec}}), SimpleNamespace(key=key))

    ask("pld:21", "7")
    ask("vanilla", "6")
    assert load.events == []
    assert ask("vanilla", "7") == {"question_id": "7"}
    assert load.events == ["start", "stop"]
    ask("vanilla", "7")  # the re-run of the pair: not disturbed
    assert load.events == ["start", "stop"]


def test_busy_load_starts_once_and_never_after_stop() -> None:
    load = check.BusyLoad()
    load.start()
    assert len(load.processes) == len(load.cores) >= 1
    assert all(p.poll() is None for p in load.processes)
    load.start()
    assert len(load.processes) == len(load.cores)
    load.stop()
    assert all(p.returncode is not None for p in load.processes)
    late = check.BusyLoad()
    late.stop()
    late.start()  # the timer fired after the answer was done
    assert late.processes == [] and not late.started


def test_speedups_before_and_after_the_reruns() -> None:
    undisturbed = {"rows": {"overall": {"vanilla": {"speedup": 1.0}, "pld": {"speedup": 2.0}}}}
    disturbed = {"rows": {"overall": {"vanilla": {"speedup": 1.0}, "pld": {"speedup": 2.06}}},
                 "before_rerun": {"vanilla": {"speedup": 1.0}, "pld": {"speedup": 2.8}}}
    table = check.speedups(undisturbed, disturbed)
    assert table["pld"] == {"disturbed": 2.8, "after_rerun": 2.06, "undisturbed": 2.0,
                            "gap": pytest.approx(0.03)}
    no_rerun = dict(disturbed, before_rerun=None)
    assert check.speedups(undisturbed, no_rerun)["pld"]["disturbed"] == 2.06


def test_the_outcome_lines(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = {"question": "7", "method": "vanilla", "delay_s": 1.5, "load_started": True,
               "flagged": True, "found": [{}], "within_5_percent": False,
               "speedups": {"pld": {"disturbed": 2.8, "after_rerun": 2.06, "undisturbed": 2.0,
                                    "gap": 0.03}},
               "undisturbed_found": [{"method": "pld", "question": "3", "ratio": 1.45}]}
    check.print_outcome(outcome, 2)
    out = capsys.readouterr().out
    assert "vanilla on question 7, 2 busy loops from 1.50 s" in out and "flagged: yes" in out
    assert "2.80x" in out and "+3.0%" in out and "within 5% of the undisturbed run's: no" in out
    assert "not quiet: pld on 3 (1.45x)" in out
