"""The draft head (logitspec/draft_head.py) and its place in the value tree (logitspec/eagle.py):
the head's cache against recomputation, files and target identity, greedy losslessness of the
hybrid, the head alone and the head as an SpS draft on tiny random Llamas, and the head's tree
policy (top-k, expansion, depth, minimum value, calibrated values)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logitspec.decoding import Decoder, GenerationConfig
from logitspec.draft_head import (
    DraftHead, DraftHeadConfig, DraftHeadError, HeadSource, HeadState, default_head_path,
    head_dtype, load_draft_head, save_draft_head, target_key,
)
from logitspec.draft_length import DraftLengthConfig
from logitspec.draft_model import CombinedDrafter, DraftModelConfig, DraftModelDrafter
from logitspec.drafters import LogitSpecConfig, LogitSpecDrafter, PoolConfig
from logitspec.eagle import PROB_BUCKETS, EagleConfig, EagleDrafter, head_prior
from logitspec.loading import load_model
from logitspec.recycling import SuccessorTable
from logitspec.cost import CostCurve

PROMPTS = [list(range(5, 25)) * 2 + [7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
MAX_NEW = 40


def random_head(model, seed: int = 0, vocab=None) -> DraftHead:
    """A head with seeded random weights over ``vocab`` (default: every other token id)."""
    torch.manual_seed(seed)
    ids = range(0, model.config.vocab_size, 2) if vocab is None else vocab
    head = DraftHead(DraftHeadConfig.for_target(model.config, ids))
    return head.attach(model).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def target(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def head(target):
    return random_head(target)


def vanilla(model, prompt, max_new=MAX_NEW):
    return Decoder(model).generate(prompt, GenerationConfig(max_new_tokens=max_new)).output_ids


# ----------------------------------------------------------------------------- the head's cache


def fresh_outputs(head, features, tokens):
    """Outputs of pairs (features[i], tokens[i]) at positions 0.. in one causal pass."""
    cache = head.new_cache(len(tokens))
    return head(features, torch.tensor(tokens), torch.arange(len(tokens)), cache)


def test_tree_expansion_equals_recomputing_each_path(target, head):
    """A drafted pair sees the exact pairs, its ancestors and itself: its output equals a
    fresh causal pass over the context's pairs followed by its path's pairs."""
    torch.manual_seed(1)
    context = [5, 9, 13, 2, 7, 11]
    hidden = torch.randn(len(context), target.config.hidden_size)
    state = HeadState(head)
    state.reserve(32)
    state.begin(context, 0, hidden)
    root = 4
    root_out = state.advance(context, root)
    exact = fresh_outputs(head, hidden, context[1:] + [root])
    torch.testing.assert_close(root_out, exact[-1:], atol=1e-5, rtol=1e-5)
    # depth 1: tokens 20 and 30 under the root; depth 2: 40 under 30, 50 under 20
    first, slots1 = state.expand([-1, -1], root_out.repeat(2, 1), [20, 30])
    second, _ = state.expand([slots1[1], slots1[0]], first[[1, 0]], [40, 50])
    for out, path_inputs, path_tokens in (
        (first[0], [root_out[0]], [20]), (first[1], [root_out[0]], [30]),
        (second[0], [root_out[0], first[1]], [30, 40]), (second[1], [root_out[0], first[0]], [20, 50]),
    ):
        features = torch.cat((hidden, torch.stack(path_inputs)))
        expected = fresh_outputs(head, features, context[1:] + [root] + path_tokens)[-1]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_begin_with_a_reused_prefix_equals_a_fresh_state(target, head):
    torch.manual_seed(2)
    hidden = torch.randn(12, target.config.hidden_size)
    first = [3, 4, 5, 6, 7, 8, 9, 10]
    second = first[:5] + [20, 21, 22, 23, 24, 25, 26]
    state = HeadState(head)
    state.reserve(16)
    state.begin(first, 0, hidden[:8])
    state.advance(first, 1)
    state.begin(second, 5, hidden[5:12])  # the decoder recomputed features from token 5 on
    reused = state.advance(second, 2)
    fresh = HeadState(head)
    fresh.reserve(16)
    fresh.begin(second, 0, torch.cat((hidden[:5], hidden[5:12])))
    torch.testing.assert_close(reused, fresh.advance(second, 2), atol=1e-5, rtol=1e-5)
    assert state.pairs == fresh.pairs == len(second)


def test_state_refuses_missing_features(target, head):
    state = HeadState(head)
    state.reserve(8)
    with pytest.raises(ValueError, match="hidden states"):
        state.begin([1, 2, 3], 0, None)
    state.begin([1, 2, 3], 0, torch.zeros(3, target.config.hidden_size))
    with pytest.raises(ValueError, match="knows 3 features of 4 tokens"):
        state.advance([1, 2, 3, 4], 5)


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip_and_target_checks(target, head, tiny_hf, tmp_path):
    path = save_draft_head(head, tmp_path / "h.safetensors",
                           {"target": {"key": target_key(target, "tiny")}, "note": 1})
    loaded = load_draft_head(path, target, "tiny")
    x, t = torch.randn(3, target.config.hidden_size), torch.tensor([1, 2, 3])
    torch.testing.assert_close(fresh_outputs(loaded, x, t.tolist()), fresh_outputs(head, x, t.tolist()))
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["draft_vocab"] == list(range(0, 97, 2)) and config["note"] == 1
    with pytest.raises(DraftHeadError, match="trained for"):
        load_draft_head(path, target, "another-name")
    _, folder = tiny_hf("llama", seed=7)
    with pytest.raises(DraftHeadError, match="trained for"):
        load_draft_head(path, load_model(folder), "tiny")
    _, wider = tiny_hf("llama", seed=0, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(DraftHeadError, match="shapes"):
        load_draft_head(path, load_model(wider))
    torch.save(head.state_dict(), tmp_path / "h.pt")
    with pytest.raises(DraftHeadError, match="no pickle"):
        load_draft_head(tmp_path / "h.pt", target)


def test_saved_file_holds_only_the_trained_weights(head, tmp_path):
    from safetensors.torch import load_file

    names = set(load_file(str(save_draft_head(head, tmp_path / "h.safetensors"))))
    assert names and all(n.startswith(("fc.", "layer.")) for n in names)


def test_target_key_ignores_dtype_and_tells_models_apart(tiny_hf):
    _, folder = tiny_hf("llama")
    _, other = tiny_hf("llama", seed=7)
    f32, bf16 = load_model(folder), load_model(folder, dtype=torch.bfloat16)
    assert target_key(f32, "m") == target_key(bf16, "m")
    assert target_key(f32, "m") != target_key(load_model(other), "m")
    assert target_key(f32, "a b/c").startswith("a-b-c-")
    assert default_head_path(f32, "m").parent.name == target_key(f32, "m")


@pytest.mark.parametrize("vocab,message", [([], "non-empty"), ([3, 3], "increasing"),
                                           ([5, 1], "increasing"), ([0, 97], r"\[0, 97\)")])
def test_config_validation(target, vocab, message):
    from dataclasses import replace

    with pytest.raises(ValueError, match=message):
        DraftHeadConfig(replace(target.config, num_layers=1), tuple(vocab))


# ----------------------------------------------------------------------------- losslessness

AUTO_CURVE = CostCurve((1, 8, 16, 64), (1.0, 1.05, 1.2, 2.0))


def eagle(head, capacity=16, retrieval=True, curve=AUTO_CURVE, **kw):
    config = LogitSpecConfig(pool=PoolConfig(3, 8, 2), draft_tree_capacity=capacity,
                             tree_policy="value", recycle_chains=4 if retrieval else 0)
    successors = SuccessorTable(97) if retrieval else None
    curve = curve if capacity is None else None
    return EagleDrafter(head, EagleConfig(config, retrieval=retrieval, **kw), curve, successors)


def sps_head(head, schedule="constant", k=3, num_drafts=1, cost_curve=None, **length):
    config = DraftModelConfig(DraftLengthConfig(schedule, num_draft_tokens=k, **length), num_drafts)
    return DraftModelDrafter(HeadSource(head), config, cost_curve=cost_curve)


METHODS = {
    "hybrid-16": lambda h: eagle(h),
    "hybrid-auto": lambda h: eagle(h, None),
    "head-alone-64": lambda h: eagle(h, 64, retrieval=False),
    "head-alone-narrow": lambda h: eagle(h, 8, retrieval=False, top_k=2, expand=1, depth=3),
    "sps-constant": lambda h: sps_head(h),
    "sps-heuristic": lambda h: sps_head(h, "heuristic", bounds=(1, 6)),
    "sps-confidence": lambda h: sps_head(h, "confidence", stop_threshold=0.7, bounds=(1, 5)),
    "sps-multi-draft": lambda h: sps_head(h, num_drafts=3),
    "sps-cost": lambda h: sps_head(h, "cost", cost_curve=AUTO_CURVE, bounds=(1, 6)),
    "sps-with-logitspec": lambda h: CombinedDrafter(
        sps_head(h), LogitSpecDrafter(LogitSpecConfig(pool=PoolConfig(), draft_tree_capacity=12)), 12),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_equals_vanilla(target, head, method):
    decoder = Decoder(target, METHODS[method](head))
    for prompt in PROMPTS:
        decoder.reset()
        assert decoder.generate(prompt, GenerationConfig(max_new_tokens=MAX_NEW)).output_ids \
            == vanilla(target, prompt)


@pytest.mark.parametrize("method", ["hybrid-16", "sps-multi-draft"])
def test_follow_up_turn_equals_vanilla(target, head, method):
    """Turn 2 reuses the head's features and pairs of turn 1's context."""
    decoder = Decoder(target, METHODS[method](head))
    first = decoder.generate(PROMPTS[0], GenerationConfig(max_new_tokens=20)).output_ids
    follow_up = PROMPTS[0] + first + [11, 12, 13]
    second = decoder.generate(follow_up, GenerationConfig(max_new_tokens=20)).output_ids
    assert second == vanilla(target, follow_up, 20)


PRUNED = {
    "hybrid-8": dict(capacity=8),
    "head-alone-6": dict(capacity=6, retrieval=False, top_k=4, expand=4, depth=4, min_value=0.0),
    "hybrid-auto-steep": dict(capacity=None, curve=CostCurve((1, 2, 4, 64), (1.0, 1.15, 1.5, 9.0)),
                              gate=False),
    # nothing to prune: cheap trees, a large budget
    "hybrid-auto-flat": dict(capacity=None, gate=False),
}


@pytest.mark.parametrize("name", list(PRUNED))
def test_pruned_expansion_drafts_the_same_trees(target, head, name):
    """Pruning changes what the head computes, never the tree: every step's tree equal to
    EAGLE-2's full expansion (the drafting overhead pinned, as it is measured), with fewer
    pairs fed to the head."""
    kw = dict(PRUNED[name])
    runs = []
    for prune in (True, False):
        drafter = eagle(head, **kw, prune=prune)
        trees, fed = [], []
        inner, expand = drafter.draft, drafter.state.expand

        def draft(*args, drafter=drafter, inner=inner, trees=trees):
            drafter.overhead = 0.002
            trees.append(inner(*args))
            return trees[-1]

        drafter.draft = draft
        drafter.state.expand = lambda p, i, t, fed=fed, expand=expand: fed.append(len(t)) or expand(p, i, t)
        out = Decoder(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=MAX_NEW))
        runs.append((trees, sum(fed), out.output_ids))
    (pruned, pruned_fed, out), (full, full_fed, full_out) = runs
    assert pruned == full and out == full_out
    assert max(len(t) for t in pruned) > 1
    if name == "hybrid-auto-flat":
        assert pruned_fed == full_fed
    else:
        assert pruned_fed < full_fed, (pruned_fed, full_fed)


def gated_run(target, head, slow_head: bool, **kw):
    """The gated hybrid decoding with 40 ms added to the head's first pass (``slow_head``) or
    to the verification of every step that did not run the head: the steps that ran the head,
    the steps, the output, and the steps that the decoder reported as running the head."""
    import time

    drafter = eagle(head, None, **kw)
    ran = []
    if slow_head:
        advance = drafter.state.advance
        drafter.state.advance = lambda *a: time.sleep(0.04) or advance(*a)
    decoder = Decoder(target, drafter)
    verify, inner = decoder._verify, drafter._offer_candidates

    def slow_without_head(tree):
        if not slow_head and not drafter._use_head:
            time.sleep(0.04)
        return verify(tree)

    decoder._verify = slow_without_head
    drafter._offer_candidates = lambda *a: ran.append(drafter._use_head) or inner(*a)
    result = decoder.generate(PROMPTS[1], GenerationConfig(max_new_tokens=80))
    return sum(ran), len(ran), result.output_ids, result.source_steps


def test_gate_skips_a_head_that_costs_more_than_it_gains(target, head):
    """A random head whose passes take 40 ms runs in its warm-up steps and its explorations
    only; retrieval drafts the other steps; the output is vanilla's, and the decoder reports
    those steps."""
    with_head, steps, out, reported = gated_run(target, head, slow_head=True)
    assert out == vanilla(target, PROMPTS[1], 80)
    assert reported == with_head
    assert steps >= 30 and with_head <= 4 + steps // 16 + 1, (with_head, steps)


def test_gate_runs_a_head_that_pays(target, head):
    """Head alone, steps without it (no draft) made 40 ms slower: the head runs in all but
    the warm-up's and the explorations' steps without it."""
    with_head, steps, out, reported = gated_run(target, head, slow_head=False, retrieval=False)
    assert out == vanilla(target, PROMPTS[1], 80)
    assert reported == with_head
    assert steps >= 30 and steps - with_head <= 4 + steps // 16 + 1, (with_head, steps)


def test_gate_only_at_the_automatic_budget(target, head):
    assert eagle(head, None).gate is not None
    assert eagle(head, None, gate=False).gate is None and eagle(head, 16).gate is None


def test_head_computes_in_float32_beside_a_half_precision_cpu_target(target):
    """A bfloat16 target on a CPU gets a float32 head (its features and the embedding rows it
    reads are cast); a float32 target keeps its dtype; the hybrid decodes with it."""
    import copy

    half = copy.deepcopy(target).to(torch.bfloat16)
    head = random_head(half)
    assert head.fc.weight.dtype == head.vocab_weight.dtype == torch.float32
    assert head_dtype(target.embed.weight) == torch.float32
    assert random_head(half).attach(half, torch.bfloat16).fc.weight.dtype == torch.bfloat16
    drafter = eagle(random_head(half), 16)
    result = Decoder(half, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=24))
    assert result.new_tokens == 24 and drafter.state.cache.buffer.dtype == torch.float32
    assert drafter.state.features.dtype == torch.float32


def test_head_alone_trees_come_from_the_head(target, head):
    """Every drafted node is one of the head's top-k at its parent, within the depth."""
    drafter = eagle(head, 32, retrieval=False, top_k=3, expand=2, depth=3)
    trees = []
    inner = drafter.draft
    drafter.draft = lambda *a: trees.append(inner(*a)) or trees[-1]
    Decoder(target, drafter).generate(PROMPTS[1], GenerationConfig(max_new_tokens=24))
    assert trees and max(len(t) for t in trees) > 1
    allowed = set(head.config.draft_vocab)
    for tree in trees:
        assert max(tree.depths) <= 3
        assert all(t in allowed for t in tree.tokens[1:])
        widths = np.bincount(tree.parents[1:])
        assert widths.max() <= 3


