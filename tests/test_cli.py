"""The inference commands end to end: answer files, resume, failures and bad inputs.

Most runs use a tiny random Llama (2 layers, byte-level tokenizer) saved as an HF folder, in
process through ``main(argv)``; a few go through ``python -m`` to see the real process (exit
codes, a crash mid-run). The embedded default model runs in the tests marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation import (  # noqa: E402
    inference_baseline, inference_logitspec, inference_lookahead, inference_pld, inference_racer,
    inference_rest, inference_sam, inference_suffix, speed,
)
from evaluation.args import EvalConfig, RunConfig, parse_args  # noqa: E402
from evaluation import eval_loop  # noqa: E402
from evaluation.eval_loop import TEST_EXIT_AFTER_ENV  # noqa: E402
from evaluation.questions import Question, load_questions, select_questions  # noqa: E402
# DEMO is imported from this module by other tests
from cli_helpers import (  # noqa: E402,F401
    DEMO, load_script, read_lines, run_cli, save_tiny_llama, write_questions,
)

CHOICE_KEYS = {"index", "turns", "decoding_steps", "new_tokens", "prompt_tokens", "cached_tokens",
               "wall_time", "accept_lengths", "draft_lengths", "time_breakdown"}
META_KEYS = {"method", "params", "model_path", "dtype", "device", "template", "max_new_tokens",
             "temperature", "top_p", "top_k", "seed", "num_choices", "prefix_cache", "torch",
             "transformers",
             "hardware", "threads", "load_average", "attention", "float32_matmul_precision",
             "cpu_capability", "peak_memory_bytes"}
Capsys = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def check_answer_file(path: Path, num_turns: dict[str, int], method: str) -> list[dict[str, Any]]:
    """Schema of every line; per-turn lists match the question's turns; token sums agree."""
    lines = read_lines(path)
    assert sorted(str(line["question_id"]) for line in lines) == sorted(num_turns)
    for line in lines:
        assert {"question_id", "category", "answer_id", "model_id", "tstamp", "choices",
                "meta"} <= set(line)
        assert META_KEYS <= set(line["meta"]) and line["meta"]["method"] == method
        for choice in line["choices"]:
            assert set(choice) == CHOICE_KEYS
            turns = num_turns[str(line["question_id"])]
            for key in ("turns", "decoding_steps", "new_tokens", "prompt_tokens", "cached_tokens",
                        "wall_time"):
                assert len(choice[key]) == turns, key
            prompts = choice["prompt_tokens"]  # the conversation grows turn by turn
            assert prompts[0] > 0 and all(a + n < b for a, n, b in
                                          zip(prompts, choice["new_tokens"], prompts[1:]))
            # a follow-up turn reuses the conversation so far (HF generate keeps nothing); a
            # question starts from nothing unless the run keeps the previous question's prefix
            cached = choice["cached_tokens"]
            assert all(0 <= c < p for c, p in zip(cached, prompts))
            assert line["meta"]["prefix_cache"] or cached[0] == 0
            assert all((c == 0) if method.startswith("hf") else (c > 0) for c in cached[1:])
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            assert len(choice["draft_lengths"]) == len(choice["accept_lengths"])
            assert set(choice["time_breakdown"]) == {"prefill", "draft", "verify", "accept",
                                                     "update"}
            assert sum(choice["time_breakdown"].values()) <= sum(choice["wall_time"]) + 1e-6
    speed.load_answers(path)  # the speed report reads it
    return lines


# --------------------------------------------------------------------------- end to end


