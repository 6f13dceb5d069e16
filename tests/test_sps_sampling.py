"""Draft-model speculative sampling keeps the target's output distribution exactly.

The exact test of tests/test_sampling.py, with draft models whose distributions are known: the
target is a Markov fake (tests/fakes.py), the drafts are Markov fakes with other tables. The
probability of every complete output (up to MAX_NEW tokens or EOS) under vanilla sampling is
computed exactly; the speculative sampler's outputs over fixed seeds must pass a chi-square
goodness-of-fit test at ALPHA. Covered: chains (speculative sampling, three length
schedules), several drafts of one model merged into a trie, two draft models, a draft
chain mixed with LogitSpec's retrieved chains, and a draft head (logitspec/draft_head.py) as the
draft: its own distributions (over a restricted draft vocabulary) drawn and verified by
min(1, p/q) with residual resampling. Negative controls: dropping the residual (resampling
from the target after a rejection), with a draft model and with the head, and recording merged
draws with their unrestricted distribution must all fail the same test.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import logitspec.draft_model as draft_model
import logitspec.sampling as sampling
from fakes import MarkovLM, markov_head
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.cost import CostCurve
from logitspec.gate import SourceGate
from logitspec.draft_length import DraftLengthConfig
from logitspec.draft_head import HeadSource
from logitspec.draft_model import CombinedDrafter, DraftChain, DraftModelConfig, DraftModelDrafter, merge_chains
from logitspec.drafters import LogitSpecConfig, LogitSpecDrafter, PoolConfig
from logitspec.tree import DraftTree
from test_sampling import SETTINGS, chi_square_pvalue, reference_probs

ALPHA = 1e-3
VOCAB = 5
EOS = 4
MAX_NEW = 4  # room for a fully accepted 2-token draft, then its bonus token
PROMPT = [0, 1, 2, 1, 0, 1]
NUM_SAMPLES = 1500


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The fakes run thousands of tiny ops; on a busy machine extra threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def markov_draft(seed: int, scale: float) -> MarkovLM:
    """A Markov fake with its own table, usable as a draft model."""
    model = MarkovLM(VOCAB, seed=seed, scale=scale)
    model.config.vocab_size = VOCAB
    return model


# the cost schedule's verification costs: a second token costs 5% more, a third 15% more, so
# the draft's distributions decide the length (predicted acceptances of .2 draft one token, of
# .6 two, of .9 three)
COSTS = CostCurve((1, 2, 3, 4), (1.0, 1.05, 1.2, 1.4))


def chain_drafter(schedule: str = "constant", k: int = 2, **length) -> DraftModelDrafter:
    """A Markov draft; under the cost schedule, every step drafts (no gate): the per-token
    rule alone decides the length."""
    config = DraftLengthConfig(schedule, num_draft_tokens=k, **length)
    curve = COSTS if schedule == "cost" else None
    return DraftModelDrafter(markov_draft(11, 1.0), DraftModelConfig(config, gate=False),
                             cost_curve=curve)


def logitspec_drafter() -> LogitSpecDrafter:
    return LogitSpecDrafter(
        LogitSpecConfig(pool=PoolConfig(2, 3), draft_tree_capacity=8, rank_lengths=((2, 3),))
    )


DRAFTERS = {
    "chain": lambda: chain_drafter(),
    "chain-heuristic": lambda: chain_drafter("heuristic", 1, bounds=(1, 3)),
    "chain-confidence": lambda: chain_drafter("confidence", stop_threshold=0.4, bounds=(1, 3)),
    "chain-cost": lambda: chain_drafter("cost", bounds=(1, 3)),
    "multi-draft": lambda: DraftModelDrafter(
        markov_draft(11, 1.0), DraftModelConfig(DraftLengthConfig(num_draft_tokens=2), num_drafts=3)
    ),
    "multi-draft-peaked": lambda: DraftModelDrafter(
        markov_draft(11, 3.0), DraftModelConfig(DraftLengthConfig(num_draft_tokens=1), num_drafts=4)
    ),
    "two-models": lambda: DraftModelDrafter(
        [markov_draft(11, 1.0), markov_draft(12, 2.0)],
        DraftModelConfig(DraftLengthConfig(num_draft_tokens=2), num_drafts=2),
    ),
    "mixed": lambda: CombinedDrafter(chain_drafter(), logitspec_drafter(), 8),
    "head-chain": lambda: head_drafter(),
    "head-confidence": lambda: head_drafter("confidence", stop_threshold=0.5, bounds=(1, 3)),
    "head-cost": lambda: head_drafter("cost", bounds=(1, 3)),
    "head-multi-draft": lambda: head_drafter(num_drafts=3),
    "head-mixed": lambda: CombinedDrafter(head_drafter(), logitspec_drafter(), 8),
}
CASES = [
    ("chain", "t1.0"),
    ("chain", "t0.7-topk3"),
    ("chain-heuristic", "t1.0-topk2-topp0.9"),
    ("chain-confidence", "t1.3-topp0.8"),
    ("chain-cost", "t0.7-topk3"),
    ("multi-draft", "t1.0"),
    ("multi-draft", "t0.7-topk3"),
    ("multi-draft-peaked", "t0.7-topk3"),
    ("two-models", "t1.3-topp0.8"),
    ("mixed", "t1.0"),
    ("mixed", "t1.0-topk2-topp0.9"),
    ("head-chain", "t1.0"),  # the head's drafters, each at one of the settings above
    ("head-confidence", "t1.3-topp0.8"),
    ("head-cost", "t1.0"),
    ("head-multi-draft", "t0.7-topk3"),
    ("head-mixed", "t1.0-topk2-topp0.9"),
]


TARGET = MarkovLM(VOCAB, seed=3, scale=1.5)


def head_drafter(schedule: str = "constant", num_drafts: int = 1, **length) -> DraftModelDrafter:
    """The target's random draft head as the draft; it never proposes token 3 (outside its
    draft vocabulary: probability 0). Under the cost schedule the gate decides which steps
    draft, by measured speed, and at least every other step does (``explore=2``, with a
    regret that never spaces the tries further), so that steps of both kinds, and the head's
    catching up, are in every sample."""
    head = markov_head(TARGET, seed=5, draft_vocab=(0, 1, 2, 4))
    config = DraftLengthConfig(schedule, num_draft_tokens=2, **length)
    curve = COSTS if schedule == "cost" else None
    drafter = DraftModelDrafter(HeadSource(head), DraftModelConfig(config, num_drafts=num_drafts),
                                cost_curve=curve)
    if schedule == "cost":
        drafter.gate = SourceGate(explore=2, warmup=1, regret=0.99)
    return drafter


@pytest.fixture(scope="module")
def target() -> MarkovLM:
    return TARGET


def exact_distribution(model: MarkovLM, settings: dict) -> dict[tuple[int, ...], float]:
    """P(output) under vanilla sampling for every complete output."""
    table = model.table.numpy()
    out: dict[tuple[int, ...], float] = {}
    stack = [(list(PROMPT), (), 1.0)]
    while stack:
        context, output, prob = stack.pop()
        if output and (output[-1] == EOS or len(output) == MAX_NEW):
            out[output] = out.get(output, 0.0) + prob
            continue
        probs = reference_probs(table[(context[-2] + 1) * VOCAB + context[-1]], **settings)
        stack += [(context + [t], output + (t,), prob * probs[t]) for t in range(VOCAB) if probs[t] > 0]
    return out


def sample(decoder: Decoder, settings: dict, n: int = NUM_SAMPLES) -> tuple[Counter, list[int]]:
    counts: Counter = Counter()
    accept_lengths: list[int] = []
    for seed in range(n):
        decoder.reset()
        config = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(EOS,), seed=seed, **settings)
        result = decoder.generate(PROMPT, config)
        counts[tuple(result.output_ids)] += 1
        accept_lengths += result.accept_lengths
    return counts, accept_lengths


def pvalue(target: MarkovLM, drafter, setting: str) -> tuple[float, list[int]]:
    settings = SETTINGS[setting]
    counts, lengths = sample(Decoder(target, drafter), settings)
    return chi_square_pvalue(counts, exact_distribution(target, settings), NUM_SAMPLES), lengths


@pytest.mark.parametrize("drafter,setting", CASES, ids=[f"{d}-{s}" for d, s in CASES])
def test_draft_model_sampling_matches_exact_distribution(target, drafter, setting):
    draft = DRAFTERS[drafter]()
    p, lengths = pvalue(target, draft, setting)
    assert p > ALPHA, f"p = {p:.2e}: output distribution differs from vanilla sampling"
    least = 1.15 if drafter == "head-cost" else 1.3  # the gate drafts in about half its steps
    assert sum(lengths) / len(lengths) > least, "drafts were hardly accepted: the test is weak"
    if getattr(draft, "gate", None) is not None:
        assert 0.4 < draft.gate.share() < 0.6


def test_negative_control_no_residual_is_detected(target, monkeypatch):
    """Resampling from the target after a rejection (instead of the residual) is biased."""
    monkeypatch.setattr(sampling, "residual", lambda p, q, token: p)
    p, _ = pvalue(target, DRAFTERS["chain"](), "t1.0")
    assert p < ALPHA, f"p = {p:.2e}: the test failed to detect a biased sampler"


def test_negative_control_no_residual_with_the_head_is_detected(target, monkeypatch):
    monkeypatch.setattr(sampling, "residual", lambda p, q, token: p)
    p, _ = pvalue(target, DRAFTERS["head-chain"](), "t1.0")
    assert p < ALPHA, f"p = {p:.2e}: the test failed to detect a biased sampler"


def test_negative_control_a_length_decided_after_the_draw_is_detected(target, monkeypatch):
    """The cost schedule decides before each draw. Deciding after it (here: a first token is
    kept only if it is the draft's most likely one, else the step drafts nothing) picks the
    draws that are kept, and is biased."""
    extend = draft_model.DraftModelDrafter._extend_chain

    def keep_only_likely(self, trie, chain, rank, depth):
        probs = trie.dist[chain.node]
        extend(self, trie, chain, rank, depth)
        if depth == 1 and chain.tokens and chain.tokens[0] != int(probs.argmax()):
            chain.tokens.clear()
            chain.rows.clear()
            chain.active = False

    monkeypatch.setattr(draft_model.DraftModelDrafter, "_extend_chain", keep_only_likely)
    p, _ = pvalue(target, DRAFTERS["chain-cost"](), "t1.0")
    assert p < ALPHA, f"p = {p:.2e}: the test failed to detect a biased sampler"


def test_head_drafts_only_its_vocabulary(target):
    drafter = head_drafter(num_drafts=3)
    drafted: set[int] = set()
    propose = drafter.propose
    drafter.propose = lambda *args: [drafted.update(c.tokens) or c for c in propose(*args)]
    config = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3)
    Decoder(target, drafter).generate(PROMPT, config)
    assert drafted == {0, 1, 2, 4}


def test_negative_control_unrestricted_rows_for_merged_draws_are_detected(target, monkeypatch):
    """Recording a new sibling with the draft's full distribution (ignoring that draws equal
    to earlier siblings joined them) is biased."""
    monkeypatch.setattr(draft_model, "_new_child_row",
                        lambda chain, i, siblings: chain.probs[i].float())
    p, _ = pvalue(target, DRAFTERS["multi-draft-peaked"](), "t0.7-topk3")
    assert p < ALPHA, f"p = {p:.2e}: the test failed to detect a biased sampler"


def test_draft_equal_to_target_is_always_accepted(target):
    drafter = DraftModelDrafter(markov_draft(3, 1.5), DraftModelConfig(DraftLengthConfig(num_draft_tokens=2)))
    config = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=4, seed=5)
    result = Decoder(target, drafter).generate(PROMPT, config)
    assert result.accept_lengths[:-1] == [3] * (len(result.accept_lengths) - 1)


@pytest.mark.parametrize("drafter", ["chain", "multi-draft", "mixed"])
def test_same_seed_same_output(target, drafter):
    config = GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    first = Decoder(target, DRAFTERS[drafter]()).generate(PROMPT, config).output_ids
    assert Decoder(target, DRAFTERS[drafter]()).generate(PROMPT, config).output_ids == first


def test_merge_rows_are_restricted_to_new_siblings():
    """Node rows: the drawing chain's row with the parent's earlier children zeroed."""
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    chains = [DraftChain((1, 2), q), DraftChain((1, 3), q), DraftChain((2,), q[:1]), DraftChain((3, 0))]
    tree = merge_chains(9, chains, capacity=8, with_probs=True)
    assert tree.tokens == (9, 1, 2, 3, 2, 3, 0)
    assert tree.parents == (-1, 0, 1, 1, 0, 0, 5)
    rows = tree.draft_probs
    torch.testing.assert_close(rows[1], q[0])
    torch.testing.assert_close(rows[2], q[1])
    torch.testing.assert_close(rows[3], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))  # 2 taken
    torch.testing.assert_close(rows[4], torch.tensor([0.125, 0.0, 0.375, 0.5]))  # 1 taken
    assert rows[5].abs().sum() == 0 and rows[6].abs().sum() == 0  # deterministic: point masses


def test_merge_respects_capacity_and_depth():
    chains = [DraftChain((1, 2, 3)), DraftChain((4, 5))]
    tree = merge_chains(0, chains, capacity=4, max_depth=2)
    assert tree.tokens == (0, 1, 2, 4) and tree.depths == (0, 1, 2, 1)
    assert tree.draft_probs is None


def test_rejection_walk_point_masses_only_follows_target(target):
    """A tree of point masses (zero rows) accepts a child with the target's probability:
    the first token's frequencies match p."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0]] * 3)
    probs = torch.softmax(logits[0], -1)
    tree = DraftTree((0, 2, 1), (-1, 0, 0), (0, 1, 1), torch.zeros(3, VOCAB))
    verifier = sampling.SamplingVerifier(1.0, seed=0)
    counts = Counter()
    n = 4000
    for _ in range(n):
        path, bonus = verifier.accept(tree, sampling.SampledOutputs(logits, np.arange(3)))
        counts[tree.tokens[path[1]] if len(path) > 1 else bonus] += 1
    expected = {t: float(probs[t]) for t in range(VOCAB)}
    observed = Counter({(t,): c for t, c in counts.items()})
    assert chi_square_pvalue(observed, {(t,): p for t, p in expected.items()}, n) > ALPHA
