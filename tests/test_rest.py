"""REST's datastore and draft trie (logitspec/rest.py): suffix arrays against sorting, retrieval
and pruning policies pinned by tables and checked against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitspec.decoding import Decoder, GenerationConfig
from logitspec.rest import (
    Datastore, DatastoreError, RestConfig, RestDrafter, draft_trie, retrieve, suffix_array,
)

from test_decoding import CopyLM, check_invariants, reference_greedy


def paths_of(tokens, parents) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    return paths


# --------------------------------------------------------------------------- suffix array

def test_suffix_array_docstring_example():
    assert suffix_array(np.array([2, 1, 2, 1])).tolist() == [3, 1, 2, 0]


@settings(deadline=None, max_examples=200)
@given(tokens=st.lists(st.integers(0, 3), max_size=60))
def test_suffix_array_sorts_the_suffixes(tokens):
    expected = sorted(range(len(tokens)), key=lambda i: tokens[i:])
    assert suffix_array(np.array(tokens, dtype=np.int64)).tolist() == expected


@settings(deadline=None, max_examples=100)
@given(entries=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=20), min_size=1, max_size=3),
       query=st.lists(st.integers(0, 2), min_size=1, max_size=4))
def test_occurrences_in_suffix_array_order(entries, query):
    store = Datastore.from_entries(entries)
    tokens = [t for e in entries for t in e]  # joined without separators
    order = sorted(range(len(tokens)), key=lambda i: tokens[i:])
    expected = [i for i in order if tokens[i:i + len(query)] == query]
    assert store.occurrences(query).tolist() == expected


def test_continuations_are_padded_past_the_end():
    store = Datastore.from_entries([[1, 2, 3], [1, 2]])
    assert store.continuations([1, 2], 10, 3).tolist() == [[-1, -1, -1], [3, 1, 2]]
    assert store.continuations([1, 2], 1, 3).tolist() == [[-1, -1, -1]]  # suffix-array order
    assert store.continuations([4], 10, 3).shape == (0, 3)


def test_save_and_load(tmp_path):
    store = Datastore.from_entries([[5, 6, 7], [70000, 5]])
    store.save(tmp_path / "store.npz")
    loaded = Datastore.load(tmp_path / "store.npz")
    assert loaded.tokens.dtype == np.uint32 and loaded.tokens.tolist() == [5, 6, 7, 70000, 5]
    assert loaded.suffix_array.tolist() == store.suffix_array.tolist()
    assert loaded.entry_starts.tolist() == [0, 3]
    assert Datastore.from_entries([[1, 2]]).tokens.dtype == np.uint16


def test_bad_datastores(tmp_path):
    with pytest.raises(DatastoreError, match="no datastore file"):
        Datastore.load(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DatastoreError, match="is not a datastore"):
        Datastore.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", tokens=np.arange(3))
    with pytest.raises(DatastoreError, match="is not a datastore"):
        Datastore.load(tmp_path / "other.npz")
    with pytest.raises(DatastoreError, match="at least one non-empty entry"):
        Datastore.from_entries([[], []])
    with pytest.raises(DatastoreError, match=">= 0"):
        Datastore.from_entries([[1, -2]])


# --------------------------------------------------------------------------- retrieval

def test_the_longest_span_wins_and_short_spans_stop_at_min_span():
    store = Datastore.from_entries([[9, 1, 2, 3, 4, 7, 2, 3, 5]])
    config = RestConfig(max_span=4, min_span=2, continuation_length=2)
    assert retrieve([store], [0, 1, 2, 3], config).tolist() == [[4, 7]]  # [1, 2, 3] matched
    assert retrieve([store], [0, 7, 2, 3], config).tolist() == [[5, -1]]  # [7, 2, 3]
    assert retrieve([store], [0, 8, 2, 3], config).tolist() == [[4, 7], [5, -1]]  # [2, 3]
    assert retrieve([store], [0, 0, 2], config).shape == (0, 2)  # [2] alone is too short
    one = RestConfig(max_span=4, min_span=1, continuation_length=2)
    assert retrieve([store], [0, 0, 2], one).tolist() == [[3, 4], [3, 5]]


def test_every_datastore_contributes_at_the_winning_span():
    first = Datastore.from_entries([[1, 2, 3]])
    second = Datastore.from_entries([[8, 1, 2, 4], [7, 2, 6]])
    config = RestConfig(max_span=3, min_span=2, continuation_length=1)
    assert retrieve([first, second], [5, 1, 2], config).tolist() == [[3], [4]]
    assert retrieve([second, first], [5, 7, 2], config).tolist() == [[6]]


def test_max_matches_caps_each_datastore():
    store = Datastore.from_entries([[1, 2] * 10])
    config = RestConfig(max_span=2, min_span=2, max_matches=3, continuation_length=1)
    assert len(retrieve([store, store], [1, 2], config)) == 6


@pytest.mark.parametrize("kwargs", [
    dict(draft_tree_capacity=0), dict(min_span=0), dict(max_span=1, min_span=2),
    dict(max_matches=0), dict(continuation_length=0),
])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        RestConfig(**kwargs)


# --------------------------------------------------------------------------- the draft trie

TRIES = {
    "module docstring": ([[5, 6], [5, 6], [5, 7], [8, 9]], 3, [5, 6, 8], [-1, 0, -1]),
    "all prefixes fit": ([[5, 6], [5, 7]], 10, [5, 6, 7], [-1, 0, 0]),
    "equal counts and depths: the first retrieved first": ([[4, 1], [3, 2]], 2, [4, 3], [-1, -1]),
    "ended rows count up to their end": ([[5, -1], [5, 6], [5, 6]], 2, [5, 6], [-1, 0]),
    "nothing retrieved": ([[-1, -1]], 3, [], []),
}


@pytest.mark.parametrize("case", TRIES.values(), ids=TRIES.keys())
def test_draft_trie_table(case):
    rows, max_nodes, tokens, parents = case
    assert draft_trie(np.array(rows), max_nodes) == (tokens, parents)


@settings(deadline=None, max_examples=150)
@given(rows=st.lists(st.lists(st.integers(-1, 2), min_size=3, max_size=3), min_size=1, max_size=12),
       max_nodes=st.integers(0, 12))
def test_draft_trie_keeps_the_most_frequent_prefixes(rows, max_nodes):
    rows = [r[: r.index(-1)] + [-1] * (3 - r.index(-1)) if -1 in r else r for r in rows]
    tokens, parents = draft_trie(np.array(rows), max_nodes)
    paths = paths_of(tokens, parents)
    assert len(set(paths)) == len(paths) and all(p < i for i, p in enumerate(parents))

    def count(path):
        return sum(1 for r in rows if tuple(r[:len(path)]) == path)

    prefixes = {tuple(r[:d]) for r in rows for d in range(1, 4) if -1 not in r[:d]}
    best = sorted(map(count, prefixes), reverse=True)[:max_nodes]
    assert sorted(map(count, paths), reverse=True) == best
    assert [count(p) for p in paths] == sorted((count(p) for p in paths), reverse=True)


def test_draft_trie_is_exact_for_large_token_ids():
    rows = np.array([[49151, 0], [49151, 1], [0, 49151]])
    assert paths_of(*draft_trie(rows, 5)) == [(49151,), (0,), (49151, 0), (49151, 1), (0, 49151)]


def test_brute_force_retrieval_and_trie_agree():
    entries = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [1, 4, 1, 4, 2, 1, 3, 5, 6]]
    store = Datastore.from_entries(entries)
    joined = [t for e in entries for t in e]
    config = RestConfig(max_span=3, min_span=1, continuation_length=3)
    for context in itertools.product([1, 4, 5], repeat=3):
        found = retrieve([store], list(context), config)
        for span in range(3, 0, -1):
            starts = [i for i in range(len(joined)) if joined[i:i + span] == list(context[-span:])]
            if starts:
                break
        expected = sorted(tuple(joined[i + span:i + span + 3] + [-1] * 3)[:3] for i in starts)
        assert sorted(map(tuple, found.tolist())) == expected


# --------------------------------------------------------------------------- in the decoding loop

@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.integers(6, 20), seed=st.integers(0, 2**16),
       corpus=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=30), min_size=1, max_size=3),
       prompt=st.lists(st.integers(0, 5), min_size=1, max_size=12),
       capacity=st.integers(1, 30), max_span=st.integers(1, 6), length=st.integers(1, 6),
       max_new=st.integers(1, 30))
def test_rest_equals_vanilla(vocab, seed, corpus, prompt, capacity, max_span, length, max_new):
    model = CopyLM(vocab, seed=seed)
    config = RestConfig(draft_tree_capacity=capacity, max_span=max_span, min_span=1,
                        continuation_length=length)
    generation = GenerationConfig(max_new_tokens=max_new)
    drafter = RestDrafter([Datastore.from_entries(corpus)], config)
    result = Decoder(model, drafter).generate(prompt, generation)
    assert result.output_ids == reference_greedy(model, prompt, generation)
    check_invariants(result, generation, capacity)


def test_rest_drafts_are_accepted_when_the_datastore_knows_the_text():
    model = CopyLM(20, seed=1)
    prompt = [3, 4, 5, 6, 7, 8, 3, 4]
    generation = GenerationConfig(max_new_tokens=30)
    expected = reference_greedy(model, prompt, generation)
    store = Datastore.from_entries([prompt + expected])
    result = Decoder(model, RestDrafter([store])).generate(prompt, generation)
    assert result.output_ids == expected and result.mean_accepted_tokens > 3


def test_the_step_depth_limit_cuts_the_trie():
    store = Datastore.from_entries([[1, 2, 3, 4, 5, 6]])
    drafter = RestDrafter([store], RestConfig(min_span=1))
    drafter.begin([9, 1], 0)
    assert drafter.draft(2, np.zeros(0, dtype=np.int64), 2).tokens == (2, 3, 4)
    assert drafter.draft(2, np.zeros(0, dtype=np.int64), 0).tokens == (2,)


def test_simulate_drafters_builds_rest_over_several_datastores(tmp_path):
    """A replay spec names one datastore or several joined by '+', with REST's options."""
    from cli_helpers import load_script

    simulate = load_script("simulate_drafters")
    paths = []
    for i, entry in enumerate(([1, 2, 3, 4], [5, 6, 7])):
        Datastore.from_entries([entry]).save(tmp_path / f"s{i}.npz")
        paths.append(str(tmp_path / f"s{i}.npz"))
    drafter = simulate.make_drafter(f"rest:9,store={'+'.join(paths)},span=6,len=4", None)
    assert [d.tokens.tolist() for d in drafter.datastores] == [[1, 2, 3, 4], [5, 6, 7]]
    assert (drafter.config.draft_tree_capacity, drafter.config.max_span,
            drafter.config.continuation_length) == (9, 6, 4)
    with pytest.raises(ValueError, match="store=FILE"):
        simulate.make_drafter("rest:9", None)