# ----------------------------------------------------------------------------- the tree policy


class StubHead:
    """Stands for a head: every node's children are tokens ``10 * depth + i`` with the fixed
    probabilities ``PROBS[i]``; records how many pairs each expansion fed."""

    PROBS = (0.5, 0.3, 0.1, 0.05)

    def __init__(self) -> None:
        self.fed: list[int] = []
        self.depth = 1

    def top(self, out, k):
        rows = out.shape[0]
        tokens = np.array([[10 * int(out[r, 0]) + i for i in range(k)] for r in range(rows)])
        return tokens, np.array([self.PROBS[:k]] * rows)


class StubState:
    def __init__(self, head: StubHead) -> None:
        self.head = head

    def advance(self, context, root):
        return torch.ones(1, 1)

    def expand(self, parents, inputs, tokens):
        self.head.fed.append(len(tokens))
        out = inputs[:, :1] + 1  # the depth of the children this output proposes
        return out, list(range(len(tokens)))

    def drop_tree(self):
        pass


def stub_drafter(capacity, curve=None, **kw):
    head = random_head_for_stub()
    drafter = EagleDrafter(head, EagleConfig(
        LogitSpecConfig(draft_tree_capacity=capacity, tree_policy="value"), retrieval=False, **kw),
        curve)
    stub = StubHead()
    drafter.head, drafter.state = stub, StubState(stub)
    drafter.stats.prior = lambda feature: PROB_CENTERS[feature[2]]
    return drafter, stub


