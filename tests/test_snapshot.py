"""A drafter's learned state saved before a question and put back later: the question decodes
exactly as it did then, and not as it does from a fresh drafter."""

from __future__ import annotations

import pytest
import torch

from logitspec import snapshot
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.drafters import LogitSpecConfig, PoolConfig, make_logitspec_drafter
from logitspec.recycling import SuccessorTable

from fakes import MarkovLM

VOCAB = 50
CONFIG = LogitSpecConfig(pool=PoolConfig(3, 8, 3), draft_tree_capacity=16, tree_policy="value",
                         recycle_chains=8, suffix_trees=True)
GENERATION = GenerationConfig(max_new_tokens=40)


def decoder(model: MarkovLM) -> Decoder:
    return Decoder(model, make_logitspec_drafter(CONFIG, None, SuccessorTable(VOCAB)))


def answer(d: Decoder, prompt: list[int]):
    d.reset()
    result = d.generate(prompt, GENERATION)
    return result.output_ids, result.draft_lengths, result.accept_lengths


def test_a_restored_drafter_answers_a_question_again_as_it_did_from_that_state():
    """The run asks question A twice, then B. Taken again from the state saved before A's
    second answer, A's steps repeat that answer's exactly; a fresh drafter, which has not
    seen A's first answer, drafts and accepts otherwise (the state is what differs)."""
    model = MarkovLM(VOCAB, seed=3, scale=3.0)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    run = decoder(model)
    answer(run, a)
    state = run.save_state()
    second = answer(run, a)
    answer(run, b)
    restored = decoder(model)
    restored.restore_state(state)
    assert answer(restored, a) == second
    fresh = answer(decoder(model), a)
    assert fresh[0] == second[0]  # float32: the same text whatever the drafter
    assert sum(fresh[2]) / len(fresh[2]) < sum(second[2]) / len(second[2])


def test_restoring_twice_gives_independent_copies():
    model = MarkovLM(VOCAB, seed=3, scale=3.0)
    run = decoder(model)
    answer(run, [1, 2, 3, 4, 5, 6])
    state = run.save_state()
    first, second = decoder(model), decoder(model)
    first.restore_state(state)
    second.restore_state(state)
    answered = answer(first, [1, 2, 3, 4, 5, 6])
    assert answer(second, [1, 2, 3, 4, 5, 6]) == answered  # first's learning did not leak


def test_modules_are_kept_by_reference_and_everything_else_copied():
    head = torch.nn.Linear(4, 4)
    table = torch.zeros(3)
    state = snapshot.take({"head": head, "table": table, "seen": [1, 2]})
    copy = state.restore()
    assert copy["head"] is head and state.shared == (head,)
    copy["table"][0] = 1.0
    copy["seen"].append(3)
    assert table[0] == 0.0 and state.restore()["seen"] == [1, 2]


def test_a_decoder_without_a_drafter_has_no_state_and_a_lambda_cannot_be_saved():
    assert Decoder(MarkovLM(VOCAB)).save_state() is None
    Decoder(MarkovLM(VOCAB)).restore_state(None)  # a no-op
    with pytest.raises(snapshot.SnapshotError, match="cannot save the state of dict"):
        snapshot.take({"rule": lambda x: x})
