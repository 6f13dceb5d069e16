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
        if mask_rows < 1:
            raise ValueError(f"mask_rows must be positive, got {mask_rows}")
        self.capacity = capacity
        self.length = 0
        self.pending = 0
        self.mask_rows = mask_rows
        # (L, 2, H_kv, S, D)
        self.buffer = torch.zeros(
            num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device
        )
        self._bias: torch.Tensor | None = None  # reused attention_bias rows, made on first use
        self._written: tuple[int, int, int] | None = None  # rows, first and end column last set

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def num_layers(self) -> int:
        return self.buffer.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.buffer.shape[2]

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
        """The boolean mask (T, length + T) of the pending tokens, True where a token may
        attend: every new token sees the whole committed prefix; among themselves they follow
        ``tree_mask`` (T, T), or causal order when it is None. (The model attends through
        :meth:`attention_bias`; this is the same mask, explicit, for readers of contexts.)"""
        mask = torch.ones(num_new, self.length + num_new, dtype=torch.bool, device=self.device)
        mask[:, self.length:] = self._allowed(tree_mask, num_new)
        return mask

    def attention_bias(
        self, tree_mask: torch.Tensor | None, num_new: int, group: int = 1
    ) -> torch.Tensor:
        """The additive mask (T * group, length + T) of the pending tokens, in the cache's
        dtype: 0 where :meth:`attention_mask` is True, -inf elsewhere, each token's row
        repeated ``group`` times, token-major (row ``t * group + j`` is token ``t``'s): the
        layout of GQA queries folded along the query length (:mod:`logitspec.attention`).

        Up to ``mask_rows`` new tokens the rows live in one buffer reused across steps, whose
        rows are padded to a multiple of 16 columns: a step rewrites only the columns of its
        own new tokens and resets those of the previous step, O(T^2) instead of O(T * S).
        The result is valid until the next call. Example (group 1, length 2, causal)::

            [[0, 0, 0, -inf],
             [0, 0, 0,  0  ]]
        """
        end = self.length + num_new
        rows = num_new * group
        if num_new <= self.mask_rows:
            buffer = self._bias_buffer(group)
            if self._written is not None:
                last_rows, first, last_end = self._written
                buffer[:last_rows, first:last_end] = 0.0
            bias = buffer[:rows, :end]
            self._written = (rows, self.length, end)
        else:
            bias = torch.zeros(rows, _padded(end), dtype=self.dtype, device=self.device)[:, :end]
        block = bias[:, self.length:end].view(num_new, group, num_new)
        block.fill_(float("-inf"))
        block.masked_fill_(self._allowed(tree_mask, num_new)[:, None, :], 0.0)
        return bias

    def _bias_buffer(self, group: int) -> torch.Tensor:
        rows = self.mask_rows * group
        if self._bias is None or self._bias.shape[0] != rows:
            self._bias = torch.zeros(
                rows, _padded(self.capacity), dtype=self.dtype, device=self.device
            )
            self._written = None
        return self._bias

    def _allowed(self, tree_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        """Which new tokens each new token sees (T, T): ``tree_mask`` or causal order."""
        if tree_mask is not None:
            return tree_mask
        return torch.ones(num_new, num_new, dtype=torch.bool, device=self.device).tril_()

    def resize(self, capacity: int) -> None:
        """Reallocates the buffer for ``capacity`` tokens, keeping the committed ones (pending
        ones are dropped). The committed rows wait in host memory while the old buffer is
        freed and the new one allocated, so that a GPU never holds both buffers at once; on
        the CPU the host copy holds only the committed rows."""
        if capacity < self.length:
            raise ValueError(f"cannot resize a cache of length {self.length} to {capacity}")
        shape = (*self.buffer.shape[:3], capacity, self.buffer.shape[4])
        dtype, device = self.dtype, self.device
        kept = self.buffer[:, :, :, : self.length].to("cpu", copy=True)
        del self.buffer
        self._bias = self._written = None
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.buffer[:, :, :, : self.length] = kept.to(device)
        self.capacity = capacity
        self.pending = 0

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


def _padded(columns: int) -> int:
    """``columns`` rounded up to a multiple of 16."""
    return -(-columns // 16) * 16
