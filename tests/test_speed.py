"""Report math of evaluation/speed.py on synthetic answer files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation import speed  # noqa: E402

Capsys = pytest.CaptureFixture[str]


def answer(
    qid: int | str,
    category: str = "alpha",
    tokens: Sequence[int] = (10,),
    times: Sequence[float] = (1.0,),
    steps: Sequence[int] | None = None,
    accept: Sequence[int] | None = None,
    drafts: Sequence[int] | None = None,
    texts: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
    prompts: Sequence[int] | None = None,
    prefill: float | None = None,
) -> dict[str, Any]:
    """One answer line; by default one token per step (a vanilla generator); ``prefill``: a
    ``time_breakdown`` with that prefill time and the rest of the wall time as verify."""
    steps = list(tokens) if steps is None else list(steps)
    choice: dict[str, Any] = {
        "index": 0,
        "turns": list(texts or [f"answer {qid} turn {i}" for i in range(len(tokens))]),
        "decoding_steps": steps,
        "new_tokens": list(tokens),
        "wall_time": list(times),
        "accept_lengths": list(accept) if accept is not None else [1] * sum(steps),
    }
    if drafts is not None:
        choice["draft_lengths"] = list(drafts)
    if prompts is not None:
        choice["prompt_tokens"] = list(prompts)
    if prefill is not None:
        choice["time_breakdown"] = {"prefill": prefill, "draft": 0.0,
                                    "verify": sum(times) - prefill, "accept": 0.0, "update": 0.0}
    line: dict[str, Any] = {"question_id": qid, "category": category, "answer_id": f"a{qid}",
                            "model_id": "m", "tstamp": 0.0, "choices": [choice]}
    if meta is not None:
        line["meta"] = meta
    return line


def failure(qid: int | str, category: str = "alpha") -> dict[str, Any]:
    return {"question_id": qid, "category": category, "choices": [], "error": "RuntimeError: boom"}


def write(path: Path, lines: Sequence[dict[str, Any] | str]) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def compare(tmp_path: Path, method: Sequence[Any], base: Sequence[Any]) -> speed.Report:
    m = write(tmp_path / "method.jsonl", method)
    b = write(tmp_path / "base.jsonl", base)
    return speed.aggregate(speed.load_answers(m), speed.load_answers(b))


def run_cli(capsys: Capsys, argv: list[str]) -> tuple[int, str, str]:
    code = speed.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(report: speed.Report, name: str) -> speed.RowReport:
    return next(r for r in report.rows if r.category == name)


@pytest.mark.parametrize(
    "method, base, expected",
    [
        pytest.param(  # totals: 40 tok / 2 s vs 40 tok / 5 s; rates (30, 10) vs (10, 5)
            [answer(1, tokens=[30], times=[1.0], steps=[10]),
             answer(2, tokens=[10], times=[1.0], steps=[10])],
            [answer(1, tokens=[30], times=[3.0]), answer(2, tokens=[10], times=[2.0])],
            {"m_tps": 20.0, "b_tps": 8.0, "speedup": 2.5, "m_rate": 20.0, "b_rate": 7.5,
             "rate_speedup": 20.0 / 7.5, "m_mat": 2.0, "b_mat": 1.0},
            id="two-questions",
        ),
        pytest.param(  # two turns: sums over turns
            [answer(1, tokens=[12, 8], times=[0.5, 0.5], steps=[4, 4])],
            [answer(1, tokens=[12, 8], times=[1.0, 1.0])],
            {"m_tps": 20.0, "b_tps": 10.0, "speedup": 2.0, "m_rate": 20.0, "b_rate": 10.0,
             "rate_speedup": 2.0, "m_mat": 2.5, "b_mat": 1.0},
            id="two-turns",
        ),
        pytest.param(  # a slower method: speedup below one
            [answer(1, tokens=[10], times=[4.0], steps=[10])],
            [answer(1, tokens=[10], times=[2.0])],
            {"m_tps": 2.5, "b_tps": 5.0, "speedup": 0.5, "m_rate": 2.5, "b_rate": 5.0,
             "rate_speedup": 0.5, "m_mat": 1.0, "b_mat": 1.0},
            id="slowdown",
        ),
    ],
)
def test_rates_speedup_and_mat(tmp_path: Path, method: list, base: list, expected: dict) -> None:
    overall = compare(tmp_path, method, base).overall
    got = {
        "m_tps": overall.method.tokens_per_s, "b_tps": overall.baseline.tokens_per_s,
        "speedup": overall.speedup, "m_rate": overall.method.mean_rate,
        "b_rate": overall.baseline.mean_rate, "rate_speedup": overall.mean_rate_speedup,
        "m_mat": overall.method.mat, "b_mat": overall.baseline.mat,
    }
    assert got == pytest.approx(expected)


def test_histogram_acceptance_rate_and_tokens_per_call(tmp_path: Path) -> None:
    method = [
        answer(1, tokens=[6], steps=[3], accept=[3, 1, 2], drafts=[4, 4, 2]),
        answer(2, tokens=[4], steps=[2], accept=[3, 1], drafts=[2, 0]),
    ]
    overall = compare(tmp_path, method, [answer(1, tokens=[6]), answer(2, tokens=[4])]).overall
    assert overall.method.accept_histogram == {1: 2, 2: 1, 3: 2}
    assert overall.baseline.accept_histogram == {1: 10}
    assert overall.acceptance_rate == pytest.approx((2 + 0 + 1 + 2 + 0) / (4 + 4 + 2 + 2 + 0))
    assert overall.tokens_per_target_call == pytest.approx(10 / 5)


def test_acceptance_rate_is_null_without_draft_lengths(tmp_path: Path) -> None:
    report = compare(tmp_path, [answer(1, steps=[5], accept=[2] * 5)], [answer(1)])
    assert report.overall.acceptance_rate is None


@pytest.mark.parametrize(
    "method_texts, base_texts, exact, turn_exact",
    [
        ([["a", "b"], ["c"]], [["a", "b"], ["c"]], 1.0, 1.0),
        ([["a", "b"], ["c"]], [["a", "x"], ["c"]], 0.5, 2 / 3),
        ([["a", "b"], ["c"]], [["a", "b", "z"], ["d"]], 0.0, 2 / 4),
    ],
)
def test_exact_match(tmp_path: Path, method_texts: list, base_texts: list, exact: float,
                     turn_exact: float) -> None:
    def lines(all_texts: list[list[str]]) -> list[dict[str, Any]]:
        return [answer(i, tokens=[1] * len(t), times=[1.0] * len(t), texts=t)
                for i, t in enumerate(all_texts)]

    overall = compare(tmp_path, lines(method_texts), lines(base_texts)).overall
    assert overall.exact_match == pytest.approx(exact)
    assert overall.turn_exact_match == pytest.approx(turn_exact)


def test_several_choices_sum_and_choice_zero_is_compared(tmp_path: Path) -> None:
    line = answer(1, tokens=[10], times=[1.0], texts=["same"])
    extra = dict(line["choices"][0], index=1, turns=["different"], new_tokens=[30], wall_time=[1.0],
                 decoding_steps=[30], accept_lengths=[1] * 30)
    line["choices"].append(extra)
    base = answer(1, tokens=[40], times=[4.0], texts=["same"])
    overall = compare(tmp_path, [line], [base]).overall
    assert overall.method.tokens == 40 and overall.method.wall_time == 2.0
    assert overall.speedup == pytest.approx(2.0)
    assert overall.exact_match == 1.0


def test_mt_bench_categories_share_one_row_in_first_appearance_order(tmp_path: Path) -> None:
    cats = ["translation", "writing", "qa", "math", "coding", "translation"]
    lines = [answer(i, category=c) for i, c in enumerate(cats)]
    report = compare(tmp_path, lines, lines)
    names = [r.category for r in report.rows]
    assert names == ["translation", "multi-turn conversation", "qa", "overall"]
    assert row(report, "multi-turn conversation").questions == 3
    assert report.overall.questions == 6


def test_other_benchmark_categories_get_their_own_rows(tmp_path: Path) -> None:
    lines = [answer(1, category="beta"), answer(2, category="alpha"), answer(3, category="beta")]
    report = compare(tmp_path, lines, lines)
    rows = [(r.category, r.questions) for r in report.rows]
    assert rows == [("beta", 2), ("alpha", 1), ("overall", 3)]


def test_error_entries_are_excluded_on_both_sides_and_listed(tmp_path: Path) -> None:
    method = [answer(1, tokens=[10]), failure(2), answer(3, tokens=[10], category="gamma")]
    base = [answer(1, tokens=[10]), answer(2, tokens=[1000]), failure(3, category="gamma")]
    report = compare(tmp_path, method, base)
    assert report.overall.questions == 1
    assert report.overall.baseline.tokens == 10
    assert report.errors == {
        "method": {"count": 1, "ids": [2]}, "baseline": {"count": 1, "ids": [3]}
    }
    gamma = row(report, "gamma")  # every question failed: an empty row, no NaN
    assert gamma.questions == 0 and gamma.speedup is None and gamma.method.mat is None
    assert "NaN" not in json.dumps(report.to_json(), allow_nan=False)


def test_zero_time_and_zero_steps_give_null(tmp_path: Path, capsys: Capsys) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1, tokens=[0], times=[0.0], steps=[0], accept=[])])
    b = write(tmp_path / "b.jsonl", [answer(1, tokens=[0], times=[0.0], steps=[0], accept=[])])
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    overall = json.loads(out.strip().splitlines()[-1])["rows"][-1]
    assert code == 0
    assert overall["speedup"] is None and overall["method"]["tokens_per_s"] is None
    assert overall["method"]["mat"] is None and overall["method"]["mean_rate"] is None


def test_integer_and_string_ids_pair_up(tmp_path: Path) -> None:
    report = compare(tmp_path, [answer(81)], [answer("81")])
    assert report.overall.questions == 1


def test_settings_from_meta_and_missing_meta(tmp_path: Path) -> None:
    meta = {"method": "logitspec", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0,
            "dtype": "float32", "device": "cpu", "params": {"max_ngram_size": 3}}
    report = compare(tmp_path, [answer(1, meta=meta)], [answer(1)])
    assert report.settings["method"]["method"] == "logitspec"
    assert report.settings["method"]["params"] == {"max_ngram_size": 3}
    assert report.settings["baseline"] is None
    bf16 = dict(meta, dtype="bfloat16")
    other = compare(tmp_path, [answer(1, meta=meta)], [answer(1, meta=bf16)])
    assert other.settings_differ == ("dtype",) and other.environment_differs == ()
    cached = dict(meta, prefix_cache=True)  # a baseline that prefilled less is no baseline
    assert compare(tmp_path, [answer(1, meta=cached)], [answer(1, meta=dict(
        meta, prefix_cache=False))]).settings_differ == ("prefix_cache",)


def test_a_warning_when_the_files_were_measured_in_different_environments(
    tmp_path: Path, capsys: Capsys
) -> None:
    here = {"method": "vanilla", "hardware": "Xeon, 2 threads", "torch": "2.13.0", "threads": 2}
    there = dict(here, hardware="Xeon, 1 threads", threads=1)
    m = write(tmp_path / "m.jsonl", [answer(1, meta=dict(here, method="pld", torch="2.12.0"))])
    b = write(tmp_path / "b.jsonl", [answer(1, meta=there)])
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["environment_differs"] == ["hardware", "torch", "threads"]
    assert result["settings_differ"] == []
    warning = next(line for line in out.splitlines() if "different environments" in line)
    assert "torch '2.12.0' vs '2.13.0'" in warning and "threads 2 vs 1" in warning
    same = write(tmp_path / "same.jsonl", [answer(1, meta=dict(here, load_average=3.5))])
    code, out, _ = run_cli(capsys, ["--file-path", same, "--base-path",
                                    write(tmp_path / "b2.jsonl", [answer(1, meta=here)])])
    assert "different environments" not in out  # the load is the moment's, not the machine's


def test_mismatched_ids_name_the_missing_ones(tmp_path: Path, capsys: Capsys) -> None:
    m = write(tmp_path / "m.jsonl", [answer(i) for i in range(1, 20)])
    b = write(tmp_path / "b.jsonl", [answer(i) for i in range(5, 25)] + [failure(99)])
    code, out, err = run_cli(capsys, ["--file-path", m, "--base-path", b])
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("speed.py: error: question ids differ")
    assert f"missing from {b}: 1, 2, 3, 4;" in err
    assert f"missing from {m}: 20, 21, 22, 23, 24, 99" in err


def test_long_id_lists_are_truncated() -> None:
    shown = speed.format_ids(str(i) for i in range(30, 0, -1))
    assert shown == "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (30 ids)"


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps(answer(1)) + "\n{not json\n", "b.jsonl:2: malformed JSON"),
        (json.dumps(answer(1)) + "\n" + json.dumps(answer(1)) + "\n",
         "b.jsonl:2: duplicate question_id 1"),
        ("\n\n", "no answers (empty file)"),
        ('{"question_id": 1, "category": "x", "choices": [{"turns": ["a"], "decoding_steps": [1],'
         ' "new_tokens": [1, 2], "wall_time": [1.0]}]}\n', "b.jsonl:1: choice 0: 'turns'"),
        ('[1, 2]\n', "b.jsonl:1: expected a JSON object"),
    ],
    ids=["malformed", "duplicate", "empty", "turn-lengths", "not-object"],
)
def test_bad_base_file_is_one_line_exit_2(tmp_path: Path, capsys: Capsys,
                                          content: str, message: str) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1)])
    b = tmp_path / "b.jsonl"
    b.write_text(content)
    code, out, err = run_cli(capsys, ["--file-path", m, "--base-path", str(b)])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def make_tokenizer(directory: Path) -> str:
    """A whitespace word-level tokenizer saved offline (unknown words map to [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(directory)
    return str(directory)


def test_tokenizer_counting_replaces_new_tokens_on_both_sides(
    tmp_path: Path, capsys: Capsys
) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    m = write(tmp_path / "m.jsonl", [answer(1, tokens=[99, 99], times=[1.0, 1.0], steps=[2, 1],
                                            texts=["the cat sat", "the cat"])])
    b = write(tmp_path / "b.jsonl", [answer(1, tokens=[7, 7], times=[2.0, 3.0], steps=[3, 2],
                                            texts=["the cat sat", "a dog ran off"])])
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b, "--tokenizer-path", tok])
    result = json.loads(out.strip().splitlines()[-1])
    overall = result["rows"][-1]
    assert code == 0 and result["counting"] == "tokenizer" and result["tokenizer_path"] == tok
    assert (overall["method"]["tokens"], overall["baseline"]["tokens"]) == (5, 7)
    assert overall["method"]["mat"] == pytest.approx(5 / 3)
    assert overall["speedup"] == pytest.approx((5 / 2) / (7 / 5))
    assert "re-tokenized with" in out


