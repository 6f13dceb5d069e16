"""The evaluation loop every ``evaluation.inference_*`` command runs.

For each selected question not yet answered in the answer file, for each choice: reset the
method's generator, then answer the turns in order, the conversation growing as in FastChat.
Each question becomes one answer line (Spec-Bench/FastChat schema plus ``prompt_tokens``,
``cached_tokens``, ``draft_lengths``, ``time_breakdown`` and ``meta``; see data/README.md),
appended as soon as it is done.

Policies:

- Prefix cache: by default every question starts from nothing (Spec-Bench's protocol: each
  prompt is prefilled whole). With ``--prefix-cache 1`` the generator keeps the previous
  question's keys and values, and a question prefills only what follows the longest prefix its
  prompt shares with the previous question's conversation, as a serving engine's prefix cache
  does for questions about one document (one entry: the last conversation). A turn's
  ``cached_tokens`` says how many of its prompt tokens came from the cache (a follow-up turn's
  reuse counts too), and ``wall_time`` times only the rest. The warm-up never leaves a prefix
  behind (the generator is renewed after it).

- Timing: a turn's ``wall_time`` is the decoder's own (device synchronized,
  ``time.perf_counter``): that turn's prefill and decoding, not tokenization, templating,
  model loading or warm-up. Warm-up runs ``--warmup`` short generations (at most 32 new
  tokens) on the first question to answer whose first turn fits, before anything is timed,
  and discards them.
- Tokens: ``new_tokens`` counts the tokens the decoder emitted (up to and including an EOS),
  the same way for every method; the stored text is decoded without special tokens, stripped
  and, for FastChat templates, cut at the template's stop string.
- Failures: a question whose prompt does not fit the model's context or holds token ids
  outside its vocabulary, that ran out of device memory (the allocator's cache is emptied
  and the next question starts afresh), or whose Ray worker died on every try, becomes an
  error entry (one line on stderr) and the run goes on; the run then ends with exit code 3
  and a summary line. A device-side CUDA error (an assert, an illegal address) leaves the
  process's CUDA context unusable: the question gets its error entry, then a single-process
  run stops (exit code 2; running the same command again resumes in a fresh process), while
  a Ray worker is replaced by a fresh one and the run goes on. Everything else that stops a
  run (bad flags, question file, model, answer file) is one line on stderr and exit code 2,
  with nothing already written lost.
- Load: each line's ``meta`` also holds ``load_average``, the machine's 1-minute load average
  when the question started (``os.getloadavg``; null where the OS has none). It describes the
  moment, not the run: resume ignores it, as it ignores the hardware and library versions.
- Resume: see :mod:`evaluation.answer_file`. A file written with other settings (method,
  params, model, dtype, device, template, generation settings: :data:`RESUME_KEYS`) is refused
  rather than mixed.
  A run holds the answer file's lock throughout: a second run on the same file exits 2.
- Workers: by default this process answers the questions, in question order
  (:class:`LocalAnswerer`). With ``--num-workers`` or several GPUs, Ray workers do
  (:mod:`evaluation.sharding`, imported only then, as it needs Ray): answers are appended as
  they complete and the file is put in question-file order at the end. Either way the
  lines are the same apart from ``answer_id``, ``tstamp``, timings and ``meta.hardware``, for
  a method whose drafts depend on the current question only: a drafter that learns across
  questions sees another history in each worker, so its drafts and accept lengths may differ
  (its greedy float32 texts may not). :func:`build_context`, :func:`warm_up` and
  :func:`answer_question` are all a worker needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import shortuuid
import torch
from tqdm import tqdm

from logitspec.cost import float32_from_for
from logitspec.decoding import GenerationConfig, GenerationResult, PromptError
from logitspec.loading import LoadedModel, ModelLoadError, load
from logitspec.runtime import (
    cpu_name, is_device_error, peak_memory, release_memory, reset_peak_memory, runtime_meta,
)

from .answer_file import (
    AnswerFileError, AnswerFileLock, AnswerWriter, ExistingAnswers, drop_entries, read_answers,
    reorder_answers, repair_tail,
)
from .args import RunConfig, parse_args
from .methods import Method, TurnGenerator
from .prompts import PromptTemplate, resolve_template
from .questions import Question, QuestionFileError, load_questions, select_questions
from .speed import format_ids

EXIT_USAGE = 2
EXIT_QUESTIONS_FAILED = 3
WARMUP_MAX_NEW_TOKENS = 32
PHASES = ("prefill", "draft", "verify", "accept", "update")  # GenerationResult.times fields
TEST_EXIT_AFTER_ENV = "LOGITSPEC_TEST_EXIT_AFTER"  # tests: os._exit(9) after N answers
RESUME_KEYS = (
    "method", "params", "model_path", "dtype", "device", "template",
    "max_new_tokens", "temperature", "top_p", "top_k", "seed", "num_choices", "prefix_cache",
)


class RunError(Exception):
    """Stops the run: one line on stderr, exit code 2."""


class DeviceContextLost(Exception):
    """A device-side error while answering a question: ``entry`` is its error entry; the
    process's CUDA context is unusable from now on (:mod:`logitspec.runtime`)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__(entry["error"])
        self.entry = entry


