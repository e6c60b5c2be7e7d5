"""Vanilla linear attention: the feature maps phi (its forms are the shared core's with no decay, g = None).

o_t = phi(q_t) sum_{s<=t} phi(k_s) v_s^T, optionally divided by phi(q_t) . sum_{s<=t} phi(k_s) (+ eps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAPS = ("elu", "relu", "identity", "performer")


class ElementwiseFeatureMap(nn.Module):
    """phi applied per element: "elu" (elu + 1, positive), "relu" (non-negative) or "identity" (signed)."""

    def __init__(self, name: str, dim: int) -> None:
        super().__init__()
        if name not in ("elu", "relu", "identity"):
            raise ValueError(f"unknown elementwise feature map {name!r}")
        self.name = name
        self.out_dim = dim
        self.non_negative = name != "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "elu":
            return F.elu(x) + 1.0
        if self.name == "relu":
            return F.relu(x)
        return x

    def extra_repr(self) -> str:
        return self.name


def orthogonal_gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) stacked blocks of random orthogonal directions with chi-distributed norms (FAVOR+ projections)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(rows / cols)):
        q, r = torch.linalg.qr(torch.randn(cols, cols, generator=generator, device="cpu"))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix makes the rotation uniformly random
    norms = torch.randn(rows, cols, generator=generator, device="cpu").norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


class PerformerFeatureMap(nn.Module):
    """Positive random features phi(x) = exp(w x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4), so that
    phi(q) . phi(k) is an unbiased estimate of exp(q . k / sqrt(d)) (softmax kernel, Performer FAVOR+).

    The projection (m, d) is fixed, drawn from `seed`, and kept as a buffer so checkpoints carry it.
    """

    def __init__(self, dim: int, num_features: int, seed: int = 0) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.dim, self.out_dim, self.seed = dim, num_features, seed
        self.non_negative = True
        self.register_buffer("projection", orthogonal_gaussian(num_features, dim, seed))

    def reset_parameters(self) -> None:
        """Redraw the projection from the seed (after meta-device init or `to_empty`)."""
        with torch.no_grad():
            self.projection.copy_(orthogonal_gaussian(self.out_dim, self.dim, self.seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() * self.dim**-0.25
        logits = xf @ self.projection.float().T - xf.pow(2).sum(-1, keepdim=True) / 2
        return (logits.exp() * self.out_dim**-0.5).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_features={self.out_dim}, seed={self.seed}"


def build_feature_map(name: str, dim: int, num_features: int | None = None, seed: int = 0) -> nn.Module:
    """Feature map by name; modules expose `out_dim` (feature size) and `non_negative` (safe to normalise)."""
    if name == "performer":
        return PerformerFeatureMap(dim, num_features or dim, seed)
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; expected one of {FEATURE_MAPS}")
    if num_features is not None and num_features != dim:
        raise ValueError(f"num_features only applies to the performer map, got {num_features} for {name!r}")
    return ElementwiseFeatureMap(name, dim)
