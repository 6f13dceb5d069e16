"""A compact Llama-family causal LM with explicit positions and tree attention.

One sequence at a time (no batch dimension): ``forward(tokens (T,), positions (T,), cache,
tree_mask (T, T) | None) -> logits (T, V)``. The new tokens attend to every committed token of
``cache`` and, among themselves, to what ``tree_mask`` allows (causal order when None). Their
keys/values are written to the cache's pending slots; the caller decides which to keep.

Numerics follow HF transformers' Llama: RMSNorm in float32, RoPE tables in float32 with the
``rotate_half`` convention, everything else in the weights' dtype. Attention goes through
:mod:`logitspec.attention`, which picks the mask, the query layout and the kernels per pass. Weight names are HF's
(``model.layers.0.self_attn.q_proj.weight`` ...); the loader fuses q/k/v and gate/up into one
matrix each (see :mod:`logitspec.loading`).

Wide passes in float32: on a CPU without half-precision matrix instructions (AVX2 only, for
one), torch's bfloat16 matmul costs about one more single-token step per token of a pass
(SmolLM2-135M, 2 AVX2 cores: 22 ms for one token, 175 ms for 16, 636 ms for 64), and prefill
runs at ~130 tokens/s. A float32 copy of the weights costs twice the memory traffic for one
row but runs wide passes near the float32 rate (105 ms for 16 tokens, 225 ms for 64; prefill
~460 tokens/s).
:meth:`Transformer.set_float32_from` gives every linear layer that copy, used for passes of at
least that many rows: the input is widened, the products (exact in float32) are summed in
float32, and the result is rounded back to the model's dtype. Single-token steps, and so the
baseline's decoding, stay on the half-precision kernel.
:func:`logitspec.cost.float32_from_for` decides by measuring the machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.attention import SDPBackend

from .attention import AttentionPlan, attend, plan
from .config import ModelConfig, RopeConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in float32, scaled as ``rope.kind`` says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a linear
    blend (in 1 / wavelength) between ``old_ctx / low_freq_factor`` and
    ``old_ctx / high_freq_factor``."""
    old_ctx = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, scaled)


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, 1, D) for ``positions`` (T,) from float32 ``inv_freq`` (D/2,), computed in
    float32 and cast to ``dtype`` (the 1 broadcasts over heads)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that runs passes of at least ``float32_from`` rows in float32 against a
    float32 copy of its weight (module docstring); the same parameters and state dict."""

    float32_from: int | None = None
    float32_weight: torch.Tensor | None = None
    float32_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.float32_from is not None and x.numel() >= self.float32_from * x.shape[-1]
        if wide:
            return F.linear(x.float(), self.float32_weight, self.float32_bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def set_float32_from(self, rows: int | None) -> None:
        """Keeps a float32 copy for passes of ``rows`` rows or more (None: drops it)."""
        self.float32_from = rows
        if rows is None:
            self.float32_weight = self.float32_bias = None
            return
        self.float32_weight = self.weight.detach().float()
        self.float32_bias = None if self.bias is None else self.bias.detach().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_dim = cfg.num_heads * cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.wqkv = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        self.wo = Linear(q_dim, cfg.hidden_size, bias=cfg.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        attention: AttentionPlan,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin  # cos, sin: (T, 1, D)
        k = k * cos + rotate_half(k) * sin
        keys, values = cache.write(layer, k.transpose(0, 1), v.transpose(0, 1))  # (H_kv, S, D)
        return self.wo(attend(q, keys, values, attention))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, attention: AttentionPlan) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attention)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. ``forward`` returns logits; ``hidden`` the final normed hidden states.

    ``sdpa_backends``: None follows :mod:`logitspec.attention`'s kernel policy; a tuple of
    :class:`~torch.nn.attention.SDPBackend` allows only those kernels, in that order, for every
    pass on CUDA (for experiments).
    """

    sdpa_backends: tuple[SDPBackend, ...] | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``...: ``inv_freq`` follows the device but stays
        float32 (a bfloat16 copy would shift the rotary angles by up to ~0.5 rad at 400); the
        float32 copies of wide passes are dropped (:meth:`set_float32_from` again to keep
        them)."""
        super()._apply(fn, recurse)
        self.set_float32_from(None)
        self.inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim).to(
            self.inv_freq.device
        )
        return self

    @property
    def float32_from(self) -> int | None:
        """Passes of at least this many tokens run in float32 (None: none do)."""
        return self.lm_head.float32_from

    def set_float32_from(self, rows: int | None) -> None:
        """Passes of at least ``rows`` tokens run their matmuls in float32 against float32
        copies of the weights (None: every pass in the model's dtype; module docstring)."""
        if rows is not None:
            if rows < 1:
                raise ValueError(f"float32_from must be at least 1, got {rows}")
            if self.dtype == torch.float32:
                raise ValueError("float32 wide passes need a half-precision model")
        for module in self.modules():
            if isinstance(module, Linear):
                module.set_float32_from(rows)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, capacity: int, *, mask_rows: int = 128) -> KVCache:
        """A cache sized for this model, on its device and in its dtype."""
        cfg = self.config
        return KVCache(
            len(self.layers), cfg.num_kv_heads, cfg.head_dim, capacity,
            dtype=self.dtype, device=self.device, mask_rows=mask_rows,
        )

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, D) for ``positions`` (T,), computed in float32, cast to the dtype."""
        return rope_tables(self.inv_freq, positions, self.dtype)

    def hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states (T, hidden) of ``tokens`` (T,) at ``positions`` (T,).

        Writes the tokens' K/V to the cache's pending slots (see :class:`KVCache`).
        """
        num_new = tokens.shape[0]
        cache.begin(num_new)
        cfg = self.config
        attention = plan(cache, tree_mask, num_new, cfg.num_heads, cfg.head_dim, self.sdpa_backends)
        cos, sin = self.rope_tables(positions)
        x = self.embed(tokens)  # (T, hidden)
        with attention.kernels():
            for i, block in enumerate(self.layers):
                x = block(x, cos, sin, cache, i, attention)
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (T, V) of ``tokens`` (T,); see :meth:`hidden`."""
        return self.lm_head(self.hidden(tokens, positions, cache, tree_mask))

    def truncated(self, num_layers: int) -> "Transformer":
        """A layer-skip view: the first ``num_layers`` blocks, the final norm and the LM head,
        sharing this model's weights (no copy). It needs a cache of its own."""
        if not 1 <= num_layers <= len(self.layers):
            raise ValueError(f"num_layers must be in 1..{len(self.layers)}, got {num_layers}")
        view = Transformer.__new__(Transformer)
        nn.Module.__init__(view)
        view.config = self.config
        view.embed = self.embed
        view.layers = nn.ModuleList(self.layers[:num_layers])
        view.norm = self.norm
        view.lm_head = self.lm_head
        view.sdpa_backends = self.sdpa_backends
        view.register_buffer("inv_freq", self.inv_freq, persistent=False)
        return view
