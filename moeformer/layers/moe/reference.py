"""Slow per-token MoE forward used to check the fast path: explicit matmuls for every (token, expert) slot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layer import MoE


def _expert(x: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """One expert on one token: x (dim,) @ w_in (dim, 2F | F) -> activation -> @ w_out (F, dim)."""
    h = x @ w_in
    if activation == "swiglu":
        f = w_out.shape[0]
        h = F.silu(h[:f]) * h[f:]
    else:
        h = F.gelu(h)
    return h @ w_out


def moe_reference(x: Tensor, layer: MoE, token_mask: Tensor | None = None) -> Tensor:
    """layer(x, token_mask)[0] computed one slot at a time with the layer's own routing. The capacity rule is
    replayed by walking slots in order (token-major), so each expert keeps its earliest tokens."""
    b, t, d = x.shape
    cfg, experts = layer.config, layer.experts
    flat = x.reshape(b * t, d)
    mask = None if token_mask is None else token_mask.reshape(b * t).bool()
    routing = layer.router(flat, mask)
    capacity = layer.capacity(b * t)
    w_in_all, w_out_all = experts.dense_weights()
    taken = [0] * cfg.num_experts
    rows = [flat.new_zeros(d, dtype=torch.float32) for _ in range(b * t)]
    for token, expert, weight in zip(
        routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weights, strict=True
    ):
        if mask is not None and not mask[token]:
            continue
        if capacity is not None and taken[expert] >= capacity:
            continue
        taken[expert] += 1
        w_in, w_out = w_in_all[expert].to(x.dtype), w_out_all[expert].to(x.dtype)
        rows[token] = rows[token] + weight * _expert(flat[token], w_in, w_out, cfg.activation).float()
    out = torch.stack(rows).to(x.dtype)
    shared = layer.shared(flat)
    if shared is not None:
        out = out + shared
    return out.view(b, t, d)
