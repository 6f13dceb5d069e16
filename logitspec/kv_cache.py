"""A static key/value cache for one sequence, with tree-step compaction.

Layout: one preallocated buffer ``(num_layers, 2, num_kv_heads, capacity, head_dim)``; slot
``s`` holds the keys/values of the ``s``-th token of the committed sequence. The committed
length lives on the host (``cache.length``). A forward pass over ``T`` new tokens writes them to
the *pending* slots ``[length, length + T)`` without committing them; the caller then keeps some
of them with :meth:`KVCache.keep` (tree decoding: the accepted path, copied to be contiguous) or
:meth:`KVCache.commit` (prefill and vanilla decoding: the first ``n``).

Worked example (capacity 8, length 3, a 4-node tree written at slots 3..6)::

    slots:   0 1 2 | 3 4 5 6        pending nodes 0..3 at slots 3..6
    keep([0, 2]) -> slots 3, 4 hold nodes 0 and 2; length = 5; slots 5.. are free again
"""

from __future__ import annotations

from typing import Sequence

import torch


class CacheOverflowError(RuntimeError):
    """A write would go past the cache's capacity."""


class KVCache:
    """Preallocated K/V storage for one sequence; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        mask_rows: int = 128,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self.pending = 0
        # (L, 2, H_kv, S, D)
        self.buffer = torch.zeros(
            num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device
        )
        # Rows of the attention mask for small (decode / tree) steps, reused across steps.
        self._mask = torch.ones(mask_rows, capacity, dtype=torch.bool, device=device)
        self._causal = torch.ones(mask_rows, mask_rows, dtype=torch.bool, device=device).tril_()

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def num_layers(self) -> int:
        return self.buffer.shape[0]

    @property
    def mask_rows(self) -> int:
        """The most new tokens whose mask rows are preallocated."""
        return self._mask.shape[0]

    def reset(self) -> None:
        """Forgets everything; the buffer is reused."""
        self.length = 0
        self.pending = 0

    def truncate(self, length: int) -> None:
        """Drops committed tokens past ``length`` (e.g. where a new prompt diverges)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
        self.pending = 0

    def begin(self, num_new: int) -> None:
        """Reserves ``num_new`` pending slots for the next forward pass."""
        if self.length + num_new > self.capacity:
            raise CacheOverflowError(
                f"KV cache capacity {self.capacity} exceeded: {self.length} cached + "
                f"{num_new} new tokens"
            )
        self.pending = num_new

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the pending tokens' K/V for ``layer`` and returns all keys/values so far.

        ``keys``/``values``: (H_kv, T, D) with T equal to the reserved pending count.
        Returns two views (H_kv, length + T, D).
        """
        end = self.length + keys.shape[1]
        layer_buf = self.buffer[layer]
        layer_buf[0, :, self.length:end] = keys
        layer_buf[1, :, self.length:end] = values
        return layer_buf[0, :, :end], layer_buf[1, :, :end]

    def attention_mask(self, tree_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        """The boolean mask (T, length + T) for the pending tokens.

        Every new token sees the whole committed prefix; among themselves they follow
        ``tree_mask`` (T, T), or causal order when it is None.
        """
        end = self.length + num_new
        if num_new <= self._mask.shape[0]:
            mask = self._mask[:num_new, :end]
            mask[:, : self.length] = True
        else:
            mask = torch.ones(num_new, end, dtype=torch.bool, device=self.device)
        block = mask[:, self.length:end]
        if tree_mask is not None:
            block.copy_(tree_mask)
        elif num_new <= self._causal.shape[0]:
            block.copy_(self._causal[:num_new, :num_new])
        else:
            block.copy_(torch.ones(num_new, num_new, dtype=torch.bool, device=self.device).tril_())
        return mask

    def commit(self, num_tokens: int) -> None:
        """Keeps the first ``num_tokens`` pending tokens (a prefix: no copy)."""
        if not 0 <= num_tokens <= self.pending:
            raise ValueError(f"cannot commit {num_tokens} of {self.pending} pending tokens")
        self.length += num_tokens
        self.pending = 0

    def keep(self, nodes: Sequence[int]) -> None:
        """Keeps the pending tokens ``nodes`` (increasing offsets), contiguous after the prefix.

        The single compaction primitive: node ``nodes[i]`` moves to slot ``length + i``; the
        other pending tokens are dropped.
        """
        n = len(nodes)
        if n and (
            nodes[0] < 0 or nodes[-1] >= self.pending
            or any(b <= a for a, b in zip(nodes, nodes[1:]))
        ):
            raise ValueError(f"invalid node list {list(nodes)} for {self.pending} pending tokens")
        first_moved = next((i for i, node in enumerate(nodes) if node != i), n)
        if first_moved < n:
            src = torch.tensor(nodes[first_moved:], device=self.device) + self.length
            dst = self.length + first_moved
            # Gather first (a copy), then write: safe although source and target overlap.
            self.buffer[:, :, :, dst:self.length + n] = self.buffer.index_select(3, src)
        self.length += n
        self.pending = 0

