"""scripts/compare.py: method specs, rotation, the figures on synthetic outcomes, and one run
on the tiny random Llama (2 demo questions, 4 methods, float32: every method is lossless)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from evaluation import speed
from evaluation.disturbance import Measurement, TurnWork
from evaluation.questions import Question
from logitspec import snapshot
from logitspec.decoding import GenerationConfig
from cli_helpers import DEMO, load_script, read_lines, run_cli, save_random_head, save_tiny_llama

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
    ("racer", "racer", 64, ()),
    ("racer:16,max_nodes=500", "racer", 16, (("max_nodes", "500"),)),
    ("racer:64,prompt_logits=off", "racer", 64, (("prompt_logits", "off"),)),
    ("logitspec", "logitspec", "auto", ()),
    ("logitspec:8", "logitspec", 8, ()),
    ("logitspec:64,tree_policy=reference", "logitspec", 64, (("tree_policy", "reference"),)),
    ("logitspec:auto,recycle_chains=0", "logitspec", "auto", (("recycle_chains", "0"),)),
    ("logitspec:64,prompt_logits=1", "logitspec", 64, (("prompt_logits", "1"),)),
    ("eagle", "eagle", "auto", ()),
    ("eagle:64,no_retrieval=1", "eagle", 64, (("no_retrieval", "1"),)),
    ("sps", "sps", None, ()),
    ("sps:12,draft_head=cached,draft_length_bounds=1/8", "sps", 12,
     (("draft_head", "cached"), ("draft_length_bounds", "1/8"))),
    ("sam", "sam", 64, ()),
    ("sam:40,fallback=none,match_scale=4", "sam", 40, (("fallback", "none"), ("match_scale", "4"))),
    ("suffix", "suffix", 65, ()),
    ("suffix:16,mode=chain", "suffix", 16, (("mode", "chain"),)),
    ("lookahead", "lookahead", None, ()),
    ("lookahead,level=4,guess=5", "lookahead", None, (("level", "4"), ("guess", "5"))),
]
BAD_SPECS = ["medusa", "vanilla:3", "sps:auto", "eagle:8,no_retrieval=yes", "hf,value", "pld:0", "pld:x", "pld:8,value", "recycling:auto",
             "logitspec:8,fast=1", "logitspec:-1", "logitspec:auto,tree_policy=reference",
             "logitspec:8,recycle_chains=x", "logitspec:8,tree_policy=", "pld:8,draft_tree_capacity=3",
             "racer:auto", "racer:8,max_nodes=10", "racer:8,ngram=1", "racer:8,max_breadth=0",
             "racer:8,prompt_logits=no",
             "logitspec:8,prompt_logits=2", "logitspec:8,prompt_logits=1,recycle_chains=0",
             "logitspec:8,prompt_logits=1,tree_policy=reference",
             "logitspec:8,successor_children=2,recycle_chains=0", "logitspec:8,successor_hops=0",
             "logitspec:8,recycle_breadth=4,recycle_chains=0",
             "sam:auto", "sam:8,fallback=eagle", "sam:8,match_scale=0",
             "suffix:0", "suffix,mode=path", "suffix,min_token_prob=2", "rest",
             "rest:65,datastore=/no/such/file.npz",
             "lookahead:56", "lookahead,level=2", "lookahead,draft_tree_capacity=8"]


@pytest.mark.parametrize("text,name,number,flags", SPECS)
def test_parse_spec(text, name, number, flags):
    spec = compare.parse_spec(text)
    assert (spec.name, spec.number, spec.flags) == (name, number, flags)


def test_specs_build_the_commands_params():
    params = compare.method_params(compare.parse_spec("logitspec:64,tree_policy=reference"))
    assert params.logitspec_config().tree_policy == "reference"
    assert params.logitspec_config().draft_tree_capacity == 64
    assert compare.method_params(compare.parse_spec("logitspec")).logitspec_config().draft_tree_capacity is None
    eagle = compare.method_params(compare.parse_spec("eagle:64,no_retrieval=1,head_depth=4"))
    config = eagle.eagle_config()
    assert (config.retrieval, config.depth, config.logitspec.draft_tree_capacity) == (False, 4, 64)
    sps = compare.method_params(compare.parse_spec(
        "sps,draft_head=cached,draft_schedule=heuristic,draft_length_bounds=2/6"))
    assert sps.draft_head == "cached" and sps.draft_layers is None
    assert sps.draft_length_bounds == [2, 6] and sps.length_config().schedule == "heuristic"
    assert sps.draft_tree_capacity == 1 + 6  # one draft of at most 6 tokens
    paths = compare.method_params(compare.parse_spec(
        "sps,draft_model_path=/models/small.gguf+/models/tiny.gguf,num_draft_tokens=3"))
    assert paths.draft_model_path == ["/models/small.gguf", "/models/tiny.gguf"]
    assert paths.draft_tree_capacity == 1 + 2 * 3  # two drafts of 3 tokens
    samd = compare.method_params(compare.parse_spec("sam")).sam_config()
    assert (samd.draft_size, samd.recycling.draft_tree_capacity, samd.fallback) == (40, 64, True)
    small = compare.method_params(compare.parse_spec("sam:16")).sam_config()
    assert (small.draft_size, small.tree_capacity) == (16, 16)
    alone = compare.method_params(compare.parse_spec("sam:40,fallback=none,match_scale=4")).sam_config()
    assert (alone.fallback, alone.match_scale, alone.tree_capacity) == (False, 4.0, 40)
    published = compare.method_params(compare.parse_spec("lookahead")).lookahead_config()
    assert (published.level, published.window, published.guess) == (5, 7, 7)


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


def outcome(tokens, wall, steps, ids=((1, 2),), host=0.0, phases=0.0, drafted=None, prompt=None,
            prefill=None):
    work = Measurement(wall, (TurnWork(steps, tokens, prompt),), drafted)
    return compare.Outcome(tokens, wall, steps, tuple(ids), host, phases, work, prefill=prefill)


def test_summarize_on_synthetic_outcomes():
    outcomes = {
        "vanilla": {"1": outcome(10, 2.0, 10), "2": outcome(20, 2.0, 20), "3": outcome(5, 1.0, 5)},
        "x": {"1": outcome(10, 1.0, 4, host=0.1, phases=1.0),
              "2": outcome(20, 3.0, 8, ids=((9,),), host=0.2, phases=1.0),
              "3": None},  # failed: question 3 is left out for every method
    }
    rows_of = {"1": "qa", "2": "multi-turn conversation", "3": "qa"}
    units = compare.usable_units([outcomes], list(rows_of))
    assert units == [(0, "1"), (0, "2")]
    summary = compare.summarize([outcomes], rows_of, units)
    assert list(summary) == ["qa", "multi-turn conversation", "overall"]
    overall = summary["overall"]
    assert overall["vanilla"].questions == 2 and overall["vanilla"].mat == 1.0
    assert overall["vanilla"].speedup == 1.0 and overall["vanilla"].host_overhead is None
    assert overall["vanilla"].host_us_per_step is None  # no phase timing recorded
    x = overall["x"]
    assert (x.tokens, x.steps, x.mat) == (30, 12, 2.5)
    assert x.tokens_per_s == pytest.approx(7.5) and x.speedup == pytest.approx(1.0)
    assert x.exact_match == 0.5 and x.host_overhead == pytest.approx(0.15)
    assert x.host_us_per_step == pytest.approx(1e6 * 0.3 / 12)
    assert x.median_speedup == pytest.approx((2.0 + 2 / 3) / 2)  # per question: 2.0 and 2/3
    assert summary["qa"]["x"].speedup == pytest.approx(2.0) and summary["qa"]["x"].exact_match == 1.0
    assert x.decode_speedup is None  # vanilla timed no phases: its prefill is unknown


def test_matched_speedup_weighs_each_question_by_vanillas_length():
    """The docstring's example: a method that answered question 1 with three times vanilla's
    tokens gains 1.70x pooled but 1.50x at vanilla's lengths; equal lengths give equal figures."""
    outcomes = {
        "vanilla": {"1": outcome(80, 2.0, 80), "2": outcome(100, 2.5, 100)},
        "x": {"1": outcome(240, 3.0, 60, ids=((9,),)), "2": outcome(100, 2.0, 50)},
        "y": {"1": outcome(80, 1.0, 40), "2": outcome(100, 2.5, 50)},
    }
    rows_of = {"1": "qa", "2": "qa"}
    summary = compare.summarize([outcomes], rows_of, compare.usable_units([outcomes], list(rows_of)))
    x, y = summary["overall"]["x"], summary["overall"]["y"]
    assert x.speedup == pytest.approx(1.70) and x.matched_speedup == pytest.approx(1.50)
    assert y.matched_speedup == pytest.approx(y.speedup) == pytest.approx(4.5 / 3.5)
    assert summary["overall"]["vanilla"].matched_speedup == 1.0
    table = compare.row_table(summary["overall"])
    assert table[0][6] == "length-matched speedup" and table[2][6] == "1.50x"
    # an empty answer keeps its time unscaled
    empty = compare.matched_speedup([outcome(0, 1.0, 1)], [outcome(10, 2.0, 10)])
    assert empty == pytest.approx(2.0)


