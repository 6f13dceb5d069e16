"""Draft-model speculative decoding: greedy losslessness, the draft cache, schedules, the
acceptance head and its training script, and the tokenizer check.

Greedy outputs must equal vanilla greedy decoding token for token in float32, on tiny random
Llama pairs (a different random draft, the target's own first layer, the target itself) and on
SmolLM2-135M with its layer-skip self-draft (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import load_script
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.draft_length import (
    AcceptanceHead, DraftLength, DraftLengthConfig, confidence_stop, heuristic_update,
    load_acceptance_head, save_acceptance_head, step_ratio, worth_drafting,
)
from logitspec.cost import CostCurve
from logitspec.draft_model import (
    CombinedDrafter, DraftMismatchError, DraftModelConfig, DraftModelDrafter, check_same_tokenizer,
)
from logitspec.drafters import LogitSpecConfig, LogitSpecDrafter, PoolConfig
from logitspec.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(5, 25)) * 2 + [7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
MAX_NEW = 48


@pytest.fixture(scope="module")
def target(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def other_draft(tiny_hf):
    """A different random Llama with the target's vocabulary."""
    _, folder = tiny_hf("llama", seed=1, num_hidden_layers=1)
    return load_model(folder, dtype=torch.float32)


# verification costs for the cost schedule: flat and far above the draft's passes (every draft
# that may be accepted pays), and a step whose cost grows by a whole pass per token (none pays)
FLAT = CostCurve((1, 64), (1e6, 1e6))
STEEP = CostCurve((1, 64), (1.0, 64.0))


def sps(draft, schedule="constant", k=4, num_drafts=1, cost_curve=None, gate=False,
        **length) -> DraftModelDrafter:
    """Draft-model drafting; the cost schedule without its gate unless ``gate``, so that the
    per-token rule alone decides."""
    config = DraftLengthConfig(schedule, num_draft_tokens=k, **length)
    return DraftModelDrafter(draft, DraftModelConfig(config, num_drafts=num_drafts, gate=gate),
                             cost_curve=cost_curve)


def combined(draft, capacity=12) -> CombinedDrafter:
    retrieval = LogitSpecDrafter(LogitSpecConfig(pool=PoolConfig(), draft_tree_capacity=capacity))
    return CombinedDrafter(sps(draft, k=3), retrieval, capacity)


METHODS = {
    "constant": lambda t, d: sps(d),
    "heuristic": lambda t, d: sps(d, "heuristic", bounds=(1, 10)),
    "confidence": lambda t, d: sps(d, "confidence", stop_threshold=0.6, bounds=(1, 8)),
    "cost": lambda t, d: sps(d, "cost", cost_curve=FLAT, bounds=(1, 8)),
    "cost-gated": lambda t, d: sps(d, "cost", cost_curve=FLAT, bounds=(1, 8), gate=True),
    "multi-draft": lambda t, d: sps(d, k=3, num_drafts=3),
    "two-models": lambda t, d: DraftModelDrafter([d, t.truncated(2)], DraftModelConfig(num_drafts=2)),
    "logitspec+draft": lambda t, d: combined(d),
}
DRAFTS = {
    "other": lambda t, other: other,
    "self": lambda t, other: t.truncated(1),
    "same": lambda t, other: t,
}


def vanilla(model, prompt, max_new=MAX_NEW):
    return Decoder(model).generate(prompt, GenerationConfig(max_new_tokens=max_new)).output_ids


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_equals_vanilla(target, other_draft, method, draft):
    drafter = METHODS[method](target, DRAFTS[draft](target, other_draft))
    decoder = Decoder(target, drafter)
    for prompt in PROMPTS:
        decoder.reset()
        result = decoder.generate(prompt, GenerationConfig(max_new_tokens=MAX_NEW))
        assert result.output_ids == vanilla(target, prompt)
        if draft == "same" and method != "cost-gated":  # every step accepts a drafted token
            assert min(result.accept_lengths[:-1]) >= 2


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_draft_equal_to_target_accepts_whole_chains(target, num_drafts):
    """The draft's own distributions (chain: incremental cache; tree: re-fed with a tree mask)
    must be the target's when the draft is the target: its best chain is always accepted."""
    result = Decoder(target, sps(target, k=3, num_drafts=num_drafts)).generate(
        PROMPTS[1], GenerationConfig(max_new_tokens=40)
    )
    assert result.accept_lengths[:-1] == [4] * (len(result.accept_lengths) - 1)


