"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a small shared latent, so the KV cache
holds one `kv_lora_rank + qk_rope_head_dim` vector per token instead of full per-head keys and values.

Each head's query/key is `[nope | rope]`: the `nope` part comes from the latent (no position information), the
`rope` part is rotated and, for keys, shared by all heads (decoupled RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moeformer.layers.attention import AttentionMask, attend, cache_update
from moeformer.layers.norms import RMSNorm
from moeformer.layers.rope import apply_rotary, yarn_mscale


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q/kv projections with decoupled RoPE."""

    q_lora_rank: int | None = None  # None: full-rank q projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


def mla_softmax_scale(mla: MLAConfig, rope_scaling: dict[str, Any] | None = None) -> float:
    """Softmax scale of MLA: qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN scaling
    (DeepSeek's long-context correction; the rope tables carry the matching mscale / mscale_all_dim ratio)."""
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if not rope_scaling or (rope_scaling.get("type") or rope_scaling.get("rope_type")) in (None, "default"):
        return scale
    mscale = yarn_mscale(rope_scaling.get("factor") or 1.0, rope_scaling.get("mscale_all_dim") or 0.0)
    return scale * mscale * mscale


def _attend_mixed_dims(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float, backend: str
) -> torch.Tensor:
    """`attend` for value heads narrower or wider than query/key heads: zero-pad to a common width (zeros change
    neither q.k nor the kept value dims), then drop the padding from the output."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    width = max(qk_dim, v_dim)
    pad = lambda t: F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t  # noqa: E731
    out = attend(pad(q), pad(k), pad(v), mask, window=None, scale=scale, backend=backend)
    return out[..., :v_dim]


class LatentCache:
    """Static per-layer cache of MLA: per token one `kv_lora_rank + rope_dim` vector, the normalised kv latent then
    the rotated shared rope key, in one buffer (B, max_len, kv_lora_rank + rope_dim): the absorbed decode path reads
    it as the single key (and value) head of an MQA, without copies."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        self.kv = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank, self.max_len = kv_lora_rank, max_len
        self.length = 0

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., : self.kv_lora_rank]

    @property
    def k_rot(self) -> torch.Tensor:
        return self.kv[..., self.kv_lora_rank :]

    def update(self, latent: torch.Tensor, k_rot: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Store (B, T, .) latents and rope keys; return the stored [latent | k_rot] rows (B, Tk, rank + rope_dim).
        `at` None appends at `length` and returns the filled prefix; a 0-d device tensor writes there in place and
        returns the whole buffer (as `KVCache.update`)."""
        new = torch.cat((latent, k_rot), dim=-1)
        if at is not None:
            self.kv.index_copy_(1, at + torch.arange(new.shape[1], device=at.device), new)
            return self.kv
        end = self.length + new.shape[1]
        if end > self.max_len:
            raise ValueError(f"LatentCache overflow: {self.length} + {new.shape[1]} tokens > max_len {self.max_len}")
        self.kv[:, self.length : end] = new
        self.length = end
        return self.kv[:, :end]

    def reset(self) -> None:
        """Forget the stored tokens (the buffer is reused)."""
        self.length = 0


class MLAttention(nn.Module):
    """Multi-head latent attention with optional low-rank queries (`mla.q_lora_rank`).

    Submodules: `q_proj` (full-rank) or `q_a_proj` -> `q_a_norm` -> `q_b_proj`; `kv_a_proj` (dim -> latent + rope
    key), `kv_a_norm`, `kv_b_proj` (latent -> per-head [k_nope | v]), `o_proj`. Rope dims use the rotate-half layout.
    With a cache, queries attend either to the latents expanded by kv_b_proj or, absorbed, to the compressed cache
    itself (`absorbs`); `absorb` True / False forces one path (None: the cheaper).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mla: MLAConfig,
        *,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        softmax_scale: float | None = None,
        absorb: bool | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.backend, self.absorb = n_heads, backend, absorb
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        self.scale = softmax_scale if softmax_scale is not None else qk_dim**-0.5
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, n_heads * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, norm_eps)
        # read as a matrix by the absorbed path: it stays a plain full-precision linear (quantization skips it)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_dim, dim, bias=False)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: LatentCache | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        cos, sin = rope
        q = rearrange(self._queries(x), "b t (h d) -> b h t d", h=self.n_heads)
        q_nope, q_rope = q[..., : self.nope], apply_rotary(q[..., self.nope :], cos, sin)

        latent, k_rot = self.kv_a_proj(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        latent = self.kv_a_norm(latent)
        k_rot = apply_rotary(k_rot[:, None], cos, sin)[:, 0]  # one rope key shared by every head
        backend = backend or self.backend
        if cache is None:
            out = self._attend_expanded(q_nope, q_rope, latent, k_rot, mask, backend)
        else:
            kv = cache_update(cache, mask, latent, k_rot)
            if self.absorbs(x.shape[1]):
                out = self._attend_absorbed(q_nope, q_rope, kv, mask, backend)
            else:
                out = self._attend_expanded(
                    q_nope, q_rope, *kv.split((self.kv_lora_rank, self.rope_dim), -1), mask, backend
                )
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))

    def absorbs(self, q_len: int) -> bool:
        """Whether `q_len` cached queries take the absorbed path: per key it costs 2 * rank + rope multiply-adds per
        query against nope + rope + v expanded, plus rank * (nope + v) once per key to expand the latent; so absorb
        while q_len * (2 * rank - nope - v) < rank * (nope + v) (decoding: always; a long prefill: never)."""
        if self.absorb is not None:
            return self.absorb
        rank = self.kv_lora_rank
        return q_len * (2 * rank - self.nope - self.v_dim) < rank * (self.nope + self.v_dim)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight as per-head views: W_uk (H, nope, rank) and W_uv (H, v_dim, rank)."""
        w = rearrange(self.kv_b_proj.weight, "(h d) r -> h d r", h=self.n_heads)
        return w[:, : self.nope], w[:, self.nope :]

    def _attend_expanded(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rot: torch.Tensor,
        mask: AttentionMask,
        backend: str,
    ) -> torch.Tensor:
        """Per-head keys [k_nope | k_rot] and values from kv_b_proj(latent) (B, Tk, rank): the reference form."""
        B, H, Tk = latent.shape[0], self.n_heads, latent.shape[1]
        kv = rearrange(self.kv_b_proj(latent), "b t (h d) -> b h t d", h=H)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        k = torch.cat((k_nope, k_rot[:, None].expand(B, H, Tk, self.rope_dim)), dim=-1)
        return _attend_mixed_dims(torch.cat((q_nope, q_rope), dim=-1), k, v, mask, self.scale, backend)

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, mask: AttentionMask, backend: str
    ) -> torch.Tensor:
        """DeepSeek-V2's absorbed form over the compressed cache kv (B, Tk, rank + rope): q_nope . (W_uk latent) =
        (q_nope W_uk) . latent, so the query moves to latent space and attends, as an MQA with one shared head of
        width rank + rope, to the cached rows themselves (also the values: only their latent part is kept); W_uv then
        maps the latent-space output to each head's values."""
        w_uk, w_uv = self._up_projections()
        q = torch.cat((torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope), dim=-1)
        keys = kv[:, None]
        out = attend(q, keys, keys, mask, window=None, scale=self.scale, backend=backend)[..., : self.kv_lora_rank]
        return torch.einsum("bhtr,hvr->bhtv", out, w_uv)

    def init_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> LatentCache:
        return LatentCache(batch, max_len, self.kv_lora_rank, self.rope_dim, dtype, device)