def test_three_methods_on_two_demo_questions(
    tiny: Path, tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Questions 4 (two turns) and 5 (one turn); float32 greedy, so all methods agree.
    LogitSpec runs with its defaults: an automatic budget from a cost curve measured here."""
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "12", "--device", "cpu"]
    files = {}
    for module, method in ((inference_baseline, "vanilla"), (inference_logitspec, "logitspec"),
                           (inference_pld, "pld")):
        files[method] = tmp_path / f"{method}.jsonl"
        assert run_cli(module, common + ["--answer-file", str(files[method])]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["answered"] == 2 and summary["failed"] == []
        check_answer_file(files[method], {"4": 2, "5": 1}, method)
    base = read_lines(files["vanilla"])
    assert all(a == 1 for line in base for a in line["choices"][0]["accept_lengths"])
    assert all(d == 0 for line in base for d in line["choices"][0]["draft_lengths"])
    meta = read_lines(files["logitspec"])[0]["meta"]
    assert meta["params"] == {"max_ngram_size": 3, "num_pred_tokens": 20,
                              "draft_tree_capacity": "auto", "tree_policy": "value",
                              "num_continuations": 3, "recycle_chains": 8, "recycle_depth": 6,
                              "recycle_breadth": 1, "successor_children": 0, "successor_hops": 2,
                              "max_auto_capacity": 64, "match_lengths": 0, "suffix_trees": 1,
                              "suffix_tokens": 32, "suffix_branches": 1, "suffix_grow": 0,
                              "live_costs": 0, "agreement": 0,
                              "prompt_logits": 0}
    assert len(list((tmp_path / "cache" / "costs").glob("*.json"))) == 1
    assert meta["dtype"] == "float32" and meta["template"] == "chat_template"
    assert meta["attention"]["decode"] == "flash, folded, no mask"  # the CPU's flash kernel
    assert meta["float32_matmul_precision"] == "highest" and meta["peak_memory_bytes"] > 0
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta["float32_from"] is None  # a float32 model: nothing to widen, nothing measured
    assert read_lines(files["pld"])[0]["meta"]["params"]["draft_tree_capacity"] == 21
    for method in ("logitspec", "pld"):
        code = speed.main(["--file-path", str(files[method]), "--base-path", str(files["vanilla"])])
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0
        overall = report["rows"][-1]
        assert overall["baseline"]["mat"] == 1.0 and overall["exact_match"] == 1.0


def test_float32_passes_of_a_half_precision_run(
    tiny: Path, tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--float32-from`` reaches the model and the answer lines' meta; ``auto`` on a
    bfloat16 model measures the machine (here: a stand-in measurement) once, then reads it."""
    from logitspec import cost

    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(cost, "measure_float32_from", lambda model: measured.append(1) or 6)
    common = ["--model-path", str(tiny), "--question-begin", "4", "--question-end", "5",
              "--max-new-tokens", "8", "--device", "cpu", "--dtype", "bfloat16"]
    for setting, expected in (("4", 4), ("off", None), ("auto", 6), ("auto", 6)):
        path = tmp_path / f"answers-{setting}-{len(measured)}.jsonl"
        argv = common + ["--float32-from", setting, "--answer-file", str(path)]
        assert run_cli(inference_baseline, argv) == 0
        capsys.readouterr()
        assert read_lines(path)[0]["meta"]["float32_from"] == expected
    assert measured == [1]


def test_racer_on_two_demo_questions(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """RACER's command with its published defaults, and a small automaton that must evict:
    answer files in the harness's schema, float32 greedy output equal to vanilla's."""
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "24", "--device", "cpu"]
    runs = {"vanilla": (inference_baseline, []), "racer": (inference_racer, []),
            "racer-small": (inference_racer, ["--ngram", "3", "--max-nodes", "20",
                                              "--draft-tree-capacity", "8", "--max-breadth", "2",
                                              "--prompt-logits", "off"])}
    files = {}
    for name, (module, flags) in runs.items():
        files[name] = tmp_path / f"{name}.jsonl"
        assert run_cli(module, common + flags + ["--answer-file", str(files[name])]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["answered"] == 2 and summary["failed"] == []
        check_answer_file(files[name], {"4": 2, "5": 1}, module.METHOD.name)
    params = [read_lines(files[name])[0]["meta"]["params"] for name in ("racer", "racer-small")]
    assert params == [{"draft_tree_capacity": 64, "ngram": 10, "max_nodes": 10000, "max_breadth": 8,
                       "prompt_logits": "on"},
                      {"draft_tree_capacity": 8, "ngram": 3, "max_nodes": 20, "max_breadth": 2,
                       "prompt_logits": "off"}]
    for name in ("racer", "racer-small"):
        code = speed.main(["--file-path", str(files[name]), "--base-path", str(files["vanilla"])])
        overall = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][-1]
        assert code == 0 and overall["exact_match"] == 1.0


def test_suffix_decoding_on_two_demo_questions(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """Tree and chain mode against vanilla (float32 greedy: the same tokens), with the
    published settings recorded."""
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "24", "--device", "cpu"]
    files = {}
    for name, module, flags in (("vanilla", inference_baseline, []),
                                ("tree", inference_suffix, []),
                                ("chain", inference_suffix, ["--mode", "chain"])):
        files[name] = tmp_path / f"{name}.jsonl"
        assert run_cli(module, common + flags + ["--answer-file", str(files[name])]) == 0
        capsys.readouterr()
        check_answer_file(files[name], {"4": 2, "5": 1}, "vanilla" if name == "vanilla" else "suffix")
    meta = read_lines(files["tree"])[0]["meta"]
    assert meta["params"] == {"draft_tree_capacity": 65, "mode": "tree", "max_depth": 64,
                              "max_spec_factor": 1.0, "max_spec_offset": 0.0,
                              "min_token_prob": 0.1, "max_cached_answers": 100000}
    for name in ("tree", "chain"):
        code = speed.main(["--file-path", str(files[name]), "--base-path", str(files["vanilla"])])
        overall = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][-1]
        assert code == 0 and overall["exact_match"] == 1.0


