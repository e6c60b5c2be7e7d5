"""DeltaNet's delta rule: the state is corrected towards v_t along k_t instead of only accumulating.

S_t = S_{t-1} + k_t u_t^T with u_t = beta_t (v_t - S_{t-1}^T k_t), o_t = scale * q_t S_t; keys should be L2-normalised
and beta in (0, 1) so each step is a contraction. Forms: `recurrent` (the definition, decoding), `chunked` (WY form:
inside a chunk, U solves the unit lower-triangular system (I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K S))
and `naive` (that closed form over the whole sequence, O(T^2)). Layout, dtypes, states and packing as in decayed.py.
"""

from __future__ import annotations

import torch

from moeformer.layers.linear_attention.decayed import ChunkLayout, check_chunk_size, prepare_inputs


def _prepare_beta(beta: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be (B, H, T) = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    return beta.float()


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked delta rule: a triangular solve per chunk (all chunks at once), then a state scan across chunks."""
    check_chunk_size(chunk_size)
    dtype = v.dtype
    beta = _prepare_beta(beta, q)
    q, k, v, _, segments, state = prepare_inputs(q, k, v, None, scale, False, initial_state, document_ids, cu_seqlens)
    batch, heads, seq_len, d_k = q.shape
    chunks = ChunkLayout(segments, batch, seq_len, chunk_size, q.device)
    q, k, v, beta = chunks.split(q), chunks.split(k), chunks.split(v), chunks.split(beta)[..., None]

    strictly_before = chunks.visible & ~torch.eye(chunk_size, dtype=torch.bool, device=q.device)
    system = torch.eye(chunk_size, device=q.device) + beta * (k @ k.transpose(-1, -2)) * strictly_before
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    w, u = solve(beta * k * chunks.sees_state[..., None]), solve(beta * v)  # u_t = u0_t - w_t . S_entering
    scores = (q @ k.transpose(-1, -2)) * chunks.visible
    carried = chunks.sees_state[..., -1, None, None].float()
    keys_out = (k * chunks.in_last[..., None]).transpose(-1, -2)
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if state is None else state
    outputs = []
    for n in range(chunks.n_chunks):
        u_n = u[:, :, n] - w[:, :, n] @ state
        outputs.append((q[:, :, n] * chunks.sees_state[:, :, n, :, None]) @ state + scores[:, :, n] @ u_n)
        state = carried[:, :, n] * state + keys_out[:, :, n] @ u_n
    o = chunks.merge(torch.stack(outputs, dim=2), seq_len)
    return o.to(dtype), state if output_final_state else None


def delta_rule_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quadratic closed form: the WY solve over the whole sequence as a single chunk."""
    return delta_rule_chunked(q, k, v, beta, chunk_size=q.shape[2], **kwargs)


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token delta rule with an O(1) state (B, H, Dk, Dv): the definition and the decoding form."""
    dtype = v.dtype
    beta = _prepare_beta(beta, q)
    q, k, v, _, segments, state = prepare_inputs(q, k, v, None, scale, False, initial_state, document_ids, cu_seqlens)
    batch, heads, seq_len, d_k = q.shape
    keep = torch.ones(batch, 1, seq_len, device=q.device)
    if segments is not None:
        keep[..., 1:] = (segments[:, None, 1:] == segments[:, None, :-1]).float()
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if state is None else state
    outputs = []
    for t in range(seq_len):
        state = keep[..., t, None, None] * state
        correction = beta[..., t, None] * (v[..., t, :] - (k[..., t, None, :] @ state).squeeze(-2))
        state = state + k[..., t, :, None] * correction[..., None, :]
        outputs.append((q[..., t, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2).to(dtype), state if output_final_state else None