def random_head_for_stub():
    from dataclasses import replace
    from logitspec.config import ModelConfig

    config = ModelConfig(vocab_size=97, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4)
    return DraftHead(DraftHeadConfig(replace(config), tuple(range(97))))


PROB_CENTERS = {edge: head_prior(("head", 1, edge)) for edge in PROB_BUCKETS}


def test_head_prior_is_the_bucket_middle():
    assert head_prior(("head", 1, 0.02)) == pytest.approx(0.01)
    assert head_prior(("head", 3, 0.5)) == pytest.approx(0.45)
    assert head_prior(("head", 1, 1.0)) == pytest.approx(0.995)
    assert head_prior(("first", 1)) == pytest.approx(0.3)  # other kinds: the value tree's


@pytest.mark.parametrize("kw,fed,nodes", [
    # top_k 2, expand 1: depth 1 {10 (.45), 11 (.25)}; 10 expanded -> 20 (.2), 21 (.11)
    (dict(top_k=2, expand=1, depth=2), [1], [10, 11, 20, 21]),
    (dict(top_k=2, expand=2, depth=2), [2], [10, 11, 20, 21, 20, 21]),
    (dict(top_k=2, expand=1, depth=3), [1, 1], [10, 11, 20, 21, 30, 31]),
    (dict(top_k=2, expand=1, depth=1), [], [10, 11]),
    # min_value 0.3: only 10 (.45) is worth expanding, and none of its children (.2, .11)
    (dict(top_k=2, expand=5, depth=4, min_value=0.3), [1], [10, 11, 20, 21]),
])
def test_head_tree_expansion_table(kw, fed, nodes):
    drafter, stub = stub_drafter(64, **kw)
    tree = drafter.draft(1, np.zeros(0, dtype=np.int64), 16)
    assert stub.fed == fed
    assert sorted(tree.tokens[1:]) == sorted(nodes)


