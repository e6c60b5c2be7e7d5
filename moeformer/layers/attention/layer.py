"""Multi-head softmax self-attention (MHA / GQA / MQA) with optional QK-norm, sliding window and KV cache."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from moeformer.layers.attention.backends import attend, check_backend
from moeformer.layers.attention.cache import KVCache, cache_update
from moeformer.layers.attention.mask import AttentionMask
from moeformer.layers.norms import RMSNorm
from moeformer.layers.rope import apply_rotary

QK_NORMS = (None, "head", "full")


class Attention(nn.Module):
    """Project to heads, (QK-norm), rotary, attend under `AttentionMask`, project back.

    qk_norm: "head" normalises each head over head_dim (Qwen3); "full" normalises all query / key heads jointly
    (OLMoE); both run before rotary.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        sliding_window: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        check_backend(backend)
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.sliding_window, self.backend, self.qk_norm = sliding_window, backend, qk_norm
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        if qk_norm is not None:
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(head_dim if per_head else n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim if per_head else n_kv_heads * head_dim, norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        cache: KVCache | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim); `rope` = (cos, sin) of the T new positions (None: no positional rotation)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self._qk_norm(q, k)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", d=self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self._qk_norm(q, k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache_update(cache, mask, k, v)
        out = attend(
            q, k, v, mask, window=self.sliding_window, scale=self.head_dim**-0.5, backend=backend or self.backend
        )
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise q and k, keeping the projections' dtype (an fp32 norm weight under autocast would upcast)."""
        return self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str | None) -> KVCache:
        """An empty KV cache sized for this layer."""
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"sliding_window={self.sliding_window}, backend={self.backend!r}"
        )
