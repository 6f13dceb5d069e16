"""Reading the harness's JSONL files: one object per line, keyed by question id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def parse_keyed_lines(
    text: str, path: str | Path, parse: Callable[[object, str], T], error: type[Exception]
) -> list[T]:
    """The non-blank lines of ``text`` (split on ``\\n`` only), each parsed by
    ``parse(obj, "path:line")``; a malformed line or a repeated ``.key`` (question id) raises
    ``error`` naming ``path:line``."""
    records: list[T] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: malformed JSON ({exc.msg})") from None
        record = parse(obj, where)
        if record.key in first_line:
            raise error(
                f"{where}: duplicate question_id {record.question_id!r}"
                f" (first on line {first_line[record.key]})"
            )
        first_line[record.key] = lineno
        records.append(record)
    return records
