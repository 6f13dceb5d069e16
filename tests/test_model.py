"""The model: parity with transformers, incremental decoding, tree attention, KV-cache
compaction against recomputation, the layer-skip view, dtype handling."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import TINY_VARIANTS
from logitspec.kv_cache import CacheOverflowError, KVCache
from logitspec.loading import load_model
from logitspec.config import RopeConfig
from logitspec.model import Linear, Transformer, rope_inv_freq
from logitspec.tree import build_tree

# Measured on this machine (torch 2.13 CPU, float32): every parity difference below was exactly
# 0.0 (same kernels as transformers). Chunking changes the float32 reduction order: incremental
# vs full, tree vs path alone and compaction vs recomputation differed by at most 4.3e-6 on the
# tiny model (logits up to ~5) and 6.4e-5 on SmolLM2 (logits up to ~33, relative ~2e-6).
PARITY_TOL = 1e-4
RECOMPUTE_TOL = 1e-4  # tiny model
SMOL_RECOMPUTE_TOL = 3e-4  # SmolLM2-135M

REAL_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, "
    "polished the great lens and wrote the wind, the sea state and the ships he saw in his "
    "logbook. Ships passing the reef relied on the beam to find the narrow channel into the "
    "harbour, and during winter storms he stayed awake all night, listening to the waves "
    "breaking against the rocks below the tower."
)


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def full_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the whole sequence in one causal forward over a fresh cache."""
    cache = model.new_cache(len(ids) + 8)
    return model(ids, torch.arange(len(ids)), cache)


def prefilled(model: Transformer, ids: torch.Tensor, capacity: int, **kw) -> KVCache:
    """A fresh cache holding ``ids`` (committed)."""
    cache = model.new_cache(capacity, **kw)
    model(ids, torch.arange(len(ids)), cache)
    cache.commit(len(ids))
    return cache


# ---------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("variant", list(TINY_VARIANTS), ids=list(TINY_VARIANTS))
@torch.inference_mode()
def test_tiny_parity_with_transformers(tiny_hf, variant):
    arch, overrides = TINY_VARIANTS[variant]
    hf_model, folder = tiny_hf(arch, **overrides)
    ours = load_model(folder, dtype=torch.float32)
    ids = random_ids(90, ours.config.vocab_size, seed=1)
    expected = hf_model(ids[None]).logits[0]
    got = full_logits(ours, ids)
    assert got.shape == expected.shape
    assert expected.std() > 1.0  # logits far from uniform: a wrong layer would show
    assert (got - expected).abs().max().item() < PARITY_TOL  # measured 0.0


def model_flags(model: Transformer) -> tuple:
    """(q/k/v bias, output bias, MLP bias, tied embeddings, rope kind) as built."""
    block = model.layers[0]
    return (
        block.attn.wqkv.bias is not None,
        block.attn.wo.bias is not None,
        block.mlp.w13.bias is not None and block.mlp.w2.bias is not None,
        model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr(),
        model.config.rope.kind,
    )


