"""Fused expert FFN over token slots, reading only the chosen experts' weights in place: per slot s,
weights[s] * expert_{expert_idx[s]}(x[token_idx[s]]), the activation and routing weight fused into the first
matmul. No dispatch buffer, sort (up to MAX_SCAN_SLOTS slots) or scatter: two Triton kernels on CUDA
(fused_experts_triton.py), for full-precision and int8/int4 expert weights alike. The reference beside them
dequantises each chosen expert in fp32 and computes in fp32; it serves on CPU and wherever a gradient must flow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moeformer.layers.quant import QUANT_BITS, QuantizedWeight, dequantize
from moeformer.layers.triton_dispatch import runs_triton

try:  # at import, not per call: torch.compile cannot trace a lazy import
    from moeformer.layers.moe import fused_experts_triton as _triton
except ImportError:  # no triton (CPU installs): the reference serves everywhere
    _triton = None

# Up to this many slots (batch 64 x top-8) the kernels' programs find their rows by scanning the routing; more slots
# need `order` and `counts` (one argsort + bincount), which cost launches a decode step should not pay.
MAX_SCAN_SLOTS = 512


def _expert_matrix(
    w: Tensor, scale: Tensor | None, offset: Tensor | None, mode: str, group_size: int, e: int
) -> Tensor:
    """Expert e's weight as an fp32 (K, N) matrix: full precision is stored so, codes are (N, K)."""
    if mode == "none":
        return w[e].float()
    return dequantize(w[e], scale[e], None if offset is None else offset[e], mode, group_size).t()


def fused_experts_reference(
    x: Tensor,
    token_idx: Tensor | None,
    expert_idx: Tensor,
    weights: Tensor,
    w_in: Tensor,
    scale_in: Tensor | None,
    offset_in: Tensor | None,
    w_out: Tensor,
    scale_out: Tensor | None,
    offset_out: Tensor | None,
    mode: str,
    group_size: int,
    activation: str,
) -> Tensor:
    """(1, S, D) fp32: each chosen expert's weights gathered (dequantised) in fp32, applied to its slots in fp32."""
    if token_idx is None:
        token_idx = torch.arange(x.shape[0], device=x.device).repeat_interleave(expert_idx.numel() // x.shape[0])
    y = x.new_zeros(1, expert_idx.numel(), x.shape[1], dtype=torch.float32)
    for e in expert_idx.unique().tolist():
        slots = (expert_idx == e).nonzero().squeeze(1)
        h = x[token_idx[slots]].float() @ _expert_matrix(w_in, scale_in, offset_in, mode, group_size, e)
        if activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        h = h * weights[slots].float().unsqueeze(-1)
        y[0, slots] = h @ _expert_matrix(w_out, scale_out, offset_out, mode, group_size, e)
    return y


def triton_serves(x: Tensor) -> bool:
    """Whether the Triton kernels (rather than the reference) compute for x."""
    return _triton is not None and runs_triton(x)


def _fused_experts(
    x: Tensor,
    token_idx: Tensor | None,
    expert_idx: Tensor,
    weights: Tensor,
    w_in: Tensor,
    scale_in: Tensor | None,
    offset_in: Tensor | None,
    w_out: Tensor,
    scale_out: Tensor | None,
    offset_out: Tensor | None,
    mode: str,
    group_size: int,
    ffn_dim: int,
    activation: str,
    order: Tensor | None,
    counts: Tensor | None,
) -> Tensor:
    if triton_serves(x):
        return _triton.fused_experts(
            x,
            token_idx,
            expert_idx,
            weights,
            w_in,
            scale_in,
            offset_in,
            w_out,
            scale_out,
            offset_out,
            QUANT_BITS[mode],
            group_size,
            ffn_dim,
            activation == "swiglu",
            order,
            counts,
        )
    return fused_experts_reference(
        x,
        token_idx,
        expert_idx,
        weights,
        w_in,
        scale_in,
        offset_in,
        w_out,
        scale_out,
        offset_out,
        mode,
        group_size,
        activation,
    )


_fused_experts_op = torch.library.custom_op("moeformer::fused_experts", _fused_experts, mutates_args=())


@_fused_experts_op.register_fake
def _(
    x: Tensor,
    token_idx: Tensor | None,
    expert_idx: Tensor,
    weights: Tensor,
    w_in: Tensor,
    scale_in: Tensor | None,
    offset_in: Tensor | None,
    w_out: Tensor,
    scale_out: Tensor | None,
    offset_out: Tensor | None,
    mode: str,
    group_size: int,
    ffn_dim: int,
    activation: str,
    order: Tensor | None,
    counts: Tensor | None,
) -> Tensor:
    split = 1
    if triton_serves(x):
        s, dim = expert_idx.shape[0], x.shape[1]
        split = _triton.experts_config(
            x.shape[0], s, w_in.shape[0], dim, ffn_dim, QUANT_BITS[mode], group_size, order is not None
        ).split
    return x.new_empty(split, expert_idx.shape[0], x.shape[1], dtype=torch.float32)


def _parts(w: Tensor | QuantizedWeight) -> tuple[Tensor, Tensor | None, Tensor | None, str, int]:
    if isinstance(w, QuantizedWeight):
        return w.codes, w.scale, w.offset, w.mode, w.group_size or 0
    return w, None, None, "none", 0


def fused_experts(
    x: Tensor,
    token_idx: Tensor | None,
    expert_idx: Tensor,
    weights: Tensor,
    w_in: Tensor | QuantizedWeight,
    w_out: Tensor | QuantizedWeight,
    activation: str,
    order: Tensor | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """Per-slot expert outputs, fp32 (split, S, D): their sum over the first dimension (a K split of the second
    matmul, summed by the caller together with each token's slots) is weights[s] * expert_e(x[token_idx[s]]) for
    e = expert_idx[s]. token_idx None: token-major slots, k = S / N per token (slot s belongs to token s // k, and
    no index tensor need exist). x (N, D) in the compute dtype; w_in (E, D, 2F | F) and w_out (E, F, D) full
    precision (x's dtype) or both quantized alike. With `order` (slots sorted by expert) and `counts` (slots per
    expert) the kernels take the sorted rows, else they scan the routing (meant for at most MAX_SCAN_SLOTS slots).
    Under torch.compile one opaque custom op; with a gradient to flow, the (differentiable) reference."""
    (w1, s1, o1, mode, group), (w2, s2, o2, mode2, _) = _parts(w_in), _parts(w_out)
    if token_idx is None and expert_idx.numel() % x.shape[0]:
        raise ValueError(f"token-major slots need a multiple of {x.shape[0]} slots, got {expert_idx.numel()}")
    if mode != mode2:
        raise ValueError(f"w_in and w_out must be quantized alike, got {mode!r} and {mode2!r}")
    ffn_dim = w_out.shape[-2]
    args = (x, token_idx, expert_idx, weights, w1, s1, o1, w2, s2, o2, mode, group)
    if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad or w1.requires_grad or w2.requires_grad):
        return fused_experts_reference(*args, activation)
    op = _fused_experts_op if torch.compiler.is_compiling() else _fused_experts
    return op(*args, ffn_dim, activation, order, counts)
