"""Several decoding methods on one bench slice, in one process, interleaved question by question.

    python scripts/compare.py --bench-name demo --questions-per-category 1 --max-new-tokens 64 \\
        --methods vanilla hf hf-pld:10 pld:21 recycling:64 logitspec:64,tree_policy=reference logitspec

Method specs (``name[:N][,flag=value...]``):

    vanilla          our plain decoding: the baseline, required
    hf, hf-pld:N     HF transformers generate, plain or with prompt_lookup_num_tokens=N (10)
    pld:N            prompt lookup decoding, tree budget N (21: 20 retrieved tokens + root)
    recycling:N      Token Recycling, tree budget N (64)
    suffix:N         SuffixDecoding, tree budget N (65: the published 64 speculated tokens + root)
    rest:N           REST, tree budget N (65: 64 draft tokens + root); needs ``datastore=FILE``
    logitspec:N      LogitSpec with the inference_logitspec defaults, budget N or ``auto``
                     (the default: sized by the measured verification cost)

``flag=value`` sets any flag of the method's command (underscores), e.g. the public code's
LogitSpec: ``logitspec:64,tree_policy=reference``; ablations: ``logitspec:64,recycle_chains=0``,
``suffix:65,mode=chain``
or ``pld:21,max_ngram_size=4``. A method is built exactly as its ``inference_*`` command builds
it, from the same params dataclass.

Policies:

- One load of our model serves all our methods (each with its own decoder: cache, drafter
  state); one load of the HF model serves ``hf`` and ``hf-pld``.
- Interleaving: question ``j`` runs every method's turns, the method order rotated by ``j``
  (:func:`rotation`), so drift of the machine (other load, clocks, caches) hits all alike.
- Prompts, warm-up (``--warmup`` per method, before anything is timed), timing, token counting
  and answer lines are the harness's own (:mod:`evaluation.eval_loop`); greedy decoding.
- Figures per row (speed.py's rows: the eight MT-bench categories are one) and overall: MAT =
  tokens / decoding steps; tokens/s = tokens / wall time; speedup = tokens/s over vanilla's on
  the same questions of this run; exact = the fraction of questions whose every turn's token
  ids equal vanilla's; host overhead = (draft + accept + update) / all phases of the decoder's
  own timing (none for HF). A question that failed for any method (a prompt too long) is left
  out of every figure and the run ends with exit code 3.
- Outputs in ``--out-dir``: one answer file per method (speed.py reads them), ``report.md``
  (with the hardware), ``report.png``; the last stdout line is one JSON object with every
  figure. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `evaluation` is importable from the repository root only
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.answer_file import AnswerFileError, AnswerWriter  # noqa: E402
from evaluation.args import EvalConfig, OneLineParser  # noqa: E402
from evaluation.eval_loop import (  # noqa: E402
    EvalContext, RunError, answer_question, hardware_description, warm_up,
)
from evaluation.inference_hf import HFGenerator, load_hf_model, pad_token_id  # noqa: E402
from evaluation.methods import TurnGenerator  # noqa: E402
from evaluation.prompts import resolve_template  # noqa: E402
from evaluation.questions import Question, QuestionFileError, load_questions, select_questions  # noqa: E402
from evaluation.speed import OVERALL_ROW, align, format_ids, ratio, row_name  # noqa: E402
from evaluation import (  # noqa: E402
    inference_logitspec, inference_pld, inference_recycling, inference_rest, inference_suffix,
)
from logitspec.decoding import Decoder, GenerationConfig, GenerationResult  # noqa: E402
from logitspec.loading import DTYPES, LoadedModel, ModelLoadError, load  # noqa: E402

PROG = "compare.py"
EXIT_USAGE = 2
EXIT_QUESTIONS_FAILED = 3
BASELINE = "vanilla"
DEFAULT_METHODS = ("vanilla", "hf", "hf-pld:10", "pld:21", "recycling:64",
                   "logitspec:64,tree_policy=reference", "logitspec")
NO_ARGUMENT = ("vanilla", "hf")
DEFAULT_ARGUMENT = {"hf-pld": 10, "pld": 21, "recycling": 64, "suffix": 65, "rest": 65,
                    "logitspec": "auto"}
COMMANDS = {"pld": inference_pld, "recycling": inference_recycling, "suffix": inference_suffix,
            "rest": inference_rest, "logitspec": inference_logitspec}  # built by their commands


class CompareError(Exception):
    """Bad input: one line on stderr, exit code 2."""


# --------------------------------------------------------------------------- method specs


@dataclass(frozen=True)
class MethodSpec:
    """A parsed ``--methods`` entry; ``text`` is its label in every table."""

    text: str
    name: str
    number: int | str | None = None  # tree budget ("auto"), or HF's prompt lookup tokens
    flags: tuple[tuple[str, str], ...] = ()  # flag=value settings of the method's command

    @property
    def slug(self) -> str:
        """The label as a file-name part: ``logitspec:64,recycle_chains=0`` ->
        ``logitspec-64-recycle_chains-0``."""
        return self.text.replace(":", "-").replace(",", "-").replace("=", "-")


def parse_spec(text: str) -> MethodSpec:
    """``name[:N][,flag=value...]`` (module docstring). Examples: ``pld`` -> budget 21;
    ``logitspec`` -> budget auto; ``logitspec:64,tree_policy=reference`` -> the public code's."""
    head, *options = text.split(",")
    name, colon, argument = head.partition(":")
    if name not in NO_ARGUMENT and name not in DEFAULT_ARGUMENT:
        known = ", ".join([*NO_ARGUMENT, *DEFAULT_ARGUMENT])
        raise CompareError(f"unknown method {name!r} in {text!r} (known: {known})")
    if name in NO_ARGUMENT and (colon or options):
        raise CompareError(f"{name} takes no argument, got {text!r}")
    flags = tuple(option.partition("=")[::2] for option in options)
    if flags and name not in COMMANDS or any(not k or not v for k, v in flags):
        raise CompareError(f"bad option in {text!r}: expected flag=value for "
                           f"{', '.join(COMMANDS)}")
    if not colon:
        number = DEFAULT_ARGUMENT.get(name)
    elif argument == "auto" and name == "logitspec":
        number = argument
    elif argument.isdigit() and int(argument) >= 1:
        number = int(argument)
    else:
        raise CompareError(f"expected a whole number >= 1 after ':' in {text!r}")
    spec = MethodSpec(text, name, number, flags)
    if name in COMMANDS:
        method_params(spec)  # validates the flags
    return spec