def test_sam_on_two_demo_questions_with_and_without_a_corpus(
    tiny: Path, tmp_path: Path, capsys: Capsys
) -> None:
    """SAMD[T] at its defaults, with a text corpus and with a token-id corpus, and SAM alone:
    float32 greedy answers equal vanilla's; the flags are recorded."""
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "12", "--device", "cpu"]
    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    (tmp_path / "corpus.ids").write_text("40 41 42 43\n44 45\n")
    runs = {
        "vanilla": (inference_baseline, []),
        "samd": (inference_sam, []),
        "text": (inference_sam, ["--corpus", str(tmp_path / "corpus.txt")]),
        "ids": (inference_sam, ["--corpus", str(tmp_path / "corpus.ids"), "--static-bias", "0"]),
        "alone": (inference_sam, ["--fallback", "none", "--match-scale", "4"]),
    }
    turns = {}
    for name, (module, extra) in runs.items():
        path = tmp_path / f"{name}.jsonl"
        assert run_cli(module, common + extra + ["--answer-file", str(path)]) == 0
        capsys.readouterr()
        lines = check_answer_file(path, {"4": 2, "5": 1}, "vanilla" if name == "vanilla" else "sam")
        turns[name] = {line["question_id"]: line["choices"][0]["turns"] for line in lines}
    assert all(turns[name] == turns["vanilla"] for name in runs)
    params = read_lines(tmp_path / "ids.jsonl")[0]["meta"]["params"]
    assert params == {"draft_tree_capacity": 64, "draft_size": 40, "match_threshold": 5,
                      "static_bias": 0, "fallback": "recycling", "match_scale": None,
                      "dynamic_position": "roomier", "corpus": str(tmp_path / "corpus.ids"),
                      "recycling_k": 8}


def test_logitspec_with_the_prompts_logits(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """``--prompt-logits 1 --successor-children 2`` (a fixed budget, so no cost curve is
    measured): the answers equal vanilla's (float32 greedy) and the flags are recorded; without
    recycled chains either is refused in one line."""
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "16", "--device", "cpu"]
    files = {"vanilla": tmp_path / "vanilla.jsonl", "logitspec": tmp_path / "logitspec.jsonl"}
    assert run_cli(inference_baseline, common + ["--answer-file", str(files["vanilla"])]) == 0
    argv = common + ["--draft_tree_capacity", "16", "--prompt-logits", "1",
                     "--successor-children", "2", "--answer-file", str(files["logitspec"])]
    assert run_cli(inference_logitspec, argv) == 0
    capsys.readouterr()
    lines = check_answer_file(files["logitspec"], {"4": 2, "5": 1}, "logitspec")
    assert lines[0]["meta"]["params"]["prompt_logits"] == 1
    assert lines[0]["meta"]["params"]["successor_children"] == 2
    turns = [line["choices"][0]["turns"] for line in read_lines(files["vanilla"])]
    assert turns == [line["choices"][0]["turns"] for line in lines]
    bad = common + ["--prompt-logits", "1", "--recycle-chains", "0",
                    "--answer-file", str(tmp_path / "bad.jsonl")]
    assert run_cli(inference_logitspec, bad) == 2
    err = capsys.readouterr().err.strip()
    assert "recycled chains" in err and "\n" not in err
    bad = common + ["--successor-children", "2", "--recycle-chains", "0",
                    "--answer-file", str(tmp_path / "bad.jsonl")]
    assert run_cli(inference_logitspec, bad) == 2
    err = capsys.readouterr().err.strip()
    assert "successor_children needs recycled chains" in err and "\n" not in err
    assert not (tmp_path / "bad.jsonl").exists()
    assert not (tmp_path / "bad.jsonl").exists()


def test_rest_with_a_datastore_built_from_demo_questions(tiny: Path, tmp_path: Path,
                                                         capsys: Capsys) -> None:
    """The build script tokenizes the demo questions with the model's tokenizer; REST then
    answers two of them, token for token as vanilla (float32 greedy)."""
    store = tmp_path / "demo.npz"
    build = load_script("build_rest_datastore")
    assert build.main(["--model-path", str(tiny), "--out", str(store), str(DEMO)]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["entries"] == sum(len(q["turns"]) for q in map(json.loads, DEMO.open()))
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "24", "--device", "cpu"]
    files = {"vanilla": tmp_path / "vanilla.jsonl", "rest": tmp_path / "rest.jsonl"}
    assert run_cli(inference_baseline, common + ["--answer-file", str(files["vanilla"])]) == 0
    argv = common + ["--datastore", str(store), "--answer-file", str(files["rest"])]
    assert run_cli(inference_rest, argv) == 0
    capsys.readouterr()
    check_answer_file(files["rest"], {"4": 2, "5": 1}, "rest")
    params = read_lines(files["rest"])[0]["meta"]["params"]
    assert params == {"datastore": [str(store)], "draft_tree_capacity": 65, "max_span": 16,
                      "min_span": 2, "max_matches": 5000, "continuation_length": 10}
    assert speed.main(["--file-path", str(files["rest"]), "--base-path", str(files["vanilla"])]) == 0
    overall = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][-1]
    assert overall["exact_match"] == 1.0