def test_cost_schedule_follows_the_cost_curve(target):
    """The target as its own draft: with a flat cost every step drafts to the cap and has it
    accepted; when each verified token costs a whole pass, nothing is drafted and the steps
    are vanilla's."""
    config = GenerationConfig(max_new_tokens=40)
    flat = Decoder(target, sps(target, "cost", cost_curve=FLAT, bounds=(1, 5))).generate(PROMPTS[1], config)
    steady = steady_lengths(flat, 40, 5)
    assert steady and set(steady) == {5}
    assert flat.accept_lengths[: len(steady)] == [6] * len(steady)
    steep = Decoder(target, sps(target, "cost", cost_curve=STEEP, bounds=(1, 5))).generate(PROMPTS[1], config)
    assert set(steep.draft_lengths) == {0} and steep.output_ids == flat.output_ids


def test_cost_schedule_needs_a_curve_and_one_chain(target):
    with pytest.raises(ValueError, match="cost curve"):
        sps(target, "cost")
    with pytest.raises(ValueError, match="one chain"):
        sps(target, "cost", num_drafts=2, cost_curve=FLAT)
    with pytest.raises(ValueError, match="one chain"):
        DraftModelDrafter([target, target.truncated(1)],
                          DraftModelConfig(DraftLengthConfig("cost")), cost_curve=FLAT)


def test_follow_up_turn_reuses_the_draft_cache(target, other_draft):
    decoder = Decoder(target, sps(target.truncated(2), k=3))
    first = decoder.generate(PROMPTS[0], GenerationConfig(max_new_tokens=20)).output_ids
    follow_up = PROMPTS[0] + first + [11, 12, 13]
    second = decoder.generate(follow_up, GenerationConfig(max_new_tokens=20)).output_ids
    assert second == vanilla(target, follow_up, 20)


@pytest.mark.parametrize("method", ["constant", "multi-draft", "logitspec+draft"])
def test_draft_cache_matches_recomputation(target, method):
    """After many steps the draft cache holds a prefix of the context (a chain drafter: all
    of it but at most the last token) whose keys/values equal a fresh prefill of that prefix
    (float32, atol 1e-5: only the chunking differs)."""
    drafter = METHODS[method](target, target.truncated(2))
    decoder = Decoder(target, drafter)
    decoder.generate(PROMPTS[0], GenerationConfig(max_new_tokens=60))
    source = (drafter.draft_model if method == "logitspec+draft" else drafter).sources[0]
    n = len(source.tokens)
    assert source.tokens == decoder.context[:n]
    if method == "constant":
        assert n >= len(decoder.context) - 1
    fresh = source.model.new_cache(n)
    source.model.hidden(torch.tensor(source.tokens), torch.arange(n), fresh)
    fresh.commit(n)
    assert source.cache.length == n
    torch.testing.assert_close(
        source.cache.buffer[:, :, :, :n], fresh.buffer[:, :, :, :n], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "length,full,bounds,expected",
    [(4, True, (1, 16), 6), (4, False, (1, 16), 3), (1, False, (1, 16), 1),
     (15, True, (1, 16), 16), (2, False, (3, 8), 3), (8, True, (3, 8), 8)],
)
def test_heuristic_update_table(length, full, bounds, expected):
    assert heuristic_update(length, full, bounds) == expected


def confidence_length(accept_probs, threshold, bounds):
    """Tokens drafted when token i has predicted acceptance ``accept_probs[i]``."""
    keep = 1.0
    for drafted, a in enumerate(accept_probs, start=1):
        keep *= a
        if confidence_stop(drafted, keep, threshold, bounds):
            return drafted
    raise AssertionError("ran out of probabilities")