def test_pruning_skips_candidates_the_tree_cannot_keep():
    """Budget 3 (root + 2): after depth 1 (10 .45, 11 .25) two candidates are worth more than
    any of their children, so full expansion's second pass (and its third) is skipped."""
    trees, feds = [], []
    for prune in (True, False):
        drafter, stub = stub_drafter(3, top_k=2, expand=2, depth=3, prune=prune)
        trees.append(drafter.draft(1, np.zeros(0, dtype=np.int64), 16))
        feds.append(stub.fed)
    assert feds == [[2], [2, 2]]
    assert trees[0] == trees[1] and trees[0].tokens == (1, 10, 11)


def test_pruning_by_the_cost_curve():
    """Verifying a second token costs 30% more: nothing below .3 can enter any tree, so only
    10 (.45) is expanded, and none of its children (.2, .11)."""
    steep = CostCurve((1, 2, 3, 64), (1.0, 1.3, 1.8, 40.0))
    trees, feds = [], []
    for prune in (True, False):
        drafter, stub = stub_drafter(None, top_k=2, expand=2, depth=3, prune=prune, curve=steep)
        trees.append(drafter.draft(1, np.zeros(0, dtype=np.int64), 16))
        feds.append(stub.fed)
    assert feds == [[1], [2, 2]]
    assert trees[0] == trees[1]