def test_decode_speedup_leaves_each_sides_prefill_out():
    """Two answers of other lengths to the same prompts: the one that answers fewer tokens
    spreads the same prefill over fewer of them; decoding alone compares the rest."""
    outcomes = {
        "vanilla": {"1": outcome(100, 6.0, 100, phases=6.0, prefill=1.0),
                    "2": outcome(50, 3.0, 50, phases=3.0, prefill=0.5)},
        "x": {"1": outcome(40, 3.0, 20, phases=3.0, prefill=1.0),  # a shorter answer
              "2": outcome(50, 2.5, 25, phases=2.5, prefill=0.5)},
    }
    rows_of = {"1": "qa", "2": "qa"}
    summary = compare.summarize([outcomes], rows_of, compare.usable_units([outcomes], list(rows_of)))
    x, base = summary["overall"]["x"], summary["overall"]["vanilla"]
    assert x.speedup == pytest.approx((90 / 5.5) / (150 / 9.0))  # < 1: the short answer's prefill
    assert x.decode_speedup == pytest.approx((90 / 4.0) / (150 / 7.5))  # > 1
    assert x.speedup < 1 < x.decode_speedup and base.decode_speedup == 1.0
    table = compare.row_table(summary["overall"])
    assert table[0][5] == "decode speedup" and table[2][5] == f"{x.decode_speedup:.2f}x"


