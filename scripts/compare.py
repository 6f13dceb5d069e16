"""Several decoding methods on one bench slice, in one process, interleaved question by question.

    python scripts/compare.py --bench-name demo --questions-per-category 1 --max-new-tokens 64 \\
        --methods vanilla hf hf-pld:10 pld:21 recycling:64 logitspec:64,tree_policy=reference logitspec
    python scripts/compare.py --bench-name demo --methods vanilla logitspec --repeats 3 \\
        --rerun-disturbed

Method specs (``name[:N][,flag=value...]``):

    vanilla          our plain decoding: the baseline, required
    hf, hf-pld:N     HF transformers generate, plain or with prompt_lookup_num_tokens=N (10)
    pld:N            prompt lookup decoding, tree budget N (21: 20 retrieved tokens + root)
    recycling:N      Token Recycling, tree budget N (64)
    racer:N          RACER, tree budget N (64)
    suffix:N         SuffixDecoding, tree budget N (65: the published 64 speculated tokens + root)
    rest:N           REST, tree budget N (65: 64 draft tokens + root); needs ``datastore=FILE``
    sam:N            SAM-Decoding with the Token Recycling fallback (SAMD[T]), tree budget N
                     (64: Token Recycling's tree; automaton drafts of min(40, N) tokens);
                     SAM-Decoding alone as its public code runs it:
                     ``sam:40,fallback=none,match_scale=4,dynamic_position=earliest``
    lookahead        Lookahead decoding, Spec-Bench's N=5, W=7, G=7 (56 inputs per pass); no
                     ``:N``: its flags size it, e.g. ``lookahead,level=4,window=5,guess=5``
    logitspec:N      LogitSpec with the inference_logitspec defaults, budget N or ``auto``
                     (the default: sized by the measured verification cost)
    eagle:N          the trained draft head in LogitSpec's value tree (inference_eagle), budget
                     N or ``auto`` (default); ``eagle:64,no_retrieval=1``: the head alone
    sps[:N]          draft-model speculative decoding (inference_sps), tree budget N (default:
                     room for every draft); ``sps,draft_head=cached``: the trained head as draft

``flag=value`` sets any flag of the method's command (underscores), e.g. the public code's
LogitSpec: ``logitspec:64,tree_policy=reference``; ablations: ``logitspec:64,recycle_chains=0``,
``suffix:65,mode=chain`` or ``pld:21,max_ngram_size=4``; on/off flags take 1 or 0
(``eagle,no_retrieval=1``), list flags their items joined by ``/``
(``sps,draft_length_bounds=1/8``), or by ``+`` for lists of paths
(``sps,draft_model_path=/models/a.gguf+/models/b.gguf``). A method is built exactly as its
``inference_*`` command builds it, from the same params dataclass.

Policies:

- One load of our model serves all our methods (each with its own decoder: cache, drafter
  state); one load of the HF model serves ``hf`` and ``hf-pld``.
- Interleaving: question ``j`` runs every method's turns, the method order rotated by ``j``
  (:func:`rotation`), so drift of the machine (other load, clocks, caches) hits all alike.
  ``--repeats R`` makes R whole passes over the questions, pass ``k`` (0-based) rotating
  question ``j`` by ``j + k``, so each method takes other slots in each pass.
- Fresh state: every pass starts each method with a new generator (drafter state included),
  and so does the timed run after the warm-up and every re-run: a drafter that learns across
  questions (a pool, suffix trees over earlier answers, successor tables, acceptance rates)
  learns from the questions before this one in this pass, never from its own earlier answer
  to the same question. A re-run thus starts with less learned than the measurement it
  replaces had; and as a drafter's trees change the rounding of a bfloat16 or float16 pass,
  it may answer another text, which is other work: such a re-run is reported, never kept.
- Prompts, warm-up (``--warmup`` per method, before anything is timed), timing, token counting
  and answer lines are the harness's own (:mod:`evaluation.eval_loop`); greedy decoding.
- Prefix cache (``--prefix-cache 1``, off by default): each method's generator keeps its
  previous question's cache, so a question about the same document as the one before prefills
  only what follows the shared prefix, for every method alike (its answer lines' ``cached_tokens``
  say how much). A re-run's fresh generator first prefills the previous question's first
  prompt, untimed, so that it starts from the prefix the pass's measurement started from.
- Figures per row (speed.py's rows: the eight MT-bench categories are one) and overall, over
  every pass pooled: MAT = tokens / decoding steps; tokens/s = tokens / wall time; speedup =
  tokens/s over vanilla's on the same questions of this run; q-median speedup = the median
  over questions of each question's own speedup (robust to a few disturbed questions); decode
  speedup = the speedup with each side's prefill time left out of its wall time (every method
  prefills the same prompts, but where answers differ, as in bfloat16, a method that answers
  fewer tokens spreads its prefill over fewer of them); exact =
  the fraction of measurements whose every turn's token ids equal vanilla's; host overhead =
  (draft + accept + update) / all phases of the decoder's own timing, and host µs/step = the
  same host time per decoding step (none for HF); source steps = the share of steps that ran
  a gated draft source (``eagle`` at its automatic budget, SpS's ``cost`` schedule; "-" for
  methods without a gate). With several passes, the speedup, q-median
  speedup and tokens/s of each pass on its own give a mean, sample standard deviation and
  min over passes. A question that failed for any method (a prompt too long) is left out of
  every figure and the run ends with exit code 3.
- Disturbance: each method's measurements (all passes) get a model of a question's expected
  time from the method's own clean questions (:mod:`evaluation.disturbance`); one that took
  more than ``--disturbance-threshold`` times that (1.3) is disturbed. The report lists the
  disturbed (pass, question, method) with the load average at their start, and the overall
  figures without those questions (left out for every method of that pass).
  ``--rerun-disturbed`` answers each disturbed pair again after the passes (question by
  question, a question's methods in rotated order), each from the drafter state its
  measurement started from (saved before every question, untimed: a few tens of KB and
  milliseconds for the retrieval drafters), keeps the faster of the two measurements when
  both answered the same token ids (in the figures and the answer file), lists old and new
  times and the overall figures before the re-runs, then looks for disturbance again.
- Outputs in ``--out-dir``: one answer file per method (``<model id>.jsonl``; with several
  passes ``<model id>.pass-<k>.jsonl`` per pass; speed.py reads them), ``report.md`` (with the
  hardware), ``report.png`` (speedup bars with the median per-question speedup as diamonds and,
  with several passes, standard-deviation error bars; MAT bars); the last stdout line is one
  JSON object with every figure. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Collection, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `evaluation` is importable from the repository root only
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.answer_file import (  # noqa: E402
    AnswerFileError, AnswerWriter, drop_entries, reorder_answers,
)
from evaluation.args import EvalConfig, OneLineParser  # noqa: E402
from evaluation.disturbance import DEFAULT_THRESHOLD, Measurement, detect  # noqa: E402
from evaluation.eval_loop import (  # noqa: E402
    EvalContext, RunError, answer_question, hardware_description, prime_prefix, warm_up,
)
from evaluation.inference_hf import HFGenerator, load_hf_model, pad_token_id  # noqa: E402
from evaluation.methods import TurnGenerator  # noqa: E402
from evaluation.prompts import resolve_template  # noqa: E402
from evaluation.questions import Question, QuestionFileError, load_questions, select_questions  # noqa: E402
from evaluation.speed import (  # noqa: E402
    OVERALL_ROW, align, format_ids, length_matched_speedup, load_average_of, measurement,
    parse_record, ratio, row_name,
)
from evaluation import (  # noqa: E402
    inference_eagle, inference_logitspec, inference_lookahead, inference_pld, inference_racer,
    inference_recycling, inference_rest, inference_sam, inference_sps, inference_suffix,
)
from logitspec.cost import float32_from_for  # noqa: E402
from logitspec.decoding import Decoder, GenerationConfig, GenerationResult  # noqa: E402
from logitspec.loading import DTYPES, LoadedModel, ModelLoadError, load  # noqa: E402
from logitspec.runtime import runtime_meta  # noqa: E402
from logitspec.snapshot import Snapshot, SnapshotError  # noqa: E402

PROG = "compare.py"
EXIT_USAGE = 2
EXIT_QUESTIONS_FAILED = 3
BASELINE = "vanilla"
DEFAULT_METHODS = ("vanilla", "hf", "hf-pld:10", "pld:21", "recycling:64",
                   "logitspec:64,tree_policy=reference", "logitspec")
NO_ARGUMENT = ("vanilla", "hf")
DEFAULT_ARGUMENT = {"hf-pld": 10, "pld": 21, "recycling": 64, "logitspec": "auto",
                    "racer": 64, "sam": 64, "suffix": 65, "rest": 65, "eagle": "auto",
                    "sps": None}
COMMANDS = {  # methods built by their inference_* command
    "pld": inference_pld,
    "recycling": inference_recycling,
    "logitspec": inference_logitspec,
    "racer": inference_racer,
    "sam": inference_sam,
    "suffix": inference_suffix,
    "rest": inference_rest,
    "lookahead": inference_lookahead,
    "eagle": inference_eagle,
    "sps": inference_sps,
}
FLAGS_ONLY = ("lookahead",)  # no tree budget: the command's flags size the pass
AUTO_BUDGET = ("logitspec", "eagle")  # methods whose budget may be "auto"


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
    if name not in NO_ARGUMENT and name not in FLAGS_ONLY and name not in DEFAULT_ARGUMENT:
        known = ", ".join([*NO_ARGUMENT, *FLAGS_ONLY, *DEFAULT_ARGUMENT])
        raise CompareError(f"unknown method {name!r} in {text!r} (known: {known})")
    if name in NO_ARGUMENT and (colon or options):
        raise CompareError(f"{name} takes no argument, got {text!r}")
    if name in FLAGS_ONLY and colon:
        raise CompareError(f"{name} takes no ':N' (its flags size it), got {text!r}")
    flags = tuple(option.partition("=")[::2] for option in options)
    if flags and name not in COMMANDS or any(not k or not v for k, v in flags):
        raise CompareError(f"bad option in {text!r}: expected flag=value for "
                           f"{', '.join(COMMANDS)}")
    if not colon:
        number = DEFAULT_ARGUMENT.get(name)
    elif argument == "auto" and name in AUTO_BUDGET:
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
    known = {f.name: f for f in fields(params_type)}
    values: dict[str, Any] = {} if spec.name in FLAGS_ONLY else {"draft_tree_capacity": spec.number}
    try:
        for key, raw in spec.flags:
            if key not in known or key == "draft_tree_capacity":
                raise CompareError(f"{spec.name} has no flag {key!r} (in {spec.text!r})")
            values[key] = flag_value(known[key].metadata, raw)
        return params_type(**values)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise CompareError(f"{spec.text}: {exc}") from None


def flag_value(metadata: Any, raw: str) -> Any:
    """A spec's ``flag=value`` as the command's parser would read the flag: on/off flags from
    1/0, list flags from items joined by ``/`` (``+`` for lists of paths, which hold ``/``),
    the rest by the flag's type."""
    if metadata.get("action") == "store_true":
        if raw not in ("0", "1"):
            raise ValueError(f"expected 0 or 1, got {raw!r}")
        return raw == "1"
    convert = metadata.get("type", str)
    if metadata.get("nargs") in ("+", 2):
        return [convert(item) for item in raw.split("+" if convert is str else "/")]
    return convert(raw)


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

    def reset(self, keep_prefix: bool = False) -> None:
        if keep_prefix:
            self.inner.reset(keep_prefix=True)
        else:
            self.inner.reset()
        self.turns = []

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
        result = self.inner.generate(prompt_ids, config)
        self.turns.append(tuple(result.output_ids))
        return result

    def save_state(self) -> Snapshot | None:
        """The inner generator's learned state (:meth:`logitspec.decoding.Decoder.save_state`);
        None where it has none to save or cannot save it (an HF generator)."""
        save = getattr(self.inner, "save_state", None)
        try:
            return None if save is None else save()
        except SnapshotError:
            return None

    def restore_state(self, state: Snapshot | None) -> None:
        if state is not None:
            self.inner.restore_state(state)  # type: ignore[attr-defined]


