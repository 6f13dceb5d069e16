"""SuffixDecoding's policies (logitspec/suffix_decoding.py): the speculation budget, the two
trees and which draft wins, pinned by tables and checked against a brute-force reference."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitspec.decoding import Decoder, GenerationConfig
from logitspec.suffix_decoding import (
    MODES, SuffixCache, SuffixConfig, SuffixDecodingDrafter, draft_tree,
)

from test_decoding import CopyLM, check_invariants, reference_greedy
from test_suffix_tree import brute_count


def cache_after(prompt, output=(), config=SuffixConfig(), earlier=()):
    """A cache that answered ``earlier`` (prompt, answer) requests, then started ``prompt``
    and appended ``output``."""
    cache = SuffixCache(config)
    for earlier_prompt, answer in earlier:
        cache.start_request(earlier_prompt)
        for token in answer:
            cache.append(token)
    cache.start_request(prompt)
    for token in output:
        cache.append(token)
    return cache


# --------------------------------------------------------------------------- the budget

# (alpha, offset, draft_tree_capacity, match_len, budget)
BUDGETS = [
    (1.0, 0.0, 65, 1, 1),
    (1.0, 0.0, 65, 3, 3),
    (1.0, 0.0, 65, 63, 63),
    (1.0, 0.0, 65, 80, 64),  # max_spec_tokens = capacity - 1
    (1.0, 0.0, 9, 20, 8),
    (0.5, 0.0, 65, 3, 1),  # floor
    (0.29, 0.0, 65, 100, 29),  # 28.999999999999996 + 1e-6 -> 29, as the public code rounds
    (1.0, -2.0, 65, 1, 0),  # never negative
    (1.0, 2.0, 65, 1, 3),
    (0.0, 4.0, 65, 30, 4),
]


@pytest.mark.parametrize("alpha,offset,capacity,match_len,budget", BUDGETS)
def test_budget_table(alpha, offset, capacity, match_len, budget):
    config = SuffixConfig(draft_tree_capacity=capacity, max_spec_factor=alpha, max_spec_offset=offset)
    assert config.budget(match_len) == budget


@pytest.mark.parametrize("kwargs", [
    dict(draft_tree_capacity=0), dict(mode="path"), dict(max_depth=0),
    dict(max_spec_factor=-1.0), dict(max_spec_factor=float("nan")),
    dict(max_spec_offset=float("inf")), dict(min_token_prob=1.5), dict(max_cached_answers=-1),
])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        SuffixConfig(**kwargs)


# --------------------------------------------------------------------------- which draft wins

def test_module_docstring_example():
    prompt = [1, 2, 3, 4, 0, 2, 7, 0, 2, 7, 5, 8, 9]
    draft = cache_after(prompt, [1, 2]).speculate()
    assert draft.tokens == (3, 4) and draft.counts == (1, 1) and draft.denominator == 2
    assert draft.match_len == 2 and draft.score == 1


def test_the_match_length_caps_the_draft():
    """A 2-token match speculates 2 tokens although the continuation is longer (alpha 1)."""
    prompt = [9, 5, 6, 7, 8, 10, 11, 3]
    assert cache_after(prompt, [5, 6]).speculate().tokens == (7, 8)
    assert cache_after(prompt, [9, 5, 6]).speculate().tokens == (7, 8, 10)


def test_prompts_stay_out_of_the_global_tree_but_answers_enter_it():
    earlier = [([4, 4, 1, 2, 3, 4], [7, 1, 2, 9, 8, 6])]
    cache = cache_after([5, 1, 2], config=SuffixConfig(max_depth=8), earlier=earlier)
    assert cache.answers.count([1, 2, 9]) == 1 and cache.answers.count([1, 2, 3]) == 0
    assert cache.local.count([1, 2]) == 1  # the new prompt only
    draft = cache.speculate()
    assert draft.tokens == (9, 8) and draft.denominator == 1  # from the earlier answer


def test_the_current_answer_is_in_both_trees():
    cache = cache_after([6, 6], [1, 2, 3, 1, 2])
    assert cache.answers.count([1, 2]) == cache.local.count([1, 2]) == 2
    assert cache.speculate().tokens == (3, 1)


def test_equal_scores_go_to_the_per_request_tree():
    """Both trees score 1 on the match [1, 2] (3, 1 at 1/2 each here; 8, 9 there): the
    per-request draft wins."""
    earlier = [([0], [1, 2, 8, 9])]
    draft = cache_after([1, 2, 3], [1, 2], earlier=earlier).speculate()
    assert draft.tokens == (3, 1) and draft.denominator == 2 and draft.score == 1


def test_a_higher_score_from_the_global_tree_wins():
    earlier = [([0], [1, 2, 8, 8]), ([0], [1, 2, 8, 8])]
    draft = cache_after([1, 2, 3], [1, 2], earlier=earlier).speculate()
    assert draft.tokens == (8, 8) and draft.denominator == 3  # two earlier answers + this one


def test_fifo_keeps_the_last_answers():
    config = SuffixConfig(max_cached_answers=2)
    earlier = [([0], [1, 2, 3]), ([0], [4, 5, 6]), ([0], [7, 8, 9])]
    cache = cache_after([0], config=config, earlier=earlier)
    # the new request's (empty) answer took a slot: only [7, 8, 9] is left
    assert [cache.answers.count(a) for a in ([1, 2], [4, 5], [7, 8])] == [0, 0, 1]
    assert cache.answers.num_sequences == 2


def test_no_global_tree():
    cache = cache_after([0], [1, 2], SuffixConfig(max_cached_answers=0), earlier=[([0], [1, 2, 3])])
    assert cache.answers.count([]) == 0 and cache.speculate().tokens == ()


def test_whole_context_is_never_a_match():
    """As in the public code, the match is shorter than the context: a 2-token context
    that an earlier answer contains does not match as a whole."""
    earlier = [([0], [5, 6, 7, 8])]
    cache = cache_after([5], [6], SuffixConfig(max_depth=64), earlier=earlier)
    assert cache.speculate().match_len <= 1
    assert cache.speculate().tokens == (7,)


def test_chain_and_tree_modes():
    """[7, 1] occurred 3 times before (then 3, 3, 4): the 2-token budget goes to 3 and the
    runner-up 4 in a tree, to 3 and its first continuation 5 in a chain."""
    prompt = [7, 1, 3, 5, 7, 1, 3, 6, 7, 1, 4, 9, 7]
    tree = cache_after(prompt, [1]).speculate()
    chain = cache_after(prompt, [1], SuffixConfig(mode="chain")).speculate()
    assert (tree.tokens, tree.parents, tree.counts) == ((3, 4), (-1, -1), (2, 1))
    assert (chain.tokens, chain.parents, chain.counts) == ((3, 5), (-1, 0), (2, 1))
    assert tree.denominator == chain.denominator == 4


def test_extending_the_previous_context_equals_a_fresh_tree():
    config = SuffixConfig(max_depth=5)
    first = [1, 2, 3, 1, 2]
    cache = cache_after(first, [3, 4], config)
    indexed = cache.local
    follow_up = first + [3, 4, 1, 2, 3]
    cache.start_request(follow_up, reused=len(first) + 2)
    assert cache.local is indexed
    fresh = cache_after(follow_up, (), config)
    strings = [list(s) for n in range(1, 4) for s in itertools.product([1, 2, 3, 4], repeat=n)]
    assert [cache.local.count(s) for s in strings] == [fresh.local.count(s) for s in strings]


def test_branches_are_the_other_match_lengths_drafts():
    """Context ``1 2 3 9 5 2 3 7 6 2 3 7 8 1 2 3``: the match ``1 2 3`` (seen once before,
    then 9 5 2) scores 3/2 and is the best draft; ``2 3`` (seen three times before: 9, 7, 7)
    drafts 7 first at 2/4 and is a branch; a 1-token match is never one."""
    cache = cache_after([1, 2, 3, 9, 5, 2, 3, 7, 6, 2, 3, 7, 8, 1, 2, 3])
    best, _ = cache.drafts()
    assert best.match_len == 3 and best.tokens == (9, 5, 2) and best.score == Fraction(3, 2)
    (branch,) = cache.branches(skip=best.match_len)
    assert branch.match_len == 2 and branch.tokens[0] == 7 and branch.denominator == 4
    assert [d.match_len for d in cache.branches(skip=0)] == [3, 2]
    # ``3`` occurs as often as ``2 3`` (4 times): one occurrence set, drafted once, at 2 tokens
    assert [d.match_len for d in cache.branches(skip=0, shortest=1)] == [3, 2]
    assert cache.branches(skip=best.match_len, shortest=3) == []


def test_branches_draft_each_occurrence_set_once():
    """Context ``1 2 3 4 5 6 7 8 0 | 1 2 3 4 5 6``: every match of 2 to 6 tokens is the one
    earlier occurrence, so they make one draft, at the length that can draft deepest (the
    longest with budget 6, or the one whose room under a window of 8 tokens is largest); with
    the best draft's match in that set, no branch at all. Two occurrence sets: one draft each."""
    context = [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6]
    cache = cache_after(context)
    (branch,) = cache.branches(skip=0)
    assert branch.match_len == 6 and branch.tokens == (7, 8, 0, 1, 2, 3)
    assert branch.also == (5, 4, 3, 2)
    assert cache.branches(skip=4) == []
    small = SuffixCache(SuffixConfig(max_depth=8))
    small.start_request(context)
    # room below a match of m tokens: 8 - m; budget m: m = 4 reaches 4 tokens, the most
    (branch,) = small.branches(skip=0)
    assert branch.match_len == 4 and branch.tokens == (7, 8, 0, 1) and branch.also == (6, 5, 3, 2)
    two = cache_after([5, 1, 2, 9, 3, 1, 2, 7, 5, 1, 2])  # ``5 1 2`` twice, ``1 2`` three times
    assert [d.match_len for d in two.branches(skip=0)] == [3, 2]


