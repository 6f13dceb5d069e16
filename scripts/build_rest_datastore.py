"""Builds a REST datastore (logitspec/rest.py) from text or token files.

    python scripts/build_rest_datastore.py --out data/rest/chat.npz corpus.jsonl notes.txt
    python -m evaluation.inference_rest --datastore data/rest/chat.npz
    python scripts/build_rest_datastore.py --out data/rest/docs.npz --installed-docs \
        --exclude-packages torch transformers

Inputs, one or more, by extension (each entry is tokenized on its own, without special tokens,
with the tokenizer of ``--model-path``, the embedded default model when omitted):

- ``.txt``: UTF-8 text, the whole file one entry;
- ``.jsonl``: one line per record: a JSON string (an entry), or an object with ``text`` (a
  string), ``turns`` (strings, one entry each: question files), ``choices`` (objects with
  ``turns``: answer files of the inference commands), ``answer_ids`` (token ids, one entry,
  taken as they are: the ``answers.jsonl`` of ``scripts/train_draft_head.py``, the target's
  own answers to prompts composed there) or ``messages`` (chat records, ``role`` and
  ``content``: each assistant message one entry, as REST indexes the replies of a chat
  corpus);
- ``.tokens``: one entry per line, token ids separated by white space;
- ``.npy``: a 1-D array of token ids, one entry (no tokenizer needed);
- ``--installed-docs`` (with or without files): the long description (the README as packaged)
  of every Python distribution installed beside this script, one entry each, except those
  named by ``--exclude-packages`` (names compared as pip normalizes them), e.g. a
  documentation datastore that leaves out the documents of ``prepare_data.py pkgdocs``.

Output: one ``.npz`` file (format in ``logitspec.rest.DATASTORE_FORMAT``). The last stdout line is
one JSON object. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.args import OneLineParser  # noqa: E402
from logitspec.loading import ModelLoadError, load_tokenizer, resolve_model_path  # noqa: E402
from logitspec.rest import Datastore, DatastoreError  # noqa: E402

PROG = "build_rest_datastore.py"
SUFFIXES = (".txt", ".jsonl", ".tokens", ".npy")


class InputError(Exception):
    """A bad input file: one line on stderr, exit code 2."""


def texts_of_record(record: Any, where: str) -> Iterator[str | list[int]]:
    """The entries of one ``.jsonl`` record (module docstring): texts, or token ids where the
    record holds them."""
    if isinstance(record, str):
        yield record
    elif isinstance(record, dict) and isinstance(record.get("text"), str):
        yield record["text"]
    elif isinstance(record, dict) and isinstance(record.get("turns"), list):
        yield from (t for t in record["turns"] if isinstance(t, str))
    elif isinstance(record, dict) and isinstance(record.get("choices"), list):
        for choice in record["choices"]:
            yield from texts_of_record(choice if isinstance(choice, dict) else None, where)
    elif isinstance(record, dict) and isinstance(record.get("answer_ids"), list):
        ids = record["answer_ids"]
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise InputError(f"{where}: 'answer_ids' must be token ids (integers >= 0)")
        yield ids
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        for message in record["messages"]:
            if not (isinstance(message, dict) and isinstance(message.get("content"), str)):
                raise InputError(f"{where}: every message needs a 'content' string")
            if message.get("role") == "assistant":
                yield message["content"]
    else:
        raise InputError(f"{where}: expected a string or an object with 'text', 'turns', "
                         "'choices', 'answer_ids' or 'messages'")


def read_entries(path: Path, tokenize) -> Iterator[list[int]]:
    """The token ids of every entry of one input file."""
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown input type (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise InputError(f"no input file at {path}")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise InputError(f"{path}: expected a 1-D integer array, got {array.dtype} {array.shape}")
        yield array.tolist()
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 (byte offset {exc.start})") from None
    if path.suffix == ".txt":
        yield tokenize(text)
    elif path.suffix == ".tokens":
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                yield [int(t) for t in line.split()]
            except ValueError:
                raise InputError(f"{path}:{number}: expected token ids (integers)") from None
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: malformed JSON") from None
            for entry in texts_of_record(record, f"{path}:{number}"):
                yield entry if isinstance(entry, list) else tokenize(entry)


def normalized(name: str) -> str:
    """A distribution name as pip compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_docs(exclude: Sequence[str]) -> dict[str, str]:
    """Normalized name -> long description of every installed distribution not in ``exclude``
    and with a non-blank description (the first one found of a name installed twice)."""
    import importlib.metadata as metadata

    skip = {normalized(n) for n in exclude}
    docs: dict[str, str] = {}
    for dist in metadata.distributions():
        name = normalized(dist.metadata.get("Name") or "")
        text = dist.metadata.get_payload() or ""
        if name and name not in skip and name not in docs and text.strip():
            docs[name] = text
    return docs


def make_tokenizer(model_path: str | None, inputs: Sequence[Path], texts: bool = False):
    """Text to token ids with the model's tokenizer; loaded only if a text input needs it."""
    if not texts and all(p.suffix in (".npy", ".tokens") for p in inputs):
        return None
    try:
        tokenizer = load_tokenizer(resolve_model_path(model_path))
    except ModelLoadError as exc:
        raise InputError(str(exc)) from None
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="text or token files (see above)")
    parser.add_argument("--out", required=True, type=Path, help="the datastore file to write")
    parser.add_argument("--model-path", default=None,
                        help="the model whose tokenizer splits text inputs (default: embedded)")
    parser.add_argument("--installed-docs", action="store_true",
                        help="also the long description of every installed distribution")
    parser.add_argument("--exclude-packages", nargs="+", default=[], metavar="NAME",
                        help="distributions --installed-docs leaves out")
    args = parser.parse_args(argv)
    if not args.inputs and not args.installed_docs:
        parser.error("give input files, --installed-docs, or both")
    if args.exclude_packages and not args.installed_docs:
        parser.error("--exclude-packages goes with --installed-docs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenize = make_tokenizer(args.model_path, args.inputs, args.installed_docs)
        entries = [e for path in args.inputs for e in read_entries(path, tokenize)]
        docs = installed_docs(args.exclude_packages) if args.installed_docs else {}
        entries += [tokenize(text) for text in docs.values()]
        store = Datastore.from_entries(entries)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        store.save(args.out)
    except (InputError, DatastoreError, OSError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    summary = {"out": str(args.out), "entries": len(store.entry_starts),
               "tokens": len(store.tokens)}
    if args.installed_docs:
        summary["packages"] = sorted(docs)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
