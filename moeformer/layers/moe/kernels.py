"""The token-major MoE path's memory-bound ops: dispatch (permute token rows into expert order), combine (each
token's weighted sum of its k expert outputs) and the SwiGLU activation. Each has a PyTorch reference here and a
Triton kernel (triton_kernels.py) used on CUDA, eager or compiled (as custom ops; inductor's own fusion of the
references measured slower). Every backward is a gather: no atomics, deterministic."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # at import, not per call: torch.compile cannot trace a lazy import
    from moeformer.layers.moe import triton_kernels as _triton
except ImportError:  # no triton (CPU installs): the references serve everywhere
    _triton = None


def triton_kernels(x: Tensor) -> ModuleType | None:
    """The Triton kernels module (custom ops) when x is on CUDA and triton imports, else None (use the references)."""
    return _triton if x.is_cuda else None


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# ---- references -----------------------------------------------------------------------------------------------
def gather_sum_reference(src: Tensor, index: Tensor, weight: Tensor | None, k: int) -> Tensor:
    """out[t] = sum_j weight[t*k + j] * src[index[t*k + j]] (weight 1 when None), accumulated in fp32 (or wider)."""
    acc = _accumulation_dtype(src)
    rows = src.index_select(0, index).view(-1, k, src.shape[-1]).to(acc)
    if weight is not None:
        rows = rows * weight.to(acc).view(-1, k, 1)
    return rows.sum(dim=1).to(src.dtype)


def combine_backward_reference(grad: Tensor, y: Tensor, order: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Gradients of gather_sum(y, inverse(order), weight, k) with respect to y (expert order) and weight (slots)."""
    acc = _accumulation_dtype(y)
    g = grad.index_select(0, order // k).to(acc)
    grad_y = (g * weight.index_select(0, order).to(acc).unsqueeze(-1)).to(y.dtype)
    grad_w_sorted = (g * y.to(acc)).sum(dim=-1)
    return grad_y, torch.empty_like(grad_w_sorted).index_copy_(0, order, grad_w_sorted)


def swiglu_reference(h: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up] along the last dimension."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- autograd ops ---------------------------------------------------------------------------------------------
def _gather_sum(src: Tensor, index: Tensor, weight: Tensor | None, k: int) -> Tensor:
    kernels = triton_kernels(src)
    if kernels is None:
        return gather_sum_reference(src, index, weight, k)
    return kernels.gather_sum(src.contiguous(), index, weight, k)


class PermuteRows(torch.autograd.Function):
    """out[i] = x[rows[i]] where rows[i] = perm[i] // k for a permutation `perm` of the N*k slots (k = 1: a plain
    row permutation). `inverse` is perm's inverse, so the backward is a gather too: each source row collects its k
    slot gradients, grad_x[t] = sum_j grad[inverse[t*k + j]], instead of index_select's atomic scatter-add."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return _gather_sum(grad, inverse, None, ctx.k), None, None, None


class Combine(torch.autograd.Function):
    """out[t] = sum_j weight[t*k + j] * y[inverse[t*k + j]]: y (S, D) in expert order, weight (S,) per slot."""

    @staticmethod
    def forward(ctx, y: Tensor, order: Tensor, inverse: Tensor, weight: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(y, order, weight)
        ctx.k = k
        return _gather_sum(y, inverse, weight, k)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, Tensor | None, None]:
        y, order, weight = ctx.saved_tensors
        kernels = triton_kernels(grad)
        backward = combine_backward_reference if kernels is None else kernels.combine_backward
        grad_y, grad_w = backward(grad.contiguous(), y, order, weight, ctx.k)
        return grad_y, None, None, grad_w.to(weight.dtype), None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return triton_kernels(h).swiglu_forward(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return triton_kernels(h).swiglu_backward(h, grad.contiguous())


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up for h (S, 2F) = [gate | up]: one fused kernel each way on CUDA, else the reference."""
    if triton_kernels(h) is None or h.dim() != 2 or not h.is_contiguous():
        return swiglu_reference(h)
    return _SwiGLU.apply(h)
