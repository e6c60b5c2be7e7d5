"""Triton kernels of the token-major MoE path (imported only where triton is installed). Each computes in fp32 and
matches a PyTorch reference in moeformer.layers.moe.kernels; inputs must be contiguous. The launchers are registered
as torch custom ops, so torch.compile keeps them as single opaque calls instead of tracing into Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_sum_kernel(src, index, weight, out, D, K: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(index + t * K + j).to(tl.int64)
        v = tl.load(src + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * tl.load(weight + t * K + j).to(tl.float32)
        acc += v
    tl.store(out + t.to(tl.int64) * D + cols, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_kernel(grad, y, order, weight, grad_y, grad_w, D: tl.constexpr, K: tl.constexpr,
                             BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(order + i).to(tl.int64)
    token = slot // K
    w = tl.load(weight + slot).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.static_range(0, D, BLOCK):  # D (the model width) is a constant of the model
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        g = tl.load(grad + token * D + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(y + i * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_y + i * D + cols, (w * g).to(grad_y.dtype.element_ty), mask=mask)
        acc += g * v
    tl.store(grad_w + slot, tl.sum(acc, axis=0))


@triton.jit
def _swiglu_forward_kernel(h, out, F, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(h + i * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h + i * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + i * F + cols, (gate * tl.sigmoid(gate) * up).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(h, grad, grad_h, F, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(h + i * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h + i * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad + i * F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * gate * sig
    tl.store(grad_h + i * 2 * F + cols, d_gate.to(grad_h.dtype.element_ty), mask=mask)
    tl.store(grad_h + i * 2 * F + F + cols, d_up.to(grad_h.dtype.element_ty), mask=mask)


def _block(width: int) -> int:
    return min(1024, triton.next_power_of_2(width))


@torch.library.custom_op("moeformer::gather_sum", mutates_args=())
def gather_sum(src: Tensor, index: Tensor, weight: Tensor | None, k: int) -> Tensor:
    """out[t] = sum_j weight[t*k + j] * src[index[t*k + j]] (weight 1 when None); (S, D) -> (S // k, D)."""
    n, d = index.shape[0] // k, src.shape[1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    block = _block(d)
    _gather_sum_kernel[(n, triton.cdiv(d, block))](
        src, index, src if weight is None else weight, out, d, K=k, HAS_WEIGHT=weight is not None, BLOCK=block
    )
    return out


@torch.library.custom_op("moeformer::combine_backward", mutates_args=())
def combine_backward(grad: Tensor, y: Tensor, order: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Gradients of gather_sum(y, inverse(order), weight, k): grad_y[i] = weight[order[i]] * grad[order[i] // k] and
    grad_weight[s] = <grad[s // k], y[inverse[s]]> (fp32)."""
    s, d = y.shape
    grad_y = torch.empty_like(y)
    grad_w = torch.empty(s, dtype=torch.float32, device=y.device)
    _combine_backward_kernel[(s,)](grad, y, order, weight, grad_y, grad_w, D=d, K=k, BLOCK=_block(d))
    return grad_y, grad_w


@torch.library.custom_op("moeformer::swiglu_forward", mutates_args=())
def swiglu_forward(h: Tensor) -> Tensor:
    """silu(h[:, :F]) * h[:, F:] for h (S, 2F)."""
    s, f = h.shape[0], h.shape[1] // 2
    out = torch.empty(s, f, dtype=h.dtype, device=h.device)
    block = _block(f)
    _swiglu_forward_kernel[(s, triton.cdiv(f, block))](h, out, f, BLOCK=block)
    return out


@torch.library.custom_op("moeformer::swiglu_backward", mutates_args=())
def swiglu_backward(h: Tensor, grad: Tensor) -> Tensor:
    """Gradient of swiglu_forward with respect to h, (S, 2F)."""
    s, f = grad.shape
    grad_h = torch.empty_like(h)
    block = _block(f)
    _swiglu_backward_kernel[(s, triton.cdiv(f, block))](h, grad, grad_h, f, BLOCK=block)
    return grad_h


@gather_sum.register_fake
def _(src: Tensor, index: Tensor, weight: Tensor | None, k: int) -> Tensor:
    return src.new_empty(index.shape[0] // k, src.shape[1])


@combine_backward.register_fake
def _(grad: Tensor, y: Tensor, order: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y), y.new_empty(y.shape[0], dtype=torch.float32)


@swiglu_forward.register_fake
def _(h: Tensor) -> Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@swiglu_backward.register_fake
def _(h: Tensor, grad: Tensor) -> Tensor:
    return torch.empty_like(h)