def test_repeats_pool_passes_and_spread_over_them():
    """Three passes of one question: the method's speedup is 2, 3 and 4 (vanilla 10 s)."""
    passes = [{"vanilla": {"1": outcome(10, 10.0, 10)}, "x": {"1": outcome(10, 10.0 / s, 5)}}
              for s in (2.0, 3.0, 4.0)]
    rows_of = {"1": "qa"}
    units = compare.usable_units(passes, ["1"])
    pooled = compare.summarize(passes, rows_of, units)["overall"]["x"]
    assert pooled.questions == 1 and pooled.tokens == 30 and pooled.steps == 15
    assert pooled.speedup == pytest.approx(30 / (10 / 2 + 10 / 3 + 10 / 4) / 1.0)
    assert pooled.median_speedup == pytest.approx(pooled.speedup)  # one question, pooled
    spread = compare.spread_over_passes(passes, rows_of, units)["overall"]["x"]
    assert spread["speedup"] == compare.PassSpread(mean=pytest.approx(3.0), std=pytest.approx(1.0),
                                                   min=pytest.approx(2.0), n=3)
    assert spread["tokens_per_s"].mean == pytest.approx(3.0) and spread["tokens_per_s"].min == 2.0
    single = compare.spread_over_passes(passes[:1], rows_of, units[:1])["overall"]["x"]
    assert single["speedup"] == compare.PassSpread(2.0, None, 2.0, 1)