def every_match_in_turn(cache, tree, matches, max_depth=None):
    """The first of the best-scoring drafts over ``matches``, each drafted (no bounds)."""
    best = None
    for position in matches:
        match_len = tree.position_depth(position)
        if match_len > min(cache.config.max_depth, cache.context_length) - 1:
            continue
        draft = tree.speculate(position, cache.config.budget(match_len),
                               tree=cache.config.mode == "tree", max_depth=max_depth)
        if best is None or draft.beats(best):
            best = draft
    return best


@pytest.mark.parametrize("period, repeats, capacity, step_depth, most_drafted", [
    (23, 6, 33, None, 40),  # every match of 33 to 63 tokens has less room below it than budget
    (23, 6, 9, None, 45),   # matches of 57 to 63 tokens do
    (23, 6, 65, 9, 45),     # the step allows 9 tokens
    (70, 2, 65, None, 2),   # one earlier copy, longer than the window
    (5, 20, 33, None, 46),  # a short loop: shorter matches occur more often
])
def test_a_long_repeat_drafts_few_matches(monkeypatch, period, repeats, capacity, step_depth,
                                          most_drafted):
    """In a verbatim repeat every match of more than ``max_depth / 2`` tokens has less room
    below it in the tree than its budget: each tree's draft is the first of the best over
    every match length drafted in turn, but fewer are drafted (drafting every length that
    its budget and first token allow drafts 67, 49, 93, 33 and 69 here). With one earlier
    copy, the match with the most room is the only one drafted in each tree."""
    rng = __import__("random").Random(period * repeats)
    text = [rng.randrange(40) for _ in range(period)] * repeats
    config = SuffixConfig(draft_tree_capacity=capacity, max_depth=64)
    cache = cache_after([41, 42, 43] + text[:-7], text[-7:], config, earlier=[([44], text[:50])])
    answer_matches = list(reversed(cache._long)) + cache.answers.loci
    expected = (every_match_in_turn(cache, cache.local, cache.local.loci, step_depth),
                every_match_in_turn(cache, cache.answers, answer_matches, step_depth))
    drafted = []
    speculate = type(cache.local).speculate

    def counting(self, position, *args, **kwargs):
        drafted.append(self.position_depth(position))
        return speculate(self, position, *args, **kwargs)

    monkeypatch.setattr(type(cache.local), "speculate", counting)
    local, answers = cache.drafts(step_depth)
    for got, want in zip((local, answers), expected):
        assert (got.tokens, got.parents, got.counts, got.denominator, got.match_len) == (
            want.tokens, want.parents, want.counts, want.denominator, want.match_len)
    assert local.score > 1
    assert len(drafted) <= most_drafted, drafted