@dataclass
class Contender:
    """One method of the comparison: its harness context and answer files (one per pass)."""

    spec: MethodSpec
    ctx: EvalContext
    paths: tuple[Path, ...]

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
    work: Measurement  # what the disturbance model reads
    load_average: float | None = None  # at the question's start
    prefill: float | None = None  # prefill seconds; None when no phase was timed (speed.py's rule)
    source_steps: int | None = None  # steps that ran a gated draft source; None: not counted

    @classmethod
    def of(cls, line: dict[str, Any], turn_ids: Sequence[tuple[int, ...]]) -> "Outcome | None":
        """None for an error entry."""
        if "error" in line:
            return None
        record = parse_record(line, "answer line")
        choice = line["choices"][0]
        times = choice["time_breakdown"]
        return cls(
            tokens=sum(choice["new_tokens"]), wall_time=sum(choice["wall_time"]),
            steps=sum(choice["decoding_steps"]), turn_ids=tuple(turn_ids),
            host=times["draft"] + times["accept"] + times["update"], phases=sum(times.values()),
            work=measurement(record), load_average=load_average_of(record),
            prefill=record.choices[0].prefill_time,
            source_steps=None if record.choices[0].source_steps is None
            else sum(record.choices[0].source_steps),
        )


Outcomes = dict[str, dict[str, "Outcome | None"]]  # one pass: method label -> question key -> outcome
Unit = tuple[int, str]  # (pass index, question key): one question in one pass, every method
States = dict[tuple[int, str, str], "Snapshot | None"]  # (pass index, question key, label) -> state


