"""Router losses as pure functions: Switch/GShard load balancing, router z-loss, DeepSeek-V3 sequence-level
balancing. Each equals 1.0 (the balance losses) when routing is perfectly balanced; padding is excluded."""

from __future__ import annotations

from torch import Tensor


def _token_weights(like: Tensor, token_mask: Tensor | None) -> Tensor:
    """1.0 for real tokens and 0.0 for padding, shaped like `like` without its expert axis."""
    if token_mask is None:
        return like.new_ones(like.shape[:-1])
    return token_mask.reshape(like.shape[:-1]).to(like.dtype)


def load_balancing_loss(probs: Tensor, assigned: Tensor, top_k: int, token_mask: Tensor | None = None) -> Tensor:
    """E * sum_i f_i * P_i with f_i = (assignments to expert i) / (tokens * top_k) and P_i = mean probability of
    expert i. probs and assigned are (..., E); token_mask (...) bool, True = real token."""
    e = probs.shape[-1]
    probs, assigned = probs.reshape(-1, e), assigned.reshape(-1, e)
    if token_mask is None:  # plain means: fewer kernels on the hot path
        f, p = assigned.mean(0) / top_k, probs.mean(0)
    else:
        m = token_mask.reshape(-1, 1).to(probs.dtype)
        n = m.sum().clamp_min(1.0)
        f, p = (assigned * m).sum(0) / (n * top_k), (probs * m).sum(0) / n
    return e * (f * p).sum()


def router_z_loss(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean over real tokens of logsumexp(logits)^2: keeps router logits small (ST-MoE)."""
    m = _token_weights(logits, token_mask)
    z = logits.float().logsumexp(dim=-1).square()
    return (z * m).sum() / m.sum().clamp_min(1.0)


def sequence_aux_loss(probs: Tensor, assigned: Tensor, top_k: int, token_mask: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance: per sequence sum_i f_i * P_i with f_i = E / (k * T) * count_i and P_i the
    mean (normalised) score over the sequence's T real tokens; averaged over sequences with real tokens.
    probs and assigned are (B, T, E); token_mask (B, T)."""
    e = probs.shape[-1]
    m = _token_weights(probs, token_mask)  # (B, T)
    t = m.sum(dim=1)  # real tokens per sequence
    counts = (assigned * m.unsqueeze(-1)).sum(dim=1)  # (B, E)
    f = counts * (e / (top_k * t.clamp_min(1.0))).unsqueeze(-1)
    p = (probs * m.unsqueeze(-1)).sum(dim=1) / t.clamp_min(1.0).unsqueeze(-1)
    has_tokens = (t > 0).to(probs.dtype)
    return ((f * p).sum(dim=-1) * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)
