"""Decayed (gated) linear attention, the shared core of the linear-attention family, in three equivalent forms.

Recurrence per head: S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * q_t S_t, with g_t <= 0 a log decay.
g = 0 is vanilla linear attention, a fixed per-head g is RetNet, a data-dependent g is GLA / Mamba2-style gating.
Forms: `naive` (quadratic, the reference), `chunked` (parallel within chunks, recurrent across them: O(T * chunk)
memory) and `recurrent` (token by token, O(1) state). All take q, k (B, H, T, Dk), v (B, H, T, Dv), compute in fp32
and return (o (B, H, T, Dv) in v's dtype, final state or None).

normalize=True divides by the same recurrence run on a ones value column (phi(q) . decayed sum of phi(k), plus eps);
the state then carries that running key sum as an extra last column: (B, H, Dk, Dv + 1). States are always fp32.
Packed rows: `document_ids` (B, T) or `cu_seqlens` (B == 1) reset the state where a new document starts; the
initial state continues the first document of each row and the final state is that of the last one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeformer.layers.linear_attention.packing import segment_ids


def retnet_log_decay(n_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RetNet's fixed per-head log decays log(1 - 2^(-5 - h)), shape (H,): head 0 forgets fastest."""
    heads = torch.arange(n_heads, dtype=torch.float32, device=device)
    return torch.log1p(-torch.exp2(-5.0 - heads))


def gla_log_decay(gate_logits: torch.Tensor, normalizer: float = 16.0) -> torch.Tensor:
    """GLA-style data-dependent log decay logsigmoid(logits) / normalizer in fp32 (a normalizer > 1 keeps it near 1)."""
    return F.logsigmoid(gate_logits.float()) / normalizer


def prepare_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None,
    normalize: bool,
    initial_state: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate shapes; return fp32 (scaled q, k, v [+ ones column], g (B, H, T), segments or None, state or None)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, T, Dk), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, seq_len, d_k = q.shape
    if seq_len == 0:
        raise ValueError("linear attention needs at least one token (T >= 1)")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, T, Dv) matching q {tuple(q.shape)}, got {tuple(v.shape)}")
    if g is None:
        g = q.new_zeros(batch, heads, seq_len, dtype=torch.float32)
    elif g.shape == (heads,):
        g = g.float()[None, :, None].expand(batch, heads, seq_len)
    elif g.shape == (batch, heads, seq_len):
        g = g.float()
    else:
        raise ValueError(f"g must be (B, H, T) = {(batch, heads, seq_len)} or (H,) = ({heads},), got {tuple(g.shape)}")
    state_shape = (batch, heads, d_k, v.shape[-1] + int(normalize))
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(
            f"initial_state must have shape {state_shape} (normalize={normalize}), got {tuple(initial_state.shape)}"
        )
    segments = segment_ids(document_ids, cu_seqlens, batch, seq_len)
    scale = d_k**-0.5 if scale is None else scale
    v = v.float()
    if normalize:
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    state = None if initial_state is None else initial_state.float()
    return q.float() * scale, k.float(), v, g, segments, state