@dataclass(frozen=True)
class RowFigures:
    """One method on one row's measurements (``None`` where a denominator is zero).

    ``median_speedup``: the median over questions of each question's speedup (its tokens/s
    over vanilla's on it, pooled over passes); ``decode_speedup``: the speedup with each
    side's prefill seconds left out of its wall time (None unless both sides timed their
    phases); ``matched_speedup``: the speedup with each answer's time scaled to the length of
    vanilla's answer to the same question (:func:`matched_speedup`); ``host_us_per_step``:
    draft + accept + update microseconds per decoding step; ``source_share``: the share of
    steps that ran the method's gated draft source (None unless every answer counted them).
    """

    questions: int
    tokens: int
    wall_time: float
    steps: int
    mat: float | None
    tokens_per_s: float | None
    speedup: float | None
    median_speedup: float | None
    decode_speedup: float | None
    matched_speedup: float | None
    exact_match: float | None
    host_overhead: float | None
    host_us_per_step: float | None
    source_share: float | None = None


def _rate(outcomes: Sequence[Outcome]) -> float | None:
    return ratio(sum(o.tokens for o in outcomes), sum(o.wall_time for o in outcomes))


def _decode_rate(outcomes: Sequence[Outcome]) -> float | None:
    """Tokens per second of decoding alone (wall time less prefill); None when an outcome
    timed no phases (its prefill is unknown)."""
    if any(o.prefill is None for o in outcomes):
        return None
    return ratio(sum(o.tokens for o in outcomes),
                 sum(o.wall_time - (o.prefill or 0.0) for o in outcomes))


def _speedup(rate: float | None, base_rate: float | None) -> float | None:
    return None if rate is None or base_rate is None else ratio(rate, base_rate)


def matched_speedup(mine: Sequence[Outcome], base: Sequence[Outcome]) -> float | None:
    """:func:`~evaluation.speed.length_matched_speedup` of the same measurements: an answer
    that diverged into a longer text weighs no more than vanilla's answer to its question."""
    return length_matched_speedup([(o.tokens, o.wall_time) for o in mine],
                                  [(o.tokens, o.wall_time) for o in base])


def question_median_speedup(mine: Sequence[Outcome], base: Sequence[Outcome],
                            keys: Sequence[str]) -> float | None:
    """Median over distinct ``keys`` of the speedup of each question's pooled measurements.
    Example: speedups 2.0, 2.2 and 0.5 (vanilla measured on a quiet machine, the method on a
    busy one) give 2.0."""
    speedups = []
    for key in dict.fromkeys(keys):
        picked = [i for i, k in enumerate(keys) if k == key]
        speedups.append(_speedup(_rate([mine[i] for i in picked]), _rate([base[i] for i in picked])))
    present = [s for s in speedups if s is not None]
    return statistics.median(present) if present else None


def row_figures(mine: Sequence[Outcome], base: Sequence[Outcome], keys: Sequence[str]) -> RowFigures:
    """``mine`` and ``base`` (vanilla) hold the same measurements in the same order; ``keys``
    names their questions (a question repeats once per pass)."""
    tokens, wall = sum(o.tokens for o in mine), sum(o.wall_time for o in mine)
    steps, host = sum(o.steps for o in mine), sum(o.host for o in mine)
    phases = sum(o.phases for o in mine)
    same = sum(m.turn_ids == b.turn_ids for m, b in zip(mine, base))
    return RowFigures(
        questions=len(dict.fromkeys(keys)), tokens=tokens, wall_time=wall, steps=steps,
        mat=ratio(tokens, steps), tokens_per_s=ratio(tokens, wall),
        speedup=_speedup(_rate(mine), _rate(base)),
        median_speedup=question_median_speedup(mine, base, keys),
        decode_speedup=_speedup(_decode_rate(mine), _decode_rate(base)),
        matched_speedup=matched_speedup(mine, base),
        exact_match=ratio(same, len(mine)), host_overhead=ratio(host, phases),
        host_us_per_step=None if not phases or not steps else 1e6 * host / steps,
        source_share=None if any(o.source_steps is None for o in mine)
        else ratio(sum(o.source_steps or 0 for o in mine), steps),
    )


