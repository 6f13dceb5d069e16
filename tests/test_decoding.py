"""The decoding loop: speculative decoding == vanilla greedy, token for token.

:class:`CopyLM` is a fake deterministic target that stores token ids in a real
:class:`~logitspec.kv_cache.KVCache` and reads every new token's context through the real
attention mask: a wrong tree mask, wrong positions or a wrong cache compaction give wrong
contexts and so different outputs. Its rule copies earlier text (an induction head), so the
retrieval drafters' guesses are often right and long accepted paths are frequent.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fakes import markov_head
from logitspec import decoding as decoding_module
from logitspec.decoding import (
    Decoder,
    GenerationConfig,
    PromptTooLongError,
    TokenIdError,
    generate_logitspec,
    generate_pld,
    generate_vanilla,
)
from logitspec.drafters import (
    LogitSpecConfig,
    LogitSpecDrafter,
    PoolConfig,
    PromptLookupDrafter,
    make_logitspec_drafter,
)
from logitspec.eagle import EagleConfig, EagleDrafter
from logitspec.kv_cache import KVCache
from logitspec.racer import RacerConfig, RacerDrafter
from logitspec.lookahead import LookaheadConfig, LookaheadDrafter
from logitspec.tree import DraftTree

COPY_BONUS = 8.0


class CopyLM(nn.Module):
    """``logits(context) = table[last two tokens] + COPY_BONUS * onehot(copy)`` where ``copy``
    is the token that followed the most recent earlier occurrence of the context's last two
    tokens (none when they never occurred before). Random table entries are distinct, so the
    argmax is never tied."""

    def __init__(self, vocab_size: int, *, seed: int = 0, max_position_embeddings: int = 512):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.table = rng.standard_normal(((vocab_size + 1) ** 2, vocab_size)).astype(np.float32)
        self.config = SimpleNamespace(max_position_embeddings=max_position_embeddings,
                                      vocab_size=vocab_size)
        self.forward_sizes: list[int] = []

    device = torch.device("cpu")
    dtype = torch.float32

    def rule(self, context: list[int]) -> np.ndarray:
        """Next-token logits (V,) after ``context`` (the pure function the cache must feed)."""
        prev = context[-2] if len(context) > 1 else -1
        logits = self.table[(prev + 1) * (self.vocab_size + 1) + context[-1] + 1].copy()
        if len(context) > 2:
            a, b = context[-2], context[-1]
            for j in range(len(context) - 3, 0, -1):
                if context[j] == b and context[j - 1] == a:
                    logits[context[j + 1]] += COPY_BONUS
                    break
        return logits

    def new_cache(self, capacity: int, *, mask_rows: int = 128) -> KVCache:
        return KVCache(1, 1, 1, capacity, dtype=torch.float32, device="cpu", mask_rows=mask_rows)

    def hidden(self, tokens, positions, cache: KVCache, tree_mask=None) -> torch.Tensor:
        num_new = tokens.shape[0]
        self.forward_sizes.append(num_new)
        cache.begin(num_new)
        mask = cache.attention_mask(tree_mask, num_new).numpy().copy()  # (T, S)
        ids = tokens.float().view(1, num_new, 1)
        keys, _ = cache.write(0, ids, ids)
        seq = keys[0, :, 0].long().numpy()  # (S,) token ids in slot order
        rows = []
        for i in range(num_new):
            visible = seq[mask[i]].tolist()
            assert visible[-1] == int(tokens[i]), "a token must see itself last"
            assert int(positions[i]) == len(visible) - 1, "position != number of tokens before"
            rows.append(self.rule(visible))
        return torch.from_numpy(np.stack(rows))

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def forward(self, tokens, positions, cache, tree_mask=None) -> torch.Tensor:
        return self.hidden(tokens, positions, cache, tree_mask)


def reference_greedy(model: CopyLM, prompt: list[int], config: GenerationConfig) -> list[int]:
    """Greedy decoding straight from the rule: no cache, no tree, no drafter."""
    context, output = list(prompt), []
    while True:
        token = int(np.argmax(model.rule(context)))
        output.append(token)
        if token in config.eos_token_ids or len(output) >= config.max_new_tokens:
            return output
        context.append(token)


def check_invariants(result, config: GenerationConfig, capacity: int) -> None:
    out = result.output_ids
    assert sum(result.accept_lengths) == result.new_tokens == len(out)
    assert 1 <= result.new_tokens <= config.max_new_tokens
    assert len(result.draft_lengths) == len(result.accept_lengths) == result.decoding_steps
    for accepted, drafted in zip(result.accept_lengths, result.draft_lengths):
        assert 1 <= accepted <= capacity
        assert 0 <= drafted <= capacity - 1
        assert accepted <= drafted + 1
    eos_at = [i for i, t in enumerate(out) if t in config.eos_token_ids]
    if eos_at:
        assert eos_at == [len(out) - 1]  # the first EOS ends the output
        assert result.stop_reason == "eos"
    else:
        assert result.new_tokens == config.max_new_tokens and result.stop_reason == "length"


def drafters_for(model: CopyLM, capacity: int, pool: PoolConfig, rank_lengths, merge: bool,
                 num_next_next):
    spec = LogitSpecConfig(pool=pool, draft_tree_capacity=capacity, rank_lengths=rank_lengths,
                           merge_prefixes=merge, num_next_next=num_next_next)
    value = LogitSpecConfig(pool=pool, draft_tree_capacity=capacity, tree_policy="value",
                            num_next_next=num_next_next)
    head = markov_head(model, seed=capacity, draft_vocab=range(0, model.vocab_size, 2))
    ngram = pool.max_ngram_size + 1  # small tries, so that nodes are evicted
    racer = RacerConfig(capacity, ngram, ngram + 1 + 2 * pool.num_pred_tokens, pool.max_continuations + 1)
    return {
        "pld": PromptLookupDrafter(pool, capacity),
        "logitspec": LogitSpecDrafter(spec),
        "logitspec-value": make_logitspec_drafter(value),
        "eagle": EagleDrafter(head, EagleConfig(value, top_k=3, expand=2, depth=4)),
        "eagle-head-alone": EagleDrafter(head, EagleConfig(value, retrieval=False, top_k=2)),
        "racer": RacerDrafter(racer),
        # the fake targets' LM head is the identity: the prompt's logits are copied too
        "racer-prompt": RacerDrafter(racer, head=lambda hidden: hidden),
    }


@st.composite
def scenarios(draw):
    vocab = draw(st.integers(8, 40))
    alphabet = draw(st.integers(2, min(vocab, 6)))
    segment = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=10))
    noise = draw(st.lists(st.integers(0, vocab - 1), max_size=5))
    prompt = segment * draw(st.integers(1, 4)) + noise + segment[: draw(st.integers(0, 3))]
    eos = draw(st.one_of(  # an EOS from the prompt is copied: it lands inside accepted paths
        st.lists(st.integers(0, vocab - 1), max_size=2, unique=True),
        st.lists(st.sampled_from(sorted(set(prompt))), min_size=1, max_size=1),
    ))
    ranks = sorted(draw(st.lists(st.integers(1, 12), max_size=3, unique=True)))
    rank_lengths = tuple((r, draw(st.integers(1, 6))) for r in ranks)
    return dict(
        vocab=vocab,
        seed=draw(st.integers(0, 2**16)),
        prompt=prompt,
        config=GenerationConfig(max_new_tokens=draw(st.integers(1, 60)),
                                eos_token_ids=tuple(eos)),
        capacity=draw(st.integers(1, 64)),
        pool=PoolConfig(max_ngram_size=draw(st.integers(1, 4)),
                        num_pred_tokens=draw(st.integers(1, 12)),
                        max_continuations=draw(st.integers(1, 2))),
        rank_lengths=rank_lengths,
        merge=draw(st.booleans()),
        num_next_next=draw(st.one_of(st.none(), st.integers(0, 10))),
    )


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(s=scenarios())
def test_speculative_equals_vanilla(s):
    model = CopyLM(s["vocab"], seed=s["seed"])
    config, prompt, capacity = s["config"], s["prompt"], s["capacity"]
    expected = reference_greedy(model, prompt, config)
    vanilla = Decoder(model).generate(prompt, config)
    assert vanilla.output_ids == expected
    check_invariants(vanilla, config, 1)
    assert set(vanilla.accept_lengths) == {1} and set(vanilla.draft_lengths) == {0}
    drafters = drafters_for(model, capacity, s["pool"], s["rank_lengths"], s["merge"],
                            s["num_next_next"])
    for name, drafter in drafters.items():
        result = Decoder(model, drafter).generate(prompt, config)
        assert result.output_ids == expected, name
        check_invariants(result, config, capacity)


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(s=scenarios(), extra=st.lists(st.integers(0, 7), min_size=1, max_size=8),
       keep=st.integers(1, 30))
def test_multi_turn_reuse_equals_fresh_decoder(s, extra, keep):
    """Turn 2 extends turn 1's conversation (only the new tokens are prefilled); turn 3 diverges
    inside the prompt (the cache and pool are cut back). Each equals a fresh decoder."""
    model = CopyLM(s["vocab"], seed=s["seed"])
    config, capacity = s["config"], s["capacity"]
    args = (model, capacity, s["pool"], s["rank_lengths"], s["merge"], s["num_next_next"])
    decoders = {name: Decoder(model, d) for name, d in drafters_for(*args).items()}
    decoders["vanilla"] = Decoder(model)
    first = {name: d.generate(s["prompt"], config).output_ids for name, d in decoders.items()}
    assert len(set(map(tuple, first.values()))) == 1
    second_prompt = s["prompt"] + first["vanilla"] + extra
    third_prompt = second_prompt[: min(keep, len(second_prompt))] + extra[::-1] + [1]
    for prompt in (second_prompt, third_prompt):
        expected = reference_greedy(model, prompt, config)
        for name, decoder in decoders.items():
            assert decoder.generate(prompt, config).output_ids == expected, name
            assert decoder.cache.length == len(decoder.context)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(s=scenarios(), question=st.lists(st.integers(0, 7), min_size=1, max_size=6),
       cut=st.integers(0, 40))
def test_a_kept_prefix_serves_the_next_question(s, question, cut):
    """``reset(keep_prefix=True)``: the next question (the first ``cut`` tokens of the last
    one's prompt, then its own) prefills only what follows the prefix it shares with the last
    conversation, says so in ``cached_tokens``, and answers as a fresh decoder does; a plain
    ``reset()`` caches nothing."""
    model = CopyLM(s["vocab"], seed=s["seed"])
    config, capacity = s["config"], s["capacity"]
    args = (model, capacity, s["pool"], s["rank_lengths"], s["merge"], s["num_next_next"])
    decoders = {name: Decoder(model, d) for name, d in drafters_for(*args).items()}
    decoders["vanilla"] = Decoder(model)
    prompt = s["prompt"] + question
    conversations = {name: prompt + decoder.generate(prompt, config).output_ids
                     for name, decoder in decoders.items()}
    shared = prompt[: min(cut, len(prompt))]
    second = shared + [(t + 1) % s["vocab"] for t in question[::-1]]
    expected = reference_greedy(model, second, config)
    for name, decoder in decoders.items():
        # the cache holds the conversation but its last token, and the last prompt token is
        # always prefilled (its logit chooses the first new token)
        bound = min(len(second) - 1, decoder.cache.length, len(conversations[name]) - 1)
        common = 0
        while common < bound and second[common] == conversations[name][common]:
            common += 1
        decoder.reset(keep_prefix=True)
        result = decoder.generate(second, config)
        assert result.output_ids == expected, name
        assert result.cached_tokens == common, name
        decoder.reset()
        again = decoder.generate(second, config)
        assert again.output_ids == expected and again.cached_tokens == 0, name


# ---------------------------------------------------------------------------------------------
# Deterministic cases the properties rely on (they must keep happening)

REPEATED = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3]


class AuxProbe:
    """PLD's tree plus two aux inputs per step, ``a = root + 1`` and ``b = root + 2`` (mod V),
    a chain of their own under the root at depths 1 and 2. ``observe`` checks that the target's
    output for each is the rule applied to exactly the context the aux mask defines; the
    model itself (CopyLM) checks positions and that every input sees itself last."""

    name = "aux-probe"
    top_k = 1
    needs_hidden = False

    def __init__(self, model: CopyLM, pool: PoolConfig, capacity: int) -> None:
        self.model = model
        self.inner = PromptLookupDrafter(pool, capacity)
        self.tree_capacity = capacity + 2
        self.context: list[int] = []
        self.expected: list[list[int]] = []
        self.checked = 0

    def configure(self, config) -> None:
        pass

    def begin(self, context, reused, hidden=None) -> None:
        self.inner.begin(context, reused)
        self.context = list(context)

    def draft(self, root, root_topk, max_depth):
        tree = self.inner.draft(root, root_topk, max_depth)
        vocab, n = self.model.vocab_size, len(tree)
        a, b = (root + 1) % vocab, (root + 2) % vocab
        mask = np.zeros((2, n + 2), dtype=bool)
        mask[:, 0] = True  # the root
        mask[0, n] = mask[1, n] = mask[1, n + 1] = True
        self.expected = [self.context + [root, a], self.context + [root, a, b]]
        return DraftTree(tree.tokens, tree.parents, tree.depths,
                         aux_tokens=(a, b), aux_depths=(1, 2), aux_mask=mask)

    def observe(self, tree, out) -> None:
        assert out.topk.shape[0] == tree.num_inputs == len(tree) + 2
        for row, context in zip(out.topk[len(tree):], self.expected):
            assert row[0] == int(np.argmax(self.model.rule(context)))
        self.checked += 1

    def extend(self, tokens, tree, path) -> None:
        self.inner.extend(tokens, tree, path)
        self.context += list(tokens)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(s=scenarios())
def test_aux_inputs_see_their_masked_context_and_change_nothing(s):
    model = CopyLM(s["vocab"], seed=s["seed"])
    config, prompt = s["config"], s["prompt"]
    probe = AuxProbe(model, s["pool"], s["capacity"])
    result = Decoder(model, probe).generate(prompt, config)
    assert result.output_ids == reference_greedy(model, prompt, config)
    # every step verifies, but a last one that only emits its root (EOS or the length cut)
    assert result.decoding_steps - 1 <= probe.checked <= result.decoding_steps
    assert probe.checked >= 1 or result.new_tokens == 1
    check_invariants(result, config, s["capacity"])


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(s=scenarios(), level=st.integers(3, 6), window=st.integers(1, 8), guess=st.integers(1, 8),
       seed=st.integers(0, 3))
def test_lookahead_equals_vanilla(s, level, window, guess, seed):
    """Lookahead's window inputs ride in every pass (CopyLM checks each input's positions and
    that it sees itself last); the output is vanilla's, on a first and on a follow-up turn."""
    model = CopyLM(s["vocab"], seed=s["seed"])
    lookahead = LookaheadConfig(level, window, guess)
    config, prompt = replace(s["config"], seed=seed), s["prompt"]  # the seed draws the window
    decoder = Decoder(model, LookaheadDrafter(lookahead))
    first = decoder.generate(prompt, config)
    assert first.output_ids == reference_greedy(model, prompt, config)
    check_invariants(first, config, lookahead.verify_capacity)
    second_prompt = prompt + first.output_ids + [1]
    second = decoder.generate(second_prompt, config)
    assert second.output_ids == reference_greedy(model, second_prompt, config)
    assert max(model.forward_sizes[1:], default=1) <= lookahead.tree_capacity