def test_default_counting_is_named(tmp_path: Path, capsys: Capsys) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1)])
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", m])
    assert code == 0 and "token counting: new_tokens" in out
    assert json.loads(out.strip().splitlines()[-1])["counting"] == "new_tokens"


def test_mean_report_mean_and_sample_std(tmp_path: Path, capsys: Capsys) -> None:
    methods, bases = [], []
    for run, seconds in enumerate([5.0, 10 / 3, 2.5]):  # speedups 2, 3, 4 against a 10 s baseline
        method = answer(1, tokens=[10], times=[seconds], steps=[5])
        methods.append(write(tmp_path / f"m{run}.jsonl", [method]))
        bases.append(write(tmp_path / f"b{run}.jsonl", [answer(1, tokens=[10], times=[10.0])]))
    argv = ["--mean-report", "--file-path", *methods, "--base-path", *bases]
    code, out, _ = run_cli(capsys, argv)
    result = json.loads(out.strip().splitlines()[-1])
    overall = result["rows"][-1]
    assert code == 0 and result["mode"] == "mean-report" and result["runs"] == 3
    assert overall["category"] == "overall" and overall["runs"] == 3
    assert overall["figures"]["speedup"]["mean"] == pytest.approx(3.0)
    assert overall["figures"]["speedup"]["std"] == pytest.approx(1.0)
    assert overall["figures"]["mat"] == {"mean": 2.0, "std": 0.0, "n": 3}
    assert len(result["reports"]) == 3