def method_params(spec: MethodSpec) -> Any:
    """The params of ``spec``'s inference command, as that command would parse them."""
    params_type = COMMANDS[spec.name].METHOD.params_type
    types = {f.name: f.metadata.get("type", str) for f in fields(params_type)}
    values: dict[str, Any] = {"draft_tree_capacity": spec.number}
    try:
        for key, raw in spec.flags:
            if key not in types or key == "draft_tree_capacity":
                raise CompareError(f"{spec.name} has no flag {key!r} (in {spec.text!r})")
            values[key] = types[key](raw)
        return params_type(**values)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise CompareError(f"{spec.text}: {exc}") from None


def parse_specs(texts: Sequence[str]) -> list[MethodSpec]:
    specs = [parse_spec(text) for text in texts]
    labels = [s.text for s in specs]
    if len(set(labels)) != len(labels) or len({s.slug for s in specs}) != len(specs):
        raise CompareError(f"a method is listed twice: {' '.join(labels)}")
    if BASELINE not in labels:
        raise CompareError("--methods must include vanilla (the baseline of every speedup)")
    return specs


def rotation(labels: Sequence[str], index: int) -> list[str]:
    """The method order of question ``index``: ``labels`` rotated left by ``index``.
    Example: [a, b, c] -> question 0: a b c, 1: b c a, 2: c a b, 3: a b c."""
    shift = index % len(labels)
    return list(labels[shift:]) + list(labels[:shift])


# --------------------------------------------------------------------------- generators


@dataclass
class Models:
    """Our model (loaded once) and, on first use, the HF model on the same weights."""

    loaded: LoadedModel
    _hf: Any = None

    def hf(self) -> Any:
        if self._hf is None:
            model = self.loaded.model
            self._hf = load_hf_model(self.loaded.path, model.dtype, model.device)
        return self._hf


def make_generator(spec: MethodSpec, models: Models) -> TurnGenerator:
    if spec.name == BASELINE:
        return Decoder(models.loaded.model, None)
    if spec.name in ("hf", "hf-pld"):
        lookup = spec.number if spec.name == "hf-pld" else None
        return HFGenerator(models.hf(), pad_token_id(models.loaded), lookup)
    return COMMANDS[spec.name].METHOD.make_generator(models.loaded, method_params(spec))


class RecordingGenerator:
    """Delegates to ``inner``; keeps each turn's output ids since the last reset."""

    def __init__(self, inner: TurnGenerator) -> None:
        self.inner = inner
        self.turns: list[tuple[int, ...]] = []

    def reset(self) -> None:
        self.inner.reset()
        self.turns = []

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
        result = self.inner.generate(prompt_ids, config)
        self.turns.append(tuple(result.output_ids))
        return result