def test_lookahead_fills_its_window_then_verifies_whole_ngrams():
    """5/7/7 on a text that repeats: the window fills in 3 steps (10, 18, 24 inputs), the
    first steady step (28 inputs) has an empty pool, and later steps accept whole n-grams: the
    root and N - 1 = 4 drafts."""
    model = CopyLM(12, seed=1)
    prompt = REPEATED[:20] + REPEATED[:20] + REPEATED[:3]
    config = GenerationConfig(max_new_tokens=60)
    result = Decoder(model, LookaheadDrafter(LookaheadConfig())).generate(prompt, config)
    assert result.output_ids == reference_greedy(model, prompt, config)
    assert model.forward_sizes[1:5] == [10, 18, 24, 28]
    assert result.draft_lengths[:4] == [0, 0, 0, 0]
    assert max(result.accept_lengths) == 5 and result.mean_accepted_tokens > 1.5


def test_copy_model_makes_long_accepted_paths():
    model = CopyLM(12, seed=1)
    prompt = REPEATED[:20] + REPEATED[:20] + REPEATED[:3]
    config = GenerationConfig(max_new_tokens=40)
    for drafter in (PromptLookupDrafter(PoolConfig(), 16), LogitSpecDrafter(
            LogitSpecConfig(draft_tree_capacity=16))):
        result = Decoder(model, drafter).generate(prompt, config)
        assert result.output_ids == reference_greedy(model, prompt, config)
        assert max(result.accept_lengths) >= 8
        assert result.mean_accepted_tokens > 3  # so the property tests are not vacuous


