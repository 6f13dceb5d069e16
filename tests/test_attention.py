"""Attention plans: the policy per shape and device, the folded GQA layout and the additive
mask against the explicit boolean mask, and cache growth."""

from __future__ import annotations

import pytest
import torch

from logitspec import attention as attention_module
from logitspec.attention import FLASH_FIRST, MASKED, AttentionPlan, Choice, choose, kernel_of
from logitspec.kv_cache import KVCache
from logitspec.loading import load_model
from logitspec.tree import build_tree


@pytest.mark.parametrize(
    "device, num_new, is_tree, flash, expected",
    [
        ("cpu", 1, False, False, Choice("decode", True, "none", None)),
        ("cpu", 1, True, False, Choice("decode", True, "none", None)),
        ("cpu", 20, False, False, Choice("chain", True, "bias", None)),
        ("cpu", 64, True, False, Choice("tree", True, "bias", None)),
        ("cuda", 1, False, True, Choice("decode", True, "none", FLASH_FIRST)),
        ("cuda", 512, False, True, Choice("chain", False, "causal", FLASH_FIRST)),
        ("cuda", 512, False, False, Choice("chain", True, "bias", MASKED)),
        ("cuda", 64, True, True, Choice("tree", True, "bias", MASKED)),
    ],
    ids=["cpu-decode", "cpu-decode-1x1-tree", "cpu-chain", "cpu-tree", "cuda-decode",
         "cuda-chain-flash", "cuda-chain-float32", "cuda-tree"],
)
def test_policy_table(device, num_new, is_tree, flash, expected):
    assert choose(device, num_new, is_tree, flash) == expected


def explicit_plan(cache, tree_mask, num_new, num_heads, head_dim, backends=None):
    """The unfolded path with the explicit boolean mask and SDPA's own GQA: the reference."""
    mask = cache.attention_mask(tree_mask, num_new)
    return AttentionPlan(Choice("reference", False, "explicit", None), mask)


def tree_mask_of(seed: int, size: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chains = [torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=g)),),
                            generator=g).tolist() for _ in range(12)]
    tree = build_tree(5, chains, size)
    assert max(tree.depths) < len(tree) - 1
    return torch.tensor(tree.tokens), torch.tensor(tree.depths), torch.from_numpy(tree.tree_mask())


def run_steps(model, steps):
    """Logits of each (tokens, positions, tree_mask) step over one cache, committing all."""
    cache = model.new_cache(160, mask_rows=24)
    out = []
    for tokens, positions, tree_mask in steps:
        out.append(model(tokens, positions, cache, tree_mask))
        cache.commit(len(tokens)) if tree_mask is None else cache.keep([0])
    return out


# Measured here: at most 1.8e-6 in float32 (logits up to ~5), exactly 0.0 in bfloat16.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0625)],
                         ids=["float32", "bfloat16"])
@torch.inference_mode()
def test_every_shape_matches_the_explicit_mask(tiny_hf, monkeypatch, dtype, tol):
    """Prefill chunks (over an empty cache and over a prefix), decode steps, a chain and two
    trees: the planned attention gives the logits of the unfolded explicit-mask path."""
    model = load_model(tiny_hf("llama")[1], dtype=dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (90,), generator=torch.Generator().manual_seed(0))
    tree_tokens, depths, mask = tree_mask_of(1, 20, vocab)
    steps = [(ids[:40], torch.arange(40), None), (ids[40:70], torch.arange(40, 70), None)]
    steps += [(ids[i:i + 1], torch.arange(i, i + 1), None) for i in range(70, 74)]
    steps += [(ids[74:86], torch.arange(74, 86), None)]
    steps += [(tree_tokens, 86 + depths, mask), (tree_tokens, 87 + depths, mask)]
    got = run_steps(model, steps)
    monkeypatch.setattr("logitspec.model.plan", explicit_plan)
    expected = run_steps(model, steps)
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        assert (a.float() - b.float()).abs().max().item() <= tol


def test_plans_per_shape_on_cpu(tiny_model):
    """What the model actually plans on the CPU, and which kernel SDPA picks for it."""
    cache = tiny_model.new_cache(64, mask_rows=16)
    seen = []
    real_plan = attention_module.plan

    def recording(*args, **kwargs):
        result = real_plan(*args, **kwargs)
        seen.append((result.choice.shape, result.choice.fold, type(result.mask).__name__))
        q = torch.zeros(args[2], args[3], args[4])
        keys = torch.zeros(cache.num_kv_heads, cache.length + args[2], args[4])
        assert kernel_of(result, q, keys) == "flash"
        return result

    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("logitspec.model.plan", recording)
        tiny_model(torch.tensor([1, 2, 3]), torch.arange(3), cache)
        cache.commit(3)
        tiny_model(torch.tensor([4]), torch.tensor([3]), cache)
        cache.commit(1)
        tiny_model(torch.tensor([5, 6]), torch.tensor([4, 4]), cache, torch.eye(2, dtype=torch.bool))
    assert seen == [("chain", True, "Tensor"), ("decode", True, "NoneType"),
                    ("tree", True, "Tensor")]


def bias_reference(cache: KVCache, tree_mask, num_new: int, group: int) -> torch.Tensor:
    allowed = cache.attention_mask(tree_mask, num_new).repeat_interleave(group, dim=0)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("group", [1, 3])
def test_attention_bias_equals_the_boolean_mask_across_steps(group):
    """Reused rows: every step's bias equals the boolean mask, whatever earlier steps wrote
    (longer and shorter steps, a step past the reused rows, a compaction, a truncation)."""
    cache = KVCache(1, 2, 4, 64, dtype=torch.float32, device="cpu", mask_rows=6)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    steps = [(None, 5, "commit"), (tree, 4, "keep"), (None, 6, "keep"), (None, 9, "commit"),
             (None, 1, "commit"), (tree, 4, "truncate"), (None, 3, "commit")]
    for tree_mask, num_new, then in steps:
        cache.begin(num_new)
        bias = cache.attention_bias(tree_mask, num_new, group)
        assert bias.shape == (num_new * group, cache.length + num_new)
        assert bias.stride(0) % 16 == 0
        assert torch.equal(bias, bias_reference(cache, tree_mask, num_new, group))
        if then == "commit":
            cache.commit(num_new)
        elif then == "keep":
            cache.keep([0, 2] if num_new > 2 else [0])
        else:
            cache.truncate(cache.length - 2)


def test_resize_keeps_the_committed_tokens():
    cache = KVCache(2, 2, 3, 8, dtype=torch.float32, device="cpu", mask_rows=4)
    cache.begin(5)
    for layer in range(2):
        rows = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3) + 100 * layer
        cache.write(layer, rows, -rows)
    cache.commit(5)
    before = cache.buffer[:, :, :, :5].clone()
    cache.attention_bias(None, 3, 2)
    cache.resize(20)
    assert cache.capacity == 20 and cache.buffer.shape[3] == 20 and cache.length == 5
    assert torch.equal(cache.buffer[:, :, :, :5], before)
    cache.begin(15)  # the new room is usable
    assert cache.attention_bias(None, 15, 2).shape == (30, 20)
    with pytest.raises(ValueError, match="cannot resize a cache of length 5 to 4"):
        cache.resize(4)