@dataclass
class Contender:
    """One method of the comparison: its harness context and answer file."""

    spec: MethodSpec
    ctx: EvalContext
    path: Path

    @property
    def recorder(self) -> RecordingGenerator:
        return self.ctx.generator  # type: ignore[return-value]


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Outcome:
    """One method's answer to one question, summed over its turns."""

    tokens: int
    wall_time: float
    steps: int
    turn_ids: tuple[tuple[int, ...], ...]
    host: float  # draft + accept + update seconds
    phases: float  # all timed phases

    @classmethod
    def of(cls, line: dict[str, Any], turn_ids: Sequence[tuple[int, ...]]) -> "Outcome | None":
        """None for an error entry."""
        if "error" in line:
            return None
        choice = line["choices"][0]
        times = choice["time_breakdown"]
        return cls(
            tokens=sum(choice["new_tokens"]), wall_time=sum(choice["wall_time"]),
            steps=sum(choice["decoding_steps"]), turn_ids=tuple(turn_ids),
            host=times["draft"] + times["accept"] + times["update"], phases=sum(times.values()),
        )


@dataclass(frozen=True)
class RowFigures:
    """One method on one row's questions (``None`` where a denominator is zero)."""

    questions: int
    tokens: int
    wall_time: float
    steps: int
    mat: float | None
    tokens_per_s: float | None
    speedup: float | None
    exact_match: float | None
    host_overhead: float | None


def row_figures(mine: Sequence[Outcome], base: Sequence[Outcome]) -> RowFigures:
    """``mine`` and ``base`` (vanilla) hold the same questions in the same order."""
    tokens, wall = sum(o.tokens for o in mine), sum(o.wall_time for o in mine)
    steps = sum(o.steps for o in mine)
    rate = ratio(tokens, wall)
    base_rate = ratio(sum(o.tokens for o in base), sum(o.wall_time for o in base))
    same = sum(m.turn_ids == b.turn_ids for m, b in zip(mine, base))
    return RowFigures(
        questions=len(mine), tokens=tokens, wall_time=wall, steps=steps,
        mat=ratio(tokens, steps), tokens_per_s=rate,
        speedup=None if rate is None or base_rate is None else ratio(rate, base_rate),
        exact_match=ratio(same, len(mine)),
        host_overhead=ratio(sum(o.host for o in mine), sum(o.phases for o in mine)),
    )


Summary = dict[str, dict[str, RowFigures]]  # row -> method label -> figures


def summarize(outcomes: dict[str, dict[str, Outcome | None]], rows_of: dict[str, str]) -> Summary:
    """Figures per row (in first-appearance order of ``rows_of``, question key -> row) and
    overall, over the questions every method answered; the baseline is ``outcomes[vanilla]``."""
    usable = [key for key in rows_of if all(per[key] is not None for per in outcomes.values())]
    groups: dict[str, list[str]] = {row: [] for row in rows_of.values()}
    for key in usable:
        groups[rows_of[key]].append(key)
    groups[OVERALL_ROW] = usable
    base = outcomes[BASELINE]
    return {
        row: {label: row_figures([per[k] for k in keys], [base[k] for k in keys])  # type: ignore[misc]
              for label, per in outcomes.items()}
        for row, keys in groups.items()
    }


# --------------------------------------------------------------------------- the run


def model_id(spec: MethodSpec, settings: EvalConfig) -> str:
    """As the harness names runs: ``<model-name>-<method>-<dtype>-temp-0.0``."""
    return f"{settings.model_name}-{spec.slug}-{settings.resolved_dtype}-temp-0.0"


def build_contenders(specs: Sequence[MethodSpec], models: Models, settings: EvalConfig,
                     out_dir: Path) -> list[Contender]:
    loaded = models.loaded
    template = resolve_template(loaded.tokenizer, settings.model_name, None)
    eos = tuple(dict.fromkeys(loaded.eos_token_ids + template.stop_token_ids))
    hardware = hardware_description(str(loaded.model.device))
    contenders = []
    for spec in specs:
        ctx = EvalContext(
            model_id=model_id(spec, settings), loaded=loaded,
            generator=RecordingGenerator(make_generator(spec, models)), template=template,
            generation=settings.generation_config(eos), num_choices=1,
            meta=method_meta(spec, specs, settings, template.name, hardware),
        )
        contenders.append(Contender(spec, ctx, out_dir / f"{ctx.model_id}.jsonl"))
    return contenders


