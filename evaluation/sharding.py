"""Sharding a run's questions over Ray workers (``--num-workers``, ``--num-gpus-total``).

Policies:

- Workers: ``EvalConfig.worker_count`` Ray actors (:class:`AnswerWorker`). Each loads the
  model once (:func:`evaluation.eval_loop.build_context`) and runs its own warm-up before its
  first answer. CPU workers split the cluster's CPUs evenly and use
  ``max(1, CPUs // workers)`` torch threads each; GPU workers reserve
  ``--num-gpus-per-model`` GPUs each (Ray sets their ``CUDA_VISIBLE_DEVICES``) and run the
  model on the first. The driver's ``LOGITSPEC_*`` environment variables (the model cache,
  the test hooks) are set in every worker.
- Ray: a connection this process already has is used as it is; otherwise ``--ray-address``
  is connected to, or a local Ray is started (``address="local"``) and stopped at the end.
- Dispatch: questions go out in question order, one at a time to each idle worker; answers
  are yielded as they complete (the loop appends each at once; the answer file is put in
  question order at the end of the run, see :mod:`evaluation.answer_file`).
- Faults: a worker that dies (its process killed, out of memory) loses only the question it
  was answering. That question goes back to the head of the queue, at most ``--max-retries``
  times, then becomes an error entry; the dead worker is replaced by a new one, which loads
  the model and warms up. A question that exhausts the device's memory is an error entry
  and its worker goes on (as in one process); a device-side CUDA error makes the question's
  error entry and the worker is replaced (its CUDA context is unusable). A worker that dies or fails while loading the model stops the run
  (the others would fail the same way); so does an exception raised by the answering code,
  as it would in one process.
- Test hooks: ``LOGITSPEC_TEST_KILL_ON_QUESTION=<id>`` makes the worker handed that question
  exit at once (``os._exit``); with ``LOGITSPEC_TEST_KILL_MARKER=<file>`` only while that file
  does not exist (the dying worker creates it), so once. ``LOGITSPEC_TEST_FAULT_ON_QUESTION=
  <id>:oom,<id>:device`` makes answering those questions raise a CUDA out-of-memory error or
  a device-side error, in whichever worker gets them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm import tqdm

from .args import EvalConfig, RunConfig
from .eval_loop import (
    DeviceContextLost, EvalContext, RunError, answer_question, build_context, error_entry,
    first_line, warm_up,
)
from .questions import Question

KILL_ON_ENV = "LOGITSPEC_TEST_KILL_ON_QUESTION"
KILL_MARKER_ENV = "LOGITSPEC_TEST_KILL_MARKER"
FAULT_ON_ENV = "LOGITSPEC_TEST_FAULT_ON_QUESTION"
FORWARDED_ENV_PREFIX = "LOGITSPEC_"
KILL_EXIT_CODE = 9


@dataclass(frozen=True)
class WorkerPlan:
    """What each of ``count`` workers reserves; ``threads``: torch threads (None: default)."""

    count: int
    num_cpus: float
    num_gpus: int
    threads: int | None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def plan_workers(settings: EvalConfig, resources: Mapping[str, float]) -> WorkerPlan:
    """Splits the cluster's ``resources`` (Ray's ``cluster_resources()``) among the workers.

    Example: 2 CPUs, ``--num-workers 2`` -> 1 CPU and 1 torch thread each; 16 CPUs, 8 GPUs,
    ``--num-gpus-total 8 --num-gpus-per-model 2`` -> 4 workers of 4 CPUs and 2 GPUs.
    """
    count = settings.worker_count
    cpus = float(resources.get("CPU", 0.0))
    if not settings.resolved_device.startswith("cuda"):
        return WorkerPlan(count, cpus / count, 0, max(1, int(cpus) // count))
    need, have = count * settings.num_gpus_per_model, int(resources.get("GPU", 0))
    if need > have:
        raise RunError(f"{count} workers of {settings.num_gpus_per_model} GPU(s) need {need} "
                       f"GPUs, the Ray cluster has {have}")
    return WorkerPlan(count, cpus / count, settings.num_gpus_per_model, None)


def _kill_hook(question: Question) -> None:
    """The test hook of the module docstring."""
    if os.environ.get(KILL_ON_ENV) != question.key:
        return
    marker = os.environ.get(KILL_MARKER_ENV)
    if marker:
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    os._exit(KILL_EXIT_CODE)


class AnswerWorker:
    """A worker's state, the body of a Ray actor: the context :meth:`start` builds."""

    def __init__(self, config: RunConfig, env: Mapping[str, str], threads: int | None) -> None:
        os.environ.update(env)
        if threads is not None:
            torch.set_num_threads(threads)
        self.config = config
        self.ctx: EvalContext | None = None

    def start(self, questions: Sequence[Question]) -> dict[str, Any]:
        """Loads the model and warms up: ``{"meta": ...}``, or ``{"error": message}``."""
        try:
            self.ctx = build_context(self.config)
        except RunError as exc:
            return {"error": str(exc)}
        warm_up(self.ctx, questions, self.config.settings.warmup)
        return {"meta": self.ctx.meta}

    def answer(self, question: Question) -> tuple[dict[str, Any], bool]:
        """The answer line, and whether this worker can go on (False after a device-side
        error: the driver replaces it)."""
        if self.ctx is None:
            raise RuntimeError("answer() before start()")
        _kill_hook(question)
        ctx = self.ctx
        faults = dict(item.partition(":")[::2] for item in os.environ.get(FAULT_ON_ENV, "").split(","))
        if question.key in faults:
            ctx = replace(ctx, generator=_FaultyGenerator(faults[question.key]))
        try:
            return answer_question(ctx, question), True
        except DeviceContextLost as lost:
            return lost.entry, False


