"""SAM-Decoding: the source policy, draft sizes, drafts from the context's and a corpus's
automata, the Token Recycling fallback, multi-turn contexts, corpus files, and losslessness
with the fake Markov target (tests/fakes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import load_script
from evaluation.inference_sam import SamParams
from fakes import MarkovLM
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.recycling import RecyclingConfig, SuccessorTable
from logitspec.sam import (
    DYNAMIC, RECYCLING, STATIC, CorpusError, SamConfig, SamDrafter, chain_tree, choose_source,
    read_corpus,
)
from logitspec.suffix_automaton import CorpusAutomaton

NO_TOPK = np.zeros(0, dtype=np.int64)

# --------------------------------------------------------------------------- policies

SOURCES = [
    # (dynamic length, static length or None, threshold, bias, fallback, expected source)
    (5, None, 5, 5, True, DYNAMIC),
    (4, None, 5, 5, True, RECYCLING),
    (0, None, 5, 5, True, RECYCLING),
    (4, 9, 5, 5, True, RECYCLING),  # 9 - 5 = 4: both below the threshold
    (4, 10, 5, 5, True, STATIC),
    (5, 10, 5, 5, True, DYNAMIC),  # a tie goes to the dynamic automaton
    (6, 10, 5, 5, True, DYNAMIC),
    (2, 30, 5, 5, True, STATIC),
    (0, None, 0, 5, True, DYNAMIC),  # threshold 0: never the fallback
    (0, 0, 5, 0, False, DYNAMIC),  # SAM alone: no threshold; nothing matches: dynamic (root only)
    (2, 8, 5, 5, False, STATIC),  # 8 - 5 = 3 > 2
    (3, 8, 5, 5, False, DYNAMIC),
    (2, 2, 5, 0, False, DYNAMIC),
]


@pytest.mark.parametrize("dynamic,static,threshold,bias,fallback,expected", SOURCES)
def test_choose_source_table(dynamic, static, threshold, bias, fallback, expected):
    config = SamConfig(threshold=threshold, static_bias=bias, fallback=fallback)
    assert choose_source(dynamic, static, config) == expected


DRAFT_NODES = [
    # (draft_size, match_scale, match length, expected nodes)
    (40, None, 0, 40),
    (40, None, 7, 40),
    (40, 4.0, 0, 1),
    (40, 4.0, 2, 9),
    (40, 4.0, 10, 40),
    (40, 2.5, 3, 8),  # 1 + floor(7.5)
    (40, 4.0, -3, 1),  # a static match below the bias counts as none
    (8, 4.0, 5, 8),
]


@pytest.mark.parametrize("size,scale,length,expected", DRAFT_NODES)
def test_draft_nodes_table(size, scale, length, expected):
    assert SamConfig(draft_size=size, match_scale=scale).draft_nodes(length) == expected


@pytest.mark.parametrize("kwargs", [
    {"draft_size": 0}, {"threshold": -1}, {"static_bias": -1}, {"match_scale": 0.0},
    {"match_scale": -1.0},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamConfig(**kwargs)


def test_tree_capacity_is_the_larger_draft():
    assert SamConfig().tree_capacity == 64
    assert SamConfig(draft_size=80).tree_capacity == 80
    assert SamConfig(recycling=RecyclingConfig(8)).tree_capacity == 40
    assert SamConfig(fallback=False).tree_capacity == 40


def test_chain_tree():
    tree = chain_tree(7, [1, 2, 3])
    assert (tree.tokens, tree.parents, tree.depths) == ((7, 1, 2, 3), (-1, 0, 1, 2), (0, 1, 2, 3))
    assert chain_tree(7, []).tokens == (7,)


# --------------------------------------------------------------------------- drafting


def drafter_with_table(config: SamConfig = SamConfig(), rows: dict | None = None, corpus=None):
    table = SuccessorTable(64, config.recycling.k)
    for token, row in (rows or {}).items():
        table.update([token], np.array([row]))
    return SamDrafter(config, corpus, table)


def test_docstring_example():
    rows = {9: [30, 31], 30: [2, 5]}
    config = SamConfig(recycling=RecyclingConfig(4, k=2))
    drafter = drafter_with_table(config, rows)
    drafter.begin([3, 18, 41, 7, 9, 30, 2, 18, 41, 7], 0)
    tree = drafter.draft(9, NO_TOPK, 100)
    assert drafter.last_source == RECYCLING and tree.tokens == (9, 30, 2)  # the recycled chain
    drafter = drafter_with_table(config, rows)
    drafter.begin([2, 18, 41, 7, 9, 30, 2, 18, 41, 7], 0)
    tree = drafter.draft(9, NO_TOPK, 100)
    assert drafter.last_source == DYNAMIC and tree.tokens == (9, 30, 2, 18, 41, 7)
    assert tree.parents == (-1, 0, 1, 2, 3, 4)


DYNAMIC_DRAFTS = [
    # (context, root, draft_size, roomier, max_depth, expected tree tokens)
    ([1, 2, 3, 4, 5, 6, 1, 2, 3], 4, 40, True, 100, (4, 5, 6, 1, 2, 3)),
    ([1, 2, 3, 4, 5, 6, 1, 2, 3], 4, 3, True, 100, (4, 5, 6)),  # draft_size nodes
    ([1, 2, 3, 4, 5, 6, 1, 2, 3], 4, 40, True, 2, (4, 5, 6)),  # cut at max_depth
    ([1, 2, 3, 4, 5, 6, 1, 2, 3], 4, 40, True, 0, (4,)),
    # 6 tokens follow the earliest occurrence of the match [7, 1, 2, 3, 4], fewer than the 7
    # asked for: the walk moves to the suffix [3, 4], first seen at the start (18 follow)
    ([3, 4, 8, 8, 8, 8, 8, 8, 8, 7, 1, 2, 3, 4, 9, 9, 7, 1, 2, 3], 4, 8, True, 100,
     (4, 8, 8, 8, 8, 8, 8, 8)),
    ([3, 4, 8, 8, 8, 8, 8, 8, 8, 7, 1, 2, 3, 4, 9, 9, 7, 1, 2, 3], 4, 8, False, 100,
     (4, 9, 9, 7, 1, 2, 3)),
]


@pytest.mark.parametrize("context,root,size,roomier,max_depth,expected", DYNAMIC_DRAFTS)
def test_dynamic_draft_table(context, root, size, roomier, max_depth, expected):
    config = SamConfig(draft_size=size, threshold=2, roomier_suffix=roomier)
    drafter = drafter_with_table(config)
    drafter.begin(context, 0)
    tree = drafter.draft(root, NO_TOPK, max_depth)
    assert tree.tokens == expected and len(tree) <= drafter.tree_capacity


@settings(deadline=None, max_examples=100)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.lists(st.integers(0, 3), max_size=8),
       st.integers(0, 3), st.integers(1, 12))
def test_dynamic_draft_is_the_earliest_continuation_of_the_longest_match(prompt, accepted, root, size):
    """Brute force over ``prompt`` extended by ``accepted`` in one step: the chain after the
    earliest occurrence of the longest suffix of ``context + [root]`` found in the context."""
    drafter = SamDrafter(SamConfig(draft_size=size, threshold=0, fallback=False, roomier_suffix=False))
    drafter.begin(prompt, 0)
    if accepted:
        drafter.extend(accepted, chain_tree(accepted[0], accepted[1:]), list(range(len(accepted))))
    context = prompt + accepted
    stream = context + [root]
    length = max(k for k in range(len(stream)) if _occurs(stream[len(stream) - k:], context))
    expected = [root]
    if length:
        needle = stream[len(stream) - length:]
        end = next(i + length for i in range(len(context)) if context[i:i + length] == needle)
        expected += context[end:end + size - 1]
    assert list(drafter.draft(root, NO_TOPK, 100).tokens) == expected


def _occurs(needle: list[int], hay: list[int]) -> bool:
    return any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def test_static_draft_when_the_corpus_match_is_longer_by_more_than_the_bias():
    corpus = CorpusAutomaton([[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
    drafter = drafter_with_table(SamConfig(), corpus=corpus)
    drafter.begin([5, 10, 11, 12, 13, 14, 15, 16, 17, 18], 0)
    tree = drafter.draft(19, NO_TOPK, 100)  # corpus match 10 tokens (5 after the bias)
    assert drafter.last_source == STATIC and tree.tokens == (19, 20, 21)
    drafter = drafter_with_table(SamConfig(), corpus=corpus)
    drafter.begin([5, 13, 14, 15, 16, 17, 18], 0)
    drafter.draft(19, NO_TOPK, 100)  # corpus match 7 tokens: 2 after the bias, too short
    assert drafter.last_source == RECYCLING


def test_the_corpus_match_follows_accepted_tokens():
    corpus = CorpusAutomaton([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    drafter = drafter_with_table(SamConfig(threshold=3, static_bias=0), corpus=corpus)
    drafter.begin([40, 1, 2], 0)
    tree = drafter.draft(3, NO_TOPK, 4)
    assert drafter.last_source == STATIC and tree.tokens == (3, 4, 5, 6, 7)
    drafter.extend([3, 4, 5], tree, [0, 1, 2])
    assert drafter.sources.corpus_match.match.length == 5
    assert drafter.draft(6, NO_TOPK, 2).tokens == (6, 7, 8)


def test_sam_alone_drafts_the_root_alone_when_nothing_matches_and_scales_with_the_match():
    drafter = SamDrafter(SamConfig(fallback=False, match_scale=1.0))
    assert drafter.fallback is None and drafter.top_k == 0
    drafter.begin([1, 2, 3, 4, 5, 6, 1, 2], 0)
    assert drafter.draft(9, NO_TOPK, 100).tokens == (9,)
    assert drafter.draft(3, NO_TOPK, 100).tokens == (3, 4, 5, 6)  # match 3: 1 + 3 nodes
    assert drafter.last_source == DYNAMIC


def test_stats_count_steps_and_tokens_per_source():
    drafter = drafter_with_table(SamConfig(threshold=2))
    drafter.begin([1, 2, 3, 4, 1, 2], 0)
    tree = drafter.draft(3, NO_TOPK, 10)
    drafter.extend([3, 4], tree, [0, 1])
    tree = drafter.draft(7, NO_TOPK, 10)
    drafter.extend([7], tree, [0])
    assert drafter.source_stats.summary() == {DYNAMIC: {"share": 0.5, "mat": 2.0},
                                       RECYCLING: {"share": 0.5, "mat": 1.0}}


@settings(deadline=None, max_examples=60)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(0, 30),
       st.lists(st.integers(0, 3), max_size=10), st.integers(0, 3))
def test_begin_extends_or_rebuilds_like_a_fresh_drafter(first, keep, follow, root):
    """A second ``begin`` over a context sharing ``keep`` tokens with what the drafter holds
    leaves it exactly as a fresh drafter begun on that context."""
    corpus = CorpusAutomaton([[0, 1, 2, 3, 0, 1, 1, 2]])
    config = SamConfig(threshold=2, static_bias=1)
    drafter = drafter_with_table(config, corpus=corpus)
    drafter.begin(first, 0)
    keep = min(keep, len(first))
    context = first[:keep] + follow if follow else first + [root]
    reused = keep if follow else len(first)
    drafter.begin(context, reused)
    fresh = drafter_with_table(config, corpus=corpus)
    fresh.begin(context, 0)
    assert drafter.sources.context.tokens == context
    assert drafter.sources.corpus_match.match == fresh.sources.corpus_match.match
    assert drafter.draft(root, NO_TOPK, 50) == fresh.draft(root, NO_TOPK, 50)


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize("spec,params", [
    ("sam:64", SamParams()),
    ("sam:8", SamParams(draft_tree_capacity=8)),
    ("sam:40,alone,scale=4", SamParams(draft_tree_capacity=40, fallback="none", match_scale=4.0)),
    ("sam:32,size=16,thr=3,bias=2,earliest",
     SamParams(draft_tree_capacity=32, draft_size=16, match_threshold=3, static_bias=2,
               dynamic_position="earliest")),
])
def test_replay_specs_build_what_the_command_builds(spec, params):
    simulate = load_script("simulate_drafters")
    assert simulate.make_drafter(spec, None, 64).config == params.sam_config()


def test_replay_of_a_repetitive_trace_drafts_from_the_context():
    simulate = load_script("simulate_drafters")
    prompt = list(range(10, 30))
    output = list(range(10, 30)) * 2
    topk = torch.full((len(output), 64), -1, dtype=torch.int32)
    topk[:-1, 0] = torch.tensor(output[1:], dtype=torch.int32)
    trace = simulate.TurnTrace(1, "qa", prompt, output, topk, len(output))
    drafter = simulate.make_drafter("sam:64", None, 64)
    lengths = simulate.replay_turn(drafter, trace).accept_lengths
    # matches of 1 to 4 tokens: recycled trees (nothing learned yet); 5 tokens: the context's
    # continuation (19 tokens after the prompt's 10..14), then the rest of the turn
    assert lengths == [1, 1, 1, 1, 20, 16]
    assert drafter.source_stats.steps == {RECYCLING: 4, DYNAMIC: 2}


# --------------------------------------------------------------------------- corpus files


def encode(text: str) -> list[int]:
    return [ord(c) % 50 for c in text]


def test_read_corpus_formats(tmp_path):
    ids = tmp_path / "c.ids"
    ids.write_text("5 6 7\n\n  8\t9 \n")
    assert read_corpus(ids, encode, 50) == [[5, 6, 7], [8, 9]]
    text = tmp_path / "c.txt"
    text.write_text("ab\n\ncd")
    assert read_corpus(text, encode, 50) == [encode("ab\n\ncd")]


@pytest.mark.parametrize("name,content,message", [
    ("c.ids", "5 x 7\n", "line 1: 'x' is not a token id"),
    ("c.ids", "5 6\n-1\n", "line 2: '-1' is not a token id"),
    ("c.ids", "5 60\n", "token id 60 is outside the vocabulary of 50"),
    ("c.ids", "\n \n", "no tokens"),
    ("c.txt", "  \n", "no tokens"),
    ("c.txt", b"\xff\xfe", "not UTF-8"),
])
def test_read_corpus_errors_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorpusError, match=message) as info:
        read_corpus(path, encode, 50)
    assert "\n" not in str(info.value)


def test_read_corpus_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="No such file"):
        read_corpus(tmp_path / "none.ids", encode, 50)


# --------------------------------------------------------------------------- losslessness

VOCAB = 9
MODEL = MarkovLM(VOCAB, seed=5)
CORPUS = CorpusAutomaton([[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4], [3, 3, 4, 4, 5, 5]])
SHARED = {  # hot across examples, as in a run
    "samd": SamDrafter(SamConfig(recycling=RecyclingConfig(16))),
    "samd-corpus": SamDrafter(SamConfig(threshold=2, static_bias=1,
                                        recycling=RecyclingConfig(8)), CORPUS),
    "alone": SamDrafter(SamConfig(draft_size=12, fallback=False, match_scale=4.0)),
    "alone-corpus": SamDrafter(SamConfig(draft_size=6, fallback=False, static_bias=0), CORPUS),
}


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
       max_new=st.integers(1, 40), eos=st.lists(st.integers(0, VOCAB - 1), max_size=1),
       kind=st.sampled_from(sorted(SHARED)))
def test_greedy_sam_equals_vanilla(prompt, max_new, eos, kind):
    config = GenerationConfig(max_new_tokens=max_new, eos_token_ids=tuple(eos))
    vanilla = Decoder(MODEL, None).generate(prompt, config)
    drafter = SHARED[kind]
    result = Decoder(MODEL, drafter).generate(prompt, config)
    assert result.output_ids == vanilla.output_ids
    assert sum(result.accept_lengths) == result.new_tokens
    assert max(result.draft_lengths) <= drafter.tree_capacity - 1


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
       follow=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
       keep=st.integers(0, 10), kind=st.sampled_from(sorted(SHARED)))
def test_multi_turn_and_diverging_prompts_equal_vanilla(prompt, follow, keep, kind):
    """Turn 2 extends turn 1's context (prompt + answer + more) or diverges from it after
    ``keep`` tokens: both equal a vanilla decoder's output."""
    config = GenerationConfig(max_new_tokens=20)
    decoder = Decoder(MODEL, SHARED[kind])
    first = decoder.generate(prompt, config).output_ids
    extended = prompt + first + follow
    for turn in (extended, extended[:keep] + follow):
        assert decoder.generate(turn, config).output_ids == \
            Decoder(MODEL, None).generate(turn, config).output_ids
        assert SHARED[kind].sources.context.tokens == decoder.context


def test_same_seed_sampling_reproduces_vanilla_token_for_token():
    drafter = SamDrafter(SamConfig(threshold=1, recycling=RecyclingConfig(16)))
    for seed in range(40):
        config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        vanilla = Decoder(MODEL, None).generate([0, 1, 2, 1], config).output_ids
        assert Decoder(MODEL, drafter).generate([0, 1, 2, 1], config).output_ids == vanilla


def test_a_repetitive_target_is_drafted_from_the_context():
    """Greedy decoding of a small Markov chain falls into a cycle: the automaton drafts it."""
    model = MarkovLM(6, seed=2, scale=3.0)
    drafter = SamDrafter(SamConfig(threshold=3, recycling=RecyclingConfig(16)))
    config = GenerationConfig(max_new_tokens=120)
    result = Decoder(model, drafter).generate([3, 4], config)
    assert result.output_ids == Decoder(model, None).generate([3, 4], config).output_ids
    assert result.mean_accepted_tokens > 3
    assert drafter.source_stats.steps[DYNAMIC] > 0
