"""Speculative sampling keeps the target's output distribution exactly.

The exact test: a fake second-order Markov target (tests/fakes.py) with known conditionals;
the probability of every complete short output is computed exactly for vanilla sampling (an
independent numpy implementation of temperature / top-k / top-p); the speculative sampler's
empirical distribution over a fixed set of seeds must pass a chi-square goodness-of-fit test at
ALPHA. Deterministic: fixed seeds, fixed model. A deliberately wrong acceptance rule (greedy
matching of drafts with a sampled bonus token) must fail the same test (negative control).
Covered: retrieval drafters, the command-line default (the value tree with recycled chains,
suffix trees and a cost-sized budget, here with match lengths too; its drafts, the suffix
trees' among them, must be accepted), the value tree's successor options (successor trees,
successors below every other node, the prompt's logits) and a draft head's tree
beside retrieval, whose deterministic candidates are verified by the same walk.
"""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np
import pytest
import torch

from fakes import MarkovLM, markov_head
from logitspec.acceptance import greedy_accept
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.cost import CostCurve
from logitspec.drafters import (
    LogitSpecConfig, LogitSpecDrafter, PoolConfig, PromptLookupDrafter, ValueTreeDrafter,
)
from logitspec.eagle import EagleConfig, EagleDrafter
from logitspec.racer import RacerConfig, RacerDrafter
from logitspec.recycling import RecyclingConfig, SuccessorTable
from logitspec.sam import SamConfig, SamDrafter
from logitspec.suffix_automaton import CorpusAutomaton
from logitspec.rest import Datastore, RestConfig, RestDrafter
from logitspec.lookahead import LookaheadConfig, LookaheadDrafter
from logitspec.sampling import SamplingVerifier, sampling_probs
from logitspec.suffix_decoding import SuffixConfig, SuffixDecodingDrafter
from logitspec.tree import build_tree

