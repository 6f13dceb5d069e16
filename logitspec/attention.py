"""How a forward pass calls scaled-dot-product attention (SDPA): its mask, its query layout
and, on CUDA, the kernels it may use.

A forward pass of ``T`` new tokens over a cache of ``L`` committed tokens has ``S = L + T``
keys. Its shape decides the mask:

- ``decode``: ``T = 1``. The token sees every key: no mask at all.
- ``chain``: ``T > 1`` tokens in causal order (prefill chunks, PLD's chains): token ``t`` sees
  the prefix and new tokens ``0..t``, the lower-right causal mask.
- ``tree``: ``T > 1`` nodes of a draft tree: each sees the prefix and its ancestors, an
  explicit mask (the cache's :meth:`~logitspec.kv_cache.KVCache.attention_bias`).

GQA folding: the ``g = H / H_kv`` query heads that share a KV head are stacked along the query
length, token-major, so that attention is multi-head-shaped: q ``(H_kv, T * g, D)`` against the
cache's own K/V ``(H_kv, S, D)``, with no K/V copy; the mask repeats each token's row ``g``
times. Example: ``H = 4, H_kv = 2, T = 2``: KV head 1 gets the query rows (token 0, head 2),
(token 0, head 3), (token 1, head 2), (token 1, head 3).

Policy (:func:`choose`):

- CPU: always folded; ``decode`` without a mask, ``chain`` and ``tree`` with the additive mask.
  Measured on a 2-core x86-64 CPU (SmolLM2's 9/3 heads, head size 64, the fastest of 100 runs
  of one attention call): folding made a bfloat16 decode step's attention 6-7x faster than
  SDPA's ``enable_gqa`` (100 vs 607 us at 512 cached tokens, 684 vs 5,138 us at 4,096); with a
  mask, folded and additive was the fastest variant, or within noise of it, for chains and
  trees of 8-64 tokens in bfloat16 and float32; SDPA's lower-right causal bias is
  materialized on the CPU and was 10-50% slower.
- CUDA: ``decode`` folded, no mask, kernels flash > efficient > math. ``chain`` unfolded with
  :func:`torch.nn.attention.bias.causal_lower_right` (no mask tensor) and SDPA's native GQA,
  kernels flash > efficient > math, where the flash kernel takes that shape and dtype
  (float16/bfloat16 on sm80+); otherwise folded with the additive mask, like a tree. ``tree``
  folded with the additive mask (its rows padded to 16 columns, as the memory-efficient
  kernel wants), kernels efficient > math. cuDNN attention is never picked: it builds a graph
  per key length ``S``, and ``S`` changes every step. ``Transformer.sdpa_backends`` replaces
  the kernel list (for experiments such as ``scripts/gpu_check.py``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

if TYPE_CHECKING:
    from .kv_cache import KVCache

FLASH_FIRST = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
MASKED = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
_ORDERED = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decides for one forward pass.

    ``mask``: ``"none"``, ``"causal"`` (a lower-right :class:`CausalBias`, nothing
    materialized) or ``"bias"`` (the cache's additive mask). ``backends``: the SDPA kernels
    allowed on CUDA, in priority order; None leaves the choice to SDPA (the CPU).
    """

    shape: str
    fold: bool
    mask: str
    backends: tuple[SDPBackend, ...] | None


def choose(device_type: str, num_new: int, is_tree: bool, flash_takes_causal: bool) -> Choice:
    """The policy of the module docstring. ``flash_takes_causal``: whether the flash kernel
    runs an unmasked causal attention of this model's heads and dtype on this device.

    Example: a 20-token chain on CUDA in bfloat16 -> ``Choice("chain", False, "causal",
    FLASH_FIRST)``; the same chain on the CPU -> ``Choice("chain", True, "bias", None)``.
    """
    cuda = device_type == "cuda"
    if num_new == 1:
        return Choice("decode", True, "none", FLASH_FIRST if cuda else None)
    shape = "tree" if is_tree else "chain"
    if cuda and not is_tree and flash_takes_causal:
        return Choice(shape, False, "causal", FLASH_FIRST)
    return Choice(shape, True, "bias", MASKED if cuda else None)


@dataclass(frozen=True)
class AttentionPlan:
    """How every layer of one forward pass calls SDPA (built once per pass by :func:`plan`).

    ``mask``: what SDPA gets as ``attn_mask``: None, a :class:`CausalBias`, or an additive
    ``(T * g, S)`` tensor in the model's dtype (folded rows).
    """

    choice: Choice
    mask: torch.Tensor | CausalBias | None

    def kernels(self) -> ContextManager:
        """The context that restricts SDPA to the plan's kernels, in the plan's order
        (nothing on the CPU)."""
        backends = self.choice.backends
        if not backends:
            return contextlib.nullcontext()
        if _ORDERED:
            return sdpa_kernel(list(backends), set_priority=True)
        return sdpa_kernel(list(backends))