def test_eos_inside_an_accepted_path():
    """The copied text runs into EOS: it is accepted as a draft, then nothing after it."""
    eos = 11
    model = CopyLM(12, seed=2)
    prompt = [1, 2, 3, 4, 5, 6, eos, 7, 8, 9, 0, 1, 2, 3]
    config = GenerationConfig(max_new_tokens=30, eos_token_ids=(eos,))
    expected = reference_greedy(model, prompt, config)
    assert expected == [4, 5, 6, eos]
    result = Decoder(model, PromptLookupDrafter(PoolConfig(), 16)).generate(prompt, config)
    assert result.output_ids == expected and result.stop_reason == "eos"
    # one step: root 4, drafts 5 6 EOS accepted; the drafts after EOS (7 8 ...) were right too
    assert result.accept_lengths == [4] and result.draft_lengths[0] > 4


def test_max_new_tokens_cuts_the_path():
    model = CopyLM(12, seed=1)
    prompt = REPEATED[:20] + REPEATED[:20] + REPEATED[:3]
    drafter = lambda: PromptLookupDrafter(PoolConfig(), 16)  # noqa: E731
    free = Decoder(model, drafter()).generate(prompt, GenerationConfig(max_new_tokens=40))
    assert free.accept_lengths[0] >= 6
    for limit in (1, 2, free.accept_lengths[0] - 1):
        config = GenerationConfig(max_new_tokens=limit)
        capped = Decoder(model, drafter()).generate(prompt, config)
        assert capped.output_ids == free.output_ids[:limit]
        assert capped.accept_lengths == [limit] and capped.stop_reason == "length"