ALPHA = 1e-3
VOCAB = 5
EOS = 4
MAX_NEW = 3
PROMPT = [0, 1, 2, 1, 0, 1]
NUM_SAMPLES = 2000


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent of logitspec.sampling: plain numpy, explicit loops."""
    scores = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(scores)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        keep, mass = [], 0.0
        for token in np.argsort(-probs, kind="stable"):
            if mass >= top_p:
                break
            keep.append(token)
            mass += probs[token]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return probs


def exact_distribution(model: MarkovLM, settings: dict, prompt: list[int] = PROMPT,
                       max_new: int = MAX_NEW) -> dict[tuple[int, ...], float]:
    """P(output) under vanilla sampling, for every complete output (EOS or max_new long)."""
    table = model.table.numpy()
    out: dict[tuple[int, ...], float] = {}

    def walk(context: list[int], output: tuple[int, ...], prob: float) -> None:
        if output and (output[-1] == EOS or len(output) == max_new):
            out[output] = out.get(output, 0.0) + prob
            return
        row = table[(context[-2] + 1) * VOCAB + context[-1]]
        probs = reference_probs(row, **settings)
        for token in range(VOCAB):
            if probs[token] > 0:
                walk(context + [token], output + (token,), prob * probs[token])

    walk(list(prompt), (), 1.0)
    return out


@cache
def sampled_datastore() -> Datastore:
    """A REST datastore of 20 texts of 32 tokens sampled from the fake target (temperature 1):
    its own patterns, so that retrieved drafts are often accepted."""
    table = MarkovLM(VOCAB, seed=3, scale=1.5).table.numpy()
    rng = np.random.default_rng(1)
    texts = []
    for _ in range(20):
        text = [0, 1]
        while len(text) < 32:
            probs = reference_probs(table[(text[-2] + 1) * VOCAB + text[-1]], 1.0, 0, 1.0)
            text.append(int(rng.choice(VOCAB, p=probs)))
        texts.append(text)
    return Datastore.from_entries(texts)


class FullTreeDrafter:
    """Every token under the root, and every token under each of those: 1 + V + V^2 nodes."""

    name = "full-tree"
    tree_capacity = 1 + VOCAB + VOCAB**2
    top_k = 0
    needs_hidden = False

    def configure(self, config) -> None:
        pass

    def begin(self, context, reused, hidden=None) -> None:
        pass

    def observe(self, tree, out) -> None:
        pass

    def extend(self, tokens, tree, path) -> None:
        pass

    def draft(self, root, root_topk, max_depth):
        chains = [[a, b] for a in range(VOCAB) for b in range(VOCAB)]
        return build_tree(root, chains, self.tree_capacity, max_depth=max_depth)


class GreedyMatchVerifier(SamplingVerifier):
    """WRONG on purpose: accepts drafts by greedy matching, samples only the bonus token."""

    def accept(self, tree, out):
        path = greedy_accept(tree.tokens, tree.parents, out.logits.argmax(dim=-1).tolist())
        return path, self.token(out, path[-1])


class WrongDecoder(Decoder):
    def _verifier(self, config):
        return GreedyMatchVerifier(config.temperature, config.top_k, config.top_p, seed=config.seed,
                                   device=self.model.device)


def chi_square_pvalue(counts: Counter, expected: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson chi-square p-value; outcomes expected fewer than 5 times are pooled."""
    unexpected = set(counts) - set(expected)
    assert not unexpected, f"outputs impossible under vanilla sampling: {unexpected}"
    bins_obs, bins_exp, pool_obs, pool_exp = [], [], 0, 0.0
    for outcome, prob in expected.items():
        if prob * n >= 5:
            bins_obs.append(counts[outcome])
            bins_exp.append(prob * n)
        else:
            pool_obs += counts[outcome]
            pool_exp += prob * n
    if pool_exp > 0:
        bins_obs.append(pool_obs)
        bins_exp.append(pool_exp)
    obs, exp = np.array(bins_obs, dtype=float), np.array(bins_exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def sample_outputs(decoder: Decoder, settings: dict, n: int = NUM_SAMPLES,
                   prompt: list[int] = PROMPT, max_new: int = MAX_NEW) -> Counter:
    counts: Counter = Counter()
    for seed in range(n):
        decoder.reset()
        config = GenerationConfig(max_new_tokens=max_new, eos_token_ids=(EOS,), seed=seed, **settings)
        counts[tuple(decoder.generate(prompt, config).output_ids)] += 1
    return counts


SETTINGS = {
    "t1.0": dict(temperature=1.0, top_k=0, top_p=1.0),
    "t0.7-topk3": dict(temperature=0.7, top_k=3, top_p=1.0),
    "t1.3-topp0.8": dict(temperature=1.3, top_k=0, top_p=0.8),
    "t1.0-topk2-topp0.9": dict(temperature=1.0, top_k=2, top_p=0.9),
}
DRAFTERS = {
    "vanilla": lambda: None,
    "full-tree": FullTreeDrafter,
    "pld": lambda: PromptLookupDrafter(PoolConfig(2, 3), 4),
    "logitspec": lambda: LogitSpecDrafter(
        LogitSpecConfig(pool=PoolConfig(2, 3), draft_tree_capacity=8, rank_lengths=((2, 3),))
    ),
    # the command-line default at this scale (value tree, three continuations per n-gram,
    # recycled chains, suffix trees, a budget sized by a flat cost curve), with match lengths
    "logitspec-default": lambda: ValueTreeDrafter(
        LogitSpecConfig(pool=PoolConfig(2, 3, 3), draft_tree_capacity=None, tree_policy="value",
                        max_auto_capacity=8, recycle_chains=3, recycle_depth=2, match_lengths=True,
                        suffix_trees=True, suffix_tokens=4, suffix_branches=True),
        CostCurve((1, 8), (1.0, 1.0)), SuccessorTable(VOCAB, 3)),
    # the options that grow the successor table's share of a fixed tree: successor trees of
    # breadth 2, two successors below every other node, the prompt's logits (MarkovLM's LM
    # head is the identity)
    "logitspec-successors": lambda: ValueTreeDrafter(
        LogitSpecConfig(pool=PoolConfig(2, 3, 3), draft_tree_capacity=8, tree_policy="value",
                        recycle_chains=3, recycle_depth=3, recycle_breadth=2,
                        successor_children=2, suffix_trees=True, suffix_tokens=4),
        None, SuccessorTable(VOCAB, 3), prompt_head=lambda hidden: hidden),
    "eagle": lambda: EagleDrafter(
        markov_head(MarkovLM(VOCAB), seed=2),
        EagleConfig(LogitSpecConfig(pool=PoolConfig(2, 3), draft_tree_capacity=8, tree_policy="value"),
                    top_k=3, expand=2, depth=2),
    ),
    # the automatic budget's gate: steps with and without the head by measured speed
    "eagle-gated": lambda: EagleDrafter(
        markov_head(MarkovLM(VOCAB), seed=2),
        EagleConfig(LogitSpecConfig(pool=PoolConfig(2, 3), draft_tree_capacity=None,
                                    max_auto_capacity=8, tree_policy="value"),
                    top_k=3, expand=2, depth=2),
        CostCurve((1, 8), (1.0, 1.0)),
    ),
    # windows of 3 and a 12-node automaton: retrieval and eviction within these short outputs;
    # the prompt's logits copied through MarkovLM's LM head (the identity)
    "racer": lambda: RacerDrafter(RacerConfig(8, ngram=3, max_nodes=12, max_breadth=3),
                                  head=lambda hidden: hidden),
    # SAMD[T] with short matches counted: context and corpus chains, recycled trees otherwise
    "sam": lambda: SamDrafter(SamConfig(draft_size=4, threshold=2, static_bias=1,
                                        recycling=RecyclingConfig(6)),
                              CorpusAutomaton([[2, 1, 0, 1, 0, 4], [2, 2, 1, 0]])),
    # one drafter for all samples: its global tree learns the earlier samples' outputs
    "suffix": lambda: SuffixDecodingDrafter(SuffixConfig(draft_tree_capacity=8)),
    "rest": lambda: RestDrafter([sampled_datastore()], RestConfig(draft_tree_capacity=8, min_span=1)),
    "lookahead": lambda: LookaheadDrafter(LookaheadConfig(level=3, window=3, guess=3)),
}
# SuffixDecoding drafts what the context repeats: its cases run after a prompt sampled from the
# fake target itself (temperature 1), whose patterns the target follows
PROMPTS = {
    "suffix": [0, 1, 0, 2, 0, 0, 1, 0, 4, 4, 3, 3, 1, 0, 4, 1, 0, 2, 3, 2, 3, 2],
}
# Lookahead's window fills in its first step and its pool in its second: its drafts are verified
# from the third token on, so its outputs are longer.
MAX_NEW_OF = {"lookahead": 5}
CASES = [
    ("vanilla", "t1.0"),
    ("full-tree", "t1.0"),
    ("full-tree", "t0.7-topk3"),
    ("full-tree", "t1.3-topp0.8"),
    ("full-tree", "t1.0-topk2-topp0.9"),
    ("logitspec", "t0.7-topk3"),
    ("logitspec", "t1.0"),
    ("pld", "t1.3-topp0.8"),
    ("logitspec-default", "t1.0"),
    ("logitspec-default", "t0.7-topk3"),
    ("logitspec-successors", "t1.0"),
    ("eagle", "t1.0"),
    ("eagle-gated", "t0.7-topk3"),
    ("racer", "t1.0"),
    ("racer", "t0.7-topk3"),
    ("sam", "t1.0"),
    ("sam", "t0.7-topk3"),
    ("suffix", "t1.0"),
    ("suffix", "t0.7-topk3"),
    ("rest", "t1.0"),
    ("rest", "t1.3-topp0.8"),
    ("lookahead", "t1.0"),
    ("lookahead", "t0.7-topk3"),
]


@pytest.fixture(scope="module")
def model() -> MarkovLM:
    return MarkovLM(VOCAB, seed=3, scale=1.5)


@pytest.mark.parametrize("drafter,setting", CASES, ids=[f"{d}-{s}" for d, s in CASES])
def test_speculative_sampling_matches_exact_distribution(model, drafter, setting):
    settings, prompt = SETTINGS[setting], PROMPTS.get(drafter, PROMPT)
    max_new = MAX_NEW_OF.get(drafter, MAX_NEW)
    decoder = Decoder(model, DRAFTERS[drafter]())
    counts = sample_outputs(decoder, settings, prompt=prompt, max_new=max_new)
    expected = exact_distribution(model, settings, prompt, max_new)
    pvalue = chi_square_pvalue(counts, expected, NUM_SAMPLES)
    assert pvalue > ALPHA, f"p = {pvalue:.2e}: output distribution differs from vanilla sampling"
    if drafter == "logitspec-default":  # not vacuous: the value tree's drafts were accepted,
        counts = decoder.drafter.stats.counts  # the suffix trees' among them
        assert sum(success for success, _ in counts.values()) > 0
        assert sum(success for feature, (success, _) in counts.items() if feature[0] == "suf") > 0
    if drafter == "logitspec-successors":  # successors below other nodes were accepted
        counts = decoder.drafter.stats.counts
        assert sum(success for feature, (success, _) in counts.items() if feature[0] == "succ") > 0


@pytest.mark.parametrize("drafter", ["full-tree", "logitspec", "logitspec-successors", "racer",
                                     "sam", "suffix", "rest", "lookahead", "eagle"])
def test_negative_control_wrong_acceptance_rule_is_detected(model, drafter):
    settings, prompt = SETTINGS["t1.0"], PROMPTS.get(drafter, PROMPT)
    max_new = MAX_NEW_OF.get(drafter, MAX_NEW)
    counts = sample_outputs(WrongDecoder(model, DRAFTERS[drafter]()), settings, prompt=prompt,
                            max_new=max_new)
    pvalue = chi_square_pvalue(counts, exact_distribution(model, settings, prompt, max_new),
                               NUM_SAMPLES)
    assert pvalue < ALPHA, f"p = {pvalue:.2e}: the test failed to detect a biased sampler"


@pytest.mark.parametrize("drafter", ["full-tree", "racer"])
def test_drafts_are_accepted_while_sampling(model, drafter):
    """The exact test is only meaningful if trees actually get accepted beyond the root."""
    decoder = Decoder(model, DRAFTERS[drafter]())
    config = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(EOS,), temperature=1.0)
    lengths = []
    for seed in range(50):
        decoder.reset()
        lengths += decoder.generate(PROMPT, GenerationConfig(**{**config.__dict__, "seed": seed})).accept_lengths
    assert max(lengths) == MAX_NEW and sum(lengths) / len(lengths) > 1.5