@settings(deadline=None, max_examples=80)
@given(period=st.lists(st.integers(0, 3), min_size=1, max_size=7), repeats=st.integers(1, 8),
       noise=st.lists(st.integers(0, 5), max_size=6), split=st.integers(0, 30),
       max_depth=st.integers(3, 24), capacity=st.integers(2, 30),
       alpha=st.sampled_from([0.5, 1.0, 2.0]), min_prob=st.sampled_from([0.0, 0.1, 0.4]),
       mode=st.sampled_from(MODES), step_depth=st.sampled_from([None, 2, 9]))
def test_deep_repeats_draft_as_every_match_in_turn(period, repeats, noise, split, max_depth,
                                                    capacity, alpha, min_prob, mode, step_depth):
    """Repeats deeper than the trees (where the longest matches lack room below them and the
    match with the most room is drafted first): each tree's draft equals drafting every
    match in turn, the first of the best scores."""
    text = noise + period * repeats
    config = SuffixConfig(draft_tree_capacity=capacity, max_depth=max_depth, max_spec_factor=alpha,
                          min_token_prob=min_prob, mode=mode)
    cut = min(split, len(text) - 1)
    cache = cache_after(text[:cut + 1], text[cut + 1:], config, earlier=[([9], period * 3 + noise)])
    local, answers = cache.drafts(step_depth)
    want_local = every_match_in_turn(cache, cache.local, cache.local.loci, step_depth)
    want_answers = every_match_in_turn(cache, cache.answers,
                                       list(reversed(cache._long)) + cache.answers.loci, step_depth)
    for got, want in ((local, want_local), (answers, want_answers)):
        if want is None or not want.tokens:
            assert not got.tokens
            continue
        assert (got.tokens, got.parents, got.counts, got.denominator, got.match_len) == (
            want.tokens, want.parents, want.counts, want.denominator, want.match_len)