def test_generate_helpers_agree():
    model = CopyLM(10, seed=3)
    prompt = REPEATED[:12] * 2
    config = GenerationConfig(max_new_tokens=25, eos_token_ids=(9,))
    expected = reference_greedy(model, prompt, config)
    assert generate_vanilla(model, prompt, config).output_ids == expected
    assert generate_pld(model, prompt, config, draft_tree_capacity=5).output_ids == expected
    small = LogitSpecConfig(draft_tree_capacity=7, rank_lengths=((2, 2),))
    assert generate_logitspec(model, prompt, config, small).output_ids == expected


def test_tree_forward_sizes_within_capacity():
    model = CopyLM(12, seed=1)
    prompt = REPEATED[:20] * 2
    Decoder(model, LogitSpecDrafter(LogitSpecConfig(draft_tree_capacity=9))).generate(
        prompt, GenerationConfig(max_new_tokens=30))
    prefill, *steps = model.forward_sizes
    assert prefill == len(prompt) and steps and max(steps) <= 9 and max(steps) > 1


# ---------------------------------------------------------------------------------------------
# The real (tiny, random) Llama


def naive_greedy(model, prompt: list[int], config: GenerationConfig) -> list[int]:
    """Recomputes the whole sequence with a fresh cache at every step (no KV reuse)."""
    sequence, output = list(prompt), []
    with torch.inference_mode():
        while True:
            cache = model.new_cache(len(sequence))
            logits = model(torch.tensor(sequence), torch.arange(len(sequence)), cache)
            token = int(logits[-1].argmax())
            output.append(token)
            if token in config.eos_token_ids or len(output) >= config.max_new_tokens:
                return output
            sequence.append(token)