def test_sam_drafts_from_every_source_while_sampling(model):
    drafter = DRAFTERS["sam"]()
    decoder = Decoder(model, drafter)
    for seed in range(100):
        decoder.reset()
        config = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(EOS,), temperature=1.0,
                                  seed=seed)
        decoder.generate(PROMPT, config)
    stats = drafter.source_stats  # the context's chains are drafted, the corpus's and recycled ones taken
    accepted = {source: stats.tokens[source] - stats.steps[source] for source in stats.steps}
    assert set(accepted) == {"dynamic", "static", "recycling"}, accepted
    assert accepted["static"] > 20 and accepted["recycling"] > 5, accepted


def test_suffix_drafts_are_accepted_while_sampling(model):
    """SuffixDecoding's cases are not vacuous: its drafts (from the prompt and the earlier
    samples) are accepted on a fair share of the steps (measured: 24%)."""
    decoder = Decoder(model, DRAFTERS["suffix"]())
    lengths = []
    for seed in range(200):
        decoder.reset()
        config = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(EOS,), temperature=1.0,
                                  seed=seed)
        lengths += decoder.generate(PROMPTS["suffix"], config).accept_lengths
    assert max(lengths) == MAX_NEW and sum(length > 1 for length in lengths) > len(lengths) / 8


