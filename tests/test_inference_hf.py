"""The HF transformers reference method: step counting from cache lengths, greedy output equal
to our vanilla decoder in float32 (plain and prompt lookup), and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import inference_hf, inference_recycling
from evaluation.inference_hf import HFGenerator, load_hf_model, steps_from_calls
from logitspec.decoding import Decoder, GenerationConfig, PromptTooLongError
from logitspec.loading import load
from cli_helpers import read_lines, run_cli, save_tiny_llama
from test_cli import check_answer_file

STEPS = [
    # (calls, prompt_len, new_tokens, accepted, drafted)
    ([(0, 5)], 5, 1, [1], [0]),  # one prefill call
    ([(0, 5), (5, 1), (6, 1)], 5, 3, [1, 1, 1], [0, 0, 0]),  # plain generate
    ([(0, 66), (61, 1), (62, 6), (68, 1)], 61, 9, [1, 1, 6, 1], [5, 0, 5, 0]),  # docstring
    ([(0, 13), (12, 4)], 10, 5, [3, 2], [3, 3]),  # the last call cut by max_new_tokens or EOS
]


@pytest.mark.parametrize("calls,prompt_len,new_tokens,accepted,drafted", STEPS)
def test_steps_from_calls(calls, prompt_len, new_tokens, accepted, drafted):
    assert steps_from_calls(calls, prompt_len, new_tokens) == (accepted, drafted)
    assert sum(accepted) == new_tokens


def test_steps_from_calls_rejects_inconsistent_lengths():
    with pytest.raises(RuntimeError, match="no forward call"):
        steps_from_calls([], 5, 1)
    with pytest.raises(RuntimeError, match="unexpected"):
        steps_from_calls([(0, 13), (12, 4)], 10, 3)  # the last call would have emitted nothing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def models(tiny):
    loaded = load(str(tiny), dtype="float32", device="cpu")
    return loaded, load_hf_model(loaded.path, loaded.model.dtype, loaded.model.device)


PROMPTS = [
    [1] + list(range(10, 30)) * 3,
    [1, 50, 51, 52, 53, 50, 51, 52, 53, 50],
    [1, 200, 7, 9, 11, 200, 7],
]


@pytest.mark.parametrize("prompt_lookup", [None, 3, 10])
def test_greedy_hf_equals_our_vanilla_in_float32(models, prompt_lookup):
    """HF's prompt lookup is lossless too: the same tokens as plain decoding."""
    loaded, hf = models
    generator = HFGenerator(hf, pad_token_id=2, prompt_lookup=prompt_lookup)
    vanilla = Decoder(loaded.model, None)
    config = GenerationConfig(max_new_tokens=40, eos_token_ids=loaded.eos_token_ids)
    steps = 0
    for prompt in PROMPTS:
        vanilla.reset()
        expected = vanilla.generate(prompt, config)
        result = generator.generate(prompt, config)
        assert result.output_ids == expected.output_ids
        assert sum(result.accept_lengths) == result.new_tokens and result.wall_time > 0
        assert all(a <= d + 1 for a, d in zip(result.accept_lengths, result.draft_lengths))
        steps += result.decoding_steps
        if prompt_lookup is None:
            assert result.accept_lengths == [1] * result.new_tokens
            assert result.draft_lengths == [0] * result.new_tokens
    if prompt_lookup is not None:  # these prompts repeat themselves: lookups get accepted
        assert steps < sum(len(vanilla.generate(p, config).output_ids) for p in PROMPTS)


def test_eos_ends_the_output_and_long_prompts_are_refused(models):
    loaded, hf = models
    generator = HFGenerator(hf, pad_token_id=2)
    first = generator.generate(PROMPTS[0], GenerationConfig(max_new_tokens=20)).output_ids
    eos = first[5]
    result = generator.generate(PROMPTS[0], GenerationConfig(max_new_tokens=20, eos_token_ids=(eos,)))
    assert result.output_ids == first[: first.index(eos) + 1] and result.stop_reason == "eos"
    with pytest.raises(PromptTooLongError):
        generator.generate([1] * 1020, GenerationConfig(max_new_tokens=10))


def test_hf_command_writes_hf_pld_answers(tiny, tmp_path, capsys):
    common = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
              "--max-new-tokens", "12", "--device", "cpu"]
    files = {}
    for name, extra in (("hf", []), ("hf-pld", ["--prompt-lookup", "4"])):
        files[name] = tmp_path / f"{name}.jsonl"
        assert run_cli(inference_hf, common + extra + ["--answer-file", str(files[name])]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["method"] == name and summary["model_id"] == f"tiny-llama-{name}-float32-temp-0.0"
        check_answer_file(files[name], {"4": 2, "5": 1}, name)
    meta = read_lines(files["hf-pld"])[0]["meta"]
    assert meta["params"] == {"prompt_lookup": 4}
    turns = [line["choices"][0]["turns"] for line in read_lines(files["hf"])]
    assert turns == [line["choices"][0]["turns"] for line in read_lines(files["hf-pld"])]
    assert run_cli(inference_hf, common + ["--prompt-lookup", "0"]) == 2
    assert "prompt_lookup must be >= 1" in capsys.readouterr().err


def test_recycling_command(tiny, tmp_path, capsys):
    answers = tmp_path / "recycling.jsonl"
    argv = ["--model-path", str(tiny), "--question-begin", "3", "--question-end", "5",
            "--max-new-tokens", "12", "--device", "cpu", "--draft_tree_capacity", "16",
            "--recycling-k", "4", "--answer-file", str(answers)]
    assert run_cli(inference_recycling, argv) == 0
    capsys.readouterr()
    lines = check_answer_file(answers, {"4": 2, "5": 1}, "recycling")
    assert lines[0]["meta"]["params"] == {"draft_tree_capacity": 16, "recycling_k": 4}
    assert max(d for line in lines for d in line["choices"][0]["draft_lengths"]) <= 15
    assert run_cli(inference_recycling, argv[:-2] + ["--recycling_k", "0"]) == 2


@pytest.mark.slow
def test_hf_on_the_embedded_model_equals_our_vanilla_in_float32(smollm2_f32):
    loaded = smollm2_f32
    hf = load_hf_model(loaded.path, loaded.model.dtype, loaded.model.device)
    messages = [{"role": "user", "content": "List three facts about the Moon, then repeat them."}]
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    config = GenerationConfig(max_new_tokens=48, eos_token_ids=loaded.eos_token_ids)
    expected = Decoder(loaded.model, None).generate(prompt, config).output_ids
    for lookup in (None, 10):
        generator = HFGenerator(hf, inference_hf.pad_token_id(loaded), lookup)
        assert generator.generate(prompt, config).output_ids == expected, lookup