def test_vanilla_equals_naive_on_tiny_llama(tiny_model):
    prompt = [(7 * i) % 97 for i in range(12)] * 3
    config = GenerationConfig(max_new_tokens=24)
    expected = naive_greedy(tiny_model, prompt, config)
    assert generate_vanilla(tiny_model, prompt, config).output_ids == expected
    # and the speculative methods, on a prompt that repeats itself
    assert generate_pld(tiny_model, prompt, config, draft_tree_capacity=8).output_ids == expected
    spec = LogitSpecConfig(draft_tree_capacity=12)
    assert generate_logitspec(tiny_model, prompt, config, spec).output_ids == expected


def test_tiny_llama_eos_stops(tiny_model):
    prompt = [5, 6, 7, 8]
    free = naive_greedy(tiny_model, prompt, GenerationConfig(max_new_tokens=12))
    eos = free[5]
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=(eos,))
    expected = free[: free.index(eos) + 1]
    result = generate_vanilla(tiny_model, prompt, config)
    assert result.output_ids == expected and result.stop_reason == "eos"


# ---------------------------------------------------------------------------------------------
# Errors and the cache


def test_empty_prompt():
    with pytest.raises(ValueError, match="the prompt is empty"):
        Decoder(CopyLM(8)).generate([], GenerationConfig(max_new_tokens=4))


def test_prompt_too_long():
    model = CopyLM(8, max_position_embeddings=64)
    decoder = Decoder(model, PromptLookupDrafter(PoolConfig(), 8))
    with pytest.raises(PromptTooLongError, match="prompt of 60 tokens \\+ max_new_tokens 5 "
                       "exceeds the model's context of 64 tokens"):
        decoder.generate([1] * 60, GenerationConfig(max_new_tokens=5))
    result = decoder.generate([1, 2] * 30, GenerationConfig(max_new_tokens=4))  # exactly fits
    assert result.new_tokens == 4