def test_mean_report_single_run_has_null_std() -> None:
    assert speed.spread([2.0, None]) == speed.Spread(mean=2.0, std=None, n=1)


def test_mean_report_needs_paired_files(tmp_path: Path, capsys: Capsys) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1)])
    code, _, err = run_cli(capsys, ["--mean-report", "--file-path", m, m, "--base-path", m])
    assert code == 2 and "--file-path has 2 files but --base-path has 1" in err


def test_table_then_json_last_line_and_json_only(tmp_path: Path, capsys: Capsys) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1, category="writing", steps=[5], accept=[2] * 5)])
    b = write(tmp_path / "b.jsonl", [answer(1, category="writing")])
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) > 3
    assert any(line.startswith("multi-turn conversation") for line in lines)
    assert "accepted-length histogram (method, overall): 2:5" in out
    result = json.loads(lines[-1])
    assert result["mode"] == "single" and result["rows"][-1]["method"]["mat"] == 2.0
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b, "--json"])
    assert len(out.strip().splitlines()) == 1 and json.loads(out) == result


def test_plot_writes_png(tmp_path: Path, capsys: Capsys) -> None:
    method = [answer(1, steps=[4], accept=[3, 3, 2, 2]), answer(2, category="beta")]
    m = write(tmp_path / "m.jsonl", method)
    b = write(tmp_path / "b.jsonl", [answer(1), answer(2, category="beta")])
    png = tmp_path / "speed.png"
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b, "--plot", str(png)])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_script_mode_runs_without_the_package_on_the_path(tmp_path: Path) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1, tokens=[10], times=[1.0], steps=[5])])
    b = write(tmp_path / "b.jsonl", [answer(1, tokens=[10], times=[2.0])])
    script = str(ROOT / "evaluation" / "speed.py")

    def run(base: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, script, "--file-path", m, "--base-path", base]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=60)

    done = run(b)
    assert done.returncode == 0, done.stderr
    speedup = json.loads(done.stdout.strip().splitlines()[-1])["rows"][-1]["speedup"]
    assert math.isclose(speedup, 2.0)
    bad = run(str(tmp_path / "missing.jsonl"))
    assert bad.returncode == 2 and bad.stderr.startswith("speed.py: error: cannot read")
    assert bad.stderr.count("\n") == 1