def test_rest_datastore_from_chat_records(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """``answer_ids`` records enter as they are (train_draft_head.py's answers.jsonl, which also
    carries the messages), ``messages`` records give their assistant turns; a bad record is one
    line on stderr, exit 2, and writes no datastore."""
    from logitspec.rest import Datastore
    from transformers import AutoTokenizer

    build = load_script("build_rest_datastore")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in [
        {"id": 0, "messages": [{"role": "user", "content": "ignored"},
                               {"role": "assistant", "content": "also ignored"}],
         "answer_ids": [7, 8, 9, 2]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello there"},
                      {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": "Hello"}]},
    ]) + "\n")
    store = tmp_path / "chat.npz"
    assert build.main(["--model-path", str(tiny), "--out", str(store), str(chat)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["entries"] == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    loaded = Datastore.load(store)
    entries = np.split(loaded.tokens.astype(np.int64), loaded.entry_starts[1:])
    assert [e.tolist() for e in entries] == [
        [7, 8, 9, 2], tokenizer("Hello there", add_special_tokens=False)["input_ids"],
        tokenizer("Hello", add_special_tokens=False)["input_ids"]]
    for bad, message in [({"answer_ids": [3, -1]}, "token ids"),
                         ({"answer_ids": [3, True]}, "token ids"),
                         ({"messages": [{"role": "assistant"}]}, "'content'"),
                         ({"messages": ["text"]}, "'content'"),
                         ({"other": 1}, "'messages'")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad) + "\n")
        out = tmp_path / "bad.npz"
        assert build.main(["--model-path", str(tiny), "--out", str(out), str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("build_rest_datastore.py: error:") and message in err, err
        assert "\n" not in err and not out.exists()


def test_rest_datastore_from_installed_docs(tiny: Path, tmp_path: Path, capsys: Capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``--installed-docs`` reads the installed distributions' long descriptions, leaving out
    ``--exclude-packages`` (names normalized as pip does); each description is one entry."""
    import importlib.metadata as metadata

    build = load_script("build_rest_datastore")
    docs = build.installed_docs(["TORCH", "Typing_Extensions"])
    assert "torch" not in docs and "typing-extensions" not in docs
    assert docs["numpy"] == metadata.distribution("numpy").metadata.get_payload()
    assert "transformers" in docs and all(text.strip() for text in docs.values())
    picked = {"alpha": "Alpha docs.", "beta": "Beta docs, longer."}
    seen: list[list[str]] = []
    monkeypatch.setattr(build, "installed_docs", lambda exclude: seen.append(exclude) or picked)
    store = tmp_path / "docs.npz"
    text = tmp_path / "extra.txt"
    text.write_text("One more entry.")
    argv = ["--model-path", str(tiny), "--out", str(store), "--installed-docs",
            "--exclude-packages", "torch", "ray", "--", str(text)]
    assert build.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == [["torch", "ray"]] and summary["packages"] == ["alpha", "beta"]
    assert summary["entries"] == 3
    for bad in (["--out", str(store)], ["--out", str(store), "--exclude-packages", "x", str(text)]):
        with pytest.raises(SystemExit) as exit_info:
            build.main(bad)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("build_rest_datastore.py: error:") and "\n" not in err


def test_lookahead_command(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """Questions 4 and 5 with Spec-Bench's flag names at a small setting: the answers equal
    vanilla's (float32 greedy), the params are recorded, the trees stay within G x (N - 1)."""
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "12", "--device", "cpu"]
    files = {name: tmp_path / f"{name}.jsonl" for name in ("vanilla", "lookahead")}
    assert run_cli(inference_baseline, common + ["--answer-file", str(files["vanilla"])]) == 0
    assert run_cli(inference_lookahead, common + ["--level", "3", "--window", "4", "--guess", "2",
                                                  "--answer-file", str(files["lookahead"])]) == 0
    capsys.readouterr()
    lines = check_answer_file(files["lookahead"], {"4": 2, "5": 1}, "lookahead")
    assert lines[0]["meta"]["params"] == {"level": 3, "window": 4, "guess": 2}
    assert max(d for line in lines for d in line["choices"][0]["draft_lengths"]) <= 4
    turns = [line["choices"][0]["turns"] for line in read_lines(files["vanilla"])]
    assert turns == [line["choices"][0]["turns"] for line in lines]


def test_subprocess_run_and_default_answer_path(tiny: Path, tmp_path: Path) -> None:
    questions = write_questions(tmp_path / "bench" / "question.jsonl", [
        {"question_id": "a", "category": "writing", "turns": ["Say hi.", "Again."]},
        {"question_id": "b", "category": "qa", "turns": ["Why?"]},
    ])
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.inference_logitspec", "--model-path", str(tiny),
         "--question-file", str(questions), "--max-new-tokens", "8", "--draft_tree_capacity",
         "4", "--warmup", "2", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = tmp_path / "bench" / "model_answer" / "tiny-llama-logitspec-float32-temp-0.0.jsonl"
    assert summary["answer_file"] == str(expected)
    check_answer_file(expected, {"a": 2, "b": 1}, "logitspec")


def test_fastchat_template(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    out = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(tiny), "--question-end", "1", "--max-new-tokens", "6",
            "--template", "vicuna_v1.1", "--answer-file", str(out)]
    assert run_cli(inference_baseline, argv) == 0
    (line,) = check_answer_file(out, {"1": 2}, "vanilla")
    assert line["meta"]["template"] == "vicuna_v1.1"


def test_fastchat_template_when_the_tokenizer_has_none(tmp_path: Path, capsys: Capsys) -> None:
    model = save_tiny_llama(tmp_path / "vicuna-tiny", chat_template=False)
    out = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(model), "--question-begin", "4", "--question-end", "5",
            "--max-new-tokens", "6", "--answer-file", str(out), "--warmup", "0"]
    assert run_cli(inference_pld, argv) == 0
    assert read_lines(out)[0]["meta"]["template"] == "vicuna_v1.1"  # FastChat's for "vicuna"


def test_sampling_is_seeded(tiny: Path, tmp_path: Path, capsys: Capsys) -> None:
    """temperature > 0 samples; the same seed gives the same answers, choice i uses seed + i,
    and LogitSpec's defaults sample exactly what vanilla samples with the same seed."""
    common = ["--model-path", str(tiny), "--question-begin", "4", "--question-end", "6",
              "--max-new-tokens", "10", "--temperature", "1.5", "--top-k", "50"]

    def sampled(module, name: str, seed: int, choices: int) -> list:
        out = tmp_path / f"{name}.jsonl"
        argv = common + ["--seed", str(seed), "--num-choices", str(choices), "--answer-file", str(out)]
        assert run_cli(module, argv) == 0
        method = "vanilla" if module is inference_baseline else "logitspec"
        lines = check_answer_file(out, {"5": 1, "6": 1}, method)
        assert [c["index"] for c in lines[0]["choices"]] == list(range(choices))
        assert lines[0]["meta"]["temperature"] == 1.5 and lines[0]["meta"]["seed"] == seed
        return [[c["turns"] for c in line["choices"]] for line in lines]

    first = sampled(inference_logitspec, "first", 7, 2)
    assert sampled(inference_logitspec, "second", 7, 2) == first
    # not greedy: the two choices of a question differ
    assert any(choices[0] != choices[1] for choices in first)
    # choice 1 is a run seeded with 8
    assert [choices[0] for choices in sampled(inference_logitspec, "eight", 8, 1)] == [
        choices[1] for choices in first]
    assert sampled(inference_baseline, "vanilla", 7, 2) == first


# --------------------------------------------------------------------------- resume


def test_resume_after_a_crash_and_a_partial_line(
    tiny: Path, tmp_path: Path, capsys: Capsys
) -> None:
    out = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(tiny), "--question-begin", "4", "--question-end", "8",
            "--max-new-tokens", "6", "--answer-file", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.inference_logitspec", *argv], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env={**os.environ, TEST_EXIT_AFTER_ENV: "2"},
    )
    assert proc.returncode == 9, proc.stderr
    before = out.read_bytes()
    assert [line["question_id"] for line in read_lines(out)] == [5, 6]
    with open(out, "ab") as f:  # what a crash in the middle of a write would leave
        f.write(b'{"question_id": 7, "category": "transl')
    assert run_cli(inference_logitspec, argv) == 0
    assert "removed an incomplete last line" in capsys.readouterr().err
    after = out.read_bytes()
    assert after.startswith(before)
    assert [line["question_id"] for line in read_lines(out)] == [5, 6, 7, 8]
    assert run_cli(inference_logitspec, argv) == 0  # all answered: nothing to do
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == 4
    assert out.read_bytes() == after


def faulty_answers(monkeypatch: pytest.MonkeyPatch, faults: dict[int, BaseException]) -> None:
    """Answering the questions in ``faults`` raises the given error (once per question)."""
    real = eval_loop.answer_choice

    def answer_choice(ctx, question, index):
        if question.question_id in faults:
            raise faults.pop(question.question_id)
        return real(ctx, question, index)

    monkeypatch.setattr(eval_loop, "answer_choice", answer_choice)


def questions_4_to_6(tiny: Path, out: Path) -> list[str]:
    return ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "6",
            "--max-new-tokens", "6", "--answer-file", str(out), "--warmup", "0"]


def test_out_of_memory_is_an_error_entry_and_the_run_goes_on(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    released = []
    monkeypatch.setattr(eval_loop, "release_memory", lambda device: released.append(str(device)))
    faulty_answers(monkeypatch, {5: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB.\nSee the documentation")})
    out = tmp_path / "answers.jsonl"
    argv = questions_4_to_6(tiny, out)
    assert run_cli(inference_pld, argv) == 3
    assert "question 5: OutOfMemoryError: CUDA out of memory." in capsys.readouterr().err
    lines = {line["question_id"]: line for line in read_lines(out)}
    assert lines[5]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB."
    assert lines[4]["choices"] and lines[6]["choices"] and released == ["cpu"]
    assert run_cli(inference_pld, argv) == 0  # a re-run retries it
    assert all(line["choices"] for line in read_lines(out))


def test_a_device_error_stops_the_run_and_a_rerun_resumes(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    """After a device-side error the process's CUDA context is unusable: the question gets
    its error entry, the run stops (exit 2), the same command resumes in a fresh process."""
    faulty_answers(monkeypatch, {5: torch.AcceleratorError(
        "CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")})
    out = tmp_path / "answers.jsonl"
    argv = questions_4_to_6(tiny, out)
    assert run_cli(inference_pld, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "inference_pld: error: question 5: DeviceError: CUDA error: device-side assert "
        "triggered; the CUDA context of this process is unusable: run the same command again "
        "to resume")
    lines = read_lines(out)
    assert [line["question_id"] for line in lines] == [4, 5] and lines[1]["choices"] == []
    assert run_cli(inference_pld, argv) == 0
    assert sorted(line["question_id"] for line in read_lines(out)) == [4, 5, 6]


def test_prompt_too_long_is_an_error_entry_and_is_retried(tmp_path: Path, capsys: Capsys) -> None:
    model = save_tiny_llama(tmp_path / "short-context", max_positions=64)
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "qa", "turns": ["Hi?"]},
        {"question_id": 2, "category": "qa", "turns": ["a long question " * 10]},
        {"question_id": 3, "category": "qa", "turns": ["Yes?"]},
    ])
    out = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(model), "--question-file", str(questions), "--max-new-tokens",
            "8", "--answer-file", str(out)]
    for _ in range(2):  # the re-run retries question 2 and keeps one line per question
        assert run_cli(inference_logitspec, argv) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("inference_logitspec: 1 of ") and "ids 2" in err[-1]
        assert any("PromptTooLongError" in line for line in err)
        lines = read_lines(out)
        assert sorted(line["question_id"] for line in lines) == [1, 2, 3]
        failed = [line for line in lines if "error" in line]
        assert [line["question_id"] for line in failed] == [2]
        assert failed[0]["choices"] == [] and "exceeds the model's context" in failed[0]["error"]
    assert [line["question_id"] for line in lines] == [1, 3, 2]


# --------------------------------------------------------------------------- bad inputs


def bad_inputs(tmp_path: Path, tiny: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text expected in the error line)."""
    malformed = write_questions(tmp_path / "bad.jsonl", [
        {"question_id": 1, "category": "qa", "turns": ["ok"]}, '{"question_id": 2,',
    ])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tiny_args = ["--model-path", str(tiny), "--question-end", "1"]
    return {
        "malformed question line": (["--question-file", str(malformed)], f"{malformed}:2"),
        "unknown bench": (["--bench-name", "no_such_bench"], "data/no_such_bench/question.jsonl"),
        "missing model path": (["--model-path", str(tmp_path / "nope"), "--question-end", "1",
                                "--answer-file", str(tmp_path / "x.jsonl")], "does not exist"),
        "draft tree capacity 0": (["--draft_tree_capacity", "0"], "draft_tree_capacity"),
        "max ngram size 0": (["--max_ngram_size", "0"], "max_ngram_size"),
        "max new tokens 0": (["--max-new-tokens", "0"], "max_new_tokens"),
        "negative temperature": (["--temperature", "-0.5"], "temperature"),
        "GPU workers on cpu": (["--num-gpus-total", "2", "--device", "cpu"],
                               "the device is cpu: use --num-workers"),
        "unknown template": (["--template", "no-such-template"], "unknown template"),
        "unknown flag": (["--no-such-flag"], "unrecognized arguments"),
        "empty slice": (["--question-begin", "100"], "no questions selected"),
        "unwritable answer path": (tiny_args + ["--answer-file", str(blocker / "a.jsonl")],
                                   "cannot write answer file"),
    }


BAD_INPUTS = [
    "malformed question line", "unknown bench", "missing model path", "draft tree capacity 0",
    "max ngram size 0", "max new tokens 0", "negative temperature", "GPU workers on cpu",
    "unknown template", "unknown flag", "empty slice", "unwritable answer path",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(
    name: str, tiny: Path, tmp_path: Path, capsys: Capsys
) -> None:
    argv, expected = bad_inputs(tmp_path, tiny)[name]
    assert run_cli(inference_logitspec, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("inference_logitspec: error: ") and expected in lines[0]
    assert "Traceback" not in captured.err


def test_bad_input_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.inference_baseline", "--model-path",
         str(tmp_path / "missing"), "--answer-file", str(tmp_path / "a.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"inference_baseline: error: model path {str(tmp_path / 'missing')!r} does not exist"
    ]


def test_prefix_cache_prefills_only_what_follows_the_shared_document(
    tiny: Path, tmp_path: Path, capsys: Capsys
) -> None:
    """Three questions about one document, then one about another: with ``--prefix-cache 1``
    the second and third take the document from the cache (``cached_tokens``), and every
    method answers the same texts; resuming the file with the cache off is refused."""
    document = "Here is a document: " + " ".join(f"fact {i} is {i * 7 % 13}." for i in range(40))
    other = "Another text altogether, about something else, " * 8
    asks = ["Summarize it.", "List the facts.", "What is fact 3?"]
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question_id": i + 1, "category": "doc", "turns": [f"{text}\n\n{ask}"]}
        for i, (text, ask) in enumerate([(document, a) for a in asks] + [(other, asks[0])])])
    common = ["--model-path", str(tiny), "--question-file", str(questions), "--max-new-tokens",
              "8", "--device", "cpu", "--prefix-cache", "1", "--warmup", "1"]
    files, texts = {}, {}
    for module, method in ((inference_baseline, "vanilla"), (inference_logitspec, "logitspec"),
                           (inference_pld, "pld")):
        files[method] = tmp_path / f"{method}.jsonl"
        assert run_cli(module, common + ["--answer-file", str(files[method])]) == 0
        capsys.readouterr()
        lines = check_answer_file(files[method], {str(i): 1 for i in range(1, 5)}, method)
        assert all(line["meta"]["prefix_cache"] is True for line in lines)
        cached = [line["choices"][0]["cached_tokens"][0] for line in lines]
        prompts = [line["choices"][0]["prompt_tokens"][0] for line in lines]
        # the byte-level tokenizer: the document is hundreds of tokens, the asks a dozen
        assert cached[0] == 0 and cached[3] < 40, cached
        assert all(len(document) < c < p for c, p in zip(cached[1:3], prompts[1:3])), cached
        texts[method] = [line["choices"][0]["turns"] for line in lines]
    assert texts["logitspec"] == texts["vanilla"] == texts["pld"]
    before = files["vanilla"].read_bytes()
    with questions.open("a") as f:  # something left to answer
        f.write(json.dumps({"question_id": 5, "category": "doc", "turns": [asks[1]]}) + "\n")
    assert run_cli(inference_baseline, common[:-4] + ["--answer-file", str(files["vanilla"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefix_cache" in err[0]
    assert files["vanilla"].read_bytes() == before


def test_other_settings_are_not_mixed_into_an_answer_file(
    tiny: Path, tmp_path: Path, capsys: Capsys
) -> None:
    out = tmp_path / "answers.jsonl"
    common = ["--model-path", str(tiny), "--answer-file", str(out)]
    assert run_cli(inference_baseline, common + ["--max-new-tokens", "4",
                                                 "--question-end", "1"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run_cli(inference_baseline, common + ["--max-new-tokens", "5",
                                                 "--question-end", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_new_tokens 4 != 5" in err[0]
    assert out.read_bytes() == before


def test_load_average_is_recorded_and_is_not_a_setting(
    tiny: Path, tmp_path: Path, capsys: Capsys
) -> None:
    """Every line records the load at its start; resume ignores it (and threads, hardware)."""
    out = tmp_path / "answers.jsonl"
    common = ["--model-path", str(tiny), "--answer-file", str(out), "--max-new-tokens", "4"]
    assert run_cli(inference_baseline, common + ["--question-end", "1"]) == 0
    line = read_lines(out)[0]
    assert isinstance(line["meta"]["load_average"], float) and line["meta"]["load_average"] >= 0
    line["meta"].update(load_average=99.5, threads=64, hardware="another machine, 64 threads")
    out.write_text(json.dumps(line) + "\n")
    assert run_cli(inference_baseline, common + ["--question-end", "2"]) == 0
    lines = read_lines(out)
    assert [x["question_id"] for x in lines] == [1, 2] and lines[0]["meta"]["load_average"] == 99.5
    assert lines[1]["meta"]["load_average"] != 99.5


# --------------------------------------------------------------------------- settings


def test_default_model_id_and_answer_path() -> None:
    config = parse_args(inference_logitspec.METHOD, ["--dtype", "bfloat16", "--device", "cpu"])
    assert config.model_id == "smollm2-135m-instruct-logitspec-bfloat16-temp-0.0"
    assert config.answer_path == (
        ROOT / "data" / "demo" / "model_answer" / f"{config.model_id}.jsonl"
    )
    gguf = RunConfig(EvalConfig(model_path="/m/Foo.Q4.gguf", device="cpu", temperature=0.7),
                     inference_baseline.METHOD, inference_baseline.NoParams())
    assert gguf.model_id == "Foo.Q4-vanilla-float32-temp-0.7"


def test_both_flag_spellings() -> None:
    config = parse_args(inference_pld.METHOD, [
        "--max-ngram-size", "2", "--num_pred_tokens", "5", "--max_new_tokens", "9",
    ])
    assert (config.params.max_ngram_size, config.params.num_pred_tokens) == (2, 5)
    assert config.params.draft_tree_capacity == 6 and config.settings.max_new_tokens == 9


def test_questions_per_category_groups_mt_bench() -> None:
    """Spec-Bench's layout: 8 MT-bench categories, then one block per other category."""
    mt = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
          "humanities"]
    categories = [c for c in mt for _ in range(3)] + [c for c in ("qa", "rag") for _ in range(5)]
    questions = [Question(i, c, ("x",)) for i, c in enumerate(categories)]
    picked = select_questions(questions, per_category=2)
    assert [q.question_id for q in picked] == [0, 1, 24, 25, 29, 30]
    assert [q.question_id for q in select_questions(questions, 1, 5, per_category=1)] == [1]
    assert [q.question_id for q in select_questions(questions, 26, None, 2)] == [26, 27, 29, 30]