def synthetic_passes(disturbed: dict[tuple[int, str, str], float]) -> list[dict]:
    """Two passes of 12 questions on a clean clock: vanilla 20 ms a step, ``x`` 30 ms a step
    plus 1 ms a drafted token, both 5 us per context token a step and 1 ms per prompt token;
    ``disturbed`` multiplies (pass, question, method) times."""
    passes = []
    for run_pass in range(2):
        per = {"vanilla": {}, "x": {}}
        for q in range(12):
            key, prompt = str(q + 1), 40 + 150 * (q % 4)
            for label, steps, drafted, base in (("vanilla", 60, 0, 0.02), ("x", 20 + q, 5 * q, 0.03)):
                tokens = 60
                wall = (base * steps + 0.001 * drafted + 5e-6 * steps * (prompt + tokens / 2)
                        + 0.001 * prompt) * disturbed.get((run_pass, key, label), 1.0)
                per[label][key] = outcome(tokens, wall, steps, drafted=drafted, prompt=prompt)
        passes.append(per)
    return passes


def test_planted_disturbances_are_found_and_left_out_of_the_clean_figures():
    categories = {str(q + 1): "qa" for q in range(12)}
    planted = {(1, "4", "vanilla"): 3.0, (0, "9", "x"): 1.6}
    passes = synthetic_passes(planted)
    flags = compare.find_disturbed(passes, categories, 1.3)
    assert [(f.run_pass, f.question, f.method) for f in flags] == [(1, "9", "x"), (2, "4", "vanilla")]
    assert [f.ratio for f in flags] == [pytest.approx(1.6), pytest.approx(3.0)]
    clean = synthetic_passes({})
    assert compare.find_disturbed(clean, categories, 1.3) == []
    keys = list(categories)
    rows_of = dict.fromkeys(keys, "qa")
    kept = compare.usable_units(passes, keys, compare.flagged_units(flags))
    assert len(kept) == 22
    got = compare.summarize(passes, rows_of, kept)["overall"]["x"].speedup
    want = compare.summarize(clean, rows_of, kept)["overall"]["x"].speedup
    assert got == pytest.approx(want)  # the clean figures: exactly the undisturbed ones


def test_the_report_lists_the_disturbed_and_the_figures_without_them():
    passes = synthetic_passes({(1, "4", "vanilla"): 3.0})
    questions = [Question(q + 1, "qa", ("?",)) for q in range(12)]
    args = argparse.Namespace(disturbance_threshold=1.3, rerun_disturbed=False)
    c = compare.compare_measurements(args, {"repeats": 2}, [], questions, passes)
    assert [(f.run_pass, f.question, f.method) for f in c.remaining] == [(2, "4", "vanilla")]
    assert c.found == c.remaining and c.reruns == () and c.before_rerun is None
    assert (c.units, c.left_out) == (24, 1)
    assert c.summary["overall"]["x"].speedup > c.clean["overall"]["x"].speedup  # slow vanilla
    assert c.spread["overall"]["x"]["speedup"].n == 2
    report = compare.report_text(c, md=True)
    assert "| 2 | 4 | qa | vanilla |" in report and "| 3.00x |" in report
    assert "## overall without the disturbed measurements" in report
    assert "Left out, for every method: 1 of 24 (pass, question) units." in report
    assert "speedup over passes" in report and "## re-runs" not in report


# --------------------------------------------------------------------------- a real run