# --------------------------------------------------------------------------- disturbance


def run_lines(slowdowns: dict[int, float], load: float = 0.5) -> list[dict[str, Any]]:
    """12 clean questions (20 ms per step, 3 us per context token a step, 0.5 ms per prompt
    token), prompts from 30 to 1530 tokens; ``slowdowns`` multiplies some questions' times."""
    lines = []
    for q in range(12):
        prompt, steps = 30 + 500 * (q % 4), 40 + 5 * q
        wall = 0.02 * steps + 3e-6 * steps * (prompt + steps / 2) + 5e-4 * prompt
        lines.append(answer(q, category=["qa", "rag"][q % 2], tokens=[steps],
                            times=[wall * slowdowns.get(q, 1.0)], prompts=[prompt],
                            meta={"method": "vanilla", "load_average": load + slowdowns.get(q, 0)}))
    return lines


def speedy(lines: list[dict[str, Any]], speedup: float) -> list[dict[str, Any]]:
    """The same questions answered ``speedup`` times faster, in half the steps."""
    out = []
    for line in lines:
        choice = line["choices"][0]
        steps = [s // 2 for s in choice["decoding_steps"]]
        out.append(answer(line["question_id"], category=line["category"],
                          tokens=choice["new_tokens"], steps=steps,
                          times=[t / speedup for t in choice["wall_time"]],
                          accept=[2] * sum(steps), drafts=[4] * sum(steps),
                          prompts=choice["prompt_tokens"]))
    return out


def test_clean_files_flag_nothing(tmp_path: Path, capsys: Capsys) -> None:
    base = run_lines({})
    per_step = [line["choices"][0]["wall_time"][0] / line["choices"][0]["decoding_steps"][0]
                for line in base]  # long prompts: dearer steps, which a bare median would flag
    assert max(per_step) / sorted(per_step)[len(per_step) // 2] > 1.3
    m = write(tmp_path / "m.jsonl", speedy(base, 2.0))
    b = write(tmp_path / "b.jsonl", base)
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert result["disturbance"]["method"]["disturbed"] == []
    assert result["disturbance"]["baseline"]["disturbed"] == []
    assert result["clean_rows"] == result["rows"]
    assert "  method: none" in out and "  baseline: none" in out and "w/o disturbed" not in out
    assert result["rows"][-1]["median_speedup"] == pytest.approx(2.0)


def test_planted_disturbed_questions_are_listed_with_the_clean_figures(
    tmp_path: Path, capsys: Capsys
) -> None:
    clean_base = run_lines({})
    method = speedy(clean_base, 2.0)
    base = run_lines({3: 4.0, 8: 1.5})  # vanilla slowed while it answered questions 3 and 8
    m, b = write(tmp_path / "m.jsonl", method), write(tmp_path / "b.jsonl", base)
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["disturbance"]["method"]["disturbed"] == []
    flagged = result["disturbance"]["baseline"]["disturbed"]
    assert [(q["question_id"], q["category"]) for q in flagged] == [(3, "rag"), (8, "qa")]
    assert [q["ratio"] for q in flagged] == [pytest.approx(4.0), pytest.approx(1.5)]
    assert [q["load_average"] for q in flagged] == [4.5, 2.0]
    assert flagged[0]["expected"] == pytest.approx(clean_base[3]["choices"][0]["wall_time"][0])
    overall, clean = result["rows"][-1], result["clean_rows"][-1]
    assert overall["speedup"] > 2.1 and overall["median_speedup"] == pytest.approx(2.0)
    assert clean["questions"] == 10 and clean["speedup"] == pytest.approx(2.0)
    assert "  baseline: id 3 (rag)" in out and "id 8 (qa)" in out and "4.00x, load 4.50" in out
    row = next(line for line in out.splitlines() if line.startswith("overall w/o disturbed"))
    assert " 10 " in row and "2.00x" in row
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b,
                                    "--disturbance-threshold", "5", "--json"])
    assert json.loads(out)["disturbance"]["baseline"]["disturbed"] == []