@dataclass
class EvalContext:
    """Everything a worker needs to answer questions. ``make_generator`` builds the method's
    generator afresh (:meth:`renew_generator`)."""

    model_id: str
    loaded: LoadedModel
    generator: TurnGenerator
    template: PromptTemplate
    generation: GenerationConfig
    num_choices: int
    meta: dict[str, Any]
    make_generator: Callable[[], TurnGenerator] | None = None
    prefix_cache: bool = False  # a question starts from the previous one's cache

    def renew_generator(self) -> None:
        """Replaces the generator by a fresh one, which has learned nothing yet (a drafter's
        pool, suffix trees over earlier answers, successor table and acceptance statistics
        start empty): after the warm-up, whose answer the run will give again, and wherever a
        measurement must not meet text the method already answered (a repeated pass). The
        old generator, its cache included, is released before the new one is built."""
        if self.make_generator is None:
            return
        self.generator = None  # type: ignore[assignment]
        release_memory(self.loaded.model.device)
        self.generator = self.make_generator()


def build_context(run: RunConfig) -> EvalContext:
    """Loads the model and builds the method's generator (the one of the whole run)."""
    settings = run.settings
    try:
        loaded = load(settings.model_path, dtype=settings.resolved_dtype,
                      device=settings.resolved_device)
    except ModelLoadError as exc:
        raise RunError(str(exc)) from None
    except ValueError as exc:  # an unsupported architecture or an inconsistent config
        raise RunError(f"model {settings.model_location}: {exc}") from None
    float32_from_for(loaded.model, str(loaded.path), settings.resolved_float32_from)
    context = loaded.model.config.max_position_embeddings
    if settings.max_new_tokens >= context:
        raise RunError(f"max_new_tokens {settings.max_new_tokens} leaves no room for a prompt "
                       f"in the model's context of {context} tokens")
    template = resolve_template(loaded.tokenizer, settings.model_name, settings.template)
    eos = tuple(dict.fromkeys(loaded.eos_token_ids + template.stop_token_ids))
    make = partial(run.method.make_generator, loaded, run.params)
    return EvalContext(
        model_id=run.model_id,
        loaded=loaded,
        generator=make(),
        template=template,
        generation=settings.generation_config(eos),
        num_choices=settings.num_choices,
        meta=run_meta(run, template.name, loaded),
        make_generator=make,
        prefix_cache=bool(settings.prefix_cache),
    )


def run_meta(run: RunConfig, template_name: str, loaded: LoadedModel) -> dict[str, Any]:
    """The ``meta`` object of every answer line of this run (each line adds its own
    ``peak_memory_bytes``)."""
    import transformers

    e = run.settings
    device = str(torch.device(e.resolved_device))
    return {
        "method": run.method.name, "params": asdict(run.params),
        "model_path": e.model_location, "dtype": e.resolved_dtype, "device": device,
        "template": template_name, "max_new_tokens": e.max_new_tokens,
        "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k, "seed": e.seed,
        "num_choices": e.num_choices, "prefix_cache": bool(e.prefix_cache),
        "torch": torch.__version__,
        "transformers": transformers.__version__, "hardware": hardware_description(device),
        "threads": torch.get_num_threads(), **runtime_meta(loaded.model),
    }


def hardware_description(device: str) -> str:
    """``"<CPU model>, <N> threads"``, plus ``"; <GPU name>"`` on cuda."""
    text = f"{cpu_name()}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        text += f"; {torch.cuda.get_device_name(torch.device(device))}"
    return text