METHODS = ["vanilla", "hf-pld:4", "recycling:16", "logitspec:auto", "lookahead,level=3,guess=2"]


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
    assert rows["overall"]["hf-pld:4"]["host_us_per_step"] is None
    assert 0 < rows["overall"]["recycling:16"]["host_overhead"] < 1
    assert rows["overall"]["recycling:16"]["host_us_per_step"] > 0
    assert rows["overall"]["vanilla"]["median_speedup"] == 1.0
    assert result["repeats"] == 1 and len(result["passes"]) == 1
    assert result["passes"][0] == {"answer_files": result["answer_files"], "order": result["order"]}
    assert set(result["disturbance"]) == {"threshold", "found", "remaining"}
    assert result["order"] == {"4": METHODS, "5": METHODS[1:] + METHODS[:1]}
    assert result["dtype"] == "float32" and "threads" in result["hardware"] and result["failed"] == []
    check_files(result, out_dir)
    report = (out_dir / "report.md").read_text()
    assert "## overall (2 questions)" in report and "host µs/step" in report
    assert "## disturbed measurements" in report
    assert "overall (2 questions)" in stdout


def test_compare_run_with_the_prefix_cache(tiny, tmp_path, capsys, monkeypatch):
    """``--prefix-cache 1``: each method's second question starts from its first one's cache
    (they share the chat template's opening), and every method still answers vanilla's
    texts."""
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    methods = ["vanilla", "pld:8", "logitspec:8"]
    argv = argv_for(tiny, tmp_path / "out", "--methods", *methods, "--prefix-cache", "1")
    assert compare.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for label in methods:
        assert result["rows"]["overall"][label]["exact_match"] == 1.0, label
        first, second = read_lines(Path(result["answer_files"][label]))
        assert first["meta"]["prefix_cache"] is True
        assert first["choices"][0]["cached_tokens"][0] == 0
        assert first["choices"][0]["cached_tokens"][1] > 0  # the follow-up turn, as always
        choice = second["choices"][0]
        assert 0 < choice["cached_tokens"][0] < choice["prompt_tokens"][0]


class SyntheticClock:
    """A generator whose ``wall_time`` is 10 ms per decoding step, times ``slowdown`` on the
    calls numbered in ``slow_calls`` (0-based, counted in ``calls``, which the generators of
    one method share): a planted disturbance, free of the machine's. The calls numbered in
    ``other_text`` answer with their last token changed (as a bfloat16 run whose drafter starts
    afresh can). ``prompts``: the prompts this instance answered."""

    def __init__(self, inner, calls, slow_calls=(), slowdown=3.0, other_text=()):
        self.inner, self.slow_calls, self.slowdown, self.calls = inner, set(slow_calls), slowdown, calls
        self.other_text = set(other_text)
        self.prompts = []

    def reset(self, keep_prefix=False):
        self.inner.reset(keep_prefix)

    def generate(self, prompt_ids, config):
        self.prompts.append(tuple(prompt_ids))
        result = self.inner.generate(prompt_ids, config)
        factor = self.slowdown if self.calls[0] in self.slow_calls else 1.0
        if self.calls[0] in self.other_text:
            ids = list(result.output_ids)
            ids[-1] = 0 if ids[-1] else 1
            result = dataclasses.replace(result, output_ids=ids)
        self.calls[0] += 1
        return dataclasses.replace(result, wall_time=0.01 * result.decoding_steps * factor)


