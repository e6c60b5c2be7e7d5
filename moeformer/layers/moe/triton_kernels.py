"""Triton kernels of the token-major MoE path (imported only where triton is installed). Each computes in fp32 and
matches a PyTorch reference in moeformer.layers.moe.kernels; inputs must be contiguous. The launchers are plain
functions (what eager calls) and, in `OPS`, the same functions registered as torch custom ops, so torch.compile
keeps each as one opaque call instead of tracing into Triton."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_sum_kernel(src, index, out, D, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(index + t * K + j).to(tl.int64) + tl.zeros_like(cols)  # -1: a row not there, read as zero
        acc += tl.load(src + row * D + cols, mask=mask & (row >= 0), other=0.0).to(tl.float32)
    tl.store(out + t.to(tl.int64) * D + cols, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_forward_kernel(h, weight, rows, out, F, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    if HAS_WEIGHT:
        slot = tl.load(rows + i)
        mask = mask & (tl.zeros_like(cols) + slot >= 0)  # a row not computed (slot -1): neither read nor written
    gate = tl.load(h + i * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h + i * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    value = gate * tl.sigmoid(gate) * up
    if HAS_WEIGHT:
        value = value * tl.load(weight + tl.maximum(slot, 0)).to(tl.float32)
    tl.store(out + i * F + cols, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    h, grad, weight, rows, grad_h, grad_w, F: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64)  # one row per program: the weight's gradient sums over it (F: a model constant)
    if HAS_WEIGHT:
        slot = tl.load(rows + i).to(tl.int64)
        live = tl.zeros([BLOCK], tl.int64) + slot >= 0  # a row not computed: nothing read or written, its slot's
        w = tl.load(weight + tl.maximum(slot, 0)).to(tl.float32)  # gradient stays 0
    else:
        live = tl.full([BLOCK], 1, tl.int1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = (cols < F) & live
        gate = tl.load(h + i * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h + i * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad + i * F + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        if HAS_WEIGHT:
            acc += g * gate * sig * up
            g = g * w
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = g * gate * sig
        tl.store(grad_h + i * 2 * F + cols, d_gate.to(grad_h.dtype.element_ty), mask=mask)
        tl.store(grad_h + i * 2 * F + F + cols, d_up.to(grad_h.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        if slot >= 0:
            tl.store(grad_w + slot, tl.sum(acc, axis=0))


def _block(width: int) -> int:
    return min(1024, triton.next_power_of_2(width))


def _dense(*tensors: Tensor | None) -> list[Tensor | None]:
    """The kernels index rows as contiguous: inside a compiled graph a custom op's inputs keep only their stride
    order (inductor may pad a row), so every launcher makes its inputs dense first (free when they already are)."""
    return [t if t is None else t.contiguous() for t in tensors]


def gather_sum(src: Tensor, index: Tensor, k: int) -> Tensor:
    """out[t] = sum_j src[index[t*k + j]]; (S, D) -> (S // k, D)."""
    src, index = _dense(src, index)
    n, d = index.shape[0] // k, src.shape[1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    block = _block(d)
    _gather_sum_kernel[(n, triton.cdiv(d, block))](src, index, out, d, K=k, BLOCK=block)
    return out


def swiglu_forward(h: Tensor, weight: Tensor | None, rows: Tensor | None) -> Tensor:
    """silu(h[:, :F]) * h[:, F:] for h (S, 2F), row i times weight[rows[i]] when weight is given."""
    h, weight, rows = _dense(h, weight, rows)
    s, f = h.shape[0], h.shape[1] // 2
    out = torch.empty(s, f, dtype=h.dtype, device=h.device)
    block = _block(f)
    has_weight = weight is not None
    _swiglu_forward_kernel[(s, triton.cdiv(f, block))](
        h, weight if has_weight else h, rows if has_weight else h, out, f, HAS_WEIGHT=has_weight, BLOCK=block
    )
    return out


def swiglu_backward(h: Tensor, grad: Tensor, weight: Tensor | None, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradients of swiglu_forward with respect to h (S, 2F) and weight (fp32, like weight; empty without one).
    `rows` must be a permutation of weight's indices (-1: a row not computed): each slot's gradient is written once,
    the slots of no row get 0."""
    h, grad, weight, rows = _dense(h, grad, weight, rows)
    s, f = grad.shape
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    has_weight = weight is not None
    grad_w = torch.zeros(weight.shape[0] if has_weight else 0, dtype=torch.float32, device=h.device)
    _swiglu_backward_kernel[(s,)](
        h,
        grad,
        weight if has_weight else h,
        rows if has_weight else h,
        grad_h,
        grad_w if has_weight else h,
        F=f,
        HAS_WEIGHT=has_weight,
        BLOCK=_block(f),
    )
    return grad_h, grad_w


OPS = SimpleNamespace(
    **{
        fn.__name__: torch.library.custom_op(f"moeformer::{fn.__name__}", fn, mutates_args=())
        for fn in (gather_sum, swiglu_forward, swiglu_backward)
    }
)


@OPS.gather_sum.register_fake
def _(src: Tensor, index: Tensor, k: int) -> Tensor:
    return src.new_empty(index.shape[0] // k, src.shape[1])


@OPS.swiglu_forward.register_fake
def _(h: Tensor, weight: Tensor | None, rows: Tensor | None) -> Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@OPS.swiglu_backward.register_fake
def _(h: Tensor, grad: Tensor, weight: Tensor | None, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(h), h.new_empty(0 if weight is None else weight.shape[0], dtype=torch.float32)
