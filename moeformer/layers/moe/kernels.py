"""The token-major MoE path's memory-bound ops: dispatch (permute token rows into expert order), combine (each
token's sum of its k expert outputs) and the SwiGLU activation, which also applies the routing weights (one scale
per row, on the F-wide activation rather than the D-wide output, so the combine needs no weights and its backward
is a plain gather). Each has a PyTorch reference here and a Triton kernel (triton_kernels.py) used on CUDA. Every
backward is a gather: no atomics, deterministic. A negative index marks a row that is not there (a padding slot, or
under expert parallelism another rank's): it reads as zero and its activation is not computed."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from moeformer.layers.autograd_output import cast_output
from moeformer.layers.triton_dispatch import launchers

try:  # at import, not per call: torch.compile cannot trace a lazy import
    from moeformer.layers.moe import triton_kernels as _triton
except ImportError:  # no triton (CPU installs): the references serve everywhere
    _triton = None


def triton_kernels(x: Tensor) -> ModuleType | SimpleNamespace | None:
    """triton_kernels.py's launchers for x, or None: use the references (`triton_dispatch.launchers`)."""
    return launchers(_triton, x)


# ---- references -----------------------------------------------------------------------------------------------
def gather_sum_reference(src: Tensor, index: Tensor, k: int) -> Tensor:
    """out[t] = sum_j src[index[t*k + j]] over the j with index >= 0 (zero for none), accumulated in fp32 (or
    wider); k = 1 is a row gather."""
    rows = src.index_select(0, index.clamp(min=0)).masked_fill((index < 0).unsqueeze(-1), 0)
    if k == 1:
        return rows
    acc = torch.promote_types(src.dtype, torch.float32)
    return cast_output(rows.view(-1, k, src.shape[-1]).to(acc).sum(dim=1), src.dtype)


def row_weights(weight: Tensor, rows: Tensor) -> Tensor:
    """weight[rows[i]] for each row, 0 where rows[i] < 0 (a row that is not there)."""
    return weight.index_select(0, rows.clamp(min=0)).masked_fill(rows < 0, 0)


def swiglu_reference(h: Tensor, weight: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """silu(gate) * up for h = [gate | up] along the last dimension; with `weight`, row i is also scaled by
    weight[rows[i]] (computed in fp32, rounded once; zero where rows[i] < 0, whatever h holds there)."""
    if weight is None:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    h = h.masked_fill((rows < 0).unsqueeze(-1), 0)
    gate, up = h.chunk(2, dim=-1)
    scale = row_weights(weight, rows).unsqueeze(-1)
    return (F.silu(gate.float()) * up.float() * scale.float()).to(h.dtype)


# ---- autograd ops ---------------------------------------------------------------------------------------------
def _gather_sum(src: Tensor, index: Tensor, k: int) -> Tensor:
    kernels = triton_kernels(src)
    if kernels is None:
        return gather_sum_reference(src, index, k)
    return kernels.gather_sum(src.contiguous(), index, k)


def _gather_rows(src: Tensor, index: Tensor, masked: bool) -> Tensor:
    """src[index]; `masked`: index may hold -1, whose rows are zero."""
    return _gather_sum(src, index, 1) if masked else src.index_select(0, index)


class PermuteRows(torch.autograd.Function):
    """out[i] = x[rows[i]] where rows[i] = perm[i] // k for a permutation `perm` of the N*k slots (k = 1: a plain
    row permutation). `inverse` is perm's inverse, so the backward is a gather too: each source row collects its k
    slot gradients, grad_x[t] = sum_j grad[inverse[t*k + j]], instead of index_select's atomic scatter-add.
    `masked`: slots that are not computed have inverse -1 and their rows (after the computed ones) rows -1."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, inverse: Tensor, k: int, masked: bool = False) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return _gather_rows(x, rows, masked)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return _gather_sum(grad, inverse, ctx.k), None, None, None, None


class Combine(torch.autograd.Function):
    """The transpose of PermuteRows: out[t] = sum_j y[inverse[t*k + j]] for y (S, D) in expert order; the backward
    gathers grad_y[i] = grad[rows[i]] with rows = perm // k."""

    @staticmethod
    def forward(ctx, y: Tensor, rows: Tensor, inverse: Tensor, k: int, masked: bool = False) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.masked = masked
        return _gather_sum(y, inverse, k)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (rows,) = ctx.saved_tensors
        return _gather_rows(grad, rows, ctx.masked), None, None, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor | None, rows: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight, rows)
        return triton_kernels(h).swiglu_forward(h, weight, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        h, weight, rows = ctx.saved_tensors
        grad_h, grad_w = triton_kernels(h).swiglu_backward(h, grad.contiguous(), weight, rows)
        return grad_h, None if weight is None else grad_w.to(weight.dtype), None


def swiglu(h: Tensor, weight: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """silu(gate) * up for h (S, 2F) = [gate | up], row i scaled by weight[rows[i]] when given (`rows` a permutation
    of weight's indices, -1 for a row that is not computed: its output is undefined, its weight's gradient 0): one
    fused kernel each way on CUDA, else the reference."""
    if triton_kernels(h) is None or h.dim() != 2 or not h.is_contiguous():
        return swiglu_reference(h, weight, rows)
    return _SwiGLU.apply(h, weight, rows)