class _FaultyGenerator:
    """The fault test hook of the module docstring: generating raises a CUDA error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def reset(self, keep_prefix: bool = False) -> None:
        pass

    def generate(self, prompt_ids: Sequence[int], config: Any) -> Any:
        if self.kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (injected by a test hook)")
        raise torch.AcceleratorError("CUDA error: device-side assert triggered (test hook)")


@dataclass(frozen=True)
class _Job:
    """A call in flight: a worker's start (``question`` None) or an answer."""

    slot: int
    question: Question | None = None
    attempt: int = 0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RunError("sharding needs Ray: pip install 'logitspec[ray]'") from None
    return ray


def connect(ray: Any, address: str | None) -> bool:
    """Connects to Ray (module docstring); returns whether this call did, so must shut down."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RunError(f"cannot connect to Ray at {address!r}: {first_line(exc)}") from None
    return True


class ShardedAnswerer:
    """Answers questions with Ray workers (module docstring); an ``Answerer`` of the loop."""

    def __init__(self, config: RunConfig, questions: Sequence[Question], prog: str) -> None:
        self.config = config
        self.questions = list(questions)
        self.prog = prog
        self.ray = _import_ray()
        self.pending: deque[tuple[Question, int]] = deque((q, 0) for q in self.questions)
        self.jobs: dict[Any, _Job] = {}
        self.workers: list[Any] = []
        self.idle: deque[int] = deque()
        self.meta: dict[str, Any] | None = None
        self.plan: WorkerPlan | None = None
        self._owns_ray = False
        self._actor = self.ray.remote(AnswerWorker)
        self._env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
        self._warmup_ref: Any = None  # the questions in Ray's object store, for the warm-ups
        exceptions = self.ray.exceptions
        self._died = (exceptions.RayActorError, exceptions.WorkerCrashedError,
                      exceptions.OutOfMemoryError)

    def start(self) -> dict[str, Any]:
        """Starts every worker; returns the ``meta`` of the first one ready."""
        self._owns_ray = connect(self.ray, self.config.settings.ray_address)
        self.plan = plan_workers(self.config.settings, self.ray.cluster_resources())
        self._warmup_ref = self.ray.put(self.questions)
        self.workers = [None] * self.plan.count
        for slot in range(self.plan.count):
            self._spawn(slot)
        while self.meta is None:
            ref = self._next_done()
            self._started(self.jobs.pop(ref), ref)
        return self.meta

    def answers(self) -> Iterator[dict[str, Any]]:
        while self.pending or any(job.question is not None for job in self.jobs.values()):
            self._dispatch()
            ref = self._next_done()
            job = self.jobs.pop(ref)
            if job.question is None:
                self._started(job, ref)
                continue
            line = self._answered(job, ref)
            if line is not None:
                yield line

    def close(self) -> None:
        for handle in self.workers:
            if handle is not None:
                self.ray.kill(handle)
        self.workers = []
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False

    def _spawn(self, slot: int) -> None:
        options: dict[str, Any] = {"num_cpus": self.plan.num_cpus, "num_gpus": self.plan.num_gpus}
        handle = self._actor.options(**options).remote(self.config, self._env, self.plan.threads)
        self.workers[slot] = handle
        self.jobs[handle.start.remote(self._warmup_ref)] = _Job(slot)

    def _next_done(self) -> Any:
        ready, _ = self.ray.wait(list(self.jobs), num_returns=1)
        return ready[0]

    def _dispatch(self) -> None:
        while self.idle and self.pending:
            slot = self.idle.popleft()
            question, attempt = self.pending.popleft()
            self.jobs[self.workers[slot].answer.remote(question)] = _Job(slot, question, attempt)

    def _started(self, job: _Job, ref: Any) -> None:
        try:
            result = self.ray.get(ref)
        except self._died as exc:
            raise RunError(
                f"worker {job.slot} died while loading the model: {first_line(exc)}") from None
        if "error" in result:
            raise RunError(result["error"])
        self.meta = self.meta or result["meta"]
        self.idle.append(job.slot)

    def _answered(self, job: _Job, ref: Any) -> dict[str, Any] | None:
        """The answer line, or None when the question went back to the queue."""
        try:
            line, usable = self.ray.get(ref)
        except self._died as exc:
            self._spawn(job.slot)
            return self._retry_or_fail(job, first_line(exc))
        if usable:
            self.idle.append(job.slot)
        else:
            tqdm.write(f"{self.prog}: question {job.question.question_id}: {line['error']}; "
                       f"replacing worker {job.slot}", file=sys.stderr)
            self.ray.kill(self.workers[job.slot])
            self._spawn(job.slot)
        return line

    def _retry_or_fail(self, job: _Job, reason: str) -> dict[str, Any] | None:
        question, attempts = job.question, job.attempt + 1
        limit = self.config.settings.max_retries + 1
        if attempts < limit:
            self.pending.appendleft((question, attempts))
            tqdm.write(f"{self.prog}: question {question.question_id}: its worker died "
                       f"({reason}); retrying ({attempts} of {limit} attempts made)",
                       file=sys.stderr)
            return None
        return error_entry(question, self.config.model_id, self.meta or {},
                           f"WorkerDiedError: its worker died on each of {attempts} attempts "
                           f"(last: {reason})")