@dataclass
class ChoiceRecord:
    """One choice of an answer line, filled turn by turn (field names are the schema's)."""

    index: int
    turns: list[str] = field(default_factory=list)
    decoding_steps: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    time_breakdown: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    source_steps: list[int] | None = None  # per turn; only for a drafter with a gate

    def add(self, text: str, prompt_tokens: int, result: GenerationResult) -> None:
        self.turns.append(text)
        self.decoding_steps.append(result.decoding_steps)
        self.new_tokens.append(result.new_tokens)
        self.prompt_tokens.append(prompt_tokens)
        self.cached_tokens.append(result.cached_tokens)
        self.wall_time.append(result.wall_time)
        self.accept_lengths.extend(result.accept_lengths)
        self.draft_lengths.extend(result.draft_lengths)
        for phase in self.time_breakdown:
            self.time_breakdown[phase] += getattr(result.times, phase)
        if result.source_steps is not None:
            self.source_steps = (self.source_steps or []) + [result.source_steps]

    def as_dict(self) -> dict[str, Any]:
        """The choice's fields, ``source_steps`` only where a gate counted them."""
        fields = asdict(self)
        if self.source_steps is None:
            del fields["source_steps"]
        return fields


def answer_choice(ctx: EvalContext, question: Question, index: int) -> dict[str, Any]:
    """All turns of ``question`` as choice ``index`` (sampling seed: seed + index)."""
    config = replace(ctx.generation, seed=ctx.generation.seed + index)
    if ctx.prefix_cache:
        ctx.generator.reset(keep_prefix=True)
    else:
        ctx.generator.reset()
    conversation = ctx.template.start()
    record = ChoiceRecord(index)
    for user_turn in question.turns:
        conversation.add_user(user_turn)
        prompt_ids = conversation.prompt_ids()
        result = ctx.generator.generate(prompt_ids, config)
        text = conversation.answer_text(result.output_ids)
        conversation.add_answer(text)
        record.add(text, len(prompt_ids), result)
    return record.as_dict()


def answer_question(ctx: EvalContext, question: Question) -> dict[str, Any]:
    """The answer line of ``question``: its choices and the span's peak memory in ``meta``,
    or an error entry when it cannot be answered (a prompt the model cannot take, device
    memory exhausted). Raises :class:`DeviceContextLost` after a device-side error."""
    meta = {**ctx.meta, "load_average": load_average()}  # before the question's work
    device = ctx.loaded.model.device
    reset_peak_memory(device)
    try:
        choices = [answer_choice(ctx, question, i) for i in range(ctx.num_choices)]
    except PromptError as exc:
        return error_entry(question, ctx.model_id, ctx.meta, f"{type(exc).__name__}: {exc}")
    except torch.OutOfMemoryError as exc:
        error = f"OutOfMemoryError: {first_line(exc)}"
    except RuntimeError as exc:
        if not is_device_error(exc):
            raise
        entry = error_entry(question, ctx.model_id, ctx.meta, f"DeviceError: {first_line(exc)}")
        raise DeviceContextLost(entry) from None
    else:
        return {
            "question_id": question.question_id, "category": question.category,
            "answer_id": shortuuid.uuid(), "model_id": ctx.model_id, "tstamp": time.time(),
            "choices": choices, "meta": {**meta, "peak_memory_bytes": peak_memory(device)},
        }
    release_memory(device)  # here, once the exception and its frames are gone
    return error_entry(question, ctx.model_id, ctx.meta, error)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_average() -> float | None:
    """The machine's 1-minute load average now (runnable and waiting tasks), or None where
    the operating system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def error_entry(question: Question, model_id: str, meta: dict[str, Any],
                error: str) -> dict[str, Any]:
    """The answer line of a question that could not be answered (``error``: one line); its
    ``meta`` gets the load average of now."""
    return {
        "question_id": question.question_id, "category": question.category,
        "answer_id": shortuuid.uuid(), "model_id": model_id, "tstamp": time.time(),
        "choices": [], "error": " ".join(error.split()),
        "meta": {**meta, "load_average": load_average()},
    }


def warm_up(ctx: EvalContext, questions: Sequence[Question], count: int) -> None:
    """``count`` discarded short generations on the first question whose first turn fits;
    then the generator is renewed (:meth:`EvalContext.renew_generator`), so that no drafter
    meets the warm-up's answer again when that question is answered for real."""
    if count == 0:
        return
    config = replace(
        ctx.generation, max_new_tokens=min(WARMUP_MAX_NEW_TOKENS, ctx.generation.max_new_tokens)
    )
    for question in questions:
        prompt = first_prompt(ctx, question)
        try:
            for _ in range(count):
                ctx.generator.reset()
                ctx.generator.generate(prompt, config)
            break
        except PromptError:
            continue
        finally:
            ctx.generator.reset()
    ctx.renew_generator()