@pytest.mark.parametrize("value", ["1", "0.5"])
def test_disturbance_threshold_must_be_above_one(tmp_path: Path, capsys: Capsys, value: str) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1)])
    code, _, err = run_cli(capsys, ["--file-path", m, "--base-path", m,
                                    "--disturbance-threshold", value])
    assert code == 2 and err.count("\n") == 1 and "--disturbance-threshold" in err


def test_prompt_tokens_need_one_entry_per_turn(tmp_path: Path, capsys: Capsys) -> None:
    m = write(tmp_path / "m.jsonl", [answer(1, tokens=[5, 5], times=[1.0, 1.0], prompts=[10])])
    code, _, err = run_cli(capsys, ["--file-path", m, "--base-path", m])
    assert code == 2 and "'prompt_tokens' and 'turns' differ in length" in err


@pytest.mark.parametrize("cached, prompts, message", [
    ([0], [10, 12], "'cached_tokens' and 'turns' differ in length"),
    ([0, 13], [10, 12], "a turn's 'cached_tokens' exceeds its 'prompt_tokens'"),
    ([0, 5], None, "'cached_tokens' without 'prompt_tokens'"),
])
def test_cached_tokens_are_checked(tmp_path: Path, capsys: Capsys, cached, prompts,
                                   message) -> None:
    line = answer(1, tokens=[5, 5], times=[1.0, 1.0], prompts=prompts)
    line["choices"][0]["cached_tokens"] = cached
    m = write(tmp_path / "m.jsonl", [line])
    code, _, err = run_cli(capsys, ["--file-path", m, "--base-path", m])
    assert code == 2 and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("sources, message", [
    ([1], "'source_steps' and 'turns' differ in length"),
    ([1, 6], "a turn's 'source_steps' exceeds its 'decoding_steps'"),
    ([1, -1], "'source_steps'"),
])
def test_source_steps_are_checked(tmp_path: Path, capsys: Capsys, sources, message) -> None:
    line = answer(1, tokens=[5, 5], times=[1.0, 1.0])
    line["choices"][0]["source_steps"] = sources
    m = write(tmp_path / "m.jsonl", [line])
    code, _, err = run_cli(capsys, ["--file-path", m, "--base-path", m])
    assert code == 2 and err.count("\n") == 1 and message in err