def test_draft_tree_hangs_the_draft_under_the_root():
    earlier = [([0], [1, 2, 8, 8]), ([0], [1, 2, 8, 8])]
    draft = cache_after([1, 2, 3], [1, 2], earlier=earlier).speculate()
    tree = draft_tree(2, draft)
    assert tree.tokens == (2, 8, 8) and tree.parents == (-1, 0, 1) and tree.depths == (0, 1, 2)


# --------------------------------------------------------------------------- against brute force

def reference_scores(sequences, context, config, alphabet, max_depth):
    """{match length m: the score of its draft} over one tree holding ``sequences``, by brute
    force, for every m = 1, 2, ... whose suffix occurs: the sum of the ``budget(m)`` largest
    eligible continuation counts over count(suffix)."""
    scores = {}
    for m in range(1, min(config.max_depth, len(context))):
        s = context[-m:]
        total = brute_count(sequences, s)
        if not total:
            break
        budget = config.budget(m)
        limit = min(budget, max_depth)
        counts = sorted(
            (c for n in range(1, min(config.max_depth - m, limit) + 1)
             for p in itertools.product(range(alphabet), repeat=n)
             if (c := brute_count(sequences, s + list(p))) and c >= config.min_token_prob * total),
            reverse=True,
        )
        scores[m] = Fraction(sum(counts[:budget]), total)
    return scores


def reference(sequences, context, config, alphabet, max_depth):
    """(best score, its match length) of :func:`reference_scores`; ties to the longer match."""
    best = (Fraction(0), 0)
    for m, score in reference_scores(sequences, context, config, alphabet, max_depth).items():
        if score >= best[0]:
            best = (score, m)
    return best


def branch_lengths(context, scores, config, skip, max_depth):
    """The match lengths :meth:`SuffixCache.branches` drafts, by brute force: matches of 2 or
    more tokens grouped by their number of occurrences (one group per occurrence set), none
    from the group of ``skip``, else the one reaching deepest (budget, ``max_depth``, the
    window's room; the longer on ties) if its draft scores."""
    groups: dict[int, list[int]] = {}
    for m in sorted(scores, reverse=True):
        if m >= 2:
            groups.setdefault(brute_count([context], context[-m:]), []).append(m)

    def reach(m):
        return min(config.budget(m), max_depth, config.max_depth - m)

    lengths = []
    for members in groups.values():
        best = max(members, key=lambda m: (reach(m), m))
        if skip not in members and reach(best) > 0 and scores[best]:
            lengths.append(best)
    return sorted(lengths, reverse=True)


@settings(deadline=None, max_examples=60)
@given(requests=st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=7),
                                   st.lists(st.integers(0, 2), max_size=8)), min_size=1, max_size=3),
       capacity=st.integers(1, 6), max_depth=st.integers(2, 5),
       alpha=st.sampled_from([0.5, 1.0, 2.0]), offset=st.sampled_from([-1.0, 0.0, 1.0]),
       min_prob=st.sampled_from([0.0, 0.1, 0.4]), cached=st.sampled_from([0, 1, 2, 100]),
       step_depth=st.sampled_from([1, 3, 99]))
