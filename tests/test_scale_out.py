"""Sharded runs over Ray workers, crashes and the answer file's integrity.

One local Ray (2 CPUs) serves the module; the in-process runs find it initialized and use it.
A tiny random Llama with a byte-level tokenizer keeps every run to seconds; PLD is the method,
as its drafts depend on the current question only, so any worker gives the same answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from cli_helpers import DEMO, ROOT, read_lines, run_cli, save_tiny_llama, write_questions
from evaluation import inference_baseline, inference_pld
from evaluation.answer_file import AnswerFileLock
from evaluation.args import EvalConfig
from evaluation.eval_loop import TEST_EXIT_AFTER_ENV, RunError
from evaluation.sharding import (
    FAULT_ON_ENV, KILL_MARKER_ENV, KILL_ON_ENV, WorkerPlan, plan_workers,
)

# Ray is installed with the test environment (scripts/setup_env.sh), so its absence fails the
# module; LOGITSPEC_NO_RAY=1 skips it where Ray cannot be installed.
if os.environ.get("LOGITSPEC_NO_RAY"):
    pytest.skip("LOGITSPEC_NO_RAY is set: the sharding tests need Ray", allow_module_level=True)
import ray  # noqa: E402

Capsys = pytest.CaptureFixture[str]
QUESTION_END = 12  # demo questions 1-12: 9-12 do not fit the tiny model's context


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def pld_argv(tiny: Path, answers: Path, *flags: str) -> list[str]:
    return ["--model-path", str(tiny), "--question-file", str(DEMO), "--question-end",
            str(QUESTION_END), "--max-new-tokens", "24", "--answer-file", str(answers), *flags]


def outputs(path: Path) -> list[tuple[Any, ...]]:
    """What must not depend on who answered: per line the id, error, and per choice the
    texts, token counts and accept lengths."""
    return [
        (line["question_id"], line.get("error"),
         [(c["turns"], c["new_tokens"], c["accept_lengths"]) for c in line["choices"]])
        for line in read_lines(path)
    ]


@pytest.fixture(scope="module")
def single(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process answers every sharded run is compared with."""
    path = tmp_path_factory.mktemp("single") / "answers.jsonl"
    assert run_cli(inference_pld, pld_argv(tiny, path)) == 3  # 9-12 are error entries
    return path


def summary(capsys: Capsys) -> dict[str, Any]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("workers, cpus, plan", [
    (1, 2, WorkerPlan(1, 2.0, 0, 2)),
    (2, 2, WorkerPlan(2, 1.0, 0, 1)),
    (4, 2, WorkerPlan(4, 0.5, 0, 1)),  # more workers than cores: one thread each
    (3, 16, WorkerPlan(3, 16 / 3, 0, 5)),
])
def test_cpu_workers_split_the_cores(workers: int, cpus: int, plan: WorkerPlan) -> None:
    settings = EvalConfig(device="cpu", num_workers=workers)
    assert plan_workers(settings, {"CPU": float(cpus)}) == plan


def test_gpu_workers_need_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EvalConfig, "resolved_device", property(lambda self: "cuda"))
    settings = EvalConfig(num_gpus_total=8, num_gpus_per_model=2, ray_address="auto")
    assert plan_workers(settings, {"CPU": 16.0, "GPU": 8.0}) == WorkerPlan(4, 4.0, 2, None)
    with pytest.raises(RunError, match="4 workers of 2 GPU\\(s\\) need 8 GPUs, the Ray "
                       "cluster has 4"):
        plan_workers(settings, {"CPU": 16.0, "GPU": 4.0})


def test_sharded_answers_equal_single_process(tiny: Path, single: Path, tmp_path: Path,
                                              capsys: Capsys) -> None:
    sharded = tmp_path / "answers.jsonl"
    assert run_cli(inference_pld, pld_argv(tiny, sharded, "--num-workers", "2")) == 3
    assert summary(capsys)["failed"] == ["9", "10", "11", "12"]
    assert outputs(sharded) == outputs(single)
    assert [line["question_id"] for line in read_lines(sharded)] == list(range(1, 13))
    meta = read_lines(sharded)[0]["meta"]
    moment = ("hardware", "threads", "load_average", "peak_memory_bytes")  # not the settings
    assert {k: v for k, v in meta.items() if k not in moment} == {
        k: v for k, v in read_lines(single)[0]["meta"].items() if k not in moment}
    assert not (tmp_path / "answers.jsonl.lock").exists()