def test_source_share_pools_the_questions_that_counted_steps(tmp_path: Path,
                                                             capsys: Capsys) -> None:
    """The docstring's example: 3 of 10 steps and 1 of 30 ran the gated source (a question
    without the count, from a method with no gate, is left out of the share)."""
    counted = [answer(1, tokens=[10], steps=[10]), answer(2, tokens=[20, 10], times=[1.0, 1.0],
                                                         steps=[20, 10])]
    counted[0]["choices"][0]["source_steps"] = [3]
    counted[1]["choices"][0]["source_steps"] = [1, 0]
    base = [answer(1, tokens=[10]), answer(2, tokens=[20, 10], times=[1.0, 1.0])]
    report = compare(tmp_path, [*counted, answer(3)], [*base, answer(3)])
    assert report.overall.source_share == pytest.approx(4 / 40)
    assert compare(tmp_path, base, base).overall.source_share is None
    m, b = write(tmp_path / "m.jsonl", counted), write(tmp_path / "b.jsonl", base)
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    assert code == 0 and "steps that ran the gated draft source (method, overall): 10.0%" in out
    code, out, _ = run_cli(capsys, ["--file-path", b, "--base-path", b])
    assert "gated draft source" not in out


def test_the_disturbance_model_reads_the_prefilled_tokens() -> None:
    """A turn's prefill work is its prompt less the tokens its cache held."""
    line = answer(1, tokens=[5, 5], times=[1.0, 1.0], prompts=[100, 130])
    line["choices"][0]["cached_tokens"] = [40, 110]
    work = speed.measurement(speed.parse_record(line, "line")).work()
    assert work["prompt"] == 60 + 20 and work["context"] == 5 * 102.5 + 5 * 132.5


