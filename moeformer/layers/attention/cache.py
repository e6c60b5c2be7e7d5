"""Static key/value cache for incremental decoding: preallocated buffers filled left to right."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer, (batch, n_kv_heads, max_len, head_dim) each; `length` are filled."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v (B, Hkv, T, D) at `length`; return views of all keys and values stored so far."""
        expected = (*self.k.shape[:2], k.shape[2], self.k.shape[3])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KVCache.update expects k and v of shape {expected}, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} cached + {k.shape[2]} new tokens > max_len "
                             f"{self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget the stored tokens (buffers are reused)."""
        self.length = 0