def test_cache_grows_when_needed():
    model = CopyLM(10, seed=4)
    prompt = REPEATED[:15] * 2
    config = GenerationConfig(max_new_tokens=20)
    expected = reference_greedy(model, prompt, config)
    decoder = Decoder(model, LogitSpecDrafter(LogitSpecConfig(draft_tree_capacity=8)),
                      capacity=12)
    assert decoder.cache.capacity == 12
    assert decoder.generate(prompt, config).output_ids == expected
    assert decoder.cache.capacity >= len(prompt) + 20 + 8
    # a longer follow-up grows it again and keeps the cached prefix
    second = prompt + expected + REPEATED[:40]
    config2 = GenerationConfig(max_new_tokens=30)
    grown_from = decoder.cache.capacity
    assert decoder.generate(second, config2).output_ids == reference_greedy(model, second, config2)
    assert decoder.cache.capacity > grown_from


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([1, 2, 8], r"token id 8 \(position 2\) is outside the model's vocabulary of 8 ids"),
        ([1, -1, 2], r"token id -1 \(position 1\) is outside"),
        ([9, 1, -3], r"token id 9 \(position 0\)"),
    ],
    ids=["past-the-end", "negative", "both-first-too-large"],
)
def test_token_ids_are_range_checked_before_the_model(prompt, message):
    model = CopyLM(8)
    decoder = Decoder(model)
    with pytest.raises(TokenIdError, match=message):
        decoder.generate(prompt, GenerationConfig(max_new_tokens=4))
    assert model.forward_sizes == []  # refused before any forward pass
    assert decoder.generate([0, 7, 7], GenerationConfig(max_new_tokens=2)).new_tokens == 2


def test_cache_growth_is_geometric_up_to_the_context():
    """Policy: grow to max(needed, 1.5 x capacity), at most context + tree budget; the committed
    tokens survive every growth (the outputs equal the reference)."""
    model = CopyLM(10, seed=4, max_position_embeddings=104)
    decoder = Decoder(model, PromptLookupDrafter(PoolConfig(), 8), capacity=20)
    config = GenerationConfig(max_new_tokens=10)
    sizes = []
    prompt = REPEATED[:12]
    for extra in (0, 4, 26, 20):
        prompt = prompt + REPEATED[:extra]
        assert decoder.generate(prompt, config).output_ids == reference_greedy(model, prompt, config)
        prompt = prompt + reference_greedy(model, prompt, config)
        sizes.append(decoder.cache.capacity)
    # prompt + 10 new + 8 tree: 30 -> 30; 44 -> max(44, 1.5 x 30) = 45; 80 -> max(80, 68);
    # 110 -> max(110, 120), capped at the context 104 + 8
    assert sizes == [30, 45, 80, 112]


@pytest.mark.parametrize("chunk", [1, 7, 64])
@torch.inference_mode()
def test_chunked_prefill_equals_one_pass(tiny_model, monkeypatch, chunk):
    """Prefill in chunks of 1, 7 or 64 tokens: the same cache rows, the same last logit and the
    same greedy output as one pass (float32 rounding only), also for a follow-up turn."""
    prompt = torch.randint(0, tiny_model.config.vocab_size, (50,),
                           generator=torch.Generator().manual_seed(3)).tolist()
    config = GenerationConfig(max_new_tokens=6)

    def run():
        decoder = Decoder(tiny_model)
        first = decoder.generate(prompt, config).output_ids
        second = decoder.generate(prompt + first + prompt[:20], config).output_ids
        return first + second, decoder.cache.buffer[:, :, :, :decoder.cache.length].clone()

    monkeypatch.setattr(decoding_module, "PREFILL_CHUNK", 10_000)
    expected, rows = run()
    monkeypatch.setattr(decoding_module, "PREFILL_CHUNK", chunk)
    got, chunked_rows = run()
    assert got == expected
    assert (chunked_rows - rows).abs().max().item() < 1e-5  # measured: at most 1.1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
    ids=["max-new-0", "negative-temperature", "nan-temperature", "top-p-0", "top-p-above-1",
         "negative-top-k"],
)
def test_generation_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_vanilla_counts():
    model = CopyLM(9, seed=5)
    result = Decoder(model).generate([1, 2, 3], GenerationConfig(max_new_tokens=7))
    assert result.new_tokens == result.decoding_steps == 7
    assert result.mean_accepted_tokens == 1.0