Summary = dict[str, dict[str, RowFigures]]  # row -> method label -> figures


def usable_units(passes: Sequence[Outcomes], keys: Sequence[str],
                 left_out: Collection[Unit] = ()) -> list[Unit]:
    """The (pass, question) units every method answered, in pass then question order,
    without ``left_out``."""
    return [(r, key) for r, outcomes in enumerate(passes) for key in keys
            if (r, key) not in left_out and all(per[key] is not None for per in outcomes.values())]


def summarize(passes: Sequence[Outcomes], rows_of: dict[str, str], units: Sequence[Unit]) -> Summary:
    """Figures per row (in first-appearance order of ``rows_of``, question key -> row) and
    overall, over ``units`` pooled; the baseline is each pass's ``vanilla``."""
    groups: dict[str, list[Unit]] = {row: [] for row in rows_of.values()}
    for unit in units:
        groups[rows_of[unit[1]]].append(unit)
    groups[OVERALL_ROW] = list(units)
    labels = list(passes[0])
    summary: Summary = {}
    for row, members in groups.items():
        keys = [key for _, key in members]
        base = [passes[r][BASELINE][key] for r, key in members]
        summary[row] = {
            label: row_figures([passes[r][label][key] for r, key in members], base, keys)  # type: ignore[misc]
            for label in labels
        }
    return summary


@dataclass(frozen=True)
class PassSpread:
    """A figure over passes: mean, sample standard deviation (None below 2 passes), min."""

    mean: float | None
    std: float | None
    min: float | None
    n: int


SPREAD_FIGURES = ("speedup", "median_speedup", "tokens_per_s")


def pass_spread(values: Sequence[float | None]) -> PassSpread:
    present = [v for v in values if v is not None]
    return PassSpread(
        mean=statistics.fmean(present) if present else None,
        std=statistics.stdev(present) if len(present) > 1 else None,
        min=min(present) if present else None, n=len(present),
    )


Spread = dict[str, dict[str, dict[str, PassSpread]]]  # row -> label -> figure -> spread


def spread_over_passes(passes: Sequence[Outcomes], rows_of: dict[str, str],
                       units: Sequence[Unit]) -> Spread:
    """Each pass summarized on its own units, then :data:`SPREAD_FIGURES` spread over them."""
    per_pass = [summarize(passes, rows_of, [u for u in units if u[0] == r])
                for r in range(len(passes))]
    return {
        row: {label: {name: pass_spread([getattr(s[row][label], name) for s in per_pass])
                      for name in SPREAD_FIGURES}
              for label in figures}
        for row, figures in per_pass[0].items()
    }


# --------------------------------------------------------------------------- disturbance


@dataclass(frozen=True)
class Flag:
    """A disturbed measurement: ``method`` on question ``question`` of pass ``run_pass``
    (1-based) took ``ratio`` times its ``expected`` seconds."""

    run_pass: int
    question: str
    category: str
    method: str
    wall_time: float
    expected: float
    ratio: float
    load_average: float | None


def find_disturbed(passes: Sequence[Outcomes], categories: dict[str, str],
                   threshold: float) -> list[Flag]:
    """Each method's measurements over all passes get one model
    (:func:`evaluation.disturbance.detect`); flags in pass, question, method order."""
    flags = []
    for label in passes[0]:
        measured = [(r, key, o) for r, outcomes in enumerate(passes)
                    for key, o in outcomes[label].items() if o is not None]
        found = detect([o.work for _, _, o in measured], threshold)
        flags += [
            Flag(r + 1, key, categories[key], label, o.wall_time, v.expected or 0.0,
                 v.ratio or 0.0, o.load_average)
            for (r, key, o), v in zip(measured, found.verdicts) if v.disturbed
        ]
    order = {key: i for i, key in enumerate(categories)}
    labels = list(passes[0])
    return sorted(flags, key=lambda f: (f.run_pass, order[f.question], labels.index(f.method)))


def flagged_units(flags: Sequence[Flag]) -> set[Unit]:
    return {(f.run_pass - 1, f.question) for f in flags}


# --------------------------------------------------------------------------- the run


def model_id(spec: MethodSpec, settings: EvalConfig) -> str:
    """As the harness names runs: ``<model-name>-<method>-<dtype>-temp-0.0``."""
    return f"{settings.model_name}-{spec.slug}-{settings.resolved_dtype}-temp-0.0"


def answer_file_name(run_id: str, run_pass: int, repeats: int) -> str:
    """``<model id>.jsonl``; with ``--repeats`` above 1, ``<model id>.pass-<k>.jsonl`` for
    pass k (1-based), one file per pass as each holds one line per question."""
    return f"{run_id}.jsonl" if repeats == 1 else f"{run_id}.pass-{run_pass}.jsonl"


def recorded_generator(spec: MethodSpec, models: Models) -> RecordingGenerator:
    """A fresh generator for ``spec``, recording its output ids (module function: compare's
    tests replace :func:`make_generator`)."""
    return RecordingGenerator(make_generator(spec, models))


