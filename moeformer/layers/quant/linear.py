"""`QuantLinear`, the int8/int4 weight-only stand-in for nn.Linear, and its matmul: a Triton kernel with the
dequantisation fused (CUDA), or the reference (dequantise in fp32, then matmul) elsewhere and wherever a gradient
must flow to the input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeformer.layers.triton_dispatch import runs_triton

from .formats import QUANT_BITS, dequantize
from .weight import QuantizedWeight

try:  # at import, not per call: torch.compile cannot trace a lazy import
    from moeformer.layers.quant import triton_kernels as _triton
except ImportError:  # no triton (CPU installs): the reference serves everywhere
    _triton = None


def quant_matmul_reference(
    x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None, mode: str, group_size: int
) -> Tensor:
    """x (M, K) @ W^T (+ bias) with W dequantised in fp32, computed in fp32 and rounded once to x's dtype."""
    w = dequantize(codes, scale, offset, mode, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def _triton_serves(x: Tensor) -> bool:
    return _triton is not None and runs_triton(x)


def _quant_matmul(
    x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None, mode: str, group_size: int
) -> Tensor:
    """(M, N) in x's dtype, or with a split K the Triton kernel's fp32 partial products (split, M, N), unbiased."""
    if _triton_serves(x):
        return _triton.quant_matmul(x, codes, scale, offset, bias, QUANT_BITS[mode], group_size)
    return quant_matmul_reference(x, codes, scale, offset, bias, mode, group_size)


_quant_matmul_op = torch.library.custom_op("moeformer::quant_matmul", _quant_matmul, mutates_args=())


@_quant_matmul_op.register_fake
def _(
    x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None, mode: str, group_size: int
) -> Tensor:
    m, k = x.shape
    n = codes.shape[0]
    if _triton_serves(x):
        split = _triton.matmul_config(m, n, k, QUANT_BITS[mode], group_size).split
        if split > 1:
            return x.new_empty(split, m, n, dtype=torch.float32)
    return x.new_empty(m, n)


def quant_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ W^T + bias for a quantized W (N, K). Under torch.compile one opaque custom op (its CPU
    implementation is the reference). With a gradient to flow to x, the differentiable reference runs."""
    flat = x.reshape(-1, x.shape[-1])
    args = (weight.codes, weight.scale, weight.offset, bias, weight.mode, weight.group_size or 0)
    if torch.is_grad_enabled() and x.requires_grad:
        y = quant_matmul_reference(flat, *args)
    else:
        op = _quant_matmul_op if torch.compiler.is_compiling() else _quant_matmul
        y = op(flat.contiguous(), *args)
        if y.dim() == 3:  # partial products of a split K (fused into the consumer under torch.compile)
            y = y.sum(0)
            y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y.view(*x.shape[:-1], weight.out_features)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W held as int8/int4 codes (a `QuantizedWeight` named `weight`, so its state-dict keys
    are `weight.codes`, `weight.scale`, `weight.offset`). Inference only: the bias is frozen like the codes."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        mode: str = "int8",
        group_size: int = 128,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantizedWeight((out_features, in_features), mode, group_size, dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = 128) -> QuantLinear:
        """Quantize an nn.Linear (same device; scales in its weight's dtype)."""
        w = linear.weight
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, mode, group_size, w.dtype, "meta"
        )
        module.weight.quantize_(w.detach())
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return quant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