def test_rest_drafts_are_accepted_while_sampling(model):
    """REST's cases are not vacuous (measured: half the steps accept a draft)."""
    decoder = Decoder(model, DRAFTERS["rest"]())
    lengths = []
    for seed in range(200):
        decoder.reset()
        config = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(EOS,), temperature=1.0,
                                  seed=seed)
        lengths += decoder.generate(PROMPT, config).accept_lengths
    assert max(lengths) == MAX_NEW and sum(length > 1 for length in lengths) > len(lengths) / 3


def test_lookahead_drafts_are_accepted_while_sampling(model):
    """Lookahead's exact test is meaningful only if its n-grams get accepted (measured: 276
    drafts over the 2000 seeds of the exact test at temperature 1, 27 over these 200)."""
    decoder, accepted = Decoder(model, DRAFTERS["lookahead"]()), 0
    for seed in range(200):
        decoder.reset()
        config = GenerationConfig(max_new_tokens=MAX_NEW_OF["lookahead"], eos_token_ids=(EOS,),
                                  temperature=1.0, seed=seed)
        result = decoder.generate(PROMPT, config)
        accepted += result.new_tokens - result.decoding_steps
    assert accepted >= 10


@pytest.mark.parametrize("drafter", ["vanilla", "logitspec"])
def test_same_seed_same_output(model, drafter):
    outputs = []
    for _ in range(2):
        decoder = Decoder(model, DRAFTERS[drafter]())
        config = GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
        outputs.append(decoder.generate(PROMPT, config).output_ids)
    assert outputs[0] == outputs[1]
    other = Decoder(model, DRAFTERS[drafter]()).generate(
        PROMPT, GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=99)
    )
    assert other.output_ids != outputs[0]


