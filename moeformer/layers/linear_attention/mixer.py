"""`CausalLinearAttention`: LinearAttention behind the softmax `Attention` call signature, so a transformer block
can hold either; its decoding cache is the O(1) recurrent state instead of keys and values."""

from __future__ import annotations

import torch

from moeformer.layers.attention import AttentionMask
from moeformer.layers.linear_attention.layer import LinearAttention


class RecurrentCache:
    """Per-layer decoding cache of a linear-attention layer: the recurrent state, in a preallocated fp32 buffer
    updated in place (fixed address for a CUDA graph), and how many tokens it has seen (host-side decoding only)."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state = state
        self.length = 0

    def reset(self) -> None:
        """Back to the empty state."""
        self.state.zero_()
        self.length = 0


class CausalLinearAttention(LinearAttention):
    """forward(x, rope, mask, cache=None, backend=None) -> y, like `Attention`. Rotary embeddings are not used
    (the recurrence carries order). Packed documents reset the state at each new document; left padding is
    treated as a document of its own, so real tokens never mix with it."""

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: AttentionMask | None = None,
        cache: RecurrentCache | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        seq_len = x.shape[1]
        documents = segments_of(mask, seq_len)
        if cache is None:
            return super().forward(x, document_ids=documents)[0]
        y, state = super().forward(x, state=cache.state, document_ids=documents)
        cache.state.copy_(state)
        if mask is None or not mask.in_buffer:
            cache.length += seq_len
        return y

    def init_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> RecurrentCache:
        """An empty cache: the zero state (fp32 whatever the model's dtype; `max_len` does not matter)."""
        return RecurrentCache(self.init_state(batch, device=device))


def segments_of(mask: AttentionMask | None, seq_len: int) -> torch.Tensor | None:
    """Document ids of the new tokens for the recurrence: the packed documents, with padded positions split off (read
    at the query positions: the keys may be a longer cached prefix or a whole static buffer)."""
    if mask is None:
        return None
    documents = mask.at_queries(mask.document_ids, seq_len) if mask.document_ids is not None else None
    if mask.key_padding is None:
        return documents
    padding = (~mask.at_queries(mask.key_padding, seq_len)).long()
    if documents is None:
        return 1 - padding  # pad run = 0, real tokens = 1: the state restarts at the first real token
    return documents * 2 + padding  # pad positions become their own segments inside each document