def test_speculate_matches_brute_force(requests, capacity, max_depth, alpha, offset, min_prob,
                                       cached, step_depth):
    config = SuffixConfig(draft_tree_capacity=capacity, max_depth=max_depth, max_spec_factor=alpha,
                          max_spec_offset=offset, min_token_prob=min_prob, max_cached_answers=cached)
    cache = SuffixCache(config)
    answers: list[list[int]] = []
    for prompt, output in requests:
        cache.start_request(prompt)
        answers.append([])
        context = list(prompt)
        for token in output:
            cache.append(token)
            context.append(token)
            answers[-1].append(token)
            draft = cache.speculate(step_depth)
            local = reference([context], context, config, 3, step_depth)
            kept = answers[-cached:] if cached else []
            remote = reference(kept, context, config, 3, step_depth) if kept else (Fraction(0), 0)
            expected = local if local[0] >= remote[0] else remote
            assert Fraction(sum(draft.counts), draft.denominator) == expected[0]
            if expected[0]:
                assert draft.match_len == expected[1]
            # each tree's own best, as the value tree takes them
            own, theirs = cache.drafts(step_depth)
            assert Fraction(sum(own.counts), own.denominator) == local[0]
            assert Fraction(sum(theirs.counts), theirs.denominator) == remote[0]
            # the per-request tree's other drafts: every other match of 2 or more tokens
            scores = reference_scores([context], context, config, 3, step_depth)
            branches = cache.branches(step_depth, skip=own.match_len)
            assert [d.match_len for d in branches] == branch_lengths(
                context, scores, config, own.match_len, step_depth)
            for d in branches:  # the other lengths with the same occurrences that can draft
                count = brute_count([context], context[-d.match_len:])
                assert sorted(d.also + (d.match_len,)) == sorted(
                    m for m in scores if m >= 2 and brute_count([context], context[-m:]) == count
                    and min(config.budget(m), step_depth, config.max_depth - m) > 0)
            assert all(Fraction(sum(d.counts), d.denominator) == scores[d.match_len]
                       for d in branches)


# --------------------------------------------------------------------------- in the decoding loop

@st.composite
def runs(draw):
    """Requests answered one after another by one drafter (the global tree carries the answers
    over), each with an optional follow-up turn that extends its conversation."""
    vocab = draw(st.integers(8, 30))
    alphabet = draw(st.integers(2, min(vocab, 6)))
    requests = []
    for _ in range(draw(st.integers(1, 3))):
        segment = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=8))
        noise = draw(st.lists(st.integers(0, vocab - 1), max_size=4))
        prompt = segment * draw(st.integers(1, 3)) + noise + segment[: draw(st.integers(0, 3))]
        follow_up = draw(st.lists(st.integers(0, vocab - 1), max_size=4))
        requests.append((prompt, follow_up if draw(st.booleans()) else None))
    return dict(
        vocab=vocab, seed=draw(st.integers(0, 2**16)), requests=requests,
        generation=GenerationConfig(
            max_new_tokens=draw(st.integers(1, 40)),
            eos_token_ids=tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=1))),
        ),
        config=SuffixConfig(
            draft_tree_capacity=draw(st.integers(1, 40)), mode=draw(st.sampled_from(MODES)),
            max_depth=draw(st.integers(1, 12)),
            max_spec_factor=draw(st.sampled_from([0.5, 1.0, 3.0])),
            max_spec_offset=draw(st.sampled_from([-1.0, 0.0, 2.0])),
            min_token_prob=draw(st.sampled_from([0.0, 0.1, 0.5])),
            max_cached_answers=draw(st.sampled_from([0, 1, 100_000])),
        ),
    )


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(run=runs())
def test_suffix_decoding_equals_vanilla(run):
    model = CopyLM(run["vocab"], seed=run["seed"])
    config, generation = run["config"], run["generation"]
    decoder = Decoder(model, SuffixDecodingDrafter(config))
    for prompt, follow_up in run["requests"]:
        decoder.reset()
        result = decoder.generate(prompt, generation)
        assert result.output_ids == reference_greedy(model, prompt, generation)
        check_invariants(result, generation, config.draft_tree_capacity)
        if follow_up is not None:
            prompt = prompt + result.output_ids + follow_up
            result = decoder.generate(prompt, generation)
            assert result.output_ids == reference_greedy(model, prompt, generation)
            check_invariants(result, generation, config.draft_tree_capacity)


def test_drafts_are_accepted_with_the_copying_target():
    """Not vacuous: CopyLM repeats its prompt's patterns, and the suffix trees predict them."""
    model = CopyLM(20, seed=1)
    prompt = [3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4]
    generation = GenerationConfig(max_new_tokens=30)
    result = Decoder(model, SuffixDecodingDrafter()).generate(prompt, generation)
    assert result.output_ids == reference_greedy(model, prompt, generation)
    assert result.mean_accepted_tokens > 2
