"""Bad inputs, one table: each stops the run with one line on stderr and exit code 2.

Every case runs ``main(argv)`` in this process on a tiny random Llama (or a broken copy of it)
and a question file written for the case; the answer file always goes to a temporary folder.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

from cli_helpers import DEMO, run_cli, save_tiny_llama, write_questions
from evaluation import (
    inference_eagle, inference_lookahead, inference_pld, inference_racer, inference_rest, inference_sam,
    inference_sps, inference_suffix,
)
from logitspec.rest import Datastore

Argv = Callable[["Inputs"], list[str]]


@dataclass(frozen=True)
class Inputs:
    """The files the cases point at, made once for the module."""

    folder: Path
    tiny: Path
    reversed_bytes: Path  # the tiny model with a same-size tokenizer that maps ids otherwise

    def questions(self, name: str, lines: list[dict | str] | None = None,
                  raw: bytes | None = None) -> str:
        path = self.folder / "questions" / f"{name}.jsonl"
        if raw is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
        else:
            write_questions(path, lines or [])
        return str(path)

    def datastore(self) -> str:
        """A REST datastore with a token id the tiny model does not have."""
        path = self.folder / "big-ids.npz"
        if not path.exists():
            Datastore.from_entries([[1, 2, 40000]]).save(path)
        return str(path)

    def model(self, name: str, edit: Callable[[Path], None]) -> str:
        """A copy of the tiny model, changed by ``edit``."""
        path = self.folder / "models" / name
        if not path.exists():
            shutil.copytree(self.tiny, path)
            edit(path)
        return str(path)


def _set_config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _remove(*names: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        for name in names:
            (folder / name).unlink(missing_ok=True)
    return edit


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


OK = {"question_id": 1, "category": "qa", "turns": ["Hi?"]}


def _question_file(name: str, lines: list[dict | str] | None = None,
                   raw: bytes | None = None) -> Argv:
    return lambda inputs: ["--model-path", str(inputs.tiny), "--question-file",
                           inputs.questions(name, lines, raw)]


def _tiny(*flags: str) -> Argv:
    return lambda inputs: ["--model-path", str(inputs.tiny), "--question-file", str(DEMO),
                           "--question-end", "1", *flags]


def _model(name: str, edit: Callable[[Path], None], *flags: str) -> Argv:
    return lambda inputs: ["--model-path", inputs.model(name, edit), "--question-file",
                           str(DEMO), "--question-end", "1", *flags]


def _draft_mismatch(inputs: Inputs) -> list[str]:
    return _tiny("--draft-model-path", str(inputs.reversed_bytes))(inputs)


def _corpus(name: str, content: bytes) -> Argv:
    """The tiny model with ``--corpus`` pointing at a file holding ``content``."""
    def argv(inputs: Inputs) -> list[str]:
        path = inputs.folder / "corpora" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return _tiny("--corpus", str(path))(inputs)
    return argv


@dataclass(frozen=True)
class Case:
    """A bad input: its id, its command line, a regex for the error line, the command."""

    id: str
    argv: Argv
    pattern: str
    command: ModuleType = inference_pld


CASES = [
    # question files
    Case("question file missing", lambda i: ["--question-file", str(i.folder / "nope.jsonl")],
         r"no question file at .*nope\.jsonl"),
    Case("question file empty", _question_file("empty", raw=b"\n\n"),
         r"empty\.jsonl: no questions"),
    Case("question not UTF-8",
         _question_file("latin", raw=json.dumps(OK).encode() + b'\n{"turns": ["\xff"]}\n'),
         r"latin\.jsonl:2: not UTF-8 \(byte 0xff at offset \d+\)"),
    Case("question malformed JSON", _question_file("malformed", [OK, '{"question_id": 2,']),
         r"malformed\.jsonl:2: malformed JSON"),
    Case("question not an object", _question_file("array", [[1, 2]]),
         r":1: expected a JSON object"),
    Case("question without turns", _question_file("no-turns", [{"question_id": 1,
                                                                 "category": "qa"}]),
         r":1: 'turns' must be a non-empty list"),
    Case("question with empty turns",
         _question_file("empty-turns", [OK, {**OK, "question_id": 2, "turns": []}]),
         r":2: 'turns' must be a non-empty list"),
    Case("question with an empty turn", _question_file("empty-turn", [{**OK, "turns": ["a", ""]}]),
         r"'turns' must be a non-empty list of non-empty strings"),
    Case("question id of a wrong type", _question_file("float-id", [{**OK, "question_id": 1.5}]),
         r"'question_id' must be an integer or a non-empty string"),
    Case("question category of a wrong type",
         _question_file("list-category", [{**OK, "category": ["qa"]}]),
         r"'category' must be a non-empty string"),
    Case("duplicate question ids", _question_file("duplicate", [OK, {**OK, "turns": ["again"]}]),
         r":2: duplicate question_id 1 \(first on line 1\)"),
    # models
    Case("model path missing",
         lambda i: ["--model-path", str(i.folder / "none"), "--question-file", str(DEMO)],
         r"model path '.*none' does not exist"),
    Case("model without config.json", _model("no-config", _remove("config.json")),
         r"no-config has no config\.json"),
    Case("model with pickle weights only", _model("pickle-only", _pickle_only),
         r"no \.safetensors files \(found pytorch_model\.bin: pickle checkpoints are not loaded"),
    Case("model of an unsupported architecture", _model("gpt2", _set_config(model_type="gpt2")),
         r"model .*gpt2: model_type 'gpt2' is not supported"),
    Case("model without a tokenizer",
         _model("no-tokenizer", _remove("tokenizer.json", "tokenizer_config.json")),
         r"no-tokenizer has no tokenizer \(none of tokenizer\.json"),
    Case("draft tokenizer unlike the target's", _draft_mismatch,
         r"token id \d+ is .* for the draft: draft and target must share a tokenizer",
         inference_sps),
    Case("max new tokens beyond the context",
         _model("short", _set_config(max_position_embeddings=64), "--max-new-tokens", "64"),
         r"max_new_tokens 64 leaves no room for a prompt in the model's context of 64 tokens"),
    # flags
    Case("max new tokens 0", _tiny("--max-new-tokens", "0"),
         r"max_new_tokens must be >= 1, got 0"),
    Case("max new tokens negative", _tiny("--max-new-tokens", "-3"),
         r"max_new_tokens must be >= 1, got -3"),
    Case("tree budget 0", _tiny("--draft-tree-capacity", "0"),
         r"draft_tree_capacity must be >= 1 \(the root\), got 0"),
    Case("tree budget negative", _tiny("--draft-tree-capacity", "-4"),
         r"draft_tree_capacity must be >= 1 \(the root\), got -4"),
    Case("n-gram size 0", _tiny("--max-ngram-size", "0"), r"max_ngram_size must be >= 1, got 0"),
    Case("num_pred_tokens 0", _tiny("--num-pred-tokens", "0"),
         r"num_pred_tokens must be >= 1, got 0"),
    Case("cost schedule with several drafts",
         _tiny("--draft-schedule", "cost", "--num-drafts", "2"),
         r"--draft-schedule cost sizes one chain: one draft model, --num-drafts 1", inference_sps),
    Case("draft always without the cost schedule", _tiny("--draft-always"),
         r"--draft-always applies to --draft-schedule cost", inference_sps),
    Case("head always at a fixed budget", _tiny("--head-always", "--draft-tree-capacity", "16"),
         r"--head-always applies at the automatic budget", inference_eagle),
    Case("lookahead level 2", _tiny("--level", "2"),
         r"level \(n-gram size N\) must be >= 3, got 2", inference_lookahead),
    Case("lookahead window 0", _tiny("--window", "0"), r"window \(W\) must be >= 1, got 0",
         inference_lookahead),
    Case("lookahead guess negative", _tiny("--guess", "-1"),
         r"guess \(G, n-grams verified per step\) must be >= 1, got -1", inference_lookahead),
    Case("num workers 0", _tiny("--num-workers", "0"), r"num_workers must be >= 1, got 0"),
    Case("GPUs per model above the total", _tiny("--num-gpus-per-model", "2"),
         r"num_gpus_per_model \(2\) must be <= num_gpus_total \(1\)"),
    Case("GPUs total not a multiple", _tiny("--num-gpus-total", "3", "--num-gpus-per-model", "2"),
         r"num_gpus_total \(3\) must be a multiple of num_gpus_per_model \(2\)"),
    Case("GPU workers on cpu", _tiny("--num-gpus-total", "2", "--device", "cpu"),
         r"the device is cpu: use --num-workers"),
    Case("max retries negative", _tiny("--max-retries", "-1"), r"max_retries must be >= 0"),
    Case("top_p 0", _tiny("--top-p", "0"), r"top_p must be in \(0, 1\], got 0\.0"),
    Case("top_p above 1", _tiny("--top-p", "1.5"), r"top_p must be in \(0, 1\], got 1\.5"),
    Case("top_k negative", _tiny("--top-k", "-1"), r"top_k must be >= 0, got -1"),
    Case("temperature negative", _tiny("--temperature", "-0.5"),
         r"temperature must be >= 0, got -0\.5"),
    Case("num choices 0", _tiny("--num-choices", "0"), r"num_choices must be >= 1, got 0"),
    Case("slice end before begin", _tiny("--question-begin", "3", "--question-end", "1"),
         r"question_end must be >= question_begin"),
    Case("unknown device", _tiny("--device", "tpu"), r"unknown device 'tpu'"),
    Case("float32 passes from 0 tokens", _tiny("--float32-from", "0"),
         r"float32_from must be 'auto', 'off' or a positive number of tokens, got '0'"),
    Case("float32 passes of a float32 model", _tiny("--float32-from", "16", "--dtype", "float32"),
         r"--float32-from widens half-precision passes; the dtype is float32"),
    Case("not a number", _tiny("--max-new-tokens", "many"),
         r"argument --max-new-tokens: invalid int value: 'many'"),
    Case("empty slice", _tiny("--question-begin", "100", "--question-end", "200"),
         r"no questions selected from .*demo/question\.jsonl"),
    Case("racer tree budget 0", _tiny("--draft-tree-capacity", "0"),
         r"draft_tree_capacity must be >= 1 \(the root\), got 0", inference_racer),
    Case("racer n-gram window 1", _tiny("--ngram", "1"), r"ngram must be >= 2, got 1",
         inference_racer),
    Case("racer automaton too small", _tiny("--max-nodes", "10"),
         r"max_nodes must be > ngram=10, got 10", inference_racer),
    Case("racer breadth 0", _tiny("--max-breadth", "0"), r"max_breadth must be >= 1, got 0",
         inference_racer),
    Case("racer prompt logits neither on nor off", _tiny("--prompt-logits", "maybe"),
         r"argument --prompt-logits: invalid choice: 'maybe'", inference_racer),
    # SAM-Decoding
    Case("sam draft size 0", _tiny("--draft-size", "0"),
         r"draft_size must be >= 1 \(the root\), got 0", inference_sam),
    Case("sam tree budget 0", _tiny("--draft-tree-capacity", "0"),
         r"draft_tree_capacity must be >= 1 \(the root\), got 0", inference_sam),
    Case("sam threshold negative", _tiny("--match-threshold", "-1"),
         r"threshold and static_bias must be >= 0, got -1 and 5", inference_sam),
    Case("sam bias negative", _tiny("--static-bias", "-2"),
         r"threshold and static_bias must be >= 0, got 5 and -2", inference_sam),
    Case("sam match scale 0", _tiny("--match-scale", "0"), r"match_scale must be > 0, got 0\.0",
         inference_sam),
    Case("sam unknown fallback", _tiny("--fallback", "eagle"),
         r"argument --fallback: invalid choice: 'eagle'", inference_sam),
    Case("sam corpus missing", lambda i: _tiny("--corpus", str(i.folder / "none.ids"))(i),
         r"corpus .*none\.ids: no such file", inference_sam),
    Case("sam corpus id not a number", _corpus("words.ids", b"5 6\n7 x\n"),
         r"corpus .*words\.ids, line 2: 'x' is not a token id", inference_sam),
    Case("sam corpus id outside the vocabulary", _corpus("big.ids", b"5 6 400\n"),
         r"corpus .*big\.ids, line 1: token id 400 is outside the vocabulary of 259",
         inference_sam),
    Case("sam corpus empty", _corpus("empty.txt", b" \n\n"), r"corpus .*empty\.txt: no tokens",
         inference_sam),
    Case("sam corpus not UTF-8", _corpus("latin.txt", b"caf\xe9"),
         r"corpus .*latin\.txt: not UTF-8 text \(byte 3\)", inference_sam),
    # SuffixDecoding's flags
    Case("suffix tree budget 0", _tiny("--draft-tree-capacity", "0"),
         r"draft_tree_capacity must be >= 1 \(the root\), got 0", inference_suffix),
    Case("suffix mode unknown", _tiny("--mode", "path"),
         r"argument --mode: invalid choice: 'path'", inference_suffix),
    Case("suffix tree depth 0", _tiny("--max-depth", "0"), r"max_depth must be >= 1, got 0",
         inference_suffix),
    Case("suffix spec factor negative", _tiny("--max-spec-factor", "-1"),
         r"max_spec_factor must be >= 0, got -1\.0", inference_suffix),
    Case("suffix spec offset not finite", _tiny("--max-spec-offset", "inf"),
         r"max_spec_offset must be finite, got inf", inference_suffix),
    Case("suffix min token prob above 1", _tiny("--min-token-prob", "1.5"),
         r"min_token_prob must be in \[0, 1\], got 1\.5", inference_suffix),
    Case("suffix cached answers negative", _tiny("--max-cached-answers", "-1"),
         r"max_cached_answers must be >= 0, got -1", inference_suffix),
    # REST's datastores and flags
    Case("rest without a datastore", _tiny(), r"--datastore is required", inference_rest),
    Case("rest datastore missing", lambda i: _tiny("--datastore", str(i.folder / "none.npz"))(i),
         r"no datastore file at .*none\.npz", inference_rest),
    Case("rest datastore not a datastore", lambda i: _tiny("--datastore", str(DEMO))(i),
         r"question\.jsonl is not a datastore", inference_rest),
    Case("rest datastore of another vocabulary", lambda i: _tiny("--datastore", i.datastore())(i),
         r"holds token id 40000, beyond the model's vocabulary of 259", inference_rest),
    Case("rest spans reversed",
         lambda i: _tiny("--datastore", i.datastore(), "--max-span", "2", "--min-span", "3")(i),
         r"spans must satisfy 1 <= min_span <= max_span, got 3 and 2", inference_rest),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("bad-inputs")
    return Inputs(folder, save_tiny_llama(folder / "tiny-llama"),
                  save_tiny_llama(folder / "reversed-bytes", reversed_bytes=True))


def check_one_line_error(command: ModuleType, argv: list[str], pattern: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    prog = command.METHOD.prog
    assert run_cli(command, argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, inputs: Inputs, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = case.argv(inputs) + ["--answer-file", str(tmp_path / "answers.jsonl"), "--warmup", "0"]
    check_one_line_error(case.command, argv, case.pattern, capsys)
    assert not (tmp_path / "answers.jsonl.lock").exists()


def test_workers_without_ray(inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what a missing package looks like
    argv = _tiny("--num-workers", "2", "--answer-file", str(tmp_path / "a.jsonl"))(inputs)
    check_one_line_error(inference_pld, argv, r"--num-workers 2 needs Ray: pip install "
                         r"'logitspec\[ray\]'$", capsys)


def test_a_broken_answer_file(inputs: Inputs, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """A bad line before the last is not a crash's doing: refused, the file left alone."""
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b"{broken\n" + json.dumps({"question_id": 9, "category": "qa",
                                                   "choices": [], "error": "x"}).encode() + b"\n")
    before = answers.read_bytes()
    argv = _tiny("--answer-file", str(answers))(inputs)
    check_one_line_error(inference_pld, argv, r"answers\.jsonl:1: malformed JSON", capsys)
    assert answers.read_bytes() == before
