"""scripts/train_draft_head.py and the commands that use a head: the composed prompts, the
unrolled training passes against drafting, an end-to-end run on a tiny model (resumed, then
refused with other data settings), ``inference_eagle`` finding the head under the model cache
or saying how to train one, and ``inference_sps --draft-head``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import DEMO, load_script, read_lines, run_cli, save_random_head
from evaluation import inference_eagle, inference_sps
from logitspec.draft_head import DraftHead, DraftHeadConfig, HeadState, default_head_path, load_draft_head
from logitspec.loading import load_model

train = load_script("train_draft_head")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- prompts


def test_prompts_are_composed_deterministically_and_not_from_a_benchmark():
    first = train.first_round(400, seed=0)
    assert first == train.first_round(400, seed=0) and first != train.first_round(400, seed=1)
    texts = [messages[0]["content"] for _, messages in first]
    assert len(set(texts)) > 300
    demo = [turn for line in read_lines(DEMO) for turn in line["turns"]]
    assert not set(texts) & set(demo)
    kinds = {"Write a Python function": 0, "Translate": 0, "Show your steps": 0, "Explain": 0}
    for text in texts:
        for key in kinds:
            kinds[key] += key in text
    assert all(kinds.values()), kinds


def test_second_round_builds_on_first_answers():
    answered = [train.Answered(i, i, [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"answer {i}"}], [1], [2])
                for i in range(10)]
    second = train.second_round(answered, follow_ups=3, documents=4, seed=0)
    follow, docs = second[:3], second[3:]
    assert len(docs) == 4
    for family, messages in follow:
        assert messages[:2] == answered[family].messages and messages[2]["content"] in train.FOLLOW_UPS
    for family, messages in docs:
        assert len(messages) == 1 and f"answer {family}" in messages[0]["content"]


# ----------------------------------------------------------------------------- unrolled passes


def test_unroll_mask_docstring_example():
    mask = train.unroll_mask(4, 1, 1).int().tolist()
    assert mask == [[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1]]
    assert train.unroll_mask(3, 0, 0).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # pass 2, root 0: row i sees exact pairs <= i, row i of pass 1 and itself
    assert train.unroll_mask(4, 0, 2).int().tolist() == [[1, 0, 0, 0, 1, 0, 0, 1, 0],
                                                         [1, 1, 0, 0, 0, 1, 0, 0, 1]]


def test_training_passes_compute_what_drafting_computes(tiny_model):
    """Pass s, pair j: what a draft tree's node at depth s + 1 on the true path computes."""
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(tiny_model.config, range(97))).attach(tiny_model)
    tokens = torch.tensor([3, 9, 4, 17, 5, 22, 8, 30, 2, 11])
    features = torch.randn(len(tokens) - 1, tiny_model.config.hidden_size)
    seq = train.Conversation(tokens, features, answer_start=4)
    with torch.no_grad():
        passes = train.trained_predictions(head, seq, 3, 0.0, None)
    assert [len(p) for p, _ in passes] == [5, 4, 3]  # pairs 3..7, 4..7, 5..7 of 8
    for step, (predicted, target) in enumerate(passes):
        for i in range(len(predicted)):
            j = seq.answer_start - 1 + step + i  # the pair; its last exact pair is j - step
            n = j - step + 1  # context t_0 .. t_{n-1}, root t_n
            state = HeadState(head)
            state.reserve(32)
            with torch.no_grad():
                state.begin(tokens[:n].tolist(), 0, features[:n])
                out = state.advance(tokens[:n].tolist(), int(tokens[n]))
                slot = -1
                for depth in range(1, step + 1):
                    out, (slot,) = state.expand([slot], out, [int(tokens[n + depth])])
            torch.testing.assert_close(predicted[i], out[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(target[i], features[j + 1])


def test_loss_decreases_on_one_conversation(tiny_model):
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(tiny_model.config, range(97))).attach(tiny_model)
    tokens = torch.randint(0, 97, (24,))
    with torch.no_grad():
        features = tiny_model.hidden(tokens, torch.arange(24), tiny_model.new_cache(24))[:-1]
    seq = train.Conversation(tokens, features, answer_start=6)
    args = train.parse_args(["--unroll", "2", "--lr", "3e-3", "--warmup", "1"])
    args.noise_abs = 0.0
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr)
    params = list(head.parameters())
    first = train.train_step(head, optimizer, params, [seq], args, 3e-3, torch.Generator())
    for _ in range(30):
        last = train.train_step(head, optimizer, params, [seq], args, 3e-3, torch.Generator())
    assert last < 0.5 * first


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (and its chat template)."""
    from conftest import build_tiny_hf
    from logitspec.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    folder = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat"
    build_tiny_hf("llama", folder, seed=4, vocab_size=len(tokenizer), num_hidden_layers=2,
                  tie_word_embeddings=True)
    tokenizer.save_pretrained(folder)
    return folder


TINY_RUN = ["--prompts", "6", "--follow-ups", "2", "--documents", "2", "--max-new-tokens", "8",
            "--epochs", "2", "--batch-size", "2", "--gen-batch", "4", "--draft-vocab", "64",
            "--holdout", "0.2", "--checkpoint-every", "2"]


def test_training_end_to_end_resumes_and_guards_its_data(tiny_chat, tmp_path, capsys):
    out = tmp_path / "heads" / "head.safetensors"
    argv = ["--model-path", str(tiny_chat), "--output", str(out), *TINY_RUN]
    assert train.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data, training = summary["data"], summary["training"]
    assert data["conversations"] == 10 and data["heldout_conversations"] >= 1
    assert data["train_answer_tokens"] > 0 and training["steps"] > 0
    assert len(summary["report"]["heldout_top1_agreement"]) == 2  # depths 1 and 2
    assert set(summary["seconds"]) >= {"answering", "training", "evaluation"}
    model = load_model(tiny_chat)
    head = load_draft_head(out, model, tiny_chat.name)
    assert len(head.config.draft_vocab) <= 64 + 2  # the most frequent, plus the EOS ids
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["target"]["name"] == tiny_chat.name and config["training"]["unroll"] == 2
    work = out.parent / "work"
    answers = (work / "answers.jsonl").read_text()
    assert len(answers.splitlines()) == 10
    # a rerun: nothing answered again, training already done (the checkpoint's last step)
    assert train.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (work / "answers.jsonl").read_text() == answers
    assert again["training"]["steps"] == training["steps"]
    assert again["report"] == summary["report"]
    # other data settings in the same folder: refused
    assert train.main([*argv, "--prompts", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_draft_head.py: error:") and "other settings" in err
    assert "\n" not in err


def test_answers_only_then_a_datastore_then_training_on_the_same_answers(tiny_chat, tmp_path,
                                                                         capsys):
    """``--answers-only`` writes the answers and no head; build_rest_datastore.py takes the
    answers file (each answer's ids, as answered); a later full run answers nothing again."""
    out = tmp_path / "heads" / "head.safetensors"
    argv = ["--model-path", str(tiny_chat), "--output", str(out), *TINY_RUN]
    assert train.main([*argv, "--answers-only"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    answers = out.parent / "work" / "answers.jsonl"
    assert summary["answers"] == str(answers) and summary["conversations"] == 10
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert summary["answer_tokens"] == sum(len(r["answer_ids"]) for r in records) > 0
    assert not out.exists() and "answering" in summary["seconds"]
    build = load_script("build_rest_datastore")
    store = tmp_path / "answers.npz"
    assert build.main(["--model-path", str(tiny_chat), "--out", str(store), str(answers)]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["tokens"] == summary["answer_tokens"]
    assert built["entries"] == sum(1 for r in records if r["answer_ids"])
    text = answers.read_text()
    assert train.main(argv) == 0
    capsys.readouterr()
    assert answers.read_text() == text and out.exists()


def test_training_resumes_from_a_checkpoint(tiny_chat, tmp_path, capsys, monkeypatch):
    """Stopped after the first checkpoint, a rerun ends with the same head as a run that was
    never stopped (same seed, same data)."""
    whole = tmp_path / "whole" / "head.safetensors"
    argv = ["--model-path", str(tiny_chat), *TINY_RUN]
    assert train.main([*argv, "--output", str(whole)]) == 0
    stopped = tmp_path / "stopped" / "head.safetensors"
    (stopped.parent / "work").mkdir(parents=True)
    for name in ("answers.jsonl", "settings.json"):
        (stopped.parent / "work" / name).write_text((whole.parent / "work" / name).read_text())
    for shard in (whole.parent / "work").glob("features-*.safetensors"):
        (stopped.parent / "work" / shard.name).write_bytes(shard.read_bytes())
    calls = {"n": 0}
    real = train.save_checkpoint

    def crash_after_first(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train.main([*argv, "--output", str(stopped)])
    monkeypatch.setattr(train, "save_checkpoint", real)
    assert train.main([*argv, "--output", str(stopped)]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(whole)), load_file(str(stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


# ----------------------------------------------------------------------------- commands


def run_eagle(tiny: Path, tmp_path: Path, *flags: str) -> tuple[int, Path]:
    answers = tmp_path / "answers.jsonl"
    code = run_cli(inference_eagle, [
        "--model-path", str(tiny), "--question-file", str(DEMO), "--question-end", "2",
        "--max-new-tokens", "8", "--warmup", "0", "--draft-tree-capacity", "12",
        "--answer-file", str(answers), *flags])
    return code, answers


def test_inference_eagle_finds_the_targets_head(tiny_chat, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    code, _ = run_eagle(tiny_chat, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("inference_eagle: error: no draft head trained for tiny-chat")
    assert "python scripts/train_draft_head.py" in err[0]
    path = save_random_head(tiny_chat)
    assert path == default_head_path(load_model(tiny_chat), "tiny-chat")
    for flags in ((), ("--no-retrieval",)):
        code, answers = run_eagle(tiny_chat, tmp_path / "-".join(flags or ("hybrid",)), *flags)
        assert code == 0, capsys.readouterr().err
        line = read_lines(answers)[0]
        assert line["meta"]["method"] == "eagle"
        assert line["meta"]["params"]["no_retrieval"] == bool(flags)


@pytest.mark.parametrize("flags,message", [
    (["--draft-head", "head.pt"], "must be a .safetensors file"),
    (["--draft-head", "/nonexistent/head.safetensors"], "does not exist"),
    (["--head-depth", "0"], "must be >= 1"),
    (["--head-min-value", "1.5"], "min_value"),
])
def test_inference_eagle_bad_flags(tiny_chat, tmp_path, capsys, flags, message):
    code, _ = run_eagle(tiny_chat, tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_inference_eagle_refuses_a_head_of_another_target(tiny_chat, tiny_hf, tmp_path, capsys):
    _, other = tiny_hf("llama", seed=3, vocab_size=load_model(tiny_chat).config.vocab_size,
                       num_hidden_layers=2, tie_word_embeddings=True)
    path = save_random_head(other, tmp_path / "other.safetensors")
    code, _ = run_eagle(tiny_chat, tmp_path, "--draft-head", str(path))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "was trained for" in err


def test_inference_sps_with_the_head(tiny_chat, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(tiny_chat), "--question-file", str(DEMO), "--question-end", "1",
            "--max-new-tokens", "8", "--warmup", "0", "--answer-file", str(answers),
            "--draft-head", "--draft-schedule", "heuristic", "--num-drafts", "2"]
    assert run_cli(inference_sps, argv) == 2
    assert "no draft head trained for tiny-chat" in capsys.readouterr().err
    save_random_head(tiny_chat)
    assert run_cli(inference_sps, argv) == 0, capsys.readouterr().err
    params = read_lines(answers)[0]["meta"]["params"]
    assert params["draft_head"] == "cached" and params["draft_layers"] is None
    assert params["draft_tree_capacity"] == 1 + 2 * 16  # two drafts of at most 16 tokens
