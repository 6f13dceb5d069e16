"""scripts/compare.py: method specs, rotation, the figures on synthetic outcomes, and one run
on the tiny random Llama (2 demo questions, 4 methods, float32: every method is lossless)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import speed
from cli_helpers import DEMO, load_script, read_lines, run_cli, save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


compare = load_script("compare")
Capsys = pytest.CaptureFixture[str]

SPECS = [
    ("vanilla", "vanilla", None, ()),
    ("hf", "hf", None, ()),
    ("hf-pld", "hf-pld", 10, ()),
    ("hf-pld:3", "hf-pld", 3, ()),
    ("pld", "pld", 21, ()),
    ("pld:8,max_ngram_size=4", "pld", 8, (("max_ngram_size", "4"),)),
    ("recycling", "recycling", 64, ()),
    ("logitspec", "logitspec", "auto", ()),
    ("logitspec:8", "logitspec", 8, ()),
    ("logitspec:64,tree_policy=reference", "logitspec", 64, (("tree_policy", "reference"),)),
    ("logitspec:auto,recycle_chains=0", "logitspec", "auto", (("recycle_chains", "0"),)),
    ("suffix", "suffix", 65, ()),
    ("suffix:16,mode=chain", "suffix", 16, (("mode", "chain"),)),
]
BAD_SPECS = ["eagle", "vanilla:3", "hf,value", "pld:0", "pld:x", "pld:8,value", "recycling:auto",
             "logitspec:8,fast=1", "logitspec:-1", "logitspec:auto,tree_policy=reference",
             "logitspec:8,recycle_chains=x", "logitspec:8,tree_policy=", "pld:8,draft_tree_capacity=3",
             "suffix:0", "suffix,mode=path", "suffix,min_token_prob=2", "rest",
             "rest:65,datastore=/no/such/file.npz"]


@pytest.mark.parametrize("text,name,number,flags", SPECS)
def test_parse_spec(text, name, number, flags):
    spec = compare.parse_spec(text)
    assert (spec.name, spec.number, spec.flags) == (name, number, flags)


def test_specs_build_the_commands_params():
    params = compare.method_params(compare.parse_spec("logitspec:64,tree_policy=reference"))
    assert params.logitspec_config().tree_policy == "reference"
    assert params.logitspec_config().draft_tree_capacity == 64
    assert compare.method_params(compare.parse_spec("logitspec")).logitspec_config().draft_tree_capacity is None


@pytest.mark.parametrize("text", BAD_SPECS)
def test_parse_spec_rejects(text):
    with pytest.raises(compare.CompareError):
        compare.parse_spec(text)


def test_specs_need_vanilla_and_no_duplicates():
    with pytest.raises(compare.CompareError, match="vanilla"):
        compare.parse_specs(["pld:8", "hf"])
    with pytest.raises(compare.CompareError, match="twice"):
        compare.parse_specs(["vanilla", "pld:8", "pld:8"])
    assert compare.parse_spec("logitspec:64,recycle_chains=0").slug == "logitspec-64-recycle_chains-0"


def test_rotation():
    labels = ["a", "b", "c"]
    assert [compare.rotation(labels, i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def outcome(tokens, wall, steps, ids=((1, 2),), host=0.0, phases=0.0):
    return compare.Outcome(tokens, wall, steps, tuple(ids), host, phases)


def test_summarize_on_synthetic_outcomes():
    outcomes = {
        "vanilla": {"1": outcome(10, 2.0, 10), "2": outcome(20, 2.0, 20), "3": outcome(5, 1.0, 5)},
        "x": {"1": outcome(10, 1.0, 4, host=0.1, phases=1.0),
              "2": outcome(20, 3.0, 8, ids=((9,),), host=0.2, phases=1.0),
              "3": None},  # failed: question 3 is left out for every method
    }
    summary = compare.summarize(outcomes, {"1": "qa", "2": "multi-turn conversation", "3": "qa"})
    assert list(summary) == ["qa", "multi-turn conversation", "overall"]
    overall = summary["overall"]
    assert overall["vanilla"].questions == 2 and overall["vanilla"].mat == 1.0
    assert overall["vanilla"].speedup == 1.0 and overall["vanilla"].host_overhead is None
    x = overall["x"]
    assert (x.tokens, x.steps, x.mat) == (30, 12, 2.5)
    assert x.tokens_per_s == pytest.approx(7.5) and x.speedup == pytest.approx(1.0)
    assert x.exact_match == 0.5 and x.host_overhead == pytest.approx(0.15)
    assert summary["qa"]["x"].speedup == pytest.approx(2.0) and summary["qa"]["x"].exact_match == 1.0


# --------------------------------------------------------------------------- a real run

METHODS = ["vanilla", "hf-pld:4", "recycling:16", "logitspec:auto"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def argv_for(tiny: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--model-path", str(tiny), "--dtype", "float32", "--device", "cpu",
            "--question-file", str(DEMO), "--question-begin", "3", "--question-end", "5",
            "--max-new-tokens", "12", "--out-dir", str(out_dir), *extra]


def test_compare_run(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))  # the cost curve goes here
    out_dir = tmp_path / "out"
    assert compare.main(argv_for(tiny, out_dir, "--methods", *METHODS)) == 0
    stdout = capsys.readouterr().out
    result = json.loads(stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert list(rows) == ["multi-turn conversation", "translation", "overall"]
    base = rows["overall"]["vanilla"]
    assert base["mat"] == 1.0 and base["speedup"] == 1.0 and base["questions"] == 2
    for label in METHODS:
        figures = rows["overall"][label]
        assert figures["exact_match"] == 1.0, label  # float32: every method is lossless
        assert figures["tokens"] == base["tokens"] and figures["mat"] >= 1.0
        assert figures["speedup"] == pytest.approx(figures["tokens_per_s"] / base["tokens_per_s"])
    assert rows["overall"]["hf-pld:4"]["host_overhead"] is None
    assert 0 < rows["overall"]["recycling:16"]["host_overhead"] < 1
    assert result["order"] == {"4": METHODS, "5": METHODS[1:] + METHODS[:1]}
    assert result["dtype"] == "float32" and "threads" in result["hardware"] and result["failed"] == []
    check_files(result, out_dir)
    assert "## overall (2 questions)" in (out_dir / "report.md").read_text()
    assert "overall (2 questions)" in stdout


def check_files(result: dict, out_dir: Path) -> None:
    """Answer files readable by speed.py, written in each question's rotated order."""
    stamps = {}
    for label, path in result["answer_files"].items():
        assert Path(path).parent == out_dir
        speed.load_answers(path)
        stamps[label] = {str(line["question_id"]): line["tstamp"] for line in read_lines(Path(path))}
        assert read_lines(Path(path))[0]["meta"]["params"]["spec"] == label
    for key, order in result["order"].items():
        assert sorted(stamps, key=lambda label: stamps[label][key]) == order
    assert (out_dir / "report.png").stat().st_size > 0 and result["plot"] == str(out_dir / "report.png")
    files = result["answer_files"]
    code = speed.main(["--file-path", files["recycling:16"], "--base-path", files["vanilla"], "--json"])
    assert code == 0