@pytest.mark.parametrize(
    "variant, flags",
    [
        ("llama", (False, False, False, False, "default")),
        ("llama-tied", (False, False, False, True, "default")),
        ("llama-bias", (True, True, True, False, "default")),
        ("llama-rope-linear", (False, False, False, False, "linear")),
        ("llama-rope-llama3", (False, False, False, False, "llama3")),
        ("qwen2", (True, False, False, False, "default")),
        ("qwen2-tied", (True, False, False, True, "default")),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_variant_flags_reach_the_model(tiny_hf, variant, flags):
    """The parity variants really exercise their flag (not silently the plain model)."""
    arch, overrides = TINY_VARIANTS[variant]
    _, folder = tiny_hf(arch, **overrides)
    assert model_flags(load_model(folder, dtype=torch.float32)) == flags


@pytest.mark.parametrize("variant", ["llama-rope-linear", "llama-rope-llama3"])
@torch.inference_mode()
def test_rope_scaling_changes_logits(tiny_hf, variant):
    """Negative control for the rope variants: the same weights with plain RoPE differ."""
    arch, overrides = TINY_VARIANTS[variant]
    _, folder = tiny_hf(arch, **overrides)
    scaled = load_model(folder, dtype=torch.float32)
    plain = load_model(folder, dtype=torch.float32)
    plain.inv_freq = rope_inv_freq(RopeConfig(theta=scaled.config.rope.theta), 16)
    ids = random_ids(90, scaled.config.vocab_size, seed=2)
    assert (full_logits(scaled, ids) - full_logits(plain, ids)).abs().max() > 1e-2


@pytest.mark.slow
@torch.inference_mode()
def test_smollm2_parity_with_transformers(smollm2_f32):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_f32.path, dtype=torch.float32).eval()
    ids = smollm2_f32.tokenizer(REAL_TEXT, add_special_tokens=False)["input_ids"]
    assert 70 <= len(ids) <= 100
    ids = torch.tensor(ids)
    expected = hf_model(ids[None]).logits[0]
    got = full_logits(smollm2_f32.model, ids)
    assert (got - expected).abs().max().item() < PARITY_TOL  # measured 0.0


# ---------------------------------------------------------------------------------------------
# Incremental decoding


@pytest.mark.parametrize("mask_rows", [128, 4], ids=["cached-mask-rows", "few-mask-rows"])
@torch.inference_mode()
def test_incremental_equals_full(tiny_model, mask_rows):
    """Prefill 30 tokens, then 10 one at a time, then a chunk of 20: same logits as one pass."""
    ids = random_ids(60, tiny_model.config.vocab_size, seed=3)
    expected = full_logits(tiny_model, ids)
    cache = tiny_model.new_cache(64, mask_rows=mask_rows)
    pieces = [(0, 30)] + [(i, i + 1) for i in range(30, 40)] + [(40, 60)]
    got = []
    for start, end in pieces:
        got.append(tiny_model(ids[start:end], torch.arange(start, end), cache))
        cache.commit(end - start)
    assert cache.length == 60
    assert (torch.cat(got) - expected).abs().max().item() < RECOMPUTE_TOL  # measured 4.3e-6


@pytest.mark.slow
@torch.inference_mode()
def test_smollm2_incremental_and_bf16_smoke(smollm2_f32):
    """float32: incremental == full. bfloat16 (same weights cast): finite, mostly same argmax."""
    model = smollm2_f32.model
    ids = torch.tensor(smollm2_f32.tokenizer(REAL_TEXT, add_special_tokens=False)["input_ids"])
    n = len(ids)
    expected = full_logits(model, ids)
    cache = model.new_cache(n + 8)
    parts = [model(ids[:40], torch.arange(40), cache)]
    cache.commit(40)
    for i in range(40, 45):
        parts.append(model(ids[i:i + 1], torch.arange(i, i + 1), cache))
        cache.commit(1)
    parts.append(model(ids[45:], torch.arange(45, n), cache))
    assert (torch.cat(parts) - expected).abs().max().item() < SMOL_RECOMPUTE_TOL  # 5.3e-5

    bf16 = load_model(smollm2_f32.path, dtype=torch.bfloat16)
    low = full_logits(bf16, ids)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    agree = (low.float().argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.85  # measured 0.92 (71 of 77 positions) on this text


# ---------------------------------------------------------------------------------------------
# Tree attention


def random_tree(seed: int, capacity: int, vocab: int):
    """A tree from random chains over few tokens, so that merged prefixes are frequent."""
    rng = random.Random(seed)
    alphabet = rng.sample(range(vocab), 4)
    chains = [[rng.choice(alphabet) for _ in range(rng.randint(1, 6))] for _ in range(12)]
    return build_tree(rng.randrange(vocab), chains, capacity)


@pytest.mark.parametrize(
    "seed, capacity, mask_rows",
    [(0, 16, 128), (1, 24, 128), (2, 9, 128), (3, 20, 6)],
    ids=["16-nodes", "24-nodes", "9-nodes", "20-nodes-few-mask-rows"],
)
@torch.inference_mode()
def test_tree_attention_matches_each_path_alone(tiny_model, seed, capacity, mask_rows):
    vocab = tiny_model.config.vocab_size
    prefix = random_ids(25, vocab, seed=10 + seed)
    tree = random_tree(seed, capacity, vocab)
    assert max(tree.depths) < len(tree) - 1  # a real tree, not a chain
    base = len(prefix)
    cache = prefilled(tiny_model, prefix, base + capacity, mask_rows=mask_rows)
    tokens = torch.tensor(tree.tokens)
    positions = base + torch.tensor(tree.depths)
    tree_logits = tiny_model(tokens, positions, cache, torch.from_numpy(tree.tree_mask()))
    worst = 0.0
    for node in range(len(tree)):
        path = tree.path_to(node)
        alone = prefilled(tiny_model, prefix, base + capacity)
        logits = tiny_model(tokens[path], torch.arange(base, base + len(path)), alone)
        worst = max(worst, (logits[-1] - tree_logits[node]).abs().max().item())
    assert worst < RECOMPUTE_TOL  # measured 3.3e-6 over all four trees


@pytest.mark.slow
@torch.inference_mode()
def test_smollm2_tree_attention(smollm2_f32):
    model = smollm2_f32.model
    prefix = torch.tensor(smollm2_f32.tokenizer(REAL_TEXT, add_special_tokens=False)["input_ids"])
    tree = random_tree(5, 16, model.config.vocab_size)
    base = len(prefix)
    cache = prefilled(model, prefix, base + 16)
    tokens = torch.tensor(tree.tokens)
    tree_logits = model(tokens, base + torch.tensor(tree.depths), cache,
                        torch.from_numpy(tree.tree_mask()))
    for node in range(len(tree)):
        path = tree.path_to(node)
        cache.truncate(base)
        logits = model(tokens[path], torch.arange(base, base + len(path)), cache)
        assert (logits[-1] - tree_logits[node]).abs().max().item() < SMOL_RECOMPUTE_TOL  # 6.4e-5


# ---------------------------------------------------------------------------------------------
# Cache compaction


class CallRecorder(TorchFunctionMode):
    """Records the names of torch functions called (to see whether a copy happens)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def tree_step(model, seed: int):
    """A prefix cache plus one tree forward (pending); returns (prefix, tree, cache)."""
    vocab = model.config.vocab_size
    prefix = random_ids(20, vocab, seed=seed)
    tree = random_tree(seed, 14, vocab)
    base = len(prefix)
    cache = prefilled(model, prefix, base + 14 + 4)
    model(torch.tensor(tree.tokens), base + torch.tensor(tree.depths), cache,
          torch.from_numpy(tree.tree_mask()))
    assert cache.pending == len(tree)
    return prefix, tree, cache


@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.inference_mode()
def test_keep_path_equals_recomputation(tiny_model, seed):
    """For every root-to-leaf path: keep it, decode one more token; logits and cache rows equal
    a fresh computation of prefix + path + token."""
    _, tree, _ = tree_step(tiny_model, seed)
    paths = tree.retrieve_paths()
    assert any(p != list(range(len(p))) for p in paths)  # some path needs moving
    for path in paths:
        prefix, tree, cache = tree_step(tiny_model, seed)
        cache.keep(path)
        length = len(prefix) + len(path)
        assert cache.length == length and cache.pending == 0
        extra = torch.tensor([7])
        logit = tiny_model(extra, torch.tensor([length]), cache)
        cache.commit(1)

        sequence = torch.cat([prefix, torch.tensor([tree.tokens[i] for i in path]), extra])
        fresh = tiny_model.new_cache(length + 1)
        expected = tiny_model(sequence, torch.arange(length + 1), fresh)
        fresh.commit(length + 1)
        assert (logit[-1] - expected[-1]).abs().max().item() < RECOMPUTE_TOL  # measured 3.2e-6
        rows = cache.buffer[:, :, :, : length + 1]
        # measured 2.1e-6
        assert (rows - fresh.buffer[:, :, :, : length + 1]).abs().max().item() < RECOMPUTE_TOL


@torch.inference_mode()
def test_keep_prefix_path_copies_nothing():
    cache = KVCache(2, 1, 2, 16, dtype=torch.float32, device="cpu")
    write_pending(cache, [1.0, 2.0, 3.0], commit=True)
    write_pending(cache, [10.0, 11.0, 12.0, 13.0])
    with CallRecorder() as calls:
        cache.keep([0, 1, 2])
    assert calls.names == []  # no tensor operation at all
    assert cache.length == 6 and stored(cache) == [1, 2, 3, 10, 11, 12]

    write_pending(cache, [20.0, 21.0, 22.0])
    with CallRecorder() as calls:  # positive control: a moved node is copied
        cache.keep([0, 2])
    assert "index_select" in calls.names
    assert stored(cache) == [1, 2, 3, 10, 11, 12, 20, 22]


def write_pending(cache: KVCache, values: list[float], commit: bool = False) -> None:
    """Writes ``values`` as keys (and negated as values) of every layer, pending."""
    cache.begin(len(values))
    keys = torch.tensor(values).view(1, -1, 1).expand(cache.buffer.shape[2], -1,
                                                       cache.buffer.shape[4])
    for layer in range(cache.num_layers):
        cache.write(layer, keys, -keys)
    if commit:
        cache.commit(len(values))


def stored(cache: KVCache) -> list[int]:
    """The committed keys (layer 0, head 0, dim 0), checking every layer/head/dim agrees."""
    keys = cache.buffer[:, 0, :, : cache.length]
    values = cache.buffer[:, 1, :, : cache.length]
    assert torch.equal(keys, -values)
    assert (keys == keys[:1, :1, :, :1]).all()
    return [int(v) for v in keys[0, 0, :, 0]]


@pytest.mark.parametrize(
    "nodes, expected",
    [
        ([], [1, 2]),
        ([0], [1, 2, 10]),
        ([0, 1, 2, 3], [1, 2, 10, 11, 12, 13]),
        ([0, 3], [1, 2, 10, 13]),
        ([0, 2, 3], [1, 2, 10, 12, 13]),
        ([1, 3], [1, 2, 11, 13]),
        ([3], [1, 2, 13]),
    ],
    ids=["nothing", "root", "all", "skip-two", "skip-one", "no-root", "last-only"],
)
def test_keep_table(nodes, expected):
    cache = KVCache(2, 2, 3, 8, dtype=torch.float32, device="cpu")
    write_pending(cache, [1.0, 2.0], commit=True)
    write_pending(cache, [10.0, 11.0, 12.0, 13.0])
    cache.keep(nodes)
    assert stored(cache) == expected and cache.pending == 0


@pytest.mark.parametrize(
    "nodes",
    [[4], [0, 0], [2, 1], [-1], [0, 1, 2, 3, 4]],
    ids=["past-pending", "duplicate", "decreasing", "negative", "too-many"],
)
def test_keep_rejects_invalid_node_lists(nodes):
    cache = KVCache(1, 1, 1, 8, dtype=torch.float32, device="cpu")
    write_pending(cache, [1.0, 2.0], commit=True)
    write_pending(cache, [10.0, 11.0, 12.0, 13.0])
    with pytest.raises(ValueError, match="invalid node list"):
        cache.keep(nodes)
    assert cache.length == 2


def test_commit_and_truncate():
    cache = KVCache(1, 1, 1, 8, dtype=torch.float32, device="cpu")
    write_pending(cache, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="cannot commit 4 of 3 pending"):
        cache.commit(4)
    cache.commit(2)  # a prefix of the pending tokens
    assert cache.length == 2 and cache.pending == 0 and stored(cache) == [1, 2]
    write_pending(cache, [5.0, 6.0], commit=True)
    assert stored(cache) == [1, 2, 5, 6]
    cache.truncate(1)
    assert stored(cache) == [1]
    write_pending(cache, [7.0], commit=True)  # writes continue at the truncated length
    assert stored(cache) == [1, 7]
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"cannot truncate a cache of length 2 to {bad}"):
            cache.truncate(bad)
    cache.reset()
    assert cache.length == 0 and cache.pending == 0
    with pytest.raises(ValueError, match="capacity must be positive"):
        KVCache(1, 1, 1, 0, dtype=torch.float32, device="cpu")


@torch.inference_mode()
def test_cache_overflow(tiny_model):
    cache = tiny_model.new_cache(10)
    ids = random_ids(10, tiny_model.config.vocab_size, seed=4)
    tiny_model(ids[:8], torch.arange(8), cache)
    cache.commit(8)
    with pytest.raises(CacheOverflowError,
                       match=r"KV cache capacity 10 exceeded: 8 cached \+ 3 new tokens"):
        tiny_model(ids[:3], torch.arange(8, 11), cache)
    assert cache.length == 8
    tiny_model(ids[8:10], torch.arange(8, 10), cache)  # exactly full is fine
    cache.commit(2)
    assert cache.length == cache.capacity == 10


# ---------------------------------------------------------------------------------------------
# Layer-skip view, dtype and device


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@torch.inference_mode()
def test_truncated_view_equals_shallower_model(tiny_model, num_layers):
    view = tiny_model.truncated(num_layers)
    assert len(view.layers) == num_layers
    full = dict(tiny_model.named_parameters())
    for name, param in view.named_parameters():
        assert param.data_ptr() == full[name].data_ptr()  # shared, never copied
    assert view.lm_head.weight.data_ptr() == tiny_model.lm_head.weight.data_ptr()

    shallow = Transformer(dataclasses.replace(tiny_model.config, num_layers=num_layers))
    state = {k: v for k, v in tiny_model.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < num_layers}
    shallow.load_state_dict(state, strict=True)
    ids = random_ids(30, tiny_model.config.vocab_size, seed=5)
    got = full_logits(view, ids)
    assert torch.equal(got, full_logits(shallow, ids))
    if num_layers < 3:
        assert not torch.allclose(got, full_logits(tiny_model, ids))
    assert view.new_cache(8).num_layers == num_layers


@pytest.mark.parametrize("num_layers", [0, 4, -1])
def test_truncated_rejects_bad_depth(tiny_model, num_layers):
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.3"):
        tiny_model.truncated(num_layers)


@torch.inference_mode()
def test_dtype_follows_weights(tiny_hf):
    _, folder = tiny_hf("llama")
    moved = load_model(folder, dtype=torch.float32).to(torch.bfloat16)
    loaded = load_model(folder, dtype=torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
    cache = moved.new_cache(40)
    assert cache.buffer.dtype == torch.bfloat16 and cache.device.type == "cpu"
    assert moved.inv_freq.dtype == torch.float32  # RoPE angles stay float32 after a cast
    ids = random_ids(40, moved.config.vocab_size, seed=6)
    logits = moved(ids, torch.arange(40), cache)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.equal(logits, full_logits(loaded, ids))


# ------------------------------------------------------------------ float32 wide passes


@torch.inference_mode()
def test_linear_widens_passes_from_its_threshold_only():
    """Rows below ``float32_from`` take the half-precision kernel bit for bit; from it on, the
    product is the float32 one of the same (exactly widened) values, rounded back once."""
    torch.manual_seed(3)
    layer = Linear(48, 40, bias=True).to(torch.bfloat16)
    wide_rows = torch.randn(5, 48).bfloat16()
    one_row = wide_rows[:1]
    half_wide = layer(wide_rows)
    layer.set_float32_from(3)
    assert torch.equal(layer(one_row), torch.nn.functional.linear(one_row, layer.weight,
                                                                   layer.bias))
    expected = torch.nn.functional.linear(
        wide_rows.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    assert torch.equal(layer(wide_rows), expected) and layer(wide_rows).dtype == torch.bfloat16
    saved = layer.float32_weight
    layer.float32_weight = saved * 2  # which weight each pass reads: only the wide one moves
    assert torch.equal(layer(one_row), torch.nn.functional.linear(one_row, layer.weight,
                                                                   layer.bias))
    assert not torch.equal(layer(wide_rows), expected)
    layer.float32_weight = saved
    layer.set_float32_from(None)
    assert torch.equal(layer(wide_rows), half_wide) and layer.float32_weight is None


@torch.inference_mode()
def test_model_float32_passes_keep_weights_and_single_steps(tiny_hf):
    arch, overrides = TINY_VARIANTS["llama-tied"]
    _, folder = tiny_hf(arch, **overrides)
    model = load_model(folder, dtype=torch.bfloat16)
    ids = random_ids(12, model.config.vocab_size, seed=8)
    before = full_logits(model, ids)
    keys = set(model.state_dict())
    model.set_float32_from(4)
    assert model.float32_from == 4 and set(model.state_dict()) == keys  # nothing saved twice
    assert model.truncated(1).float32_from == 4  # a layer-skip view shares the layers
    wide = full_logits(model, ids)
    torch.testing.assert_close(wide.float(), before.float(), rtol=0.02, atol=0.1)  # rounding
    cache = prefilled(model, ids[:-1], 40)
    step = model(ids[-1:], torch.tensor([11]), cache)
    cache = prefilled(model, ids[:-1], 40)
    for module in model.modules():  # wide passes read the copies, single steps never do
        if isinstance(module, Linear):
            module.float32_weight = torch.zeros_like(module.float32_weight)
    assert torch.equal(model(ids[-1:], torch.tensor([11]), cache), step)
    assert torch.equal(full_logits(model, ids), torch.zeros_like(wide))
    model.set_float32_from(4)
    assert model.to(torch.bfloat16).float32_from is None  # a move drops the copies
    with pytest.raises(ValueError, match="at least 1"):
        model.set_float32_from(0)
    with pytest.raises(ValueError, match="half-precision"):
        model.float().set_float32_from(4)
