"""Question files: reading, validating and choosing the questions of a run.

A question file holds one JSON object a line: ``question_id`` (an integer or a non-empty
string, unique in the file), ``category`` (a non-empty string), ``turns`` (a non-empty list of
non-empty user messages) and optional extra fields, which are ignored. Lines end at ``\n``
only (a U+2028 inside a JSON string is text, not a line break); blank lines are skipped.
Anything else is a :class:`QuestionFileError` naming ``file:line``.

Selection (:func:`select_questions`): first the slice ``[begin, end)`` of the file order, then,
with ``per_category = N``, the first N questions of each category group in that slice, in file
order. The eight MT-bench categories form one group (as in the speed report), so N = 8 on
Spec-Bench keeps 48 questions: 8 multi-turn and 8 of each of its other five categories.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .jsonl import parse_keyed_lines
from .speed import MT_BENCH_CATEGORIES, MULTI_TURN_ROW


class QuestionFileError(Exception):
    """The question file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]

    @property
    def key(self) -> str:
        """The id as answer files are matched on (``1`` and ``"1"`` agree)."""
        return str(self.question_id)

    @property
    def group(self) -> str:
        return MULTI_TURN_ROW if self.category in MT_BENCH_CATEGORIES else self.category


def parse_question(obj: object, where: str) -> Question:
    if not isinstance(obj, dict):
        raise QuestionFileError(f"{where}: expected a JSON object")
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not (isinstance(qid, int) or (isinstance(qid, str) and qid)):
        raise QuestionFileError(f"{where}: 'question_id' must be an integer or a non-empty string")
    category = obj.get("category")
    if not isinstance(category, str) or not category:
        raise QuestionFileError(f"{where}: 'category' must be a non-empty string")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns or not all(
        isinstance(t, str) and t for t in turns
    ):
        raise QuestionFileError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    return Question(qid, category, tuple(turns))


def load_questions(path: Path) -> list[Question]:
    """All questions of ``path`` in file order."""
    text = _read_text(path)
    questions = parse_keyed_lines(text, path, parse_question, QuestionFileError)
    if not questions:
        raise QuestionFileError(f"{path}: no questions")
    return questions


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; undecodable bytes are reported with their line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise QuestionFileError(f"no question file at {path}") from None
    except OSError as exc:
        raise QuestionFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise QuestionFileError(
            f"{path}:{lineno}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def select_questions(
    questions: list[Question],
    begin: int | None = None,
    end: int | None = None,
    per_category: int | None = None,
) -> list[Question]:
    """The slice ``[begin, end)``, then the first ``per_category`` of each group (module doc).

    Example: categories ``[a, a, b, a, b]``, begin 1, per_category 1 -> the questions at
    indices 1 (a) and 2 (b).
    """
    chosen = questions[begin:end]
    if per_category is None:
        return chosen
    seen: Counter[str] = Counter()
    kept = []
    for question in chosen:
        seen[question.group] += 1
        if seen[question.group] <= per_category:
            kept.append(question)
    return kept