def test_question_lines_end_at_newlines_only(tmp_path: Path) -> None:
    raw = '{"question_id": 1, "category": "qa", "turns": ["a\u2028b\u0085c"]}\r\n\n'
    path = tmp_path / "q.jsonl"
    path.write_text(raw, encoding="utf-8")
    assert load_questions(path) == [Question(1, "qa", ("a\u2028b\u0085c",))]


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_embedded_default_model(tmp_path: Path, capsys: Capsys, monkeypatch) -> None:
    """SmolLM2-135M-Instruct in float32 on questions 4 (two turns) and 5: vanilla, and LogitSpec
    at every default of the command line (value tree, recycled chains, suffix trees, automatic
    budget) except the cost surface, fixed and shaped like a CPU's so that the trees do not
    depend on the machine (measuring it would take most of a minute): the same text, turn for
    turn, and drafts accepted."""
    from logitspec.cost import CostCurve

    fixed = CostCurve((1, 8, 16, 32, 64), (1.0, 1.05, 1.15, 1.35, 1.8))
    asked = []
    monkeypatch.setattr(inference_logitspec, "cost_surface_for",
                        lambda model, key: asked.append(key) or fixed)
    common = ["--question-begin", "3", "--question-end", "5", "--max-new-tokens", "16",
              "--dtype", "float32", "--device", "cpu"]
    base, method = tmp_path / "base.jsonl", tmp_path / "logitspec.jsonl"
    assert run_cli(inference_baseline, common + ["--answer-file", str(base)]) == 0
    assert run_cli(inference_logitspec, common + ["--answer-file", str(method)]) == 0
    assert asked  # the automatic budget read the surface
    check_answer_file(base, {"4": 2, "5": 1}, "vanilla")
    lines = check_answer_file(method, {"4": 2, "5": 1}, "logitspec")
    assert lines[0]["meta"]["model_path"] == "smollm2-135m-instruct"
    assert all(turn for line in lines for turn in line["choices"][0]["turns"])
    capsys.readouterr()
    assert speed.main(["--file-path", str(method), "--base-path", str(base)]) == 0
    overall = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][-1]
    assert overall["exact_match"] == 1.0 and overall["turn_exact_match"] == 1.0
    assert overall["baseline"]["mat"] == 1.0 and overall["method"]["mat"] > 1.0