def test_repeats_and_rerun_disturbed(tiny, tmp_path, capsys, monkeypatch):
    """Two passes over 4 one-turn questions after one warm-up; pld:8's answer to the second
    question of pass 2 is planted 3x slow: it is flagged, re-run at the end, and the faster
    re-run is kept. No generator answers a prompt twice: the warm-up's, each pass's and the
    re-run's are fresh ones (a drafter that learns across questions would meet its own
    answers)."""
    make_generator = compare.make_generator
    built: dict[str, list[SyntheticClock]] = {}
    calls: dict[str, list[int]] = {}

    def clocked(spec, models):
        clock = SyntheticClock(make_generator(spec, models), calls.setdefault(spec.text, [0]),
                               slow_calls={6} if spec.text == "pld:8" else ())
        built.setdefault(spec.text, []).append(clock)
        return clock

    monkeypatch.setattr(compare, "make_generator", clocked)
    out_dir = tmp_path / "out"
    argv = argv_for(tiny, out_dir, "--methods", "vanilla", "pld:8", "--warmup", "1",
                    "--repeats", "2", "--rerun-disturbed")
    argv[argv.index("--question-begin") + 1], argv[argv.index("--question-end") + 1] = "4", "8"
    assert compare.main(argv) == 0
    stdout = capsys.readouterr().out
    result = json.loads(stdout.strip().splitlines()[-1])
    found = result["disturbance"]["found"]
    assert [(f["run_pass"], f["question"], f["method"]) for f in found] == [(2, "6", "pld:8")]
    assert found[0]["ratio"] == pytest.approx(3.0) and found[0]["load_average"] is not None
    (rerun,) = result["reruns"]
    assert rerun["kept"] == "new" and rerun["old_time"] == pytest.approx(3 * rerun["new_time"])
    assert result["disturbance"]["remaining"] == [] and result["left_out"] == 0
    assert result["before_rerun"]["pld:8"]["speedup"] < result["rows"]["overall"]["pld:8"]["speedup"]
    assert result["clean_rows"] == result["rows"]
    spread = result["spread"]["overall"]["pld:8"]["speedup"]
    assert spread["n"] == 2 and spread["mean"] == pytest.approx(result["rows"]["overall"]["pld:8"]["speedup"])
    assert [p["order"]["5"] for p in result["passes"]] == [["vanilla", "pld:8"], ["pld:8", "vanilla"]]
    second = Path(result["passes"][1]["answer_files"]["pld:8"])
    assert second.name.endswith(".pass-2.jsonl") and Path(result["answer_files"]["pld:8"]).name.endswith(".pass-1.jsonl")
    lines = read_lines(second)
    assert [line["question_id"] for line in lines] == [5, 6, 7, 8]
    assert sum(lines[1]["choices"][0]["wall_time"]) == pytest.approx(rerun["new_time"])
    report = (out_dir / "report.md").read_text()
    assert "## re-runs (--rerun-disturbed)" in report and "speedup over passes" in report
    assert "## overall before the re-runs" in report
    # built: the warm-up's, pass 1's, pass 2's and the re-run's (pld:8 only)
    assert [len(clock.prompts) for clock in built["pld:8"]] == [1, 4, 4, 1]
    assert [len(clock.prompts) for clock in built["vanilla"]] == [1, 4, 4]
    assert built["pld:8"][0].prompts[0] == built["pld:8"][1].prompts[0]  # the warm-up's question
    for clock in built["pld:8"] + built["vanilla"]:
        assert len(set(clock.prompts)) == len(clock.prompts)


