"""Static key/value cache for incremental decoding: preallocated buffers, filled left to right (host-side length) or
written at a device-side position (compiled static-cache decoding)."""

from __future__ import annotations

from typing import Any

import torch

from moeformer.layers.attention.mask import AttentionMask


class KVCache:
    """Keys and values of one attention layer, (batch, n_kv_heads, max_len, head_dim) each; `length` are filled."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(
        self, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, Hkv, T, D). `at` None appends at `length` and returns views of everything stored so far; a
        0-d device tensor writes slots at..at+T-1 in place (index_copy_: no host sync, fixed addresses for a CUDA
        graph) and returns the whole buffers, whose unwritten slots the caller's mask hides; `length` is then left
        alone (the owner of `at` tracks the position)."""
        expected = (*self.k.shape[:2], k.shape[2], self.k.shape[3])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                f"KVCache.update expects k and v of shape {expected}, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if at is not None:
            slots = at + torch.arange(k.shape[2], device=at.device)
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            return self.k, self.v
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache overflow: {self.length} cached + {k.shape[2]} new tokens > max_len {self.max_len}"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget the stored tokens (buffers are reused)."""
        self.length = 0


def cache_update(cache: Any, mask: AttentionMask, *new: torch.Tensor) -> Any:
    """Store one forward's new entries in a layer cache (`KVCache`, MLA's `LatentCache`) as `mask` says: at its device
    offset into the whole buffer, or appended after the cached prefix, which must be q_offset entries long."""
    if mask.in_buffer:
        return cache.update(*new, at=mask.q_offset)
    if cache.length != mask.q_offset:
        raise ValueError(f"mask.q_offset={mask.q_offset} must equal the cache length {cache.length}")
    return cache.update(*new)