@pytest.mark.parametrize("extra,message", [
    (["--methods", "pld:8", "hf"], "must include vanilla"),
    (["--methods", "vanilla", "eagle"], "unknown method"),
    (["--question-end", "1", "--question-begin", "2"], "question_end"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, extra, message):
    assert run_cli(compare, argv_for(tiny, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare.py: error:") and message in err and "\n" not in err


def test_bad_files_are_one_line_and_exit_2(tiny, tmp_path, capsys):
    argv = argv_for(tiny, tmp_path / "out", "--methods", "vanilla")
    argv[argv.index("--question-file") + 1] = str(tmp_path / "missing.jsonl")
    assert run_cli(compare, argv) == 2
    assert "no question file" in capsys.readouterr().err
    argv = argv_for(tiny, tmp_path / "out", "--methods", "vanilla", "--model-path", str(tmp_path))
    assert run_cli(compare, argv) == 2
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "report.md").write_text("earlier")
    assert run_cli(compare, argv_for(tiny, out_dir, "--methods", "vanilla")) == 2
    assert "already holds" in capsys.readouterr().err


def test_a_failed_question_is_left_out_and_exits_3(tiny, tmp_path, capsys):
    """Question 9 (a summarization) does not fit the tiny model's 1024 positions."""
    argv = argv_for(tiny, tmp_path / "out", "--methods", "vanilla", "pld:8", "--warmup", "0")
    argv[argv.index("--question-begin") + 1], argv[argv.index("--question-end") + 1] = "7", "9"
    assert compare.main(argv) == 3
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["failed"] == ["9"] and result["rows"]["overall"]["pld:8"]["questions"] == 1
    assert result["rows"]["summarization"]["vanilla"]["mat"] is None
    assert "error" in read_lines(Path(result["answer_files"]["vanilla"]))[1]
