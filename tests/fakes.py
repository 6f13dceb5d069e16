"""A fake target model with known conditional distributions, for exact statistical tests.

:class:`MarkovLM` is a second-order Markov chain: the logits after a context depend only on its
last two tokens, through an explicit table, so every conditional is known exactly. It runs
through the real :class:`~logitspec.kv_cache.KVCache` (token ids stored as keys, exact in
float32) and reads each new token's context through the real attention mask, so tree masks
and cache compaction are exercised: a wrong mask gives wrong contexts.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from logitspec.kv_cache import KVCache


class MarkovLM(nn.Module):
    """``logits(context) = table[(prev + 1) * V + last]`` (``prev = -1`` at the start)."""

    def __init__(self, vocab_size: int, *, seed: int = 0, scale: float = 2.0,
                 max_position_embeddings: int = 4096) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        table = torch.randn((vocab_size + 1) * vocab_size, vocab_size, generator=gen) * scale
        self.register_buffer("table", table)
        self.config = SimpleNamespace(max_position_embeddings=max_position_embeddings,
                                      vocab_size=vocab_size)

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def new_cache(self, capacity: int, *, mask_rows: int = 128) -> KVCache:
        return KVCache(1, 1, 1, capacity, dtype=torch.float32, device=self.device,
                       mask_rows=mask_rows)

    def logits_for(self, prev: int, last: int) -> torch.Tensor:
        return self.table[(prev + 1) * self.vocab_size + last]

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        num_new = tokens.shape[0]
        cache.begin(num_new)
        mask = cache.attention_mask(tree_mask, num_new).clone()  # (T, S)
        ids = tokens.float().view(1, num_new, 1)
        keys, _ = cache.write(0, ids, ids)
        seq = keys[0, :, 0].long()  # (S,)
        device = seq.device
        own = torch.arange(num_new, device=device) + cache.length
        mask[torch.arange(num_new, device=device), own] = False
        slots = torch.arange(seq.shape[0], device=device).expand(num_new, -1)
        prev_slot = torch.where(mask, slots, -1).max(dim=1).values
        prev = torch.where(prev_slot >= 0, seq[prev_slot.clamp(min=0)], -1)
        return self.table[(prev + 1) * self.vocab_size + tokens]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def forward(self, tokens, positions, cache, tree_mask=None) -> torch.Tensor:
        return self.hidden(tokens, positions, cache, tree_mask)


def markov_head(model: MarkovLM, *, seed: int = 0, draft_vocab=None):
    """A random draft head for ``model``: its "features" are the fake's logits (V wide, as
    ``MarkovLM.hidden`` returns them), read through a random embedding table and an identity
    LM head; ``draft_vocab`` (default: every token) restricts what it proposes."""
    from logitspec.config import ModelConfig
    from logitspec.draft_head import DraftHead, DraftHeadConfig

    vocab = model.vocab_size
    layer = ModelConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=4)
    torch.manual_seed(seed)
    head = DraftHead(DraftHeadConfig(layer, tuple(range(vocab)) if draft_vocab is None else tuple(draft_vocab)))
    embed = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
    return head.attach_weights(embed, torch.eye(vocab)).eval().requires_grad_(False)