def test_length_matched_speedup_weighs_each_question_by_the_baselines_length(
        tmp_path: Path, capsys: Capsys) -> None:
    """The docstring's example: the method answered question 1 with three times the
    baseline's tokens (another text): 1.70x pooled, 1.50x at the baseline's lengths."""
    method = [answer(1, tokens=[240], times=[3.0], texts=["loop"]),
              answer(2, tokens=[100], times=[2.0])]
    base = [answer(1, tokens=[80], times=[2.0]), answer(2, tokens=[100], times=[2.5])]
    overall = compare(tmp_path, method, base).overall
    assert overall.speedup == pytest.approx(1.70)
    assert overall.matched_speedup == pytest.approx(1.50)
    m, b = write(tmp_path / "m.jsonl", method), write(tmp_path / "b.jsonl", base)
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    header = next(line for line in out.splitlines() if line.startswith("category"))
    assert code == 0 and "length-matched speedup" in header
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["rows"][-1]["matched_speedup"] == pytest.approx(1.50)
    assert speed.length_matched_speedup([(0, 1.0)], [(10, 2.0)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):  # the two sides must hold the same questions
        speed.length_matched_speedup([(1, 1.0)], [])


def test_decode_speedup_leaves_each_sides_prefill_out(tmp_path: Path, capsys: Capsys) -> None:
    """The method answers fewer tokens to the same prompt: its prefill weighs on fewer of them;
    decoding alone compares the rest."""
    method = [answer(1, tokens=[40], times=[3.0], steps=[20], prefill=1.0),
              answer(2, tokens=[50], times=[2.5], steps=[25], prefill=0.5)]
    base = [answer(1, tokens=[100], times=[6.0], prefill=1.0),
            answer(2, tokens=[50], times=[3.0], prefill=0.5)]
    overall = compare(tmp_path, method, base).overall
    assert overall.speedup == pytest.approx((90 / 5.5) / (150 / 9.0))
    assert overall.decode_speedup == pytest.approx((90 / 4.0) / (150 / 7.5))
    assert overall.speedup < 1 < overall.decode_speedup
    assert overall.method.decode_tokens_per_s == pytest.approx(90 / 4.0)
    m, b = write(tmp_path / "m.jsonl", method), write(tmp_path / "b.jsonl", base)
    code, out, _ = run_cli(capsys, ["--file-path", m, "--base-path", b])
    header = next(line for line in out.splitlines() if line.startswith("category"))
    assert code == 0 and "decode speedup" in header
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["rows"][-1]["decode_speedup"] == pytest.approx(overall.decode_speedup)


@pytest.mark.parametrize("breakdown", [None, "zeros", "one side"])
def test_decode_speedup_is_null_without_timed_phases(tmp_path: Path, breakdown) -> None:
    """No ``time_breakdown``, an all-zero one (a generator that times nothing), or one side
    without it: no decode speedup (never a wall-time figure under its name)."""
    method = [answer(1, tokens=[40], times=[3.0], steps=[20], prefill=1.0)]
    base = [answer(1, tokens=[100], times=[6.0], prefill=1.0)]
    if breakdown is None:
        del method[0]["choices"][0]["time_breakdown"], base[0]["choices"][0]["time_breakdown"]
    elif breakdown == "zeros":
        base[0]["choices"][0]["time_breakdown"] = dict.fromkeys(
            ("prefill", "draft", "verify", "accept", "update"), 0.0)
    else:
        del base[0]["choices"][0]["time_breakdown"]
    overall = compare(tmp_path, method, base).overall
    assert overall.decode_speedup is None and overall.speedup is not None


def test_a_bad_time_breakdown_is_one_line_exit_2(tmp_path: Path, capsys: Capsys) -> None:
    line = answer(1, prefill=0.5)
    line["choices"][0]["time_breakdown"]["prefill"] = -1.0
    m, b = write(tmp_path / "m.jsonl", [line]), write(tmp_path / "b.jsonl", [answer(1)])
    code, out, err = run_cli(capsys, ["--file-path", m, "--base-path", b])
    assert code == 2 and out == "" and "time_breakdown" in err and err.count("\n") == 1
