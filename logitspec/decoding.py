"""The decoding loop: vanilla, PLD and LogitSpec through one engine.

One step, as named phases::

    root   = the token carried from the last step (greedy: argmax of the last logit)
    draft  : tree = drafter.draft(root, root_topk)            (vanilla: the root alone)
    verify : logits = model(tree inputs, positions, cache, mask)
             predicted, topk = verifier.read(logits, k)       (the step's one read-back)
    accept : path = longest path the target agrees with; bonus = target's token after it
    update : cache.keep(path); drafter.observe / extend; root = bonus, root_topk = topk[path[-1]]

The host reads the target's outputs once per step: the verifier's tokens and the top-``k`` ids
of every input's logit (``k`` = the widest any drafter reads), fused into one transfer; the
drafters see them as a :class:`~logitspec.acceptance.TargetOutput` and never touch the logits
on the device themselves.

A step emits the root plus the accepted drafts (its *accept length*); the bonus token is not
emitted yet but carried as the next root. Generation stops at the first end-of-sequence token
(kept, nothing after it) or at ``max_new_tokens`` (the overshoot cut). Every method counts new
tokens and steps the same way, so vanilla decoding has a mean accepted length of exactly 1.

A :class:`Decoder` keeps its cache and context between calls: a follow-up turn whose prompt
extends the previous context only prefills the new tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import snapshot
from .acceptance import GreedyVerifier, TargetOutput, Verifier
from .draft_model import check_same_vocabulary
from .drafters import Drafter, LogitSpecConfig, LogitSpecDrafter, PoolConfig, PromptLookupDrafter
from .model import Transformer
from .sampling import SamplingVerifier
from .timing import synchronize
from .tree import DraftTree

DEFAULT_CONTEXT = 4096
PREFILL_CHUNK = 512
CACHE_GROWTH = 1.5


class PromptError(ValueError):
    """A prompt this model cannot be asked to continue."""


class PromptTooLongError(PromptError):
    """The prompt (plus the tokens to generate) does not fit the model's context."""


class TokenIdError(PromptError):
    """The prompt holds a token id outside the model's vocabulary (an embedding lookup would
    fail: an IndexError on the CPU, a device-side assert that ends the process's CUDA context
    on a GPU)."""


@dataclass(frozen=True)
class GenerationConfig:
    """How much to generate, how to pick tokens and when to stop.

    ``temperature == 0`` is greedy decoding (``top_p``, ``top_k`` and ``seed`` unused);
    otherwise tokens are sampled (:mod:`logitspec.sampling`), the generator seeded with
    ``seed`` at the start of every :meth:`Decoder.generate`. ``top_k == 0`` and
    ``top_p == 1.0`` disable those filters.
    """

    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class StepTimes:
    """Seconds spent per phase (``time.perf_counter``, device synchronized at phase ends)."""

    prefill: float = 0.0
    draft: float = 0.0
    verify: float = 0.0
    accept: float = 0.0
    update: float = 0.0

    @property
    def total(self) -> float:
        return self.prefill + self.draft + self.verify + self.accept + self.update

    @property
    def overhead(self) -> float:
        """Drafting, tree building and acceptance: the method's own host work."""
        return self.draft + self.accept


@dataclass
class GenerationResult:
    """What one generation produced and what it cost."""

    output_ids: list[int]
    accept_lengths: list[int]
    draft_lengths: list[int]
    stop_reason: str  # "eos" or "length"
    times: StepTimes = field(default_factory=StepTimes)
    wall_time: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys and values the cache already held
    source_steps: int | None = None  # steps that ran the drafter's gated source (None: no gate)

    @property
    def new_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def decoding_steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accepted_tokens(self) -> float:
        return self.new_tokens / max(self.decoding_steps, 1)


