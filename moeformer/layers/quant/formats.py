"""Weight-only quantization formats and their plain-PyTorch quantize / dequantize (the references).

A weight is a matrix (..., N, K) = (..., out, in), leading dims stacking matrices (experts); K is the reduction
dimension and is contiguous in the codes.
- int8: symmetric per output channel, w ~ scale[n] * q[n, k], q in [-127, 127], scale = absmax / 127.
- int4: asymmetric per group of `group_size` consecutive inputs, w ~ scale[n, g] * q[n, k] + offset[n, g],
  q in [0, 15], offset = the group's minimum, scale = its range / 15; two codes per byte, packed in "split halves"
  within each group: byte j of a group's G / 2 bytes holds input j in its low nibble and input j + G / 2 in its high
  nibble, so a kernel unpacks a group with no interleave and reads each half of its activations contiguously.
Scales and offsets are stored in a floating dtype (the model's), rounded outward (scale up, offset down) so that
every code stays in range and |w - dequantized| <= scale / 2 holds for the stored values.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}
QUANT_BITS = {"none": 0, "int8": 8, "int4": 4}  # bits per code, the kernels' QUANT constant ("none": full precision)
INT8_MAX, INT4_MAX = 127, 15


def check_format(mode: str, group_size: int) -> None:
    """ValueError for an unknown mode or a group size outside GROUP_SIZES."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {MODES}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def _round_outward(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """fp32 `x` rounded to `dtype`, never below it (up) or never above it (down)."""
    y = x.to(dtype)
    wrong = y.float() < x if up else y.float() > x
    limit = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, limit), y)


def quantize_int8(weight: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(codes int8 (..., N, K), scale (..., N) in `dtype`, default the weight's)."""
    dtype = dtype or weight.dtype
    w = weight.float()
    scale = _round_outward(w.abs().amax(-1) / INT8_MAX, dtype, up=True).clamp_min(torch.finfo(dtype).tiny)
    codes = torch.round(w / scale.float().unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_int4(weight: Tensor, group_size: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes uint8 (..., N, K / 2), scale and offset (..., N, K / group_size) in `dtype`)."""
    dtype = dtype or weight.dtype
    *lead, n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input width {k} to be a multiple of group_size={group_size}")
    w = weight.float().reshape(*lead, n, k // group_size, group_size)
    offset = _round_outward(w.amin(-1), dtype, up=False)
    span = w.amax(-1) - offset.float()
    scale = _round_outward(span / INT4_MAX, dtype, up=True).clamp_min(torch.finfo(dtype).tiny)
    q = torch.round((w - offset.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, INT4_MAX)
    return pack_int4(q.to(torch.uint8).reshape(*lead, n, k), group_size), scale, offset


def pack_int4(q: Tensor, group_size: int) -> Tensor:
    """uint8 codes in [0, 15] (..., K) -> bytes (..., K / 2) in split halves: per group of `group_size` inputs,
    byte j holds input j (low nibble) and input j + group_size / 2 (high nibble)."""
    *lead, k = q.shape
    halves = q.reshape(*lead, k // group_size, 2, group_size // 2)
    return (halves[..., 0, :] | (halves[..., 1, :] << 4)).reshape(*lead, k // 2)


def unpack_int4(packed: Tensor, group_size: int) -> Tensor:
    """The inverse of pack_int4: bytes (..., K / 2) -> codes (..., K)."""
    *lead, k_half = packed.shape
    groups = packed.reshape(*lead, 2 * k_half // group_size, 1, group_size // 2)
    return torch.cat((groups & 15, groups >> 4), dim=-2).reshape(*lead, 2 * k_half)


def dequantize(codes: Tensor, scale: Tensor, offset: Tensor | None, mode: str, group_size: int) -> Tensor:
    """The fp32 weight (..., N, K) that the codes stand for."""
    if mode == "int8":
        return codes.float() * scale.float().unsqueeze(-1)
    q = unpack_int4(codes, group_size).float()
    *lead, n, k = q.shape
    q = q.view(*lead, n, k // group_size, group_size)
    return (q * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)).view(*lead, n, k)