def prime_prefix(ctx: EvalContext, question: Question) -> None:
    """Leaves ``question``'s first prompt in a fresh generator's cache, untimed (one token
    generated and discarded), so that with ``prefix_cache`` the next question finds the prefix
    it would have found after ``question`` (a re-run's generator has answered nothing before).
    A prompt that does not fit leaves nothing."""
    try:
        ctx.generator.generate(first_prompt(ctx, question),
                               replace(ctx.generation, max_new_tokens=1))
    except PromptError:
        ctx.generator.reset()


def first_prompt(ctx: EvalContext, question: Question) -> list[int]:
    """The token ids of ``question``'s first turn, as the conversation's template renders it."""
    conversation = ctx.template.start()
    conversation.add_user(question.turns[0])
    return conversation.prompt_ids()


@dataclass
class Totals:
    """Running figures of this run's answers, for the progress bar and the summary."""

    tokens: int = 0
    wall_time: float = 0.0
    steps: int = 0
    failed: list[str] = field(default_factory=list)

    def add(self, line: dict[str, Any]) -> None:
        if "error" in line:
            self.failed.append(str(line["question_id"]))
        for choice in line["choices"]:
            self.tokens += sum(choice["new_tokens"])
            self.wall_time += sum(choice["wall_time"])
            self.steps += sum(choice["decoding_steps"])

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall_time if self.wall_time else None

    @property
    def mat(self) -> float | None:
        return self.tokens / self.steps if self.steps else None


class Answerer(Protocol):
    """Where a run's answers come from: this process or Ray workers."""

    def start(self) -> dict[str, Any]:
        """Loads the model and warms up; returns the ``meta`` of the run's answer lines."""

    def answers(self) -> Iterator[dict[str, Any]]:
        """One answer line per question, as each completes."""

    def close(self) -> None:
        """Releases what :meth:`start` took (always called)."""


class LocalAnswerer:
    """This process answers the questions in order, with one context for the whole run."""

    def __init__(self, config: RunConfig, questions: Sequence[Question]) -> None:
        self.config = config
        self.questions = questions
        self.ctx: EvalContext | None = None

    def start(self) -> dict[str, Any]:
        self.ctx = build_context(self.config)
        warm_up(self.ctx, self.questions, self.config.settings.warmup)
        return self.ctx.meta

    def answers(self) -> Iterator[dict[str, Any]]:
        for question in self.questions:
            try:
                yield answer_question(self.ctx, question)
            except DeviceContextLost as lost:
                yield lost.entry
                raise RunError(
                    f"question {question.question_id}: {lost.entry['error']}; the CUDA context "
                    "of this process is unusable: run the same command again to resume"
                ) from None

    def close(self) -> None:
        self.ctx = None


def _exit_after() -> int | None:
    value = os.environ.get(TEST_EXIT_AFTER_ENV)
    return int(value) if value else None


def answer_all(lines: Iterator[dict[str, Any]], total: int, writer: AnswerWriter,
               prog: str, model_id: str) -> Totals:
    """Appends each of ``total`` answer lines as soon as it comes."""
    totals = Totals()
    exit_after = _exit_after()
    bar = tqdm(total=total, desc=model_id, unit="q", file=sys.stderr, dynamic_ncols=True)
    try:
        for line in lines:
            writer.write(line)
            if writer.written == exit_after:
                os._exit(9)
            totals.add(line)
            if "error" in line:
                tqdm.write(f"{prog}: question {line['question_id']}: {line['error']}",
                           file=sys.stderr)
            bar.update()
            bar.set_postfix_str(_postfix(totals), refresh=False)
    finally:
        bar.close()  # before any error that stops the run is printed
    return totals


def _postfix(totals: Totals) -> str:
    rate, mat = totals.tokens_per_s, totals.mat
    return f"{rate or 0:.1f} tok/s, MAT {mat or 0:.2f}"


