"""Speed report: a method's answer file against a baseline's answer file.

Usage::

    python evaluation/speed.py --file-path A.jsonl --base-path B.jsonl \
        [--tokenizer-path T] [--json] [--plot out.png] [--disturbance-threshold 1.3]
    python evaluation/speed.py --mean-report --file-path A1 A2 --base-path B1 B2 [--json]

Reports, per category and overall: tokens/s of both sides (from totals and as
the mean of per-question rates), speedup, the median of per-question speedups,
the decode speedup (each side's prefill time, ``time_breakdown.prefill``, left
out of its wall time; null unless every answer of both sides recorded a
timing), mean accepted tokens (MAT), the method's accepted-length histogram, the draft
acceptance rate when the method recorded ``draft_lengths``, the exact-match
rate of the generated text, the sampling settings of both runs, and the error
entries of each file; then the disturbed questions of each file and the overall
figures without them.

Policies:

- Token counting is identical on both sides: ``new_tokens`` from both files
  by default; with ``--tokenizer-path`` both sides' texts are re-tokenized
  (no special tokens) and those counts replace ``new_tokens`` on both sides.
  MAT always divides by the recorded decoding steps.
- A question that is an error entry in either file is left out of every
  figure on both sides, so both sides always cover the same questions.
- The eight MT-bench categories share one row, "multi-turn conversation";
  every other category keeps its own row. Rows follow first appearance in
  the method file, and a question's row follows its category there; the
  overall row is last.
- A ratio with a zero denominator is null (JSON) or "-" (table), never NaN.
- Several choices per question: figures sum over all choices; exact match
  compares choice 0.
- Disturbed questions (:mod:`evaluation.disturbance`): each file gets its own
  model of a question's expected time from its own clean questions; a question
  that took more than ``--disturbance-threshold`` times its expected time is
  listed (with the load average at its start, when recorded). The rows keep
  every question; ``clean_rows`` (the "without disturbed" line) leave out the
  questions disturbed in either file, on both sides.
- Environment: a warning names the hardware, torch version and thread count
  when the two files' ``meta`` record different ones (a speedup across
  machines measures the machines too); generation settings that differ get
  their own warning.
- ``--mean-report`` pairs run i of ``--file-path`` with run i of
  ``--base-path`` and reports mean and sample standard deviation (n - 1;
  null with fewer than two runs).
- Bad input ends with one line on stderr and exit code 2. The last stdout
  line is always one JSON object holding every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the package importable
    sys.path.insert(0, str(ROOT))

from evaluation.disturbance import (  # noqa: E402
    DEFAULT_THRESHOLD, Measurement, TurnWork, detect,
)
from evaluation.jsonl import parse_keyed_lines  # noqa: E402

PROG = "speed.py"
MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
MULTI_TURN_ROW = "multi-turn conversation"
OVERALL_ROW = "overall"
SETTING_KEYS = (
    "method", "temperature", "top_p", "top_k", "seed", "dtype", "device",
    "max_new_tokens", "prefix_cache", "model_path", "hardware", "torch", "threads", "params",
)
COMPARED_SETTINGS = (
    "temperature", "top_p", "top_k", "seed", "dtype", "device", "max_new_tokens",
    "prefix_cache",
)
ENVIRONMENT_KEYS = ("hardware", "torch", "threads")
MAX_LISTED_IDS = 10


class InputError(Exception):
    """A problem with the inputs or arguments, reported as one line (exit code 2)."""


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Choice:
    """One generated answer: per-turn lists, and per-step lists flat over turns."""

    turns: tuple[str, ...]
    decoding_steps: tuple[int, ...]
    new_tokens: tuple[int, ...]
    wall_time: tuple[float, ...]
    accept_lengths: tuple[int, ...]
    draft_lengths: tuple[int, ...] | None
    prompt_tokens: tuple[int, ...] | None = None
    prefill_time: float | None = None  # None: the generator timed no phases
    cached_tokens: tuple[int, ...] | None = None  # of prompt_tokens, those not prefilled
    source_steps: tuple[int, ...] | None = None  # per turn, steps that ran a gated source


@dataclass(frozen=True)
class AnswerRecord:
    """One line of an answer file; an error entry has ``error`` set and no choices."""

    question_id: int | str
    category: str
    choices: tuple[Choice, ...]
    meta: Mapping[str, Any] | None
    error: str | None

    @property
    def key(self) -> str:
        """The id used to pair questions across files (ints and digit strings agree)."""
        return str(self.question_id)


@dataclass(frozen=True)
class AnswerFile:
    """A validated answer file: records in file order, unique question ids."""

    path: str
    records: tuple[AnswerRecord, ...]

    @property
    def meta(self) -> Mapping[str, Any] | None:
        """The run's settings: the first ``meta`` object in the file, if any."""
        return next((r.meta for r in self.records if r.meta is not None), None)

    def by_key(self) -> dict[str, AnswerRecord]:
        return {r.key: r for r in self.records}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_list(obj: Mapping[str, Any], key: str, where: str, minimum: int) -> tuple[int, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(_is_int(v) and v >= minimum for v in value):
        raise InputError(f"{where}: '{key}' must be a list of integers >= {minimum}")
    return tuple(value)


def _time_list(obj: Mapping[str, Any], key: str, where: str) -> tuple[float, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(_is_number(v) and v >= 0 for v in value):
        raise InputError(f"{where}: '{key}' must be a list of non-negative numbers")
    return tuple(float(v) for v in value)


def _text_list(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: '{key}' must be a list of strings")
    return tuple(value)


def parse_choice(obj: Any, where: str) -> Choice:
    """Validate one choice. ``accept_lengths`` may be absent (files of plain
    generators); ``draft_lengths`` is optional and, when present, has one entry
    per entry of ``accept_lengths``; ``prompt_tokens`` is optional and, when
    present, has one entry per turn; so is ``cached_tokens`` (with ``prompt_tokens``,
    each at most the turn's prompt) and ``source_steps`` (each at most the turn's
    ``decoding_steps``)."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a choice must be a JSON object")
    turns = _text_list(obj, "turns", where)
    steps = _int_list(obj, "decoding_steps", where, 0)
    new_tokens = _int_list(obj, "new_tokens", where, 0)
    wall_time = _time_list(obj, "wall_time", where)
    if not len(turns) == len(steps) == len(new_tokens) == len(wall_time):
        raise InputError(
            f"{where}: 'turns', 'decoding_steps', 'new_tokens' and 'wall_time' differ in length"
        )
    accept = _int_list(obj, "accept_lengths", where, 1) if "accept_lengths" in obj else ()
    drafts = _int_list(obj, "draft_lengths", where, 0) if "draft_lengths" in obj else None
    if drafts is not None and len(drafts) != len(accept):
        raise InputError(f"{where}: 'draft_lengths' and 'accept_lengths' differ in length")
    prompts = _int_list(obj, "prompt_tokens", where, 0) if "prompt_tokens" in obj else None
    if prompts is not None and len(prompts) != len(turns):
        raise InputError(f"{where}: 'prompt_tokens' and 'turns' differ in length")
    cached = _int_list(obj, "cached_tokens", where, 0) if "cached_tokens" in obj else None
    if cached is not None:
        if prompts is None:
            raise InputError(f"{where}: 'cached_tokens' without 'prompt_tokens'")
        if len(cached) != len(turns):
            raise InputError(f"{where}: 'cached_tokens' and 'turns' differ in length")
        if any(c > p for c, p in zip(cached, prompts)):
            raise InputError(f"{where}: a turn's 'cached_tokens' exceeds its 'prompt_tokens'")
    sources = _int_list(obj, "source_steps", where, 0) if "source_steps" in obj else None
    if sources is not None:
        if len(sources) != len(turns):
            raise InputError(f"{where}: 'source_steps' and 'turns' differ in length")
        if any(k > n for k, n in zip(sources, steps)):
            raise InputError(f"{where}: a turn's 'source_steps' exceeds its 'decoding_steps'")
    return Choice(turns, steps, new_tokens, wall_time, accept, drafts, prompts,
                  _prefill_time(obj, where), cached, sources)


def _prefill_time(obj: Mapping[str, Any], where: str) -> float | None:
    """``time_breakdown.prefill`` when the choice timed its phases (some phase above zero);
    None when it has no ``time_breakdown`` or timed nothing (an all-zero breakdown)."""
    times = obj.get("time_breakdown")
    if times is None:
        return None
    if not isinstance(times, dict) or not all(
            _is_number(v) and v >= 0 for v in times.values()):
        raise InputError(f"{where}: 'time_breakdown' must map phases to seconds >= 0")
    if not any(times.values()) or "prefill" not in times:
        return None
    return float(times["prefill"])


def parse_record(obj: Any, where: str) -> AnswerRecord:
    """Validate one answer line. An entry with an ``error`` string needs only a
    ``question_id``; any other entry needs a category and at least one choice."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    qid = obj.get("question_id")
    if not (_is_int(qid) or (isinstance(qid, str) and qid)):
        raise InputError(f"{where}: 'question_id' must be an integer or a non-empty string")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InputError(f"{where}: 'meta' must be a JSON object")
    error = obj.get("error")
    if error is not None:
        if not isinstance(error, str):
            raise InputError(f"{where}: 'error' must be a string")
        category = obj.get("category")
        return AnswerRecord(qid, category if isinstance(category, str) else "", (), meta, error)
    category = obj.get("category")
    if not isinstance(category, str) or not category:
        raise InputError(f"{where}: 'category' must be a non-empty string")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InputError(f"{where}: 'choices' must be a non-empty list")
    parsed = tuple(parse_choice(c, f"{where}: choice {i}") for i, c in enumerate(choices))
    return AnswerRecord(qid, category, parsed, meta, None)


def load_answers(path: str | Path) -> AnswerFile:
    """Read and validate an answer file (blank lines are skipped).

    Raises InputError naming ``path:line`` for malformed JSON, a schema
    violation or a duplicated question id, and for a file with no answers.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    records = parse_keyed_lines(text, path, parse_record, InputError)
    if not records:
        raise InputError(f"{path}: no answers (empty file)")
    return AnswerFile(str(path), tuple(records))


def _id_sort_key(key: str) -> tuple[int, int, str]:
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def format_ids(keys: Iterable[str], limit: int = MAX_LISTED_IDS) -> str:
    """``"3, 4, 9"``; past ``limit`` ids: the first ``limit`` and ``"... (N ids)"``."""
    ordered = sorted(keys, key=_id_sort_key)
    if not ordered:
        return "none"
    shown = ", ".join(ordered[:limit])
    return shown if len(ordered) <= limit else f"{shown}, ... ({len(ordered)} ids)"


def check_same_questions(method: AnswerFile, base: AnswerFile) -> None:
    """Both files must hold the same question ids, error entries included."""
    method_ids = {r.key for r in method.records}
    base_ids = {r.key for r in base.records}
    if method_ids != base_ids:
        raise InputError(
            f"question ids differ: missing from {base.path}: {format_ids(method_ids - base_ids)};"
            f" missing from {method.path}: {format_ids(base_ids - method_ids)}"
        )


# --------------------------------------------------------------------------- counting

TokenCounter = Callable[[AnswerRecord], int]


def count_new_tokens(record: AnswerRecord) -> int:
    """Tokens of a question as recorded by the generator: all turns of all choices."""
    return sum(sum(c.new_tokens) for c in record.choices)


def tokenizer_counter(tokenizer_path: str) -> TokenCounter:
    """A counter that re-tokenizes every turn of every choice (no special tokens)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises many types for a bad path
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load tokenizer {tokenizer_path}: {first_line}") from None

    def count(record: AnswerRecord) -> int:
        texts = [turn for choice in record.choices for turn in choice.turns]
        if not texts:
            return 0
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return sum(len(ids) for ids in encoded)

    return count


# --------------------------------------------------------------------------- metrics


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is zero."""
    return numerator / denominator if denominator else None


@dataclass(frozen=True)
class QuestionStats:
    """One question on one side, summed over turns and choices."""

    tokens: int
    wall_time: float
    steps: int
    accept_lengths: tuple[int, ...]
    draft_lengths: tuple[int, ...] | None
    prefill_time: float | None = None  # None unless every choice timed its phases
    source_steps: int | None = None  # None unless every choice counted them

    @property
    def rate(self) -> float | None:
        return ratio(self.tokens, self.wall_time)


def question_stats(record: AnswerRecord, count: TokenCounter) -> QuestionStats:
    """Stats of one answer; draft lengths only when every choice recorded them."""
    drafts = [c.draft_lengths for c in record.choices]
    prefills = [c.prefill_time for c in record.choices]
    sources = [c.source_steps for c in record.choices]
    return QuestionStats(
        tokens=count(record),
        wall_time=sum(sum(c.wall_time) for c in record.choices),
        steps=sum(sum(c.decoding_steps) for c in record.choices),
        accept_lengths=tuple(a for c in record.choices for a in c.accept_lengths),
        draft_lengths=None
        if any(d is None for d in drafts)
        else tuple(x for d in drafts if d is not None for x in d),
        prefill_time=None if any(p is None for p in prefills) else sum(p or 0.0 for p in prefills),
        source_steps=None if any(k is None for k in sources) else sum(sum(k or ()) for k in sources),
    )


def measurement(record: AnswerRecord) -> Measurement:
    """What the disturbance model reads of an answer (all turns of all choices): its time,
    each turn's steps, tokens, prompt and cached prompt tokens, and the drafted tokens (None
    unless every choice recorded ``draft_lengths``). Tokens are the recorded ``new_tokens``:
    the generator's work."""
    turns = tuple(
        TurnWork(steps, tokens, None if c.prompt_tokens is None else c.prompt_tokens[i],
                 0 if c.cached_tokens is None else c.cached_tokens[i])
        for c in record.choices
        for i, (steps, tokens) in enumerate(zip(c.decoding_steps, c.new_tokens))
    )
    drafts = [c.draft_lengths for c in record.choices]
    return Measurement(
        wall_time=sum(sum(c.wall_time) for c in record.choices),
        turns=turns,
        tree_tokens=None if any(d is None for d in drafts) else sum(sum(d or ()) for d in drafts),
    )


@dataclass(frozen=True)
class SideStats:
    """One side of a row.

    ``tokens_per_s`` divides total tokens by total wall time; ``mean_rate`` is
    the mean of per-question rates over questions with non-zero time; ``mat``
    divides total tokens by total decoding steps; ``decode_tokens_per_s`` divides
    total tokens by total wall time less prefill (None unless every question
    recorded its prefill time).
    """

    tokens: int
    wall_time: float
    steps: int
    tokens_per_s: float | None
    mean_rate: float | None
    mat: float | None
    accept_histogram: Mapping[int, int]
    decode_tokens_per_s: float | None = None


def side_stats(questions: Sequence[QuestionStats]) -> SideStats:
    tokens = sum(q.tokens for q in questions)
    wall_time = sum(q.wall_time for q in questions)
    steps = sum(q.steps for q in questions)
    rates = [q.rate for q in questions if q.rate is not None]
    histogram = Counter(a for q in questions for a in q.accept_lengths)
    return SideStats(
        tokens=tokens,
        wall_time=wall_time,
        steps=steps,
        tokens_per_s=ratio(tokens, wall_time),
        mean_rate=statistics.fmean(rates) if rates else None,
        mat=ratio(tokens, steps),
        accept_histogram=dict(sorted(histogram.items())),
        decode_tokens_per_s=None if any(q.prefill_time is None for q in questions)
        else ratio(tokens, sum(q.wall_time - (q.prefill_time or 0.0) for q in questions)),
    )


def acceptance_rate(questions: Sequence[QuestionStats]) -> float | None:
    """Drafted tokens accepted over drafted tokens offered, on questions with
    ``draft_lengths``: ``sum(accept_length - 1) / sum(draft_lengths)``.

    Example: accept lengths [3, 1] with draft lengths [4, 4] give 2 / 8 = 0.25.
    """
    drafted = [q for q in questions if q.draft_lengths is not None]
    offered = sum(sum(q.draft_lengths or ()) for q in drafted)
    accepted = sum(a - 1 for q in drafted for a in q.accept_lengths)
    return ratio(accepted, offered)


def source_share(questions: Sequence[QuestionStats]) -> float | None:
    """Steps that ran a gated draft source over all steps, on the questions that counted
    them (None where none did). Example: 3 of 10 steps and 1 of 30 give 4 / 40 = 0.1."""
    counted = [q for q in questions if q.source_steps is not None]
    return ratio(sum(q.source_steps or 0 for q in counted), sum(q.steps for q in counted))


def turn_matches(method: AnswerRecord, base: AnswerRecord) -> tuple[int, int]:
    """(identical turns, compared turns) of choice 0; a turn only one side has
    counts as different. Example: ["a", "b"] vs ["a", "c", "d"] gives (1, 3)."""
    method_turns, base_turns = method.choices[0].turns, base.choices[0].turns
    same = sum(m == b for m, b in zip(method_turns, base_turns))
    return same, max(len(method_turns), len(base_turns))


@dataclass(frozen=True)
class Pair:
    """A question answered by both sides, with its stats on each side."""

    method: AnswerRecord
    base: AnswerRecord
    method_stats: QuestionStats
    base_stats: QuestionStats


@dataclass(frozen=True)
class RowReport:
    """Figures of one category row (or the overall row).

    ``speedup`` is the ratio of total-based tokens/s; ``mean_rate_speedup``
    the ratio of the mean per-question rates; ``median_speedup`` the median
    over questions of each question's own speedup (a few slow questions on
    one side barely move it); ``decode_speedup`` the ratio of tokens/s over
    wall time less prefill (where the two sides answer texts of other lengths,
    the same prefill is spread over other numbers of tokens); ``matched_speedup``
    each question weighted by the baseline's answer length (:func:`length_matched_speedup`);
    ``tokens_per_target_call`` is the method's MAT (one target forward per decoding step);
    ``source_share`` the share of the method's steps that ran its gated draft source, over the
    questions that counted them (:func:`source_share`).
    """

    category: str
    questions: int
    method: SideStats
    baseline: SideStats
    speedup: float | None
    mean_rate_speedup: float | None
    median_speedup: float | None
    decode_speedup: float | None
    matched_speedup: float | None
    acceptance_rate: float | None
    tokens_per_target_call: float | None
    exact_match: float | None
    turn_exact_match: float | None
    source_share: float | None = None


def length_matched_speedup(method: Iterable[tuple[int, float]],
                           base: Iterable[tuple[int, float]]) -> float | None:
    """The baseline's wall time over the method's, each method answer's time scaled to the
    length of the baseline's answer to the same question: ``method`` and ``base`` hold
    ``(tokens, wall time)`` of the same questions in the same order; an empty method answer
    keeps its time. In half precision the two sides may answer a question with different
    texts: a drafted answer that turned into a 256-token loop (cheap to draft) where the
    baseline answered 80 tokens would otherwise weigh three times as much in the pooled
    speedup. Example: baseline 80 tokens in 2.0 s and 100 in 2.5 s; method 240 tokens in
    3.0 s and 100 in 2.0 s: pooled speedup (340 / 5.0) / (180 / 4.5) = 1.70, length-matched
    4.5 / (3.0 x 80 / 240 + 2.0) = 1.50."""
    scaled = total = 0.0
    for (tokens, seconds), (base_tokens, base_seconds) in zip(method, base, strict=True):
        scaled += seconds * base_tokens / tokens if tokens else seconds
        total += base_seconds
    return ratio(total, scaled)


def _optional_ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else ratio(numerator, denominator)


def median_speedup(pairs: Sequence[Pair]) -> float | None:
    """Median of per-question speedups (questions with both rates). Example: per-question
    speedups 2.0, 2.2 and 0.5 (a baseline question run while the machine was quiet and the
    method's while it was busy) give 2.0, where the total-based speedup may move a lot."""
    speedups = [_optional_ratio(p.method_stats.rate, p.base_stats.rate) for p in pairs]
    present = [x for x in speedups if x is not None]
    return statistics.median(present) if present else None


def build_row(category: str, pairs: Sequence[Pair]) -> RowReport:
    method = side_stats([p.method_stats for p in pairs])
    baseline = side_stats([p.base_stats for p in pairs])
    matches = [turn_matches(p.method, p.base) for p in pairs]
    return RowReport(
        category=category,
        questions=len(pairs),
        method=method,
        baseline=baseline,
        speedup=_optional_ratio(method.tokens_per_s, baseline.tokens_per_s),
        mean_rate_speedup=_optional_ratio(method.mean_rate, baseline.mean_rate),
        median_speedup=median_speedup(pairs),
        decode_speedup=_optional_ratio(method.decode_tokens_per_s, baseline.decode_tokens_per_s),
        matched_speedup=length_matched_speedup(
            [(p.method_stats.tokens, p.method_stats.wall_time) for p in pairs],
            [(p.base_stats.tokens, p.base_stats.wall_time) for p in pairs]),
        acceptance_rate=acceptance_rate([p.method_stats for p in pairs]),
        tokens_per_target_call=method.mat,
        exact_match=ratio(sum(same == total for same, total in matches), len(matches)),
        turn_exact_match=ratio(sum(same for same, _ in matches), sum(t for _, t in matches)),
        source_share=source_share([p.method_stats for p in pairs]),
    )


# --------------------------------------------------------------------------- report


def row_name(category: str) -> str:
    """The report row of a category: MT-bench categories share one row."""
    return MULTI_TURN_ROW if category in MT_BENCH_CATEGORIES else category


def category_rows(records: Sequence[AnswerRecord]) -> list[str]:
    """Row names in order of first appearance (error entries included, so a
    category whose questions all failed still gets a row, with zero questions)."""
    names = (row_name(r.category) for r in records if r.category)
    return list(dict.fromkeys(names))


def settings_of(answers: AnswerFile) -> dict[str, Any] | None:
    """The run settings recorded in ``meta``; None for files without it."""
    meta = answers.meta
    return None if meta is None else {key: meta.get(key) for key in SETTING_KEYS}


def differing_settings(
    method: Mapping[str, Any] | None, base: Mapping[str, Any] | None,
    keys: Sequence[str] = COMPARED_SETTINGS,
) -> tuple[str, ...]:
    """Those of ``keys`` that both runs recorded with different values."""
    if method is None or base is None:
        return ()
    return tuple(
        key for key in keys
        if method.get(key) is not None and base.get(key) is not None and method[key] != base[key]
    )


@dataclass(frozen=True)
class DisturbedQuestion:
    """A question that took ``ratio`` times its expected time; ``load_average``: the
    machine's 1-minute load average at its start, when the line records it."""

    question_id: int | str
    category: str
    wall_time: float
    expected: float
    ratio: float
    load_average: float | None


@dataclass(frozen=True)
class SideDisturbance:
    """One file's model (seconds per unit of each work term) and its disturbed questions."""

    coefficients: Mapping[str, float]
    disturbed: tuple[DisturbedQuestion, ...]


def load_average_of(record: AnswerRecord) -> float | None:
    value = (record.meta or {}).get("load_average")
    return float(value) if _is_number(value) else None


def side_disturbance(records: Sequence[AnswerRecord], threshold: float) -> SideDisturbance:
    """The disturbed questions among ``records`` (one file's answers), in their order."""
    measurements = [measurement(r) for r in records]
    found = detect(measurements, threshold)
    disturbed = tuple(
        DisturbedQuestion(r.question_id, r.category, m.wall_time, v.expected or 0.0,
                          v.ratio or 0.0, load_average_of(r))
        for r, m, v in zip(records, measurements, found.verdicts) if v.disturbed
    )
    return SideDisturbance(found.coefficients, disturbed)


def error_summary(answers: AnswerFile) -> dict[str, Any]:
    ids = [r.question_id for r in answers.records if r.error is not None]
    return {"count": len(ids), "ids": ids}


@dataclass(frozen=True)
class Report:
    """Everything one method/baseline comparison reports; ``rows`` and
    ``clean_rows`` (without the questions disturbed in either file) end with
    the overall row. ``counting`` is "new_tokens" or "tokenizer"."""

    method_file: str
    baseline_file: str
    counting: str
    tokenizer_path: str | None
    rows: tuple[RowReport, ...]
    errors: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Mapping[str, Any] | None]
    settings_differ: tuple[str, ...]
    environment_differs: tuple[str, ...]
    disturbance_threshold: float
    disturbance: Mapping[str, SideDisturbance]
    clean_rows: tuple[RowReport, ...]

    @property
    def overall(self) -> RowReport:
        return self.rows[-1]

    @property
    def disturbed_ids(self) -> set[str]:
        """Question ids (as strings) disturbed in either file."""
        return {str(q.question_id) for side in self.disturbance.values() for q in side.disturbed}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_rows(names: Sequence[str], pairs: Sequence[Pair]) -> tuple[RowReport, ...]:
    """One row per name (a pair goes to its category's row), then the overall row."""
    groups: dict[str, list[Pair]] = {name: [] for name in names}
    for pair in pairs:
        groups[row_name(pair.method.category)].append(pair)
    return (*(build_row(name, group) for name, group in groups.items()),
            build_row(OVERALL_ROW, list(pairs)))


def aggregate(
    method: AnswerFile,
    base: AnswerFile,
    count: TokenCounter = count_new_tokens,
    tokenizer_path: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Report:
    """Compare two answer files question by question (see the module policies).

    ``count`` must be the same counter for both sides; pass the
    ``tokenizer_path`` it was built from so the report names the counting.
    ``threshold``: the disturbance threshold (:mod:`evaluation.disturbance`).
    """
    check_same_questions(method, base)
    base_by_key = base.by_key()
    failed = {r.key for r in method.records + base.records if r.error is not None}
    pairs = [
        Pair(r, base_by_key[r.key], question_stats(r, count), question_stats(base_by_key[r.key], count))
        for r in method.records if r.key not in failed
    ]
    disturbance = {
        "method": side_disturbance([p.method for p in pairs], threshold),
        "baseline": side_disturbance([p.base for p in pairs], threshold),
    }
    disturbed = {str(q.question_id) for side in disturbance.values() for q in side.disturbed}
    names = category_rows(method.records)
    settings = {"method": settings_of(method), "baseline": settings_of(base)}
    return Report(
        method_file=method.path,
        baseline_file=base.path,
        counting="tokenizer" if tokenizer_path else "new_tokens",
        tokenizer_path=tokenizer_path,
        rows=build_rows(names, pairs),
        errors={"method": error_summary(method), "baseline": error_summary(base)},
        settings=settings,
        settings_differ=differing_settings(settings["method"], settings["baseline"]),
        environment_differs=differing_settings(
            settings["method"], settings["baseline"], ENVIRONMENT_KEYS),
        disturbance_threshold=threshold,
        disturbance=disturbance,
        clean_rows=build_rows(names, [p for p in pairs if p.method.key not in disturbed]),
    )


# --------------------------------------------------------------------------- mean report


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1) over runs with a value."""

    mean: float | None
    std: float | None
    n: int


def spread(values: Iterable[float | None]) -> Spread:
    present = [v for v in values if v is not None]
    return Spread(
        mean=statistics.fmean(present) if present else None,
        std=statistics.stdev(present) if len(present) > 1 else None,
        n=len(present),
    )


MEAN_FIELDS: Mapping[str, Callable[[RowReport], float | None]] = {
    "speedup": lambda row: row.speedup,
    "mean_rate_speedup": lambda row: row.mean_rate_speedup,
    "median_speedup": lambda row: row.median_speedup,
    "decode_speedup": lambda row: row.decode_speedup,
    "matched_speedup": lambda row: row.matched_speedup,
    "mat": lambda row: row.method.mat,
    "baseline_mat": lambda row: row.baseline.mat,
    "tokens_per_s": lambda row: row.method.tokens_per_s,
    "baseline_tokens_per_s": lambda row: row.baseline.tokens_per_s,
}


@dataclass(frozen=True)
class MeanRow:
    category: str
    runs: int
    figures: Mapping[str, Spread]


@dataclass(frozen=True)
class MeanReport:
    """Mean and spread over paired runs; ``reports`` holds each run in full."""

    std: str
    rows: tuple[MeanRow, ...]
    reports: tuple[Report, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "mean-report",
            "std": self.std,
            "runs": len(self.reports),
            "rows": [asdict(row) for row in self.rows],
            "reports": [report.to_json() for report in self.reports],
        }


def mean_report(reports: Sequence[Report]) -> MeanReport:
    """Rows in order of first appearance over the runs, the overall row last."""
    names = list(dict.fromkeys(r.category for rep in reports for r in rep.rows[:-1]))
    rows = []
    for name in [*names, OVERALL_ROW]:
        matching = [r for rep in reports for r in rep.rows if r.category == name]
        figures = {key: spread(get(r) for r in matching) for key, get in MEAN_FIELDS.items()}
        rows.append(MeanRow(name, len(matching), figures))
    return MeanReport("sample (n-1); null with fewer than 2 runs", tuple(rows), tuple(reports))


# --------------------------------------------------------------------------- text output


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _percent(value: float | None) -> str:
    return _fmt(None if value is None else 100 * value, ".1f", "%")


def align(table: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells)

    return [line(row) for row in table]


def _settings_text(settings: Mapping[str, Any] | None) -> str:
    if settings is None:
        return "(no meta recorded)"
    keys = [k for k in SETTING_KEYS if k != "params" and settings.get(k) is not None]
    shown = [f"{k}={settings[k]}" for k in keys]
    params = settings.get("params")
    return " ".join(shown + ([f"params={json.dumps(params, sort_keys=True)}"] if params else []))


def _counting_text(report: Report) -> str:
    if report.counting == "tokenizer":
        return f"both sides re-tokenized with {report.tokenizer_path}"
    return "new_tokens recorded in both files"


CLEAN_ROW = "overall w/o disturbed"


def _row_cells(r: RowReport, name: str) -> list[str]:
    return [name, str(r.questions), _fmt(r.method.tokens_per_s), _fmt(r.baseline.tokens_per_s),
            _fmt(r.speedup, ".2f", "x"), _fmt(r.mean_rate_speedup, ".2f", "x"),
            _fmt(r.median_speedup, ".2f", "x"), _fmt(r.decode_speedup, ".2f", "x"),
            _fmt(r.matched_speedup, ".2f", "x"), _fmt(r.method.mat), _fmt(r.baseline.mat),
            _percent(r.acceptance_rate), _percent(r.exact_match), _percent(r.turn_exact_match)]


def disturbance_lines(report: Report) -> list[str]:
    """One line per file: its disturbed questions, or "none"."""
    lines = [f"disturbed questions (time over {report.disturbance_threshold:g}x what the "
             "file's own clean questions predict):"]
    for side, found in report.disturbance.items():
        listed = "; ".join(
            f"id {q.question_id} ({q.category}) {q.wall_time:.2f} s, expected {q.expected:.2f} s,"
            f" {q.ratio:.2f}x, load {_fmt(q.load_average)}"
            for q in found.disturbed
        )
        lines.append(f"  {side}: {listed or 'none'}")
    return lines


def _environment_text(report: Report) -> str:
    method, base = report.settings["method"] or {}, report.settings["baseline"] or {}
    return "; ".join(f"{key} {method[key]!r} vs {base[key]!r}"
                     for key in report.environment_differs)


def format_table(report: Report) -> str:
    """The human-readable report printed before the JSON line."""
    header = ["category", "n", "tok/s", "base tok/s", "speedup", "q-mean speedup",
              "q-median speedup", "decode speedup", "length-matched speedup", "MAT", "base MAT",
              "acc.rate", "exact", "turn exact"]
    body = [_row_cells(r, r.category) for r in report.rows]
    if report.disturbed_ids:
        body.append(_row_cells(report.clean_rows[-1], CLEAN_ROW))
    histogram = " ".join(f"{k}:{v}" for k, v in report.overall.method.accept_histogram.items())
    lines = [
        f"method:   {report.method_file}  {_settings_text(report.settings['method'])}",
        f"baseline: {report.baseline_file}  {_settings_text(report.settings['baseline'])}",
        f"token counting: {_counting_text(report)}",
        "",
        *align([header, *body]),
        "",
        f"accepted-length histogram (method, overall): {histogram or '-'}",
        *([f"steps that ran the gated draft source (method, overall): "
           f"{_percent(report.overall.source_share)}"]
          if report.overall.source_share is not None else []),
        *disturbance_lines(report),
    ]
    for side, summary in report.errors.items():
        if summary["count"]:
            ids = format_ids(str(i) for i in summary["ids"])
            lines.append(
                f"errors in {side} file: {summary['count']} (ids {ids}); excluded on both sides"
            )
    if report.settings_differ:
        differ = ", ".join(report.settings_differ)
        lines.append(f"warning: settings differ between the runs: {differ}")
    if report.environment_differs:
        lines.append("warning: the runs were measured in different environments, so the "
                     f"speedup compares them too: {_environment_text(report)}")
    return "\n".join(lines)


def format_mean_table(report: MeanReport) -> str:
    def cell(s: Spread, suffix: str = "") -> str:
        return "-" if s.mean is None else f"{s.mean:.2f}{suffix} ± {_fmt(s.std)}"

    header = ["category", "runs", "speedup", "q-median speedup", "MAT", "tok/s", "base tok/s"]
    body = [
        [r.category, str(r.runs), cell(r.figures["speedup"], "x"),
         cell(r.figures["median_speedup"], "x"), cell(r.figures["mat"]),
         cell(r.figures["tokens_per_s"]), cell(r.figures["baseline_tokens_per_s"])]
        for r in report.rows
    ]
    runs = [
        f"run {i}: {rep.method_file} vs {rep.baseline_file}"
        for i, rep in enumerate(report.reports)
    ]
    return "\n".join([*runs, f"mean ± std, std: {report.std}", "", *align([header, *body])])


def write_plot(report: Report, path: str) -> None:
    """Two panels: per-row speedup bars annotated with MAT, and the method's
    overall accepted-length histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r.category for r in report.rows]
    bars = left.bar(range(len(names)), [r.speedup or 0.0 for r in report.rows], color="tab:blue")
    for bar, row in zip(bars, report.rows):
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        left.annotate(f"MAT {_fmt(row.method.mat)}", top, ha="center", va="bottom", fontsize=8)
    left.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_ylabel("speedup over baseline")
    left.set_title("speedup by category (MAT above bars)")
    histogram = report.overall.method.accept_histogram
    right.bar(list(histogram), list(histogram.values()), color="tab:orange")
    right.set_xticks(list(histogram))
    right.set_title("accepted length per step (method, overall)")
    right.set_xlabel("accepted length (tokens per step)")
    right.set_ylabel("steps")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise InputError(f"cannot write plot {path}: {exc}") from None
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Speed report of a method against a baseline."
    )
    parser.add_argument("--file-path", nargs="+", required=True, help="method answer file(s)")
    parser.add_argument("--base-path", nargs="+", required=True, help="baseline answer file(s)")
    parser.add_argument(
        "--tokenizer-path", help="re-tokenize both sides' texts with this tokenizer"
    )
    parser.add_argument("--mean-report", action="store_true", help="mean and std over paired runs")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--plot", help="write a PNG with speedup bars and the accepted-length histogram"
    )
    parser.add_argument(
        "--disturbance-threshold", type=float, default=DEFAULT_THRESHOLD,
        help="a question taking more than this many times its expected time is disturbed "
             "(default: %(default)s)",
    )
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if len(args.file_path) != len(args.base_path):
        raise InputError(
            f"--file-path has {len(args.file_path)} files but --base-path has {len(args.base_path)}"
        )
    if not args.mean_report and len(args.file_path) != 1:
        raise InputError("pass one --file-path and one --base-path, or add --mean-report")
    if args.mean_report and args.plot:
        raise InputError("--plot needs a single comparison, not --mean-report")
    if not args.disturbance_threshold > 1.0:
        raise InputError(f"--disturbance-threshold must be above 1, got {args.disturbance_threshold}")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    count = tokenizer_counter(args.tokenizer_path) if args.tokenizer_path else count_new_tokens
    reports = [
        aggregate(load_answers(m), load_answers(b), count, args.tokenizer_path,
                  args.disturbance_threshold)
        for m, b in zip(args.file_path, args.base_path)
    ]
    if args.mean_report:
        summary = mean_report(reports)
        text, payload = format_mean_table(summary), summary.to_json()
    else:
        text, payload = format_table(reports[0]), {"mode": "single", **reports[0].to_json()}
        if args.plot:
            write_plot(reports[0], args.plot)
            text += f"\nplot: {args.plot}"
            payload["plot"] = args.plot
    if not args.json:
        print(text)
    print(json.dumps(payload, allow_nan=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
