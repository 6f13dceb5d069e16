"""An EAGLE-style draft head: one decoder layer that extrapolates the target's features.

The head drafts at the feature level (EAGLE, arXiv 2401.15077). The target's *features* are
its final normed hidden states, the inputs of its LM head: ``h_j`` at position ``j`` gives the
logit that chooses token ``t_{j+1}``. The head reads *pairs*: pair ``j`` is ``(h_j, t_{j+1})``,
the feature and the token it chose (the token sequence advanced by one step, which resolves
what the feature alone leaves uncertain), and predicts ``h_{j+1}``::

    x_j      = fc([embed(t_{j+1}), h_j])          (embed: the target's table, frozen)
    f_{j+1}  = layer(x_j)                         (one decoder layer of the target's shape,
                                                   causal over the pairs, its own KV cache)
    q(t_{j+2}) = softmax(W_d f_{j+1})             (W_d: the target's LM head rows of the draft
                                                   vocabulary, frozen)

Drafting under a step's root ``t_n`` (the context holds ``t_0 .. t_{n-1}``, the target's
features ``h_0 .. h_{n-1}``): pairs up to ``(h_{n-1}, t_n)`` are exact; the last one's output
``f_n`` proposes the tokens after the root. A drafted token ``x`` below a node whose output is
``f`` is expanded with the pair ``(f, x)``: the predicted feature stands in for the target's,
which is unknown until verification. Pair ``j`` sits at rotary position ``j``; a drafted pair
at depth ``d`` under the root at ``n - 1 + d``.

The draft vocabulary (``DraftHeadConfig.draft_vocab``) is the few thousand token ids most
frequent in the head's training text: the LM head restricted to them costs a fraction of the
full one, and tokens outside it are never proposed by the head (other candidate sources may
still propose them).

Files: the trained weights (``fc``, ``layer``) in safetensors and a JSON file beside them with
the shapes, the draft vocabulary, the target's identity and how the head was trained
(:func:`save_draft_head`); the frozen embedding and LM head come from the target when the head
is attached to it (:func:`load_draft_head`). :func:`default_head_path` is where a head trained
for a target is looked up: ``<model cache>/heads/<target key>/eagle.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .acceptance import TargetOutput
from .attention import AttentionPlan, Choice, plan
from .config import ModelConfig, RopeConfig
from .draft_model import DraftSource
from .kv_cache import KVCache
from .model import Block, Transformer, rope_inv_freq, rope_tables
from .tree import DraftTree

if TYPE_CHECKING:
    from .draft_model import _DraftTrie

FILE_FORMAT = "logitspec-draft-head"
HEAD_FILE = "eagle.safetensors"


class DraftHeadError(ValueError):
    """A head file that cannot be read, or that belongs to another target."""


@dataclass(frozen=True)
class DraftHeadConfig:
    """A head's shapes: ``layer`` is the target's configuration with one layer (its decoder
    layer's shapes, rotary settings and vocabulary size); ``draft_vocab``: the token ids the
    head can propose, increasing."""

    layer: ModelConfig
    draft_vocab: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.layer.num_layers != 1:
            raise ValueError(f"a draft head has one layer, got {self.layer.num_layers}")
        vocab = self.draft_vocab
        if not vocab or any(b <= a for a, b in zip(vocab, vocab[1:])):
            raise ValueError("the draft vocabulary must be non-empty, increasing token ids")
        if vocab[0] < 0 or vocab[-1] >= self.layer.vocab_size:
            raise ValueError(f"draft vocabulary ids must be in [0, {self.layer.vocab_size})")

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab: Sequence[int]) -> "DraftHeadConfig":
        return cls(replace(target, num_layers=1), tuple(sorted({int(t) for t in draft_vocab})))

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.layer.vocab_size

    def to_json(self) -> dict[str, Any]:
        return {"layer": asdict(self.layer), "draft_vocab": list(self.draft_vocab)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DraftHeadConfig":
        layer = dict(data["layer"])
        layer["rope"] = RopeConfig(**layer["rope"])
        return cls(ModelConfig(**layer), tuple(int(t) for t in data["draft_vocab"]))

    def matches(self, target: ModelConfig) -> bool:
        """Whether this head's shapes are ``target``'s."""
        return replace(target, num_layers=1) == self.layer


class DraftHead(nn.Module):
    """The head (module docstring). Trainable: ``fc`` and ``layer``; the target's embedding
    table (V, H) and LM head rows (V', H) are attached by :meth:`attach` and never trained."""

    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = Block(config.layer)
        self.inv_freq = rope_inv_freq(config.layer.rope, config.layer.head_dim)  # float32, not a buffer
        self.draft_ids = torch.tensor(config.draft_vocab, dtype=torch.long)
        self.embed_weight: torch.Tensor | None = None
        self.vocab_weight: torch.Tensor | None = None

    def attach(self, target: Transformer, dtype: torch.dtype | None = None) -> "DraftHead":
        """Takes the target's embedding and LM head (its shapes must be the head's); returns
        the head, computing in ``dtype`` (default: :func:`head_dtype`)."""
        if not self.config.matches(target.config):
            raise DraftHeadError("the draft head's shapes are not the target's")
        return self.attach_weights(target.embed.weight, target.lm_head.weight, dtype)

    def attach_weights(self, embed: torch.Tensor, lm_head: torch.Tensor,
                       dtype: torch.dtype | None = None) -> "DraftHead":
        """Takes an embedding table (V, H) (shared) and an LM head (V, H) (its draft
        vocabulary rows copied), and moves the head to their device, computing in ``dtype``
        (default: :func:`head_dtype` of the weights). The embedding table stays the
        target's: the rows looked up are cast."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(embed.shape) != expected or tuple(lm_head.shape) != expected:
            raise DraftHeadError(f"the draft head needs (vocab, hidden) = {expected} weights")
        dtype = dtype or head_dtype(embed)
        self.to(device=embed.device, dtype=dtype)
        self.draft_ids = self.draft_ids.to(embed.device)
        self.embed_weight = embed.detach()
        self.vocab_weight = lm_head.detach()[self.draft_ids].to(dtype)  # indexing copies
        return self

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                cache: KVCache, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted features (T, H) of the pairs ``(features[i], tokens[i])`` (T, H) and (T,)
        at ``positions`` (T,). Writes their K/V to ``cache``'s pending slots; ``mask``
        (T, cache.length + T) says what each pair sees (None: the cached pairs and, among the
        new ones, causal order)."""
        n = tokens.shape[0]
        dtype = self.fc.weight.dtype
        embedded = F.embedding(tokens, self.embed_weight).to(dtype)
        x = self.fc(torch.cat((embedded, features.to(dtype)), dim=-1))
        cache.begin(n)
        layer = self.config.layer
        if mask is None:
            attention = plan(cache, None, n, layer.num_heads, layer.head_dim)
        else:  # an explicit boolean mask, broadcast over the heads (SDPA's own GQA)
            attention = AttentionPlan(Choice("tree", False, "bias", None), mask)
        cos, sin = rope_tables(self.inv_freq.to(positions.device), positions, x.dtype)
        return self.layer(x, cos, sin, cache, 0, attention)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, V') over the draft vocabulary at predicted ``features`` (N, H)."""
        return features @ self.vocab_weight.T

    def top(self, features: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most likely token ids (N, k) int64 and their probabilities (N, k) float64,
        best first, of the head's distribution at ``features`` (N, H), read to the host."""
        probs = torch.softmax(self.logits(features).float(), dim=-1)
        values, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return self.draft_ids[index].cpu().numpy(), values.double().cpu().numpy()

    def new_cache(self, capacity: int, mask_rows: int = 64) -> KVCache:
        layer = self.config.layer
        return KVCache(1, layer.num_kv_heads, layer.head_dim, capacity, dtype=self.fc.weight.dtype,
                       device=self.device, mask_rows=mask_rows)


def head_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a head computes in beside a target whose weights are ``weight``: the
    target's, except float32 on a CPU under a half-precision target. The head is small
    (one layer, a few thousand LM head rows) and runs a few rows per level: there a
    half-precision matrix product costs about as much per row as a whole single-token
    product (measured on CPUs without bfloat16 matrix instructions: 0.11 ms per row of a
    576 x 1536 bfloat16 weight, 16 rows in 1.7 ms against 0.39 ms in float32), while the
    float32 copy of its weights is a few tens of megabytes."""
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight.dtype


class HeadState:
    """A head following one decoding context: the target's features of the context, the KV
    cache of the exact pairs, and one step's drafted pairs (the *tree region*, after them).

    Between steps the cache holds exact pairs ``0 .. pairs - 1``; the last feature waits for
    the next root. Example: context ``t_0 .. t_4`` with features ``h_0 .. h_4`` after
    :meth:`begin`: pairs 0..3 committed; :meth:`advance` with root ``t_5`` commits pair 4
    ``(h_4, t_5)`` and returns its output; after a step that accepted ``t_5, t_6`` and carried
    ``t_7``, :meth:`add_features` stores ``h_5, h_6`` and the next :meth:`advance` commits
    pairs 5 and 6.
    """

    def __init__(self, head: DraftHead) -> None:
        self.head = head
        self.cache: KVCache | None = None
        self.features: torch.Tensor | None = None  # (capacity, H)
        self.known = 0  # context positions whose target feature is stored
        self.pairs = 0  # exact pairs in the cache
        self._ancestors: list[list[int]] = []  # per tree slot: its ancestor slots and itself
        self._depths: list[int] = []

    def reserve(self, capacity: int) -> None:
        """Room for ``capacity`` pairs and features (new buffers, the kept part copied)."""
        if self.cache is not None and self.cache.capacity >= capacity:
            return
        size = max(capacity, 2 * self.cache.capacity if self.cache is not None else 0)
        cache = self.head.new_cache(size)
        features = self.head.fc.weight.new_zeros(size, self.head.config.hidden_size)
        if self.cache is not None:
            cache.buffer[:, :, :, : self.pairs] = self.cache.buffer[:, :, :, : self.pairs]
            cache.length = self.pairs
            features[: self.known] = self.features[: self.known]
        self.cache, self.features = cache, features

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None) -> None:
        """A generation starts over ``context``: the first ``reused`` features are kept, the
        rest are ``hidden`` (len(context) - reused, H); pairs whose token changed are
        dropped and pairs ``.. len(context) - 2`` are committed."""
        n = len(context)
        if hidden is None or hidden.shape[0] != n - reused:
            raise ValueError("the draft head needs the target's hidden states of the new tokens")
        if reused > self.known:
            raise ValueError(f"the draft head knows {self.known} features, {reused} were reused")
        self.reserve(n + 1)
        self.features[reused:n] = hidden
        self.known = n
        self.pairs = min(self.pairs, max(reused - 1, 0))
        self.drop_tree()
        if self.pairs < n - 1:
            self._commit(list(context[self.pairs + 1:n]))

    def add_features(self, hidden: torch.Tensor) -> None:
        """The target's features (m, H) of the tokens that just joined the context."""
        m = hidden.shape[0]
        self.reserve(self.known + m + 1)
        self.features[self.known:self.known + m] = hidden
        self.known += m

    def advance(self, context: Sequence[int], root: int) -> torch.Tensor:
        """Commits the pairs up to ``(h_{n-1}, root)`` (n = len(context)); returns the last
        one's output (1, H), the feature that proposes the token after ``root``."""
        if self.known != len(context):
            raise ValueError(f"the draft head knows {self.known} features of {len(context)} tokens")
        self.drop_tree()
        return self._commit(list(context[self.pairs + 1:]) + [int(root)])[-1:]

    def _commit(self, tokens: list[int]) -> torch.Tensor:
        """Commits pairs ``pairs ..`` with ``tokens`` (their next tokens)."""
        start, count = self.pairs, len(tokens)
        device = self.head.device
        ids = torch.tensor(tokens, device=device)
        positions = torch.arange(start, start + count, device=device)
        out = self.head(self.features[start:start + count], ids, positions, self.cache)
        self.cache.commit(count)
        self.pairs += count
        return out

    def expand(self, parents: Sequence[int], inputs: torch.Tensor, tokens: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Feeds drafted pairs ``(inputs[i], tokens[i])`` into the tree region, pair ``i``
        below the tree slot ``parents[i]`` (-1: below the root) and seeing the exact pairs,
        its ancestors' slots and itself. Returns their outputs (T, H) and their slots."""
        first, count = len(self._depths), len(tokens)
        mask = np.zeros((count, self.pairs + first + count), dtype=bool)
        mask[:, : self.pairs] = True
        for i, parent in enumerate(parents):
            ancestors = (self._ancestors[parent] if parent >= 0 else []) + [first + i]
            self._ancestors.append(ancestors)
            self._depths.append(self._depths[parent] + 1 if parent >= 0 else 1)
            mask[i, [self.pairs + a for a in ancestors]] = True
        device = self.head.device
        positions = torch.tensor([self.pairs - 1 + d for d in self._depths[first:]], device=device)
        out = self.head(inputs, torch.tensor(list(tokens), device=device), positions, self.cache,
                        torch.from_numpy(mask).to(device))
        self.cache.commit(count)
        return out, list(range(first, first + count))

    def drop_tree(self) -> None:
        """Forgets the tree region (the exact pairs stay)."""
        self.cache.truncate(self.pairs)
        self._ancestors, self._depths = [], []


class HeadSource(DraftSource):
    """The head as a draft source of :class:`~logitspec.draft_model.DraftModelDrafter`: the
    SpS schedules, the confidence stop rule and several drafts per step run on its
    distributions. Its logits cover the whole vocabulary, -inf outside the draft vocabulary
    (a drawn or greedy token is always one the head can propose). Every drafted pair stays in
    the tree region until the step is verified; the accepted tokens are then fed again with
    the target's own features."""

    needs_hidden = True

    def __init__(self, head: DraftHead) -> None:
        self.head = head
        self.state = HeadState(head)
        self.vocab_size = head.config.vocab_size
        self.hidden_size = head.config.hidden_size
        self.device = head.device
        self._slots: dict[int, int] = {}  # draft trie node -> tree slot
        self._verified: torch.Tensor | None = None

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None, room: int) -> None:
        self.state.reserve(room)
        self.state.begin(context, reused, hidden)

    def root(self, context: Sequence[int], root: int, room: int) -> torch.Tensor:
        self.state.reserve(room)
        self._slots = {0: -1}
        return self.state.advance(context, root)

    def expand(self, trie: "_DraftTrie", frontier: list[int], chain: bool) -> torch.Tensor:
        parents = [trie.parents[node] for node in frontier]
        inputs = torch.stack([trie.hidden[p] for p in parents])
        out, slots = self.state.expand([self._slots[p] for p in parents], inputs,
                                       [trie.tokens[node] for node in frontier])
        self._slots.update(zip(frontier, slots))
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        full = hidden.new_full((hidden.shape[0], self.vocab_size), float("-inf"))
        full[:, self.head.draft_ids] = self.head.logits(hidden)
        return full

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        self._verified = out.hidden

    def extend(self, context: Sequence[int], known: int, path: Sequence[int]) -> None:
        """Stores the target's features at the accepted ``path``: the tokens that joined."""
        self.state.add_features(self._verified[list(path)])
        self.state.drop_tree()


def target_key(model: Transformer, name: str) -> str:
    """A target's identity, independent of the dtype it was loaded in: ``name``, then a hash
    of its configuration and of sampled embedding and LM head rows rounded to bfloat16."""
    digest = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for weight in (model.embed.weight, model.lm_head.weight):
        rows = weight.detach()[:: max(1, weight.shape[0] // 64)][:64]
        digest.update(rows.to(torch.bfloat16).float().cpu().numpy().tobytes())
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{safe}-{digest.hexdigest()[:16]}"


def default_head_path(model: Transformer, name: str, cache_root: Path | None = None) -> Path:
    """Where the head trained for this target is kept (module docstring)."""
    from .loading import cache_dir

    return (cache_root or cache_dir()) / "heads" / target_key(model, name) / HEAD_FILE


def head_config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_draft_head(head: DraftHead, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Writes the trained weights (float32 safetensors) and the JSON config beside them
    (the shapes, the draft vocabulary, and ``info``: the target's identity, training
    settings, results). Both are written whole, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a draft head is saved as .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().float().contiguous().cpu() for name, t in head.state_dict().items()}
    staging = path.with_suffix(".safetensors.tmp")
    save_file(state, str(staging))
    config = {"format": FILE_FORMAT, **head.config.to_json(), **(info or {})}
    meta = head_config_path(path).with_suffix(".json.tmp")
    meta.write_text(json.dumps(config, indent=1) + "\n")
    staging.replace(path)
    meta.replace(head_config_path(path))
    return path


def read_head_config(path: str | Path) -> dict[str, Any]:
    """The JSON config beside a head's weights."""
    config_path = head_config_path(Path(path))
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DraftHeadError(f"cannot read draft head config {config_path}: {exc}") from exc
    if data.get("format") != FILE_FORMAT:
        raise DraftHeadError(f"{config_path} is not a draft head config")
    return data


def load_draft_head(path: str | Path, target: Transformer, name: str | None = None) -> DraftHead:
    """Loads a head written by :func:`save_draft_head` and attaches it to ``target``.
    safetensors only (no pickle). With ``name``, the head must have been trained for this
    very target (:func:`target_key`); its shapes must match in any case."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DraftHeadError(f"draft head {path}: only .safetensors files are loaded (no pickle)")
    data = read_head_config(path)
    try:
        config = DraftHeadConfig.from_json(data)
        state = load_file(str(path))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise DraftHeadError(f"cannot read draft head {path}: {exc}") from exc
    trained_for = data.get("target", {}).get("key")
    if name is not None and trained_for != target_key(target, name):
        raise DraftHeadError(f"draft head {path} was trained for {trained_for}, not for "
                             f"{target_key(target, name)}")
    head = DraftHead(config)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise DraftHeadError(f"draft head {path} does not fit its config: {exc}") from exc
    return head.attach(target).eval().requires_grad_(False)