def test_head_tree_keeps_the_most_probable_nodes():
    """Budget 4 (root + 3): 10 (.45), 11 (.25), 20 (.45 x .45 = .2): not 21 (.11)."""
    drafter, _ = stub_drafter(4, top_k=2, expand=1, depth=2)
    tree = drafter.draft(1, np.zeros(0, dtype=np.int64), 16)
    assert tree.tokens == (1, 10, 11, 20)
    assert tree.parents == (-1, 0, 0, 1)


def test_head_tree_respects_the_steps_depth():
    drafter, stub = stub_drafter(64, top_k=2, expand=1, depth=5)
    tree = drafter.draft(1, np.zeros(0, dtype=np.int64), 2)
    assert max(tree.depths) == 2 and stub.fed == [1]


def test_calibration_learns_from_acceptance(target, head):
    """Rates of head nodes move from the bucket priors toward what the target accepts."""
    drafter = eagle(head, 16, retrieval=False)
    Decoder(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=40))
    head_counts = {f: c for f, c in drafter.stats.counts.items() if f[0] == "head"}
    assert head_counts and sum(trials for _, trials in head_counts.values()) > 10
    for feature, (succ, trials) in head_counts.items():
        assert drafter.stats.rate(feature) == pytest.approx(
            (succ + head_prior(feature) * drafter.stats.strength) / (trials + drafter.stats.strength))


def test_config_validation_eagle():
    with pytest.raises(ValueError, match="tree_policy"):
        EagleConfig(LogitSpecConfig())
    with pytest.raises(ValueError, match=">= 1"):
        EagleConfig(top_k=0)
    with pytest.raises(ValueError, match="min_value"):
        EagleConfig(min_value=1.0)