class Decoder:
    """Decodes with ``model`` and an optional ``drafter``; owns the KV cache.

    ``capacity``: the cache size in tokens, allocated at once (default: the model's context, at
    most ``DEFAULT_CONTEXT``, plus the tree budget). When a turn needs more, the cache grows
    geometrically, to at least ``CACHE_GROWTH`` times its size, at most the model's context
    plus the tree budget (:meth:`~logitspec.kv_cache.KVCache.resize`: the committed tokens go
    through host memory, so a GPU never holds the old and the new buffer at once). To rule out
    growth, pass the largest capacity a run needs.

    Prefill runs in chunks of ``PREFILL_CHUNK`` tokens, each attending to the cache and
    causally to itself: memory for attention masks and activations is bounded by the chunk
    (one 6,000-token pass built a 6,000 x 6,000 mask per layer), whatever the prompt length.
    512: for a 6,000-token prompt's attention on a 2-core CPU, the fastest of 256 to 2,048
    and within noise of one unmasked causal pass; on a GPU in half precision a chunk attends
    through the flash kernel with no mask built.
    """

    def __init__(
        self, model: Transformer, drafter: Drafter | None = None, *, capacity: int | None = None
    ) -> None:
        self.model = model
        self.drafter = drafter
        self.tree_capacity = drafter.tree_capacity if drafter is not None else 1
        vocab_size = model.config.vocab_size
        self.top_k = min(drafter.top_k, vocab_size) if drafter is not None else 0
        self.needs_hidden = drafter is not None and drafter.needs_hidden
        if drafter is not None and getattr(drafter, "vocab_size", None) is not None:
            check_same_vocabulary(vocab_size, drafter.vocab_size)
        self.max_context = model.config.max_position_embeddings
        default = min(self.max_context, DEFAULT_CONTEXT) + self.tree_capacity
        self.cache = model.new_cache(capacity or default, mask_rows=max(self.tree_capacity, 1))
        self.context: list[int] = []

    def reset(self, keep_prefix: bool = False) -> None:
        """Forgets the conversation: the next :meth:`generate` starts from nothing (the cache
        buffer is kept). ``keep_prefix``: the cache keeps the last context's keys and values
        instead, and the next prompt reuses the longest prefix it shares with that context,
        as a follow-up turn does (a question about the same document as the last one prefills
        only what follows the document); the drafter learns it from ``begin``'s ``reused``."""
        if keep_prefix:
            return
        self.cache.reset()
        self.context = []

    def save_state(self) -> snapshot.Snapshot | None:
        """What the drafter learned so far (:mod:`logitspec.snapshot`); None without one. The
        cache is not part of it: :meth:`reset` and the prompt's prefill decide what it holds."""
        return None if self.drafter is None else snapshot.take(self.drafter)

    def restore_state(self, state: snapshot.Snapshot | None) -> None:
        """Puts back a state from :meth:`save_state` of this decoder or of one built with the
        same model and drafter settings: the next question starts as it did then."""
        if state is not None:
            self.drafter = state.restore()

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
        """Generates after ``prompt_ids`` (the whole conversation so far)."""
        prompt = [int(t) for t in prompt_ids]
        self._check_fits(prompt, config)
        device = self.model.device
        synchronize(device)
        start = time.perf_counter()
        verifier = self._verifier(config)
        if self.drafter is not None:
            self.drafter.configure(config)
        last = np.array([len(prompt) - 1])
        logits, cached = self._prefill(prompt)
        predicted, root_topk = verifier.read(logits, self.top_k, last)
        root = verifier.first_token(predicted)
        prefill_end = time.perf_counter()
        gate = getattr(self.drafter, "gate", None)
        before = gate.source_steps if gate is not None else 0
        result = self._decode(root, root_topk[0], config, verifier)
        synchronize(device)
        end = time.perf_counter()
        result.times.prefill = prefill_end - start
        result.wall_time = end - start
        result.cached_tokens = cached
        if gate is not None:
            result.source_steps = gate.source_steps - before
        return result

    def _check_fits(self, prompt: list[int], config: GenerationConfig) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= vocab:
            bad = high if high >= vocab else low
            raise TokenIdError(
                f"token id {bad} (position {prompt.index(bad)}) is outside the model's "
                f"vocabulary of {vocab} ids: the tokenizer does not match the model"
            )
        needed = len(prompt) + config.max_new_tokens
        if needed > self.max_context:
            raise PromptTooLongError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {config.max_new_tokens} "
                f"exceeds the model's context of {self.max_context} tokens"
            )
        if needed + self.tree_capacity > self.cache.capacity:
            self._grow_cache(needed + self.tree_capacity)

    def _grow_cache(self, capacity: int) -> None:
        """Grows the cache to at least ``capacity`` tokens (class docstring)."""
        larger = math.ceil(self.cache.capacity * CACHE_GROWTH)
        self.cache.resize(min(max(capacity, larger), self.max_context + self.tree_capacity))

    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, int]:
        """Fills the cache with ``prompt`` (reusing the common prefix), ``PREFILL_CHUNK``
        tokens per forward pass; returns the last logit (1, V) and how many of the prompt's
        tokens the cache already held."""
        reused = _common_prefix(self.context, prompt)
        reused = min(reused, len(prompt) - 1, self.cache.length)
        self.cache.truncate(reused)
        device = self.model.device
        chunks = []
        for start in range(reused, len(prompt), PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, len(prompt))
            tokens = torch.tensor(prompt[start:end], device=device)
            positions = torch.arange(start, end, device=device)
            hidden = self.model.hidden(tokens, positions, self.cache)
            self.cache.commit(end - start)
            if self.needs_hidden:
                chunks.append(hidden)
        self.context = prompt
        if self.drafter is not None:
            self.drafter.begin(prompt, reused, torch.cat(chunks) if self.needs_hidden else None)
        return self.model.lm_head(hidden[-1:]), reused

    def _verifier(self, config: GenerationConfig) -> Verifier:
        if config.greedy:
            return GreedyVerifier()
        return SamplingVerifier(
            config.temperature, config.top_k, config.top_p, seed=config.seed,
            device=self.model.device,
        )

    def _decode(
        self, root: int, root_topk: np.ndarray, config: GenerationConfig, verifier: Verifier
    ) -> GenerationResult:
        eos = frozenset(config.eos_token_ids)
        result = GenerationResult([], [], [], "length")
        times = result.times
        output = result.output_ids
        while True:
            output.append(root)
            if root in eos or len(output) >= config.max_new_tokens:
                result.accept_lengths.append(1)
                result.draft_lengths.append(0)
                break
            t0 = time.perf_counter()
            tree = self._draft(root, root_topk, config.max_new_tokens - len(output))
            t1 = time.perf_counter()
            logits, hidden, positions = self._verify(tree)
            predicted, topk = verifier.read(logits, self.top_k, positions)
            t2 = time.perf_counter()
            path, bonus = verifier.accept(tree, predicted)
            path = _cut_path(tree, path, eos, config.max_new_tokens - len(output))
            t3 = time.perf_counter()
            accepted = [tree.tokens[i] for i in path[1:]]
            self._update(tree, path, TargetOutput(logits, topk, hidden, t2 - t1))
            output.extend(accepted)
            result.accept_lengths.append(len(path))
            result.draft_lengths.append(tree.num_draft_tokens)
            root, root_topk = bonus, topk[path[-1]]
            times.draft += t1 - t0
            times.verify += t2 - t1
            times.accept += t3 - t2
            times.update += time.perf_counter() - t3
            if (accepted and accepted[-1] in eos) or len(output) >= config.max_new_tokens:
                break
        result.stop_reason = "eos" if output[-1] in eos else "length"
        return result

    def _draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        if self.drafter is None:
            return DraftTree((root,), (-1,), (0,))
        return self.drafter.draft(root, root_topk, max_depth)

    def _verify(self, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Logits (N, V) of every input (tree nodes, then aux inputs) from one forward pass,
        their final hidden states when a drafter reads them, and their positions (N,)."""
        device = self.model.device
        rows, mask = verification_inputs(tree, len(self.context))
        packed = torch.from_numpy(rows).to(device, non_blocking=True)
        if mask is not None:
            mask = torch.from_numpy(mask).to(device, non_blocking=True)
        hidden = self.model.hidden(packed[0], packed[1], self.cache, mask)
        return self.model.lm_head(hidden), hidden if self.needs_hidden else None, rows[1]

    def _update(self, tree: DraftTree, path: list[int], out: TargetOutput) -> None:
        self.cache.keep(path)
        tokens = [tree.tokens[i] for i in path]
        self.context.extend(tokens)
        if self.drafter is not None:
            self.drafter.observe(tree, out)
            self.drafter.extend(tokens, tree, path)


def verification_inputs(tree: DraftTree, base: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The host side of a verification pass: tokens and positions (2, N) int64 of the tree's
    inputs, the root at position ``base``, and their mask among themselves (N, N), or None
    when causal order is the mask (a chain)."""
    rows = np.array([tree.input_tokens(), tree.input_depths()], dtype=np.int64)
    rows[1] += base
    mask = tree.input_mask() if tree.num_inputs > 1 and not tree.is_chain else None
    return rows, mask


def _cut_path(tree: DraftTree, path: list[int], eos: frozenset[int], room: int) -> list[int]:
    """Cuts the accepted drafts after the first EOS and to ``room`` tokens (root kept)."""
    drafts = path[1:1 + room]
    for i, node in enumerate(drafts):
        if tree.tokens[node] in eos:
            drafts = drafts[: i + 1]
            break
    return path[:1] + drafts


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    drafter: Drafter | None = None,
) -> GenerationResult:
    """One-shot generation (a fresh :class:`Decoder`)."""
    return Decoder(model, drafter).generate(prompt_ids, config)


def generate_vanilla(model: Transformer, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
    """Plain greedy decoding, one token per forward pass."""
    return generate(model, prompt_ids, config)


def generate_pld(
    model: Transformer,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    pool: PoolConfig = PoolConfig(),
    draft_tree_capacity: int = 64,
) -> GenerationResult:
    """Prompt lookup decoding: one retrieved chain per step."""
    return generate(model, prompt_ids, config, PromptLookupDrafter(pool, draft_tree_capacity))


def generate_logitspec(
    model: Transformer,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    logitspec: LogitSpecConfig = LogitSpecConfig(),
) -> GenerationResult:
    """LogitSpec decoding: next-token and next-next-token retrieval in one tree."""
    return generate(model, prompt_ids, config, LogitSpecDrafter(logitspec))