def build_contenders(specs: Sequence[MethodSpec], models: Models, settings: EvalConfig,
                     out_dir: Path, repeats: int) -> list[Contender]:
    loaded = models.loaded
    template = resolve_template(loaded.tokenizer, settings.model_name, None)
    eos = tuple(dict.fromkeys(loaded.eos_token_ids + template.stop_token_ids))
    hardware = hardware_description(str(loaded.model.device))
    runtime = runtime_meta(loaded.model)
    contenders = []
    for spec in specs:
        make = partial(recorded_generator, spec, models)
        ctx = EvalContext(
            model_id=model_id(spec, settings), loaded=loaded, generator=make(), template=template,
            generation=settings.generation_config(eos), num_choices=1,
            meta=method_meta(spec, specs, settings, template.name, hardware, runtime),
            make_generator=make, prefix_cache=bool(settings.prefix_cache),
        )
        paths = tuple(out_dir / answer_file_name(ctx.model_id, r, repeats)
                      for r in range(1, repeats + 1))
        contenders.append(Contender(spec, ctx, paths))
    return contenders


def method_meta(spec: MethodSpec, specs: Sequence[MethodSpec], settings: EvalConfig,
                template: str, hardware: str, runtime: dict[str, Any]) -> dict[str, Any]:
    """The answer lines' ``meta``: the harness's keys (``runtime``: the machine's, from
    :func:`logitspec.runtime.runtime_meta`), plus the comparison it ran in."""
    import transformers

    return {
        "method": spec.name, "params": _params_meta(spec),
        "model_path": settings.model_location, "dtype": settings.resolved_dtype,
        "device": str(torch.device(settings.resolved_device)), "template": template,
        "max_new_tokens": settings.max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
        "seed": 0, "num_choices": 1, "prefix_cache": bool(settings.prefix_cache),
        "torch": torch.__version__,
        "transformers": transformers.__version__, "hardware": hardware, **runtime,
        "threads": torch.get_num_threads(), "compared_with": [s.text for s in specs],
    }


def _params_meta(spec: MethodSpec) -> dict[str, Any]:
    params = asdict(method_params(spec)) if spec.name in COMMANDS else {"number": spec.number}
    return {"spec": spec.text, **params}


def answer(contender: Contender, question: Question) -> tuple[dict[str, Any], Outcome | None]:
    """One answer line of ``contender`` and its outcome."""
    line = answer_question(contender.ctx, question)
    return line, Outcome.of(line, contender.recorder.turns)


def interleave(contenders: Sequence[Contender], questions: Sequence[Question], run_pass: int,
               writers: dict[str, AnswerWriter],
               states: States | None = None) -> tuple[Outcomes, dict[str, list[str]]]:
    """Pass ``run_pass`` (0-based): every question with every method, question ``j`` in the
    order ``rotation(labels, j + run_pass)``; returns the outcomes (label -> question key ->
    outcome) and each question's method order. ``states``, when given, receives each method's
    learned state before each question, untimed (:func:`rerun_disturbed` starts from it)."""
    by_label = {c.spec.text: c for c in contenders}
    outcomes: Outcomes = {label: {} for label in by_label}
    orders: dict[str, list[str]] = {}
    for index, question in enumerate(questions):
        orders[question.key] = rotation(list(by_label), index + run_pass)
        for label in orders[question.key]:
            if states is not None:
                states[run_pass, question.key, label] = by_label[label].recorder.save_state()
            line, outcomes[label][question.key] = answer(by_label[label], question)
            writers[label].write(line)
        print(f"{PROG}: pass {run_pass + 1}, question {index + 1}/{len(questions)} "
              f"(id {question.key}) done", file=sys.stderr, flush=True)
    return outcomes, orders


def run_passes(contenders: Sequence[Contender], questions: Sequence[Question], repeats: int,
               states: States | None = None) -> tuple[list[Outcomes], list[dict[str, list[str]]]]:
    """``repeats`` whole passes over the questions, each into its own answer files;
    ``states``: as :func:`interleave`'s."""
    passes, orders = [], []
    for run_pass in range(repeats):
        if run_pass:  # a method that learns across questions must not meet its own answers
            for contender in contenders:
                contender.ctx.renew_generator()
        with ExitStack() as stack:
            writers = {c.spec.text: stack.enter_context(AnswerWriter(c.paths[run_pass]))
                       for c in contenders}
            outcomes, order = interleave(contenders, questions, run_pass, writers, states)
        passes.append(outcomes)
        orders.append(order)
    return passes, orders


@dataclass(frozen=True)
class Rerun:
    """A disturbed measurement taken again; ``kept``: "new" when the re-run was faster with
    the same token ids (it replaced the old one everywhere, answer file included), "old: other
    text" when it answered other ids (other work, whatever its time), else "old";
    ``new_time`` is None when the re-run failed; ``state``: "saved" when the re-run's drafter
    started from the state the measurement's started from, "fresh" when from nothing (a method
    whose state was not saved)."""

    run_pass: int
    question: str
    method: str
    old_time: float
    new_time: float | None
    kept: str
    state: str = "fresh"