@pytest.mark.parametrize(
    "probs,threshold,bounds,expected",
    [
        ([0.9, 0.8, 0.6, 0.9], 0.5, (1, 8), 3),  # 1 - 0.432 = 0.568 > 0.5 after the third
        ([0.9, 0.8, 0.6, 0.9], 0.6, (1, 8), 4),  # 0.568 <= 0.6; 1 - 0.389 = 0.611 > 0.6
        ([0.99] * 20, 0.5, (1, 8), 8),  # never risky enough: the upper bound
        ([0.1] * 5, 0.5, (3, 8), 3),  # risky at once, but not before the lower bound
        ([0.5, 1.0, 1.0], 0.5, (1, 3), 3),  # 1 - 0.5 = 0.5 is not > 0.5
        ([0.5, 1.0], 0.49, (1, 8), 1),
        ([0.7, 0.7], 0.0, (1, 8), 1),  # threshold 0: stop as early as allowed
    ],
)
def test_confidence_rule_table(probs, threshold, bounds, expected):
    assert confidence_length(probs, threshold, bounds) == expected


def cost_length(accept_probs, cost, first=0.0, per_pass=0.0):
    """Tokens the cost schedule drafts when token i's predicted acceptance (before and after
    its draw, as greedy drafting has it) is ``accept_probs[i]``; ``cost`` lists the seconds
    for 1, 2, ... tokens and ends the draft."""
    table = [0.0] + list(cost)
    limit = len(cost) - 1
    keep, expected = 1.0, 0.0
    for drafted, a in enumerate(accept_probs):
        if drafted == limit or not worth_drafting(expected, keep, drafted, a, limit, table,
                                                  first, per_pass):
            return drafted
        keep *= a
        expected += keep
    raise AssertionError("ran out of probabilities")


@pytest.mark.parametrize(
    "probs,cost,first,per_pass,expected",
    [
        ([0.9] * 5, (1.0, 1.6, 1.7, 1.8), 0.0, 0.0, 3),  # the docstring's example: the table's end
        ([0.9] * 5, (1.0, 1.95, 2.9, 3.85), 0.0, 0.0, 0),  # nearly a full pass per token
        ([0.9, 0.9, 0.1, 0.9], (1.0, 1.1, 1.2, 1.3, 1.4), 0.0, 0.0, 2),  # .1 does not repay .1
        ([0.9, 0.9, 0.1, 0.9], (1.0, 1.1, 1.2, 1.3, 1.4), 0.0, 0.5, 1),  # dear draft passes
        ([0.3] * 5, (1.0, 1.74, 1.76, 1.78, 1.8), 0.0, 0.0, 0),  # float32 on a CPU: 1.74x for 2
        ([0.8] * 5, (1.0, 1.74, 1.76, 1.78, 1.8), 0.0, 0.0, 4),  # ... that long drafts repay
    ],
)
def test_cost_rule_table(probs, cost, first, per_pass, expected):
    assert cost_length(probs, cost, first, per_pass) == expected


def test_step_ratio_counts_the_draft_passes():
    table = [0.0, 1.0, 1.5, 2.0]
    assert step_ratio(0.0, 0, table, 0.2, 0.3) == pytest.approx(1 / 1.2)
    assert step_ratio(1.5, 2, table, 0.2, 0.3) == pytest.approx(2.5 / (2.0 + 0.2 + 0.3))


def test_schedule_state_constant_and_heuristic():
    constant = DraftLength(DraftLengthConfig("constant", num_draft_tokens=3))
    assert [constant.stop(d, 0.0) for d in (1, 2, 3)] == [False, False, True]
    heuristic = DraftLength(DraftLengthConfig("heuristic", num_draft_tokens=2, bounds=(1, 5)))
    for full in (True, True, False, False, False, False, False):
        heuristic.update(full)
    assert heuristic.length == 1
    heuristic.reset()
    assert heuristic.length == 2


def test_heuristic_grows_with_a_perfect_draft_and_shrinks_with_a_bad_one(target, other_draft):
    config = GenerationConfig(max_new_tokens=60)
    grows = Decoder(target, sps(target, "heuristic", k=2, bounds=(1, 9))).generate(PROMPTS[1], config)
    assert grows.draft_lengths[:5] == [2, 4, 6, 8, 9]
    shrinks = Decoder(target, sps(other_draft, "heuristic", k=4, bounds=(1, 9))).generate(PROMPTS[1], config)
    assert shrinks.draft_lengths[:4] == [4, 3, 2, 1]