def test_a_killed_worker_loses_only_its_question(
    tiny: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    monkeypatch.setenv(KILL_ON_ENV, "3")
    monkeypatch.setenv(KILL_MARKER_ENV, str(tmp_path / "killed-once"))
    answers = tmp_path / "answers.jsonl"
    assert run_cli(inference_pld, pld_argv(tiny, answers, "--num-workers", "2")) == 3
    err = capsys.readouterr().err
    assert "question 3: its worker died" in err and "retrying (1 of 3 attempts made)" in err
    assert (tmp_path / "killed-once").exists()
    assert outputs(answers) == outputs(single)  # complete, in order, no duplicates


def test_retries_exhausted_make_an_error_entry_then_a_rerun_answers(
    tiny: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    monkeypatch.setenv(KILL_ON_ENV, "2")  # no marker: every worker handed question 2 dies
    answers = tmp_path / "answers.jsonl"
    argv = pld_argv(tiny, answers, "--num-workers", "2", "--max-retries", "1",
                    "--question-end", "4")
    assert run_cli(inference_pld, argv) == 3
    assert summary(capsys)["failed"] == ["2"]
    lines = read_lines(answers)
    assert [line["question_id"] for line in lines] == [1, 2, 3, 4]
    assert lines[1]["choices"] == [] and lines[1]["error"].startswith(
        "WorkerDiedError: its worker died on each of 2 attempts")
    monkeypatch.delenv(KILL_ON_ENV)
    assert run_cli(inference_pld, argv) == 0  # the re-run retries it, the file stays ordered
    assert outputs(answers) == outputs(single)[:4]


def test_device_faults_in_workers(
    tiny: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    """Out of memory on question 2: its error entry, the worker goes on. A device-side error
    on question 5: its error entry, the worker is replaced. Everything else as in one
    process; a re-run answers both."""
    monkeypatch.setenv(FAULT_ON_ENV, "2:oom,5:device")
    answers = tmp_path / "answers.jsonl"
    argv = pld_argv(tiny, answers, "--num-workers", "2", "--question-end", "6")
    assert run_cli(inference_pld, argv) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["failed"] == ["2", "5"]
    assert "question 5: DeviceError: CUDA error: device-side assert triggered (test hook); " \
        "replacing worker" in captured.err
    lines = read_lines(answers)
    assert lines[1]["error"] == "OutOfMemoryError: CUDA out of memory (injected by a test hook)"
    assert lines[4]["error"].startswith("DeviceError: CUDA error: device-side assert")
    assert [o for i, o in enumerate(outputs(answers)) if i not in (1, 4)] == [
        o for i, o in enumerate(outputs(single)[:6]) if i not in (1, 4)]
    monkeypatch.delenv(FAULT_ON_ENV)
    assert run_cli(inference_pld, argv) == 0
    assert outputs(answers) == outputs(single)[:6]


def test_corrupted_last_line_is_repaired(tiny: Path, single: Path, tmp_path: Path,
                                         capsys: Capsys) -> None:
    answers = tmp_path / "answers.jsonl"
    kept = b"".join(single.read_bytes().splitlines(keepends=True)[:5])
    answers.write_bytes(kept + b'{"question_id": 6, "category": "math", "choi')
    assert run_cli(inference_pld, pld_argv(tiny, answers, "--num-workers", "2")) == 3
    assert "removed an incomplete last line" in capsys.readouterr().err
    assert answers.read_bytes().startswith(kept)
    assert outputs(answers) == outputs(single)


def test_a_second_writer_is_refused(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    answers = tmp_path / "answers.jsonl"
    with AnswerFileLock(answers):
        assert run_cli(inference_pld, pld_argv(tiny, answers, "--question-end", "1")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"inference_pld: error: {answers} is being written by another run "
                       f"(process {os.getpid()}): wait for it to end or pass another "
                       "--answer-file"]
        assert not answers.exists()
    assert run_cli(inference_pld, pld_argv(tiny, answers, "--question-end", "1")) == 0
    assert not (tmp_path / "answers.jsonl.lock").exists()


def start(command: str, argv: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"evaluation.{command}", *argv], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"{count} lines never appeared: {proc.communicate()[1][-2000:]}")


def test_sigkill_then_rerun(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """A single-process run killed mid-run; the same command again completes the file."""
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question_id": i, "category": "qa", "turns": [f"Count to {i}."]} for i in range(30)
    ])
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(tiny), "--question-file", str(questions), "--max-new-tokens",
            "128", "--answer-file", str(answers), "--warmup", "0"]
    proc = start("inference_baseline", argv)
    wait_for_lines(answers, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    data = answers.read_bytes()
    before = data[: data.rfind(b"\n") + 1]  # a last line cut mid-write is repaired away
    assert 3 <= before.count(b"\n") < 30
    assert run_cli(inference_baseline, argv) == 0
    after = answers.read_bytes()
    assert after.startswith(before)
    assert [line["question_id"] for line in read_lines(answers)] == list(range(30))


def test_killed_driver_then_rerun_on_an_existing_cluster(
    tiny: Path, single: Path, tmp_path: Path, capsys: Capsys
) -> None:
    """A sharded driver dies after 3 answers (connected with --ray-address); the re-run
    answers the rest and leaves the file in question order."""
    answers = tmp_path / "answers.jsonl"
    address = ray.get_runtime_context().gcs_address
    proc = start("inference_pld", pld_argv(tiny, answers, "--ray-address", address),
                 **{TEST_EXIT_AFTER_ENV: "3"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err[-2000:]
    first = answers.read_bytes().splitlines(keepends=True)
    assert len(first) == 3
    assert run_cli(inference_pld, pld_argv(tiny, answers, "--num-workers", "2")) == 3
    assert set(first) <= set(answers.read_bytes().splitlines(keepends=True))
    assert outputs(answers) == outputs(single)