def rerun_disturbed(contenders: Sequence[Contender], questions: Sequence[Question],
                    flags: Sequence[Flag], passes: list[Outcomes],
                    states: States) -> list[Rerun]:
    """Answers every flagged (pass, question, method) again, after all passes: question by
    question in flag order, a question's flagged methods in the order ``rotation(methods, i)``
    for the i-th re-run question. The faster of the two measurements is kept, in ``passes``
    (updated in place) and in the pass's answer file, if both answered the same token ids.

    Each re-run's generator is a fresh one, given the learned state the pass's generator had
    before that question where ``states`` holds it: what a drafter learned from the questions
    before (and, in a repeated pass, nothing of the later ones) shapes its trees, and in half
    precision the trees decide how the answer rounds, so a re-run from a fresh drafter would
    answer another text and could never be kept, while vanilla's always could."""
    by_label = {c.spec.text: c for c in contenders}
    by_key = {q.key: q for q in questions}
    before = {q.key: p for p, q in zip(questions, questions[1:])}
    groups: dict[Unit, list[str]] = {}
    for flag in flags:
        groups.setdefault((flag.run_pass - 1, flag.question), []).append(flag.method)
    reruns, replaced = [], {}
    for index, ((run_pass, key), labels) in enumerate(groups.items()):
        for label in rotation(labels, index):
            ctx = by_label[label].ctx
            ctx.renew_generator()  # it answered this question already
            if ctx.prefix_cache and key in before:
                prime_prefix(ctx, before[key])  # the cache the pass's question started from
            state = states.get((run_pass, key, label))
            by_label[label].recorder.restore_state(state)  # after priming, which teaches it
            line, new = answer(by_label[label], by_key[key])
            old = passes[run_pass][label][key]
            assert old is not None  # only measured outcomes are flagged
            same = new is not None and new.turn_ids == old.turn_ids
            keep = same and new.wall_time < old.wall_time
            if keep:
                passes[run_pass][label][key] = new
                replaced.setdefault((run_pass, label), []).append(line)
            kept = "new" if keep else "old" if same or new is None else "old: other text"
            reruns.append(Rerun(run_pass + 1, key, label, old.wall_time,
                                None if new is None else new.wall_time, kept,
                                "fresh" if state is None else "saved"))
        print(f"{PROG}: re-run {index + 1}/{len(groups)} (pass {run_pass + 1}, id {key}) done",
              file=sys.stderr, flush=True)
    order = {q.key: i for i, q in enumerate(questions)}
    for (run_pass, label), lines in replaced.items():
        replace_lines(by_label[label].paths[run_pass], lines, order)
    return reruns


def replace_lines(path: Path, lines: Sequence[dict[str, Any]], order: dict[str, int]) -> None:
    """Puts ``lines`` in place of the same questions' lines of ``path``, in question order."""
    drop_entries(path, frozenset(str(line["question_id"]) for line in lines))
    with AnswerWriter(path) as writer:
        for line in lines:
            writer.write(line)
    reorder_answers(path, order)


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


@dataclass(frozen=True)
class Comparison:
    """Everything a comparison reports. ``summary`` pools every kept measurement (after any
    re-runs); ``clean`` leaves out the units (pass, question) with a ``remaining`` disturbed
    measurement, for every method (``left_out`` of the ``units`` every method answered);
    ``found`` are the disturbed measurements before re-runs, ``before_rerun`` the overall
    figures then (None without re-runs)."""

    header: dict[str, Any]
    summary: Summary
    spread: Spread
    clean: Summary
    units: int
    left_out: int
    failed: list[str]
    threshold: float
    found: tuple[Flag, ...]
    reruns: tuple[Rerun, ...]
    remaining: tuple[Flag, ...]
    before_rerun: dict[str, RowFigures] | None


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _percent(value: float | None, spec: str) -> str:
    return _fmt(None if value is None else 100 * value, spec, "%")


def _spread_cell(s: PassSpread, spec: str, suffix: str = "") -> str:
    """``mean ± std (min x)``."""
    if s.mean is None:
        return "-"
    return f"{s.mean:{spec}}{suffix} ± {_fmt(s.std, spec)} (min {_fmt(s.min, spec)}{suffix})"


def row_table(figures: dict[str, RowFigures],
              spread: dict[str, dict[str, PassSpread]] | None = None) -> list[list[str]]:
    """Header and one line per method; with ``spread`` (several passes), the speedup and
    tokens/s over passes too."""
    header = ["method", "MAT", "tok/s", "speedup", "q-median speedup", "decode speedup",
              "length-matched speedup", "exact", "host overhead", "host µs/step", "source steps"]
    if spread is not None:
        header += ["speedup over passes", "tok/s over passes"]
    body = []
    for label, f in figures.items():
        cells = [label, _fmt(f.mat), _fmt(f.tokens_per_s, ".1f"), _fmt(f.speedup, ".2f", "x"),
                 _fmt(f.median_speedup, ".2f", "x"), _fmt(f.decode_speedup, ".2f", "x"),
                 _fmt(f.matched_speedup, ".2f", "x"), _percent(f.exact_match, ".0f"),
                 _percent(f.host_overhead, ".1f"), _fmt(f.host_us_per_step, ".0f"),
                 _percent(f.source_share, ".1f")]
        if spread is not None:
            cells += [_spread_cell(spread[label]["speedup"], ".2f", "x"),
                      _spread_cell(spread[label]["tokens_per_s"], ".1f")]
        body.append(cells)
    return [header, *body]


def flag_table(flags: Sequence[Flag]) -> list[list[str]]:
    header = ["pass", "question", "category", "method", "time (s)", "expected (s)", "ratio",
              "load (1 min)"]
    return [header, *([str(f.run_pass), f.question, f.category, f.method, f"{f.wall_time:.2f}",
                       f"{f.expected:.2f}", f"{f.ratio:.2f}x", _fmt(f.load_average)]
                      for f in flags)]


def rerun_table(reruns: Sequence[Rerun]) -> list[list[str]]:
    header = ["pass", "question", "method", "drafter state", "old time (s)", "new time (s)", "kept"]
    return [header, *([str(r.run_pass), r.question, r.method, r.state, f"{r.old_time:.2f}",
                       _fmt(r.new_time), r.kept] for r in reruns)]


def markdown(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(row) + " |" for row in table]
    return [lines[0], "|" + "---|" * len(table[0]), *lines[1:]]


def header_lines(header: dict[str, Any]) -> list[str]:
    return [f"{key}: {value}" for key, value in header.items()]