def steady_lengths(result, max_new: int, longest: int) -> list[int]:
    """Draft lengths of the steps that had room for ``longest`` drafted tokens."""
    lengths, emitted = [], 0
    for accepted, drafted in zip(result.accept_lengths, result.draft_lengths):
        if max_new - emitted - 1 >= longest:
            lengths.append(drafted)
        emitted += accepted
    return lengths


def test_confidence_lengths_stay_within_bounds(target):
    drafter = sps(target.truncated(1), "confidence", stop_threshold=0.3, bounds=(2, 5))
    result = Decoder(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=80))
    steady = steady_lengths(result, 80, 5)
    assert steady and all(2 <= n <= 5 for n in steady)


def test_acceptance_head_decides_the_confidence_schedule(target, tmp_path):
    draft = target.truncated(1)
    hidden = target.config.hidden_size
    lengths = {}
    for name, bias in (("pessimist", -20.0), ("optimist", 20.0)):
        head = AcceptanceHead(hidden)
        with torch.no_grad():
            head.net[0].weight.zero_()
            head.net[0].bias.fill_(bias)
        path = save_acceptance_head(head, tmp_path / f"{name}.safetensors")
        drafter = DraftModelDrafter(
            draft, DraftModelConfig(DraftLengthConfig("confidence", stop_threshold=0.5, bounds=(2, 6))),
            acceptance_head=load_acceptance_head(path),
        )
        result = Decoder(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=40))
        assert result.output_ids == vanilla(target, PROMPTS[0], 40)
        lengths[name] = set(steady_lengths(result, 40, 6))
    assert lengths == {"pessimist": {2}, "optimist": {6}}


