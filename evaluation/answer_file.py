"""Answer files: crash-safe appends, resume and repair.

Policies:

- Append only: each answer is one ``os.write`` of the whole line and its newline on a file
  opened with ``O_APPEND``, then ``fsync``. A crash can leave at most one incomplete last line.
- Lines are ASCII JSON (non-ASCII characters escaped), so no character inside a line is a
  line break to any reader (Python's ``str.splitlines`` also breaks at U+0085 and U+2028);
  this module splits lines at ``\n`` only.
- Repair (:func:`repair_tail`, at start): an unterminated last line that is a valid JSON
  object is kept and terminated; otherwise it, or a terminated last line that is not valid
  JSON, is cut off (the file is truncated to the end of the last good line). Invalid lines
  anywhere else are not a crash's doing: they are an :class:`AnswerFileError`.
- Resume (:func:`read_answers`): a question id with an answer is done and skipped; an error
  entry is not done. Before the failed questions are retried, their error entries are removed
  (:func:`drop_entries`: the other lines copied byte for byte to a temporary file that replaces
  the answer file atomically), so the file keeps one line per question id.
- Order (:func:`reorder_answers`): a sharded run appends answers as they complete, then
  puts the lines in the question file's order with one atomic rewrite (no rewrite when they
  already are); lines of ids the question file lacks keep their order, at the end.
- One writer at a time (:class:`AnswerFileLock`): a run holds an exclusive, non-blocking
  ``flock`` on ``<answer file>.lock`` from before the repair to its end; a second run on the
  same file is refused instead of interleaving lines. The holder removes the lock file when
  it ends; a run that opened the file just before its removal sees it gone and tries again.
- Lines are validated with the speed report's own parser, so whatever this module accepts,
  ``evaluation/speed.py`` reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .speed import InputError, parse_record


class AnswerFileError(Exception):
    """The answer file cannot be used; the message names the file (and line)."""


class AnswerFileBusy(AnswerFileError):
    """Another run holds the answer file's lock."""


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_tail` did: ``action`` is "none", "terminated" or "cut"."""

    action: str
    bytes_removed: int = 0


@dataclass(frozen=True)
class ExistingAnswers:
    """Question ids (as strings) already in an answer file, and the first ``meta`` found."""

    answered: frozenset[str]
    failed: frozenset[str]
    meta: Mapping[str, Any] | None


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


def repair_tail(path: Path) -> Repair:
    """Repairs a crash's incomplete last line (module docstring); a missing file is fine."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Repair("none")
    body = data.rstrip(b"\n")
    start = body.rfind(b"\n") + 1
    last = body[start:]
    if not last.strip() or _is_json_object(last):
        if data and not data.endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            return Repair("terminated")
        return Repair("none")
    with open(path, "r+b") as f:
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    return Repair("cut", len(data) - start)


def read_answers(path: Path) -> ExistingAnswers:
    """The ids answered and failed in ``path`` (nothing for a missing file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ExistingAnswers(frozenset(), frozenset(), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise AnswerFileError(f"cannot read {path}: {exc}") from None
    answered: set[str] = set()
    failed: set[str] = set()
    meta = None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_line(line, f"{path}:{lineno}")
        if record.key in answered or record.key in failed:
            raise AnswerFileError(f"{path}:{lineno}: duplicate question_id {record.question_id!r}")
        (failed if record.error is not None else answered).add(record.key)
        meta = meta if meta is not None else record.meta
    return ExistingAnswers(frozenset(answered), frozenset(failed), meta)


def _parse_line(line: str, where: str) -> Any:
    try:
        return parse_record(json.loads(line), where)
    except json.JSONDecodeError as exc:
        raise AnswerFileError(f"{where}: malformed JSON ({exc.msg})") from None
    except InputError as exc:
        raise AnswerFileError(str(exc)) from None


def drop_entries(path: Path, keys: frozenset[str]) -> int:
    """Removes the lines of question ids ``keys`` atomically; returns how many were removed."""
    if not keys or not path.exists():
        return 0
    kept: list[bytes] = []
    removed = 0
    for line in _lines(path.read_bytes()):
        if line.strip() and str(json.loads(line)["question_id"]) in keys:
            removed += 1
        else:
            kept.append(line)
    if removed:
        try:
            _replace(path, b"".join(kept))
        except OSError as exc:
            raise AnswerFileError(f"cannot rewrite answer file {path}: {exc.strerror}") from None
    return removed


def reorder_answers(path: Path, order: Mapping[str, int]) -> bool:
    """Sorts the lines of ``path`` by ``order[question id]`` (stable; ids not in ``order``
    last), atomically; returns whether the file had to be rewritten.

    Example: lines of ids 3, 1, 9, 2 with order {1: 0, 2: 1, 3: 2} -> 1, 2, 3, 9.
    """
    if not path.exists():
        return False
    lines = [line for line in _lines(path.read_bytes()) if line.strip()]
    rank = [order.get(str(json.loads(line)["question_id"]), len(order)) for line in lines]
    if rank == sorted(rank):
        return False
    ranked = sorted(zip(rank, range(len(lines))))
    try:
        _replace(path, b"".join(lines[i] for _, i in ranked))
    except OSError as exc:
        raise AnswerFileError(f"cannot rewrite answer file {path}: {exc.strerror}") from None
    return True


def _lines(data: bytes) -> list[bytes]:
    """``data`` split after every ``\n`` (kept); a last piece without one is kept too."""
    pieces = data.split(b"\n")
    return [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def _replace(path: Path, data: bytes) -> None:
    """Replaces the existing ``path`` by ``data`` atomically (same permissions, durable)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(path.stat().st_mode))
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


class AnswerWriter:
    """Appends answer lines to ``path`` (created with its folders), one durable write each."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AnswerFileError(f"cannot write answer file {path}: {exc.strerror}") from None
        self.path = path
        self.written = 0

    def write(self, record: Mapping[str, Any]) -> None:
        data = (json.dumps(record, allow_nan=False) + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self.written += 1

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "AnswerWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AnswerFileLock:
    """Holds ``<path>.lock`` (module docstring) from :meth:`acquire` to :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises :class:`AnswerFileBusy` at once (no waiting)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                self._fd = self._try_lock()
        except OSError as exc:
            raise AnswerFileError(
                f"cannot write answer file {self.path}: {exc.strerror}") from None

    def _try_lock(self) -> int | None:
        """The locked descriptor, or None when the file was removed while we locked it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AnswerFileBusy(
                f"{self.path} is being written by another run{self._holder()}: wait for it "
                "to end or pass another --answer-file") from None
        try:
            current = os.stat(self.lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _holder(self) -> str:
        try:
            pid = self.lock_path.read_text().strip()
        except OSError:
            return ""
        return f" (process {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self._fd is None:
            return
        self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "AnswerFileLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