def section(title: str, table: list[list[str]] | None, md: bool, note: str = "") -> list[str]:
    """A titled table (``None``: none), with a note line under the title."""
    lines = ["", f"## {title}" if md else title]
    lines += ["", note] if note else []
    if table is not None:
        lines += [""] + (markdown(table) if md else align(table))
    return lines


def disturbance_sections(c: Comparison, md: bool) -> list[str]:
    """Disturbed measurements, re-runs, and the overall figures without the disturbed."""
    note = (f"A measurement is disturbed when it took more than {c.threshold:g}x the time its "
            "method's clean questions in this run predict for its work (steps, drafted "
            "tokens, context and prompt tokens; evaluation/disturbance.py).")
    lines = section("disturbed measurements", flag_table(c.remaining) if c.remaining else None,
                    md, note + ("" if c.remaining else " None found."))
    if c.reruns:
        lines += section("re-runs (--rerun-disturbed)", rerun_table(c.reruns), md,
                         "The faster of the two measurements is kept when both answered the "
                         "same token ids; a re-run that answered another text did other work "
                         "and is not kept.")
        lines += section("overall before the re-runs", row_table(c.before_rerun or {}), md)
    if c.remaining:
        lines += section("overall without the disturbed measurements", row_table(c.clean[OVERALL_ROW]),
                         md, f"Left out, for every method: {c.left_out} of {c.units} (pass, "
                         "question) units.")
    return lines


def report_text(c: Comparison, *, md: bool) -> str:
    """The tables, one per row (overall last), then the disturbance sections, as markdown or
    aligned plain text."""
    lines = ["# Method comparison", ""] if md else []
    lines += [f"- {line}" for line in header_lines(c.header)] if md else header_lines(c.header)
    if c.failed:
        lines.append(f"{'- ' if md else ''}left out (failed for some method): {format_ids(c.failed)}")
    several = c.header["repeats"] > 1
    for row, figures in c.summary.items():
        count = next(iter(figures.values())).questions
        title = f"{row} ({count} question{'s' * (count != 1)})"
        table = row_table(figures, c.spread[row] if several else None) if count else None
        lines += section(title, table, md)
    return "\n".join(lines + disturbance_sections(c, md)) + "\n"