def run_with_one_rerun(tiny, tmp_path, capsys, monkeypatch, clocked, *extra):
    """compare.py with ``clocked`` generators over questions 5 to 8, vanilla and pld:8, no
    warm-up, ``--rerun-disturbed``: pld:8's call 1 (question 6) is the one the tests below
    plant slow. Returns the last stdout line's JSON."""
    monkeypatch.setattr(compare, "make_generator", clocked)
    argv = argv_for(tiny, tmp_path / "out", "--methods", "vanilla", "pld:8", "--warmup", "0",
                    "--rerun-disturbed", *extra)
    argv[argv.index("--question-begin") + 1], argv[argv.index("--question-end") + 1] = "4", "8"
    assert compare.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_rerun_that_answers_another_text_is_not_kept(tiny, tmp_path, capsys, monkeypatch):
    """The disturbed measurement is taken again, faster, but with another text (a generator
    that saves no state starts afresh, and a fresh drafter's trees round differently in
    bfloat16): other work, so the original stays."""
    make_generator = compare.make_generator
    calls: dict[str, list[int]] = {}

    def clocked(spec, models):
        planted = spec.text == "pld:8"  # calls 0-3: the pass; 4: the re-run of call 1
        return SyntheticClock(make_generator(spec, models), calls.setdefault(spec.text, [0]),
                              slow_calls={1} if planted else (), other_text={4} if planted else ())

    result = run_with_one_rerun(tiny, tmp_path, capsys, monkeypatch, clocked)
    (rerun,) = result["reruns"]
    assert (rerun["question"], rerun["kept"], rerun["state"]) == ("6", "old: other text", "fresh")
    assert rerun["new_time"] < rerun["old_time"]
    assert result["rows"]["overall"]["pld:8"] == result["before_rerun"]["pld:8"]
    lines = read_lines(Path(result["answer_files"]["pld:8"]))
    assert sum(lines[1]["choices"][0]["wall_time"]) == pytest.approx(rerun["old_time"])


def test_a_rerun_with_the_prefix_cache_starts_from_the_previous_questions_prefix(
        tiny, tmp_path, capsys, monkeypatch):
    """With ``--prefix-cache 1`` a re-run's fresh generator first prefills the previous
    question's prompt, so the re-run takes the same prefix from the cache as the pass did."""
    make_generator = compare.make_generator
    built: list[SyntheticClock] = []
    calls: dict[str, list[int]] = {}

    def clocked(spec, models):
        clock = SyntheticClock(make_generator(spec, models), calls.setdefault(spec.text, [0]),
                               slow_calls={1} if spec.text == "pld:8" else ())
        if spec.text == "pld:8":
            built.append(clock)
        return clock

    result = run_with_one_rerun(tiny, tmp_path, capsys, monkeypatch, clocked, "--prefix-cache", "1")
    (rerun,) = result["reruns"]
    assert (rerun["question"], rerun["kept"]) == ("6", "new")
    pass_clock, rerun_clock = built
    assert rerun_clock.prompts == [pass_clock.prompts[0], pass_clock.prompts[1]]
    lines = read_lines(Path(result["answer_files"]["pld:8"]))
    choice = next(line for line in lines if line["question_id"] == 6)["choices"][0]
    assert 0 < choice["cached_tokens"][0] < choice["prompt_tokens"][0]