def _finish(o: torch.Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Divide by the denominator column when normalising and cast to the output dtype."""
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o.to(dtype)


def decayed_linear_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quadratic reference: o = (q k^T * D) v with D[t, s] = exp(G_t - G_s) on causal same-document pairs."""
    dtype = v.dtype
    q, k, v, g, segments, state = prepare_inputs(q, k, v, g, scale, normalize, initial_state, document_ids, cu_seqlens)
    batch, _, seq_len, _ = q.shape
    if segments is None:
        segments = torch.zeros(batch, seq_len, dtype=torch.long, device=q.device)
    cum = g.cumsum(-1)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    visible = causal & (segments[:, :, None] == segments[:, None, :])
    decay = torch.where(visible[:, None], cum[..., :, None] - cum[..., None, :], -math.inf).exp()
    o = (q @ k.transpose(-1, -2) * decay) @ v
    in_first = (segments == segments[:, :1])[:, None]  # tokens that still see the initial state
    if state is not None:
        o = o + (q * (cum.exp() * in_first)[..., None]) @ state
    final = None
    if output_final_state:
        in_last = (segments == segments[:, -1:])[:, None]
        weights = (cum[..., -1:] - cum).exp() * in_last
        final = (k * weights[..., None]).transpose(-1, -2) @ v
        if state is not None:
            final = final + state * (cum[..., -1].exp() * in_first[..., -1])[..., None, None]
    return _finish(o, normalize, eps, dtype), final


def check_chunk_size(chunk_size: int) -> None:
    """Chunk sizes are positive ints (any value: the last chunk is zero-padded)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


class ChunkLayout:
    """Padding and per-chunk document masks shared by the chunked forms; tensors are (B, 1, N, C[, C])."""

    def __init__(self, segments: torch.Tensor | None, batch: int, seq_len: int, chunk_size: int, device) -> None:
        if segments is None:
            segments = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        self.n_chunks, self.chunk_size = -(-seq_len // chunk_size), chunk_size
        self.pad = self.n_chunks * chunk_size - seq_len
        # padding tokens join the last document; the forms give them k = v = 0, so they change nothing
        segments = torch.cat([segments, segments[:, -1:].expand(batch, self.pad)], 1)
        segments = segments.view(batch, 1, self.n_chunks, chunk_size)
        incoming = torch.cat([segments[..., :1, 0], segments[..., :-1, -1]], -1)  # document of the entering state
        self.sees_state = segments == incoming[..., None]
        self.in_last = segments == segments[..., -1:]
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()
        self.visible = causal & (segments[..., :, None] == segments[..., None, :])

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T[, D]) -> zero-padded (B, H, N, C[, D])."""
        pad = (0, 0, 0, self.pad) if x.dim() == 4 else (0, self.pad)
        return F.pad(x, pad).view(*x.shape[:2], self.n_chunks, self.chunk_size, *x.shape[3:])

    def merge(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(B, H, N, C, D) -> (B, H, T, D), dropping the padding."""
        return x.reshape(*x.shape[:2], -1, x.shape[-1])[:, :, :seq_len]


def decayed_linear_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form: quadratic inside chunks of `chunk_size`, a state scan across them (any T).

    Decays enter only as exp of differences of in-chunk cumulative log decays, all <= 0, so nothing overflows.
    """
    check_chunk_size(chunk_size)
    dtype = v.dtype
    q, k, v, g, segments, state = prepare_inputs(q, k, v, g, scale, normalize, initial_state, document_ids, cu_seqlens)
    batch, heads, seq_len, d_k = q.shape
    chunks = ChunkLayout(segments, batch, seq_len, chunk_size, q.device)
    q, k, v, cum = chunks.split(q), chunks.split(k), chunks.split(v), chunks.split(g).cumsum(-1)

    decay = torch.where(chunks.visible, cum[..., :, None] - cum[..., None, :], -math.inf).exp()
    o = (q @ k.transpose(-1, -2) * decay) @ v
    updates = (k * ((cum[..., -1:] - cum).exp() * chunks.in_last)[..., None]).transpose(-1, -2) @ v
    carried = cum[..., -1].exp() * chunks.sees_state[..., -1]  # share of the entering state kept at the chunk end
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if state is None else state
    entering = []
    for n in range(chunks.n_chunks):
        entering.append(state)
        state = carried[:, :, n, None, None] * state + updates[:, :, n]
    o = o + (q * (cum.exp() * chunks.sees_state)[..., None]) @ torch.stack(entering, dim=2)
    return _finish(chunks.merge(o, seq_len), normalize, eps, dtype), state if output_final_state else None


def decayed_linear_attn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence with an O(1) state (B, H, Dk, Dv [+1]): the decoding form."""
    dtype = v.dtype
    q, k, v, g, segments, state = prepare_inputs(q, k, v, g, scale, normalize, initial_state, document_ids, cu_seqlens)
    batch, heads, seq_len, d_k = q.shape
    keep = g.exp()
    if segments is not None:
        keep = torch.cat([keep[..., :1], keep[..., 1:] * (segments[:, None, 1:] == segments[:, None, :-1])], -1)
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if state is None else state
    outputs = []
    for t in range(seq_len):
        state = keep[..., t, None, None] * state + k[..., t, :, None] * v[..., t, None, :]
        outputs.append((q[..., t, None, :] @ state).squeeze(-2))
    return _finish(torch.stack(outputs, dim=2), normalize, eps, dtype), state if output_final_state else None