def test_temperature_zero_is_the_greedy_chain(model):
    result = Decoder(model, DRAFTERS["logitspec"]()).generate(
        PROMPT, GenerationConfig(max_new_tokens=10, temperature=0.0, top_k=2, seed=5)
    )
    context = list(PROMPT)
    for _ in range(10):
        context.append(int(model.logits_for(context[-2], context[-1]).argmax()))
    assert result.output_ids == context[len(PROMPT):]


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.5), (0.8, 10, 0.9), (1.0, 1, 1.0),
     (1.0, 0, 1e-6), (1.0, 64, 1.0)],
)
def test_sampling_probs_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(top_k + 7))
    probs = sampling_probs(logits, temperature, top_k, top_p)
    for row in range(2):
        expected = reference_probs(logits[row].numpy(), temperature, top_k, top_p)
        np.testing.assert_allclose(probs[row].numpy(), expected, atol=1e-6)


def test_top_k_keeps_ties_and_top_p_keeps_the_crossing_token():
    probs = sampling_probs(torch.tensor([2.0, 2.0, 1.0, 0.0]), 1.0, top_k=1)
    assert probs[0] == probs[1] == pytest.approx(0.5) and probs[2] == probs[3] == 0
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    kept = sampling_probs(logits, 1.0, top_p=0.6)  # 0.5 < 0.6: the 0.3 token crosses, kept
    np.testing.assert_allclose(kept.numpy(), [0.625, 0.375, 0.0], atol=1e-6)


def test_sampling_rejects_zero_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SamplingVerifier(0.0)


@pytest.mark.parametrize("drafter", ["full-tree", "pld", "logitspec", "logitspec-default", "racer",
                                     "sam", "suffix", "rest", "lookahead", "eagle"])
def test_same_seed_reproduces_vanilla_sampling_token_for_token(model, drafter):
    """The walk draws once per emitted token, in order, from the same generator stream as
    vanilla sampling: with exact logits, the outputs are identical, not just equally
    distributed."""
    prompt = PROMPTS.get(drafter, PROMPT)
    for seed in range(100):
        config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        vanilla = Decoder(model, None).generate(prompt, config).output_ids
        assert Decoder(model, DRAFTERS[drafter]()).generate(prompt, config).output_ids == vanilla


class EagerDecoder(Decoder):
    """Draws every node's token in ``read`` (as on a GPU) instead of on the walk."""

    def _verifier(self, config):
        return SamplingVerifier(config.temperature, config.top_k, config.top_p, seed=config.seed,
                                eager=True)


@pytest.mark.parametrize("drafter", ["vanilla", "full-tree", "pld", "logitspec"])
def test_eager_draws_equal_lazy_draws(model, drafter):
    """Noise keyed by position: drawing all nodes at once or one walked node at a time gives
    the same tokens, seed for seed."""
    for seed in range(30):
        config = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=3, seed=seed)
        lazy = Decoder(model, DRAFTERS[drafter]()).generate(PROMPT, config).output_ids
        assert EagerDecoder(model, DRAFTERS[drafter]()).generate(PROMPT, config).output_ids == lazy


def test_gumbel_draws_follow_the_processed_distribution():
    """One row, 4000 positions: the draw frequencies pass the chi-square test against
    sampling_probs, and the draw at a position is reproducible."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    verifier = SamplingVerifier(1.3, top_p=0.9, seed=5)
    n = 4000
    counts = Counter((verifier.draw(logits, position),) for position in range(n))
    probs = sampling_probs(logits, 1.3, top_p=0.9)
    expected = {(t,): float(probs[t]) for t in range(5) if probs[t] > 0}
    assert chi_square_pvalue(counts, expected, n) > ALPHA
    assert [verifier.draw(logits, 17) for _ in range(3)] == [verifier.draw(logits, 17)] * 3