def write_plot(c: Comparison, path: Path) -> bool:
    """Per-row speedup bars (black diamonds: the median per-question speedup; with several
    passes, the bars are the mean over passes with their standard deviation as error bars)
    and MAT bars, one bar per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary, several = c.summary, c.header["repeats"] > 1
    rows = [row for row, per in summary.items() if next(iter(per.values())).questions]
    labels = list(summary[OVERALL_ROW])
    width = 0.8 / len(labels)
    colors = plt.get_cmap("tab20").colors  # distinct for up to 20 methods
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 2.5 * len(rows)), 5))
    for i, label in enumerate(labels):
        xs = [r + (i - (len(labels) - 1) / 2) * width for r in range(len(rows))]
        color = colors[i % len(colors)]
        if several:
            spreads = [c.spread[row][label]["speedup"] for row in rows]
            axes[0].bar(xs, [s.mean or 0.0 for s in spreads], width, color=color,
                        yerr=[s.std or 0.0 for s in spreads], capsize=2)
        else:
            axes[0].bar(xs, [summary[row][label].speedup or 0.0 for row in rows], width,
                        color=color)
        medians = [summary[row][label].median_speedup for row in rows]
        axes[0].scatter([x for x, m in zip(xs, medians) if m is not None],
                        [m for m in medians if m is not None], marker="D", s=12, color="black",
                        zorder=3, label="median per-question speedup" if i == 0 else None)
        axes[1].bar(xs, [summary[row][label].mat or 0.0 for row in rows], width, label=label,
                    color=color)
    title = "speedup over vanilla" + (f" (mean ± std over {c.header['repeats']} passes)"
                                      if several else "")
    for axis, name in ((axes[0], title), (axes[1], "MAT")):
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        axis.set_title(name)
    axes[0].legend(fontsize=8, loc="upper left")
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
    add("--float32-from", default="auto",
        help="passes of at least N tokens in float32 against float32 copies of half-precision "
             "weights: N, off, or auto (measured per machine; default: %(default)s)")
    add("--bench-name", default="demo", help="reads data/<bench-name>/question.jsonl")
    add("--question-file", default=None, help="a question file instead of the bench's")
    add("--question-begin", type=int, default=None, help="first question (0-based, file order)")
    add("--question-end", type=int, default=None, help="end of the slice (exclusive)")
    add("--questions-per-category", type=int, default=None,
        help="the first N of each category (MT-bench's eight count as one)")
    add("--max-new-tokens", type=int, default=256, help="per turn (default: %(default)s)")
    add("--warmup", type=int, default=1, help="untimed warm-up generations per method")
    add("--prefix-cache", type=int, default=0, choices=[0, 1],
        help="1: each method's question starts from its previous question's cache and "
             "prefills only what follows the shared prefix (questions about one document); "
             "0: every prompt prefilled whole (default: %(default)s)")
    add("--repeats", type=int, default=1,
        help="whole passes over the questions, each with its own rotation (default: 1)")
    add("--rerun-disturbed", action="store_true",
        help="measure the disturbed (question, method) pairs again at the end; keep the faster "
             "when both answered the same text")
    add("--disturbance-threshold", type=float, default=DEFAULT_THRESHOLD,
        help="a measurement over this many times its expected time is disturbed "
             "(default: %(default)s)")
    add("--out-dir", type=Path, default=None,
        help="where answers and reports go (default: results/compare-<timestamp>/)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise CompareError(f"--repeats must be at least 1, got {args.repeats}")
    if not args.disturbance_threshold > 1.0:
        raise CompareError(
            f"--disturbance-threshold must be above 1, got {args.disturbance_threshold}")


def eval_config(args: argparse.Namespace) -> EvalConfig:
    try:
        return EvalConfig(
            model_path=args.model_path, bench_name=args.bench_name,
            question_file=args.question_file, question_begin=args.question_begin,
            question_end=args.question_end, questions_per_category=args.questions_per_category,
            max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
            float32_from=args.float32_from, warmup=args.warmup, prefix_cache=args.prefix_cache,
        )
    except ValueError as exc:
        raise CompareError(str(exc)) from None


def load_models(settings: EvalConfig) -> Models:
    try:
        loaded = load(settings.model_path, dtype=settings.resolved_dtype,
                      device=settings.resolved_device)
    except (ModelLoadError, ValueError) as exc:
        raise CompareError(f"model {settings.model_location}: {exc}") from None
    float32_from_for(loaded.model, str(loaded.path), settings.resolved_float32_from)
    context = loaded.model.config.max_position_embeddings
    if settings.max_new_tokens >= context:
        raise CompareError(f"max_new_tokens {settings.max_new_tokens} leaves no room for a "
                           f"prompt in the model's context of {context} tokens")
    return Models(loaded)


def run_header(settings: EvalConfig, models: Models, questions: int,
               repeats: int) -> dict[str, Any]:
    import transformers

    device = str(models.loaded.model.device)
    return {
        "model": settings.model_location, "hardware": hardware_description(device),
        "device": device, "dtype": settings.resolved_dtype, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "questions": questions, "max_new_tokens": settings.max_new_tokens,
        "warmup": settings.warmup, "decoding": "greedy", "repeats": repeats,
    }


def compare_measurements(args: argparse.Namespace, header: dict[str, Any],
                         contenders: Sequence[Contender], questions: Sequence[Question],
                         passes: list[Outcomes], states: States | None = None) -> Comparison:
    """The figures, the disturbed measurements and, with ``--rerun-disturbed``, their
    re-runs (which update ``passes``; ``states``: as :func:`rerun_disturbed`'s)."""
    keys = [q.key for q in questions]
    rows_of = {q.key: row_name(q.category) for q in questions}
    categories = {q.key: q.category for q in questions}
    found = find_disturbed(passes, categories, args.disturbance_threshold)
    reruns: list[Rerun] = []
    before_rerun = None
    if args.rerun_disturbed and found:
        before_rerun = summarize(passes, rows_of, usable_units(passes, keys))[OVERALL_ROW]
        reruns = rerun_disturbed(contenders, questions, found, passes, states or {})
    remaining = find_disturbed(passes, categories, args.disturbance_threshold) if reruns else found
    units = usable_units(passes, keys)
    clean_units = usable_units(passes, keys, flagged_units(remaining))
    return Comparison(
        header=header, summary=summarize(passes, rows_of, units),
        spread=spread_over_passes(passes, rows_of, units),
        clean=summarize(passes, rows_of, clean_units), units=len(units),
        left_out=len(units) - len(clean_units),
        failed=[k for k in keys if any(per[k] is None for o in passes for per in o.values())],
        threshold=args.disturbance_threshold, found=tuple(found), reruns=tuple(reruns),
        remaining=tuple(remaining), before_rerun=before_rerun,
    )


def _figures_json(summary: Summary) -> dict[str, dict[str, Any]]:
    return {row: {label: asdict(f) for label, f in per.items()} for row, per in summary.items()}


def result_json(c: Comparison, out_dir: Path, plot: Path | None,
                contenders: Sequence[Contender], orders: Sequence[dict[str, list[str]]]) -> str:
    """The last stdout line; ``answer_files`` and ``order`` are the first pass's."""
    return json.dumps({
        **c.header, "out_dir": str(out_dir), "report": str(out_dir / "report.md"),
        "plot": None if plot is None else str(plot),
        "answer_files": {ct.spec.text: str(ct.paths[0]) for ct in contenders},
        "order": orders[0], "failed": c.failed,
        "rows": _figures_json(c.summary),
        "passes": [{"answer_files": {ct.spec.text: str(ct.paths[r]) for ct in contenders},
                    "order": order} for r, order in enumerate(orders)],
        "spread": {row: {label: {name: asdict(s) for name, s in figures.items()}
                         for label, figures in per.items()} for row, per in c.spread.items()},
        "disturbance": {"threshold": c.threshold, "found": [asdict(f) for f in c.found],
                        "remaining": [asdict(f) for f in c.remaining]},
        "reruns": [asdict(r) for r in c.reruns],
        "before_rerun": None if c.before_rerun is None else {
            label: asdict(f) for label, f in c.before_rerun.items()},
        "clean_rows": _figures_json(c.clean), "left_out": c.left_out,
    }, allow_nan=False)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    settings = eval_config(args)
    specs = parse_specs(args.methods)
    questions = select(settings)
    out_dir = args.out_dir or ROOT / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    names = [answer_file_name(model_id(s, settings), r, args.repeats)
             for s in specs for r in range(1, args.repeats + 1)]
    prepare_out_dir(out_dir, names + ["report.md"])
    models = load_models(settings)
    contenders = build_contenders(specs, models, settings, out_dir, args.repeats)
    for contender in contenders:
        warm_up(contender.ctx, questions, settings.warmup)
    states: States | None = {} if args.rerun_disturbed else None
    passes, orders = run_passes(contenders, questions, args.repeats, states)
    header = run_header(settings, models, len(questions), args.repeats)
    comparison = compare_measurements(args, header, contenders, questions, passes, states)
    (out_dir / "report.md").write_text(report_text(comparison, md=True))
    plot = out_dir / "report.png" if write_plot(comparison, out_dir / "report.png") else None
    print(report_text(comparison, md=False), end="")
    print(f"answers and report: {out_dir}" + ("" if plot else " (no plot: matplotlib missing)"))
    print(result_json(comparison, out_dir, plot, contenders, orders))
    return EXIT_QUESTIONS_FAILED if comparison.failed else 0


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