def method_meta(spec: MethodSpec, specs: Sequence[MethodSpec], settings: EvalConfig,
                template: str, hardware: str) -> dict[str, Any]:
    """The answer lines' ``meta``: the harness's keys, plus the comparison it ran in."""
    import transformers

    return {
        "method": spec.name, "params": _params_meta(spec),
        "model_path": settings.model_location, "dtype": settings.resolved_dtype,
        "device": str(torch.device(settings.resolved_device)), "template": template,
        "max_new_tokens": settings.max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
        "seed": 0, "num_choices": 1, "torch": torch.__version__,
        "transformers": transformers.__version__, "hardware": hardware,
        "compared_with": [s.text for s in specs],
    }


def _params_meta(spec: MethodSpec) -> dict[str, Any]:
    params = asdict(method_params(spec)) if spec.name in COMMANDS else {"number": spec.number}
    return {"spec": spec.text, **params}


def interleave(contenders: Sequence[Contender], questions: Sequence[Question],
               writers: dict[str, AnswerWriter]) -> tuple[dict[str, dict[str, Outcome | None]], dict]:
    """Answers every question with every method, in rotated order; returns the outcomes
    (label -> question key -> outcome) and each question's method order."""
    by_label = {c.spec.text: c for c in contenders}
    outcomes: dict[str, dict[str, Outcome | None]] = {label: {} for label in by_label}
    orders: dict[str, list[str]] = {}
    for index, question in enumerate(questions):
        orders[question.key] = rotation(list(by_label), index)
        for label in orders[question.key]:
            contender = by_label[label]
            line = answer_question(contender.ctx, question)
            writers[label].write(line)
            outcomes[label][question.key] = Outcome.of(line, contender.recorder.turns)
        print(f"{PROG}: question {index + 1}/{len(questions)} (id {question.key}) done",
              file=sys.stderr, flush=True)
    return outcomes, orders


def select(settings: EvalConfig) -> list[Question]:
    questions = select_questions(load_questions(settings.question_path), settings.question_begin,
                                 settings.question_end, settings.questions_per_category)
    if not questions:
        raise CompareError(f"no questions selected from {settings.question_path}")
    return questions


