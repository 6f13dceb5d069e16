"""Answer-file writing, repair and resume bookkeeping (evaluation/answer_file.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation import speed  # noqa: E402
from evaluation.answer_file import (  # noqa: E402
    AnswerFileBusy, AnswerFileError, AnswerFileLock, AnswerWriter, drop_entries, read_answers,
    reorder_answers, repair_tail,
)


def answer(
    qid: int | str, text: str = "fine", meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "question_id": qid, "category": "qa", "answer_id": f"a{qid}", "model_id": "m",
        "tstamp": 1.0,
        "choices": [{"index": 0, "turns": [text], "decoding_steps": [2], "new_tokens": [3],
                     "wall_time": [0.5], "accept_lengths": [2, 1], "draft_lengths": [4, 4]}],
        "meta": meta or {"method": "logitspec"},
    }


def failure(qid: int | str) -> dict[str, Any]:
    return {"question_id": qid, "category": "qa", "answer_id": "x", "model_id": "m",
            "tstamp": 1.0, "choices": [], "error": "PromptTooLongError: too long"}


def line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode()


# --------------------------------------------------------------------------- writer


def test_writer_appends_one_terminated_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "answers.jsonl"
    with AnswerWriter(path) as writer:
        writer.write(answer(1, "ünïcode\nand a newline"))
        writer.write(failure(2))
    with AnswerWriter(path) as writer:  # a second run appends
        writer.write(answer(3))
        assert writer.written == 1
    data = path.read_bytes()
    assert data.count(b"\n") == 3 and data.endswith(b"\n")
    records = [json.loads(x) for x in data.splitlines()]
    assert [r["question_id"] for r in records] == [1, 2, 3]
    assert records[0]["choices"][0]["turns"] == ["ünïcode\nand a newline"]


def test_line_breaks_of_other_readers_stay_inside_the_line(tmp_path: Path) -> None:
    """U+0085 and U+2028 end a line for str.splitlines: written escaped, read back intact."""
    path = tmp_path / "answers.jsonl"
    text = "a\x85b\u2028c\u2029d\re"
    with AnswerWriter(path) as writer:
        writer.write(answer(1, text))
    assert path.read_bytes().isascii() and path.read_bytes().count(b"\n") == 1
    assert read_answers(path).answered == {"1"}
    assert speed.load_answers(path).records[0].choices[0].turns == (text,)


def test_writer_refuses_an_unwritable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AnswerFileError, match="cannot write answer file"):
        AnswerWriter(blocker / "answers.jsonl")


def test_writer_refuses_nan(tmp_path: Path) -> None:
    record = answer(1)
    record["choices"][0]["wall_time"] = [float("nan")]
    with AnswerWriter(tmp_path / "a.jsonl") as writer, pytest.raises(ValueError):
        writer.write(record)
    assert (tmp_path / "a.jsonl").read_bytes() == b""


# --------------------------------------------------------------------------- repair

GOOD = line(answer(1)) + line(answer(2))

REPAIRS = [
    # (file content, content after repair, action)
    (b"", b"", "none"),
    (GOOD, GOOD, "none"),
    (GOOD + b"\n", GOOD + b"\n", "none"),
    (GOOD + b'{"question_id": 3, "cat', GOOD, "cut"),
    (GOOD + b"\x00\x00\x00\x00", GOOD, "cut"),
    (GOOD + b"{not json}\n", GOOD, "cut"),
    (GOOD + line(answer(3)).rstrip(b"\n"), GOOD + line(answer(3)), "terminated"),
    (b'{"question_id": 1, "ca', b"", "cut"),
]


@pytest.mark.parametrize("content, repaired, action", REPAIRS)
def test_repair_tail(tmp_path: Path, content: bytes, repaired: bytes, action: str) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(content)
    result = repair_tail(path)
    assert result.action == action
    assert path.read_bytes() == repaired
    assert result.bytes_removed == (len(content) - len(repaired) if action == "cut" else 0)


def test_repair_of_a_missing_file_does_nothing(tmp_path: Path) -> None:
    assert repair_tail(tmp_path / "missing.jsonl").action == "none"
    assert not (tmp_path / "missing.jsonl").exists()


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=30), min_size=1, max_size=5), data=st.data())
def test_a_crash_anywhere_repairs_to_a_prefix_of_the_answers(
    tmp_path_factory: pytest.TempPathFactory, texts: list[str], data: st.DataObject
) -> None:
    """Cut the file at any byte (a crash mid-write): the repaired file holds complete lines,
    the first k answers, and ends with a newline."""
    path = tmp_path_factory.mktemp("crash") / "answers.jsonl"
    full = b"".join(line(answer(i, t)) for i, t in enumerate(texts))
    cut = data.draw(st.integers(0, len(full)))
    path.write_bytes(full[:cut])
    repair_tail(path)
    repaired = path.read_bytes()
    assert full.startswith(repaired) and (not repaired or repaired.endswith(b"\n"))
    existing = read_answers(path)
    assert existing.answered == {str(i) for i in range(repaired.count(b"\n"))}


# --------------------------------------------------------------------------- reading


def test_read_answers_splits_answered_and_failed(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(line(answer(1, meta={"method": "pld"})) + line(failure("b")) + b"\n"
                     + line(answer("c")))
    existing = read_answers(path)
    assert existing.answered == {"1", "c"} and existing.failed == {"b"}
    assert existing.meta == {"method": "pld"}


def test_read_answers_of_a_missing_file(tmp_path: Path) -> None:
    existing = read_answers(tmp_path / "none.jsonl")
    assert not existing.answered and not existing.failed and existing.meta is None


@pytest.mark.parametrize("bad, message", [
    (b"{broken\n", "malformed JSON"),
    (line({"question_id": 5, "category": "qa", "choices": []}), "'choices' must be a non-empty"),
    (line(answer(1)), "duplicate question_id 1"),
    (line(failure(1)), "duplicate question_id 1"),
])
def test_read_answers_names_the_bad_line(tmp_path: Path, bad: bytes, message: str) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(line(answer(1)) + bad + line(answer(9)))
    with pytest.raises(AnswerFileError, match=f"{path}:2: .*{message}"):
        read_answers(path)


# --------------------------------------------------------------------------- dropping


def test_drop_entries_keeps_the_other_lines_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    odd_spacing = b'{"question_id":  3, "category": "qa", "choices": [], "error": "x"}\n'
    kept = [line(answer(1)), odd_spacing, line(answer("z"))]
    path.write_bytes(kept[0] + line(failure(2)) + kept[1] + line(failure("y")) + kept[2])
    assert drop_entries(path, frozenset({"2", "y"})) == 2
    assert path.read_bytes() == b"".join(kept)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_drop_entries_without_matches_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(GOOD)
    inode = path.stat().st_ino
    assert drop_entries(path, frozenset({"7"})) == 0
    assert drop_entries(path, frozenset()) == 0
    assert path.stat().st_ino == inode and path.read_bytes() == GOOD
    assert drop_entries(tmp_path / "missing.jsonl", frozenset({"1"})) == 0


# --------------------------------------------------------------------------- order


@pytest.mark.parametrize("ids, expected, rewritten", [
    ([1, 2, 3], [1, 2, 3], False),
    ([3, 1, 2], [1, 2, 3], True),
    ([2, "x", 1, "y"], [1, 2, "x", "y"], True),  # ids the question file lacks: last, in order
    (["x", 1], [1, "x"], True),
    ([], [], False),
])
def test_reorder_answers(tmp_path: Path, ids: list[int | str], expected: list[int | str],
                         rewritten: bool) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b"".join(line(answer(i)) for i in ids))
    lines = {json.loads(x)["question_id"]: x for x in path.read_bytes().splitlines(True)}
    path.chmod(0o640)
    assert reorder_answers(path, {"1": 0, "2": 1, "3": 2}) == rewritten
    assert path.read_bytes() == b"".join(lines[i] for i in expected)
    assert list(tmp_path.iterdir()) == [path] and path.stat().st_mode & 0o777 == 0o640


def test_reorder_of_a_missing_file(tmp_path: Path) -> None:
    assert not reorder_answers(tmp_path / "none.jsonl", {"1": 0})


# --------------------------------------------------------------------------- lock


def test_lock_admits_one_holder_and_is_removed_after(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "answers.jsonl"
    with AnswerFileLock(path) as held:
        assert held.lock_path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(AnswerFileBusy, match=rf"^{path} is being written by another run "
                           rf"\(process {os.getpid()}\)"):
            AnswerFileLock(path).acquire()
    assert not held.lock_path.exists()
    with AnswerFileLock(path):  # free again
        pass


def test_a_lock_file_left_by_a_dead_run_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    (tmp_path / "answers.jsonl.lock").write_text("99999999\n")  # no flock held on it
    with AnswerFileLock(path) as held:
        assert held.lock_path.read_text() == f"{os.getpid()}\n"


def test_lock_on_an_unwritable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AnswerFileError, match="cannot write answer file"):
        AnswerFileLock(blocker / "answers.jsonl").acquire()