def test_the_warm_up_leaves_the_run_a_fresh_generator():
    """The warm-up answers the first question whose prompt fits (here the second), its
    generator is then replaced by a new one: a drafter that learns across questions must not
    meet the warm-up's answer again when that question is answered for real."""
    from types import SimpleNamespace

    from logitspec.decoding import GenerationConfig, PromptError

    built = []

    class Generator:
        def __init__(self):
            self.prompts = []
            built.append(self)

        def reset(self):
            pass

        def generate(self, prompt, config):
            if prompt == [3]:
                raise PromptError("too long")
            self.prompts.append((prompt, config.max_new_tokens))

    class Conversation:
        def __init__(self):
            self.users = []

        def add_user(self, text):
            self.users.append(text)

        def prompt_ids(self):
            return [len(text) for text in self.users]

    loaded = SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu")))
    ctx = eval_loop.EvalContext("m", loaded, Generator(), SimpleNamespace(start=Conversation),
                                GenerationConfig(max_new_tokens=64), 1, {},
                                make_generator=Generator)
    questions = [Question(1, "qa", ("abc",)), Question(2, "qa", ("abcd",))]
    eval_loop.warm_up(ctx, questions, 2)
    warm = min(eval_loop.WARMUP_MAX_NEW_TOKENS, 64)
    assert len(built) == 2 and built[0].prompts == [([4], warm), ([4], warm)]
    assert ctx.generator is built[1] and built[1].prompts == []