def test_acceptance_head_files_are_safetensors_only(tmp_path):
    head = AcceptanceHead(8, hidden_units=4)
    path = save_acceptance_head(head, tmp_path / "head.safetensors", {"note": "x"})
    loaded = load_acceptance_head(path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), head(x))
    assert json.loads(path.with_suffix(".json").read_text())["hidden_units"] == 4
    pickle = tmp_path / "head.pt"
    torch.save(head.state_dict(), pickle)
    with pytest.raises(ValueError, match="safetensors"):
        load_acceptance_head(pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    path.with_suffix(".json").rename(broken.with_suffix(".json"))
    with pytest.raises(ValueError, match="cannot read"):
        load_acceptance_head(broken)


def test_acceptance_head_must_fit_the_draft(target):
    with pytest.raises(ValueError, match="hidden states of size"):
        DraftModelDrafter(target, acceptance_head=AcceptanceHead(target.config.hidden_size + 1))


def _word_tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")))


def test_tokenizer_check():
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    check_same_tokenizer(_word_tokenizer(vocab), _word_tokenizer(dict(vocab)))
    swapped = {"[UNK]": 0, "a": 2, "b": 1, "c": 3}
    with pytest.raises(DraftMismatchError, match="token id 1 is 'a' for the target but 'b'"):
        check_same_tokenizer(_word_tokenizer(vocab), _word_tokenizer(swapped))
    with pytest.raises(DraftMismatchError, match="5 tokens, the target's 4"):
        check_same_tokenizer(_word_tokenizer(vocab), _word_tokenizer({**vocab, "d": 4}))


def test_vocabulary_mismatch_is_a_clear_error(target, tiny_hf):
    _, folder = tiny_hf("llama", seed=2, vocab_size=98, num_hidden_layers=1)
    draft = load_model(folder, dtype=torch.float32)
    with pytest.raises(DraftMismatchError, match="98 entries, the target's 97"):
        Decoder(target, sps(draft)).generate(PROMPTS[0], GenerationConfig(max_new_tokens=4))


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random Llama (2 layers) with SmolLM2's tokenizer and vocabulary size."""
    from conftest import build_tiny_hf
    from logitspec.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    folder = tmp_path_factory.mktemp("tiny-smollm2-tokenizer")
    build_tiny_hf("llama", folder, seed=4, vocab_size=len(tokenizer), num_hidden_layers=2,
                  tie_word_embeddings=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_training_script_end_to_end(tiny_with_tokenizer, tmp_path, capsys):
    script = load_script("train_acceptance_head")
    out = tmp_path / "head.safetensors"
    code = script.main([
        "--model-path", str(tiny_with_tokenizer), "--draft-layers", "1", "--num-questions", "4",
        "--max-new-tokens", "12", "--epochs", "30", "--output", str(out),
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train"]["examples"] == 36 and report["holdout"]["examples"] == 12
    head = load_acceptance_head(out)
    assert head.hidden_size == load_model(tiny_with_tokenizer).config.hidden_size
    assert json.loads(out.with_suffix(".json").read_text())["draft_layers"] == 1
    with pytest.raises(SystemExit):
        script.main(["--output", str(tmp_path / "head.pt")])


def _run_cli(tmp_path, *flags: str):
    from evaluation import inference_sps

    answers = tmp_path / "answers.jsonl"
    try:
        code = inference_sps.main([
            "--question-file", str(ROOT / "data" / "demo" / "question.jsonl"),
            "--question-end", "1", "--max-new-tokens", "8", "--warmup", "0",
            "--answer-file", str(answers), *flags,
        ])
    except SystemExit as exc:  # flag errors exit from the parser
        code = exc.code
    return code, answers


def test_cli_answers_with_every_option(tiny_with_tokenizer, tmp_path, capsys):
    head = save_acceptance_head(AcceptanceHead(64), tmp_path / "head.safetensors")
    code, answers = _run_cli(
        tmp_path, "--model-path", str(tiny_with_tokenizer), "--draft-layers", "1", "1",
        "--num-drafts", "2", "--draft-schedule", "confidence", "--draft-length-bounds", "2", "5",
        "--stop-threshold", "0.7", "--acceptance-head", str(head), "--combine-logitspec",
    )
    assert code == 0, capsys.readouterr().err
    line = json.loads(answers.read_text().splitlines()[0])
    params = line["meta"]["params"]
    assert params["draft_layers"] == [1, 1] and params["draft_length_bounds"] == [2, 5]
    assert params["draft_tree_capacity"] == 1 + 2 * 2 * 5 + 8
    assert sum(line["choices"][0]["new_tokens"]) == 16  # two turns of 8 tokens


@pytest.mark.parametrize("flags,message", [
    (["--acceptance-head", "head.pt"], "must be a .safetensors file"),
    (["--draft-length-bounds", "4", "2"], "MIN <= MAX"),
    (["--draft-model-path", "/nonexistent/draft"], "does not exist"),
])
def test_cli_errors_are_one_line(tiny_with_tokenizer, tmp_path, capsys, flags, message):
    code, _ = _run_cli(tmp_path, "--model-path", str(tiny_with_tokenizer), *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("inference_sps: error:")


def test_cli_refuses_a_draft_with_another_vocabulary(tiny_with_tokenizer, tmp_path, capsys):
    from conftest import build_tiny_hf
    from logitspec.loading import load_tokenizer

    folder = tmp_path / "other-vocab"
    tokenizer = load_tokenizer(tiny_with_tokenizer)
    build_tiny_hf("llama", folder, seed=5, vocab_size=len(tokenizer) + 64, num_hidden_layers=1,
                  tie_word_embeddings=True)
    tokenizer.save_pretrained(folder)
    code, _ = _run_cli(tmp_path, "--model-path", str(tiny_with_tokenizer),
                       "--draft-model-path", str(folder))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "must share a tokenizer" in err


@pytest.mark.slow
def test_smollm2_self_draft_greedy_equals_vanilla(smollm2_f32):
    model, tokenizer = smollm2_f32.model, smollm2_f32.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat after me: the cat sat on the mat, the dog sat on the log."}],
        add_generation_prompt=True, tokenize=False,
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    config = GenerationConfig(max_new_tokens=24, eos_token_ids=smollm2_f32.eos_token_ids)
    reference = Decoder(model).generate(prompt, config).output_ids
    draft = model.truncated(8)
    methods = {
        "constant": sps(draft, k=3),
        "heuristic": sps(draft, "heuristic", k=3),
        "confidence": sps(draft, "confidence", stop_threshold=0.5, bounds=(1, 4)),
        "cost": sps(draft, "cost", cost_curve=FLAT, bounds=(1, 4)),
        "multi-draft": sps(draft, k=2, num_drafts=2),
        "logitspec+draft": combined(draft, capacity=10),
    }
    for name, drafter in methods.items():
        assert Decoder(model, drafter).generate(prompt, config).output_ids == reference, name