def plan(
    cache: KVCache,
    tree_mask: torch.Tensor | None,
    num_new: int,
    num_heads: int,
    head_dim: int,
    backends: tuple[SDPBackend, ...] | None = None,
) -> AttentionPlan:
    """The plan of a forward pass of ``num_new`` tokens over ``cache`` (after
    ``cache.begin``); ``backends`` replaces the policy's kernel list on CUDA."""
    device = cache.device
    flash = False
    if device.type == "cuda" and tree_mask is None and num_new > 1:
        flash = flash_takes_causal(device, cache.dtype, num_heads, cache.num_kv_heads, head_dim)
    choice = choose(device.type, num_new, tree_mask is not None, flash)
    if backends is not None and device.type == "cuda":
        choice = Choice(choice.shape, choice.fold, choice.mask, tuple(backends))
    if choice.mask == "causal":
        mask = causal_lower_right(num_new, cache.length + num_new)
    elif choice.mask == "bias":
        mask = cache.attention_bias(tree_mask, num_new, num_heads // cache.num_kv_heads)
    else:
        mask = None
    return AttentionPlan(choice, mask)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Attention of ``q`` (T, H, D) over ``keys``/``values`` (H_kv, S, D): (T, H * D)."""
    T, H, D = q.shape
    kv_heads = keys.shape[0]
    if plan.choice.fold:
        out = F.scaled_dot_product_attention(
            fold(q, kv_heads)[None], keys[None], values[None], attn_mask=plan.mask
        )  # (1, H_kv, T * g, D)
        return out[0].view(kv_heads, T, H // kv_heads, D).transpose(0, 1).reshape(T, H * D)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=plan.mask,
        enable_gqa=H != kv_heads,
    )  # (1, H, T, D)
    return out[0].transpose(0, 1).reshape(T, H * D)


def fold(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries (T, H, D) folded into (H_kv, T * g, D), token-major (module docstring)."""
    T, H, D = q.shape
    return q.view(T, kv_heads, H // kv_heads, D).transpose(0, 1).reshape(kv_heads, T * H // kv_heads, D)


@functools.lru_cache(maxsize=None)
def flash_takes_causal(
    device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> bool:
    """Whether the flash kernel runs an unmasked causal attention of these heads (asked once
    per device, dtype and shape with small tensors)."""
    if device.type != "cuda" or not torch.backends.cuda.is_flash_attention_available():
        return False
    q = torch.empty(1, num_heads, 2, head_dim, dtype=dtype, device=device)
    kv = torch.empty(1, num_kv_heads, 4, head_dim, dtype=dtype, device=device)
    params = torch.backends.cuda.SDPAParams(q, kv, kv, None, 0.0, False, num_heads != num_kv_heads)
    return bool(torch.backends.cuda.can_use_flash_attention(params))


def kernel_of(plan: AttentionPlan, q: torch.Tensor, keys: torch.Tensor) -> str:
    """The SDPA kernel this plan runs for ``q`` (T, H, D) over ``keys`` (H_kv, S, D), as SDPA
    would pick it: ``"flash"``, ``"efficient"``, ``"math"``, ``"cudnn"`` (on the CPU,
    ``"flash"`` is its own flash kernel), or ``"unknown"`` where this torch cannot say."""
    H, kv_heads = q.shape[1], keys.shape[0]
    if isinstance(plan.mask, CausalBias):  # mirrors CausalBias's own dispatch
        query = q.transpose(0, 1)[None]
        params = torch.backends.cuda.SDPAParams(
            query, keys[None], keys[None], None, 0.0, False, H != kv_heads
        )
        with plan.kernels():
            if torch.backends.cuda.can_use_flash_attention(params):
                return "flash"
            if torch.backends.cuda.can_use_efficient_attention(params):
                return "efficient"
        return "math"
    if plan.choice.fold:
        query, gqa = fold(q, kv_heads)[None], False
    else:
        query, gqa = q.transpose(0, 1)[None], H != kv_heads
    try:
        with plan.kernels():
            index = torch._fused_sdp_choice(
                query, keys[None], keys[None], attn_mask=plan.mask, enable_gqa=gqa
            )
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"
    names = {
        SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
        SDPBackend.MATH: "math", SDPBackend.CUDNN_ATTENTION: "cudnn",
    }
    return names.get(SDPBackend(index), "unknown")