class LearningClock(SyntheticClock):
    """A :class:`SyntheticClock` whose answers depend on what it learned, as a bfloat16 run's
    depend on its drafter's trees: each answer's last token is the number of questions this
    generator answered before, its state, which it saves and restores as a decoder does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered = 0

    def generate(self, prompt_ids, config):
        result = super().generate(prompt_ids, config)
        ids = [*result.output_ids[:-1], self.answered]
        self.answered += 1
        return dataclasses.replace(result, output_ids=ids)

    def save_state(self):
        return snapshot.take(self.answered)

    def restore_state(self, state):
        self.answered = state.restore()


def test_a_rerun_starts_from_the_state_its_measurement_started_from(tiny, tmp_path, capsys,
                                                                     monkeypatch):
    """pld:8's second answer of the pass (call 1) is planted slow. Its re-run is a fresh
    generator given the state saved before that answer, so it answers the same text, faster,
    and is kept; from a fresh state it would answer another text (the test above)."""
    make_generator = compare.make_generator
    calls: dict[str, list[int]] = {}

    def clocked(spec, models):
        return LearningClock(make_generator(spec, models), calls.setdefault(spec.text, [0]),
                             slow_calls={1} if spec.text == "pld:8" else ())

    result = run_with_one_rerun(tiny, tmp_path, capsys, monkeypatch, clocked)
    (rerun,) = result["reruns"]
    assert (rerun["question"], rerun["state"], rerun["kept"]) == ("6", "saved", "new")
    assert rerun["old_time"] == pytest.approx(3 * rerun["new_time"])
    lines = read_lines(Path(result["answer_files"]["pld:8"]))
    assert sum(lines[1]["choices"][0]["wall_time"]) == pytest.approx(rerun["new_time"])


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
    (["--methods", "vanilla", "medusa"], "unknown method"),
    (["--methods", "vanilla", "eagle:16"], "no draft head trained for tiny-llama"),
    (["--question-end", "1", "--question-begin", "2"], "question_end"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--disturbance-threshold", "0.9"], "--disturbance-threshold must be above 1"),
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


def test_compare_run_with_the_head(tiny, tmp_path, capsys, monkeypatch):
    """The head's methods (hybrid, head alone, head as SpS draft) from the cache, lossless;
    the gated hybrid (automatic budget) reports the share of steps that ran the head, the
    others none."""
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    save_random_head(tiny)
    methods = ["vanilla", "eagle:16", "eagle:16,no_retrieval=1", "eagle",
               "sps,draft_head=cached,num_draft_tokens=3", "sps,draft_head=cached,num_drafts=2"]
    assert compare.main(argv_for(tiny, tmp_path / "out", "--methods", *methods, "--warmup", "0")) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]["overall"]
    assert all(rows[label]["exact_match"] == 1.0 for label in methods)
    assert 0.0 < rows["eagle"]["source_share"] <= 1.0
    assert all(rows[label]["source_share"] is None for label in methods if label != "eagle")
    lines = [json.loads(x) for x in (tmp_path / "out").rglob("*eagle*.jsonl")
             for x in x.read_text().splitlines()]
    gated = [c for line in lines if line["meta"]["params"]["draft_tree_capacity"] == "auto"
             for c in line["choices"]]
    assert gated and all(len(c["source_steps"]) == len(c["turns"]) for c in gated)


STATEFUL = ["pld:8", "recycling:16", "logitspec:16", "logitspec:16,tree_policy=reference",
            "racer:8", "sam:16", "suffix:16", "lookahead,level=3,guess=2", "eagle:16",
            "sps,draft_head=cached,num_draft_tokens=3"]


@pytest.fixture(scope="module")
def tiny_models(tiny, tmp_path_factory):
    """The tiny model, and a random head where the head's methods look for it."""
    from logitspec.loading import load

    cache = tmp_path_factory.mktemp("head-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOGITSPEC_CACHE", str(cache))
        save_random_head(tiny)
    return compare.Models(load(str(tiny), dtype="float32")), cache


@pytest.mark.parametrize("text", STATEFUL)
def test_every_method_saves_its_drafter_state_for_a_rerun(tiny_models, monkeypatch, text):
    """``--rerun-disturbed`` relies on it: each method's generator saves what it learned from
    one question, and a fresh generator given that state answers the next question with the
    same drafts, step for step (a method whose state could not be saved would re-run from
    nothing and, in half precision, answer another text)."""
    models, cache = tiny_models
    monkeypatch.setenv("LOGITSPEC_CACHE", str(cache))
    spec, config = compare.parse_spec(text), GenerationConfig(max_new_tokens=24)
    first, second = [5, 6, 7, 8, 9, 5, 6, 7, 10, 11], [5, 6, 7, 12, 13, 5, 6, 7]
    run = compare.recorded_generator(spec, models)
    run.generate(first, config)
    run.reset()
    state = run.save_state()
    assert state is not None
    expected = run.generate(second, config)
    again = compare.recorded_generator(spec, models)
    again.restore_state(state)
    result = again.generate(second, config)
    assert result.output_ids == expected.output_ids
    assert (result.draft_lengths, result.accept_lengths) == (expected.draft_lengths,
                                                             expected.accept_lengths)