def prepare_out_dir(out_dir: Path, names: Sequence[str]) -> None:
    """Creates ``out_dir``; refuses one that already holds any of these files."""
    taken = [n for n in names if (out_dir / n).exists()]
    if taken:
        raise CompareError(f"{out_dir} already holds {taken[0]}: pass another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompareError(f"cannot create {out_dir}: {exc.strerror}") from None


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def row_table(figures: dict[str, RowFigures]) -> list[list[str]]:
    """Header and one line per method."""
    header = ["method", "MAT", "tok/s", "speedup", "exact", "host overhead"]
    body = [
        [label, _fmt(f.mat), _fmt(f.tokens_per_s, ".1f"), _fmt(f.speedup, ".2f", "x"),
         _fmt(None if f.exact_match is None else 100 * f.exact_match, ".0f", "%"),
         _fmt(None if f.host_overhead is None else 100 * f.host_overhead, ".1f", "%")]
        for label, f in figures.items()
    ]
    return [header, *body]


def markdown(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(row) + " |" for row in table]
    return [lines[0], "|" + "---|" * len(table[0]), *lines[1:]]


def header_lines(header: dict[str, Any]) -> list[str]:
    return [f"{key}: {value}" for key, value in header.items()]


def report_text(header: dict[str, Any], summary: Summary, failed: Sequence[str], *,
                md: bool) -> str:
    """The tables, one per row (overall last), as markdown or aligned plain text."""
    lines = ["# Method comparison", ""] if md else []
    lines += [f"- {line}" for line in header_lines(header)] if md else header_lines(header)
    if failed:
        lines.append(f"{'- ' if md else ''}left out (failed for some method): {format_ids(failed)}")
    for row, figures in summary.items():
        count = next(iter(figures.values())).questions
        title = f"{row} ({count} question{'s' * (count != 1)})"
        lines += ["", f"## {title}" if md else title]
        if count:
            table = row_table(figures)
            lines += [""] + (markdown(table) if md else align(table))
    return "\n".join(lines) + "\n"


def write_plot(summary: Summary, path: Path) -> bool:
    """Per-row speedup bars and MAT bars, one bar per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [row for row, per in summary.items() if next(iter(per.values())).questions]
    labels = list(summary[OVERALL_ROW])
    width = 0.8 / len(labels)
    colors = plt.get_cmap("tab20").colors  # distinct for up to 20 methods
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 2.5 * len(rows)), 5))
    for axis, metric, title in ((axes[0], "speedup", "speedup over vanilla"), (axes[1], "mat", "MAT")):
        for i, label in enumerate(labels):
            xs = [r + (i - (len(labels) - 1) / 2) * width for r in range(len(rows))]
            axis.bar(xs, [getattr(summary[row][label], metric) or 0.0 for row in rows], width,
                     label=label, color=colors[i % len(colors)])
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        axis.set_title(title)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- command line


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("Policies:")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", nargs="+", default=list(DEFAULT_METHODS),
        help="method specs, name[:N][,flag=value...] (default: %(default)s)")
    add("--model-path", default=None, help="HF folder, .gguf file or the embedded default's name")
    add("--dtype", default="bfloat16", choices=sorted(DTYPES), help="(default: %(default)s)")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--bench-name", default="demo", help="reads data/<bench-name>/question.jsonl")
    add("--question-file", default=None, help="a question file instead of the bench's")
    add("--question-begin", type=int, default=None, help="first question (0-based, file order)")
    add("--question-end", type=int, default=None, help="end of the slice (exclusive)")
    add("--questions-per-category", type=int, default=None,
        help="the first N of each category (MT-bench's eight count as one)")
    add("--max-new-tokens", type=int, default=256, help="per turn (default: %(default)s)")
    add("--warmup", type=int, default=1, help="untimed warm-up generations per method")
    add("--out-dir", type=Path, default=None,
        help="where answers and reports go (default: results/compare-<timestamp>/)")
    return parser


def eval_config(args: argparse.Namespace) -> EvalConfig:
    try:
        return EvalConfig(
            model_path=args.model_path, bench_name=args.bench_name,
            question_file=args.question_file, question_begin=args.question_begin,
            question_end=args.question_end, questions_per_category=args.questions_per_category,
            max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
            warmup=args.warmup,
        )
    except ValueError as exc:
        raise CompareError(str(exc)) from None


def load_models(settings: EvalConfig) -> Models:
    try:
        loaded = load(settings.model_path, dtype=settings.resolved_dtype,
                      device=settings.resolved_device)
    except (ModelLoadError, ValueError) as exc:
        raise CompareError(f"model {settings.model_location}: {exc}") from None
    context = loaded.model.config.max_position_embeddings
    if settings.max_new_tokens >= context:
        raise CompareError(f"max_new_tokens {settings.max_new_tokens} leaves no room for a "
                           f"prompt in the model's context of {context} tokens")
    return Models(loaded)


def run_header(settings: EvalConfig, models: Models, questions: int) -> dict[str, Any]:
    import transformers

    device = str(models.loaded.model.device)
    return {
        "model": settings.model_location, "hardware": hardware_description(device),
        "device": device, "dtype": settings.resolved_dtype, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "questions": questions, "max_new_tokens": settings.max_new_tokens,
        "warmup": settings.warmup, "decoding": "greedy",
    }


def run(args: argparse.Namespace) -> int:
    settings = eval_config(args)
    specs = parse_specs(args.methods)
    questions = select(settings)
    out_dir = args.out_dir or ROOT / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_out_dir(out_dir, [f"{model_id(s, settings)}.jsonl" for s in specs] + ["report.md"])
    models = load_models(settings)
    contenders = build_contenders(specs, models, settings, out_dir)
    for contender in contenders:
        warm_up(contender.ctx, questions, settings.warmup)
    with ExitStack() as stack:
        writers = {c.spec.text: stack.enter_context(AnswerWriter(c.path)) for c in contenders}
        outcomes, orders = interleave(contenders, questions, writers)
    summary = summarize(outcomes, {q.key: row_name(q.category) for q in questions})
    header = run_header(settings, models, len(questions))
    failed = [q.key for q in questions if any(per[q.key] is None for per in outcomes.values())]
    (out_dir / "report.md").write_text(report_text(header, summary, failed, md=True))
    plot = out_dir / "report.png" if write_plot(summary, out_dir / "report.png") else None
    print(report_text(header, summary, failed, md=False), end="")
    print(f"answers and report: {out_dir}" + ("" if plot else " (no plot: matplotlib missing)"))
    print(json.dumps({
        **header, "out_dir": str(out_dir), "report": str(out_dir / "report.md"),
        "plot": None if plot is None else str(plot),
        "answer_files": {c.spec.text: str(c.path) for c in contenders},
        "order": orders, "failed": failed,
        "rows": {row: {label: asdict(f) for label, f in per.items()} for row, per in summary.items()},
    }, allow_nan=False))
    return EXIT_QUESTIONS_FAILED if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CompareError, QuestionFileError, AnswerFileError, RunError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever a library put in it
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
