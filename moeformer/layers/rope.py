"""Rotary position embeddings with the linear / dynamic-NTK / YaRN / Llama-3 frequency scalings.

Frequencies follow the published formulas with the same float32 arithmetic as Hugging Face transformers, so
cos/sin (and therefore logits) match checkpoints trained with those scalings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SCALING_KEYS: dict[str, tuple[set[str], set[str]]] = {  # type -> (required keys, optional keys)
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": (
        {"factor"},
        {
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "attention_factor",
            "truncate",
        },
    ),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor"}, {"original_max_position_embeddings"}),
}


def _check_scaling(scaling: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Split a scaling dict into (type, params) and reject unknown types, missing or unexpected keys."""
    if not scaling:
        return "default", {}
    params = dict(scaling)
    kind = params.pop("type", None)
    kind = params.pop("rope_type", kind)  # Hugging Face configs spell it rope_type
    if kind in (None, "default"):
        if params:
            raise ValueError(
                f"rope scaling without a type got keys {sorted(params)}; set 'type' to one of {sorted(SCALING_KEYS)}"
            )
        return "default", {}
    if kind not in SCALING_KEYS:
        raise ValueError(f"unknown rope scaling type {kind!r}; expected one of {sorted(SCALING_KEYS)}")
    required, optional = SCALING_KEYS[kind]
    missing, unknown = required - set(params), set(params) - required - optional
    if missing or unknown:
        raise ValueError(f"rope scaling {kind!r}: missing keys {sorted(missing)}, unexpected keys {sorted(unknown)}")
    return kind, params


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-magnitude correction for a context stretched by `factor` (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """Produces per-position (cos, sin) tables of width `rotary_dim` for `apply_rotary`.

    scaling: None or {"type": "linear"|"dynamic"|"yarn"|"llama3", "factor": ..., ...} with Hugging Face's key names.
    "dynamic" (NTK) raises the base once positions exceed `max_seq_len` (the pretraining length), using the largest
    position of each call; yarn and llama3 take `original_max_position_embeddings` (default `max_seq_len`).
    """

    def __init__(
        self, rotary_dim: int, theta: float = 10000.0, max_seq_len: int = 2048, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
        self.rotary_dim, self.theta, self.max_seq_len = rotary_dim, float(theta), max_seq_len
        self.scaling_type, self.params = _check_scaling(scaling)
        self.attention_scaling = self._attention_scaling()
        # Recomputed per call (dim/2 values) rather than stored: a buffer would be rounded by `model.to(bfloat16)`.

    def _exponents(self, device: torch.device | None) -> torch.Tensor:
        return torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float() / self.rotary_dim

    def _attention_scaling(self) -> float:
        if self.scaling_type != "yarn":
            return 1.0
        p = self.params
        if p.get("attention_factor") is not None:
            return float(p["attention_factor"])
        if p.get("mscale") and p.get("mscale_all_dim"):
            return float(yarn_mscale(p["factor"], p["mscale"]) / yarn_mscale(p["factor"], p["mscale_all_dim"]))
        return yarn_mscale(p["factor"])

    def inv_freq(self, seq_len: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Inverse frequencies (rotary_dim/2,) float32; `seq_len` (0-d tensor) only matters for dynamic NTK."""
        base_inv = 1.0 / (self.theta ** self._exponents(device))
        kind, p = self.scaling_type, self.params
        if kind == "linear":
            return base_inv / p["factor"]
        if kind == "dynamic":
            return base_inv if seq_len is None else self._dynamic_inv_freq(base_inv, seq_len)
        if kind == "yarn":
            return self._yarn_inv_freq(device)
        if kind == "llama3":
            return self._llama3_inv_freq(base_inv)
        return base_inv

    def _dynamic_inv_freq(self, base_inv: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """NTK-aware base growth for sequences longer than max_seq_len; the unscaled frequencies otherwise."""
        factor, dim = self.params["factor"], self.rotary_dim
        stretched = torch.maximum(seq_len, torch.tensor(self.max_seq_len, dtype=seq_len.dtype, device=seq_len.device))
        base = self.theta * ((factor * stretched / self.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
        scaled_inv = 1.0 / (base ** self._exponents(seq_len.device))
        return torch.where(seq_len > self.max_seq_len, scaled_inv, base_inv)

    def _yarn_inv_freq(self, device: torch.device | None) -> torch.Tensor:
        """Blend interpolated (low-frequency) and extrapolated (high-frequency) dims with a linear ramp."""
        p, dim = self.params, self.rotary_dim
        factor = p["factor"]
        original = p.get("original_max_position_embeddings") or self.max_seq_len
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def dim_for_rotations(rotations: float) -> float:  # dim index whose wavelength fits `rotations` in `original`
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        pos_freqs = self.theta ** self._exponents(device)
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate

    def _llama3_inv_freq(self, base_inv: torch.Tensor) -> torch.Tensor:
        """Keep high frequencies, divide low ones by `factor`, interpolate smoothly in between."""
        p = self.params
        factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        original = p.get("original_max_position_embeddings") or self.max_seq_len
        low_wavelen, high_wavelen = original / low_ff, original / high_ff
        wavelen = 2 * math.pi / base_inv
        inv = torch.where(wavelen > low_wavelen, base_inv / factor, base_inv)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) long -> (cos, sin), each (B, T, rotary_dim) float32."""
        if positions.dim() != 2:
            raise ValueError(f"positions must be (batch, seq) integers, got shape {tuple(positions.shape)}")
        seq_len = positions.max() + 1 if self.scaling_type == "dynamic" and positions.numel() else None
        inv_freq = self.inv_freq(seq_len, positions.device)
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, theta={self.theta}, scaling={self.scaling_type}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, D) by (cos, sin) (B, T, R); the rest pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} exceeds head_dim {x.shape[-1]}")
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    rotated = (rot * cos + rotate_half(rot) * sin).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