def check_resumable(existing: ExistingAnswers, meta: dict[str, Any], path: Path) -> None:
    """Refuses to append to a file whose ``meta`` differs in :data:`RESUME_KEYS`."""
    if existing.meta is None:
        return
    differ = [k for k in RESUME_KEYS if k in existing.meta and existing.meta[k] != meta.get(k)]
    if differ:
        details = ", ".join(f"{k} {existing.meta[k]!r} != {meta.get(k)!r}" for k in differ)
        raise RunError(
            f"{path} was written with other settings ({details}): pass another --answer-file"
        )


def _prepare_answer_file(path: Path, prog: str) -> ExistingAnswers:
    """Repairs a crash's partial last line (said on stderr) and reads what is answered."""
    try:
        repair = repair_tail(path)
    except OSError as exc:
        raise AnswerFileError(f"cannot write answer file {path}: {exc.strerror}") from None
    if repair.action == "cut":
        print(f"{prog}: {path}: removed an incomplete last line ({repair.bytes_removed} bytes)",
              file=sys.stderr)
    elif repair.action == "terminated":
        print(f"{prog}: {path}: added the missing newline after the last line", file=sys.stderr)
    return read_answers(path)


def _select(run: RunConfig) -> tuple[list[Question], dict[str, int]]:
    """The selected questions, and every question id's position in the file."""
    e = run.settings
    everything = load_questions(e.question_path)
    questions = select_questions(
        everything, e.question_begin, e.question_end, e.questions_per_category
    )
    if not questions:
        raise RunError(f"no questions selected from {e.question_path}")
    return questions, {q.key: i for i, q in enumerate(everything)}


def make_answerer(config: RunConfig, questions: Sequence[Question]) -> Answerer:
    if config.settings.sharding_flag is None:
        return LocalAnswerer(config, questions)
    from .sharding import ShardedAnswerer  # imports Ray

    return ShardedAnswerer(config, questions, config.method.prog)


def answer_missing(config: RunConfig, todo: Sequence[Question],
                   existing: ExistingAnswers) -> Totals:
    """Answers ``todo`` into the answer file, after checking the file's settings."""
    path = config.answer_path
    AnswerWriter(path).close()  # an unwritable path fails now, before the model loads
    answerer = make_answerer(config, todo)
    try:
        meta = answerer.start()
        check_resumable(existing, meta, path)
        drop_entries(path, existing.failed & {q.key for q in todo})
        with AnswerWriter(path) as writer:
            return answer_all(answerer.answers(), len(todo), writer, config.method.prog,
                              config.model_id)
    finally:
        answerer.close()


def run(config: RunConfig) -> int:
    """Answers the selected questions; returns the exit code (0, or 3 if some failed)."""
    prog, path = config.method.prog, config.answer_path
    questions, order = _select(config)
    with AnswerFileLock(path):
        existing = _prepare_answer_file(path, prog)
        todo = [q for q in questions if q.key not in existing.answered]
        if todo:
            totals = answer_missing(config, todo, existing)
        else:
            print(f"{prog}: all {len(questions)} selected questions are already answered in "
                  f"{path}", file=sys.stderr)
            totals = Totals()
        # Workers finish in any order; the summary lists failures in question order.
        failed_now = set(totals.failed)
        totals.failed = [q.key for q in todo if q.key in failed_now]
        if config.settings.sharding_flag is not None:
            reorder_answers(path, order)
    print(json.dumps({
        "answer_file": str(path), "model_id": config.model_id, "method": config.method.name,
        "selected": len(questions), "skipped": len(questions) - len(todo),
        "answered": len(todo) - len(totals.failed), "failed": totals.failed,
        "tokens": totals.tokens, "wall_time": totals.wall_time,
        "tokens_per_s": totals.tokens_per_s, "mat": totals.mat,
    }))
    if totals.failed:
        print(f"{prog}: {len(totals.failed)} of {len(todo)} questions failed: ids "
              f"{format_ids(totals.failed)} (error entries in {path}; a re-run retries them)",
              file=sys.stderr)
        return EXIT_QUESTIONS_FAILED
    return 0


def main(method: Method, argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of an inference command; returns the exit code."""
    config = parse_args(method, argv)
    try:
        return run(config)
    except (RunError, QuestionFileError, AnswerFileError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever a library put in it
        print(f"{method.prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
