"""Routed experts stored as 3-D weights, the grouped FFN over expert-sorted rows (`ExpertRows`, made by a
dispatcher, dispatch.py): one grouped GEMM (torch._grouped_mm) where supported, else a reference loop over experts,
the routing weights applied inside the activation.

The fused path (fused_experts.py) reads each chosen expert's weights in place instead, for inference: decoding (few
tokens, where sorting into rows costs more than the matmuls) and every quantized forward."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeformer.layers.quant import QuantizedWeight

from .config import BACKENDS
from .dispatch import ExpertRows, Slots, bincount, compute_dtype, stable_argsort
from .fp8_gemm import fp8_grouped_mm
from .fused_experts import MAX_SCAN_SLOTS, fused_experts, triton_serves
from .kernels import row_weights, swiglu

# Full-precision experts take the fused path up to this many tokens (decoding up to batch 64); beyond it the sorted
# rows and grouped GEMM read each expert's weights once for many rows and win. To be tuned by measurement.
FUSED_MAX_TOKENS = 64


def grouped_mm_available(x: Tensor, dim: int, ffn_dim: int) -> bool:
    """torch._grouped_mm's fast kernel: CUDA with compute capability >= 9.0, bf16, and 16-byte aligned rows
    (model and expert widths multiples of 8)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and dim % 8 == 0
        and ffn_dim % 8 == 0
    )


def _loop_matmul(x: Tensor, w: Tensor, group_sizes: Tensor) -> Tensor:
    """Reference for torch._grouped_mm: one matmul per expert over its slice (syncs on the group sizes)."""
    sizes = group_sizes.tolist()
    rest = x.shape[0] - sum(sizes)
    chunks = x.split(sizes + [rest])
    outs = [chunk @ w[i] for i, chunk in enumerate(chunks[:-1])]
    return torch.cat(outs + [x.new_zeros(rest, w.shape[-1])])


class Experts(nn.Module):
    """E feed-forward experts: w_in (E, dim, 2F as [gate | up] for swiglu, F for gelu), w_out (E, F, dim)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        activation: str = "swiglu",
        backend: str = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend must be one of {BACKENDS}, got {backend!r}")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"expert activation must be 'swiglu' or 'gelu', got {activation!r}")
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.activation, self.backend = activation, backend
        self.fp8 = False  # grouped GEMMs in FP8 (moeformer.layers.fp8.enable_fp8)
        self.fp8_wgrad = True  # with fp8: the weight gradients in FP8 too (False: in bf16)
        in_width = 2 * ffn_dim if activation == "swiglu" else ffn_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std)

    @property
    def quantized(self) -> bool:
        return isinstance(self.w_in, QuantizedWeight)

    @torch.no_grad()
    def quantize_(self, mode: str, group_size: int = 128, empty: bool = False) -> None:
        """Replace w_in and w_out by int8/int4 `QuantizedWeight`s (codes (E, out, in)): quantized from the current
        weights, or `empty` (shapes only, on the weights' device, meta included) for a loader to fill."""
        quantized = {}
        for name in ("w_in", "w_out"):
            w = getattr(self, name)
            q = QuantizedWeight(
                tuple(w.shape), mode, group_size, w.dtype, w.device if empty else "meta", transposed=True
            )
            quantized[name] = q if empty else q.quantize_(w.detach())
        for name, q in quantized.items():
            delattr(self, name)
            setattr(self, name, q)

    def dense_weights(self) -> tuple[Tensor, Tensor]:
        """(w_in, w_out) in full precision: the parameters, or the dequantised codes in fp32."""
        if self.quantized:
            return self.w_in.dequantize(), self.w_out.dequantize()
        return self.w_in, self.w_out

    def use_fused(self, x: Tensor) -> bool:
        """Whether `forward_fused` serves x (N, dim). Always for quantized experts (the only path that reads codes).
        Full-precision experts take it to decode: not training, no gradient needed, at most FUSED_MAX_TOKENS tokens,
        the Triton kernels available for x and the weights in the compute dtype."""
        if self.quantized:
            return True
        grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad or self.w_out.requires_grad)
        return (
            not self.training
            and not grad
            and x.shape[0] <= FUSED_MAX_TOKENS
            and triton_serves(x)
            and self.w_in.dtype == compute_dtype(x)
        )

    def forward_fused(self, x: Tensor, slots: Slots, keep: Tensor | None) -> Tensor:
        """The MoE output for x (N, dim) through the fused kernels, slots where `keep` is False (padding, dropped;
        None: none) weighted 0."""
        e, expert_idx = self.num_experts, slots.expert_idx
        weights = slots.weights if keep is None else torch.where(keep, slots.weights, 0.0)
        order = counts = None
        if expert_idx.numel() > MAX_SCAN_SLOTS:
            order, counts = stable_argsort(expert_idx, e), bincount(expert_idx, e)
        k = slots.top_k
        y = fused_experts(
            x.to(compute_dtype(x)),
            None if k else slots.token_idx,
            expert_idx,
            weights,
            self.w_in,
            self.w_out,
            self.activation,
            order,
            counts,
        )
        if k is not None:  # token-major: each token's k slots are consecutive
            out = y.view(y.shape[0], x.shape[0], k, x.shape[1]).sum((0, 2))
        else:
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, slots.token_idx, y.sum(0))
        return out.to(x.dtype)

    def use_grouped_mm(self, x: Tensor) -> bool:
        """Whether this input goes through torch._grouped_mm ("grouped" forces it, "loop" never)."""
        if self.backend == "auto":
            return grouped_mm_available(x, self.dim, self.ffn_dim)
        return self.backend == "grouped"

    def ffn(
        self,
        x_sorted: Tensor,
        group_sizes: Tensor,
        weight: Tensor | None = None,
        rows: Tensor | None = None,
        experts: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Expert e's FFN on its group of rows of the sorted buffer; rows past the groups are undefined. With
        `weight`, buffer row i's activation is scaled by weight[rows[i]] (`rows` a permutation of weight's indices,
        -1 past the groups; None: the identity): the output is then already weighted. `experts`: (w_in, w_out) of a
        block of consecutive experts to use instead of all of them (one group each)."""
        w_in, w_out = experts or (self.w_in, self.w_out)
        if x_sorted.shape[0] == 0:  # a rank whose experts received no row: gradients (zero) still reach everything
            touch = x_sorted.sum() + w_in.sum() + w_out.sum()  # ... so every rank joins the backward
            touch = touch if weight is None else touch + weight.sum()
            return x_sorted.new_zeros(0, self.dim) + 0.0 * touch.to(x_sorted.dtype)
        if weight is not None and rows is None:
            rows = torch.arange(x_sorted.shape[0], device=x_sorted.device)
        if self.use_grouped_mm(x_sorted):
            # rows of group e (ending at offs[e]) times w[e] in one kernel; rows past the groups come back undefined
            offs = torch.cumsum(group_sizes, 0, dtype=torch.int32)
            if self.fp8:
                matmul = functools.partial(fp8_grouped_mm, offs=offs, fp8_wgrad=self.fp8_wgrad)
            else:
                matmul = functools.partial(torch._grouped_mm, offs=offs)
        else:
            matmul = functools.partial(_loop_matmul, group_sizes=group_sizes)
        h = matmul(x_sorted, w_in.to(x_sorted.dtype))
        if self.activation == "swiglu":
            h = swiglu(h, weight, rows)
        else:
            h = F.gelu(h)
            if weight is not None:  # rows -1 (not computed) hold anything: zero them with their weight
                h = h.masked_fill((rows < 0).unsqueeze(-1), 0)
                h = (h.float() * row_weights(weight, rows).unsqueeze(-1)).to(x_sorted.dtype)
        return matmul(h, w_out.to(x_sorted.dtype))

    def forward(self, rows: ExpertRows) -> Tensor:
        """Each row through its group's expert, the activation scaled by the row's routing weight: (R, dim)."""
        return self.ffn(rows.x, rows.group_sizes, rows.weights, rows.weight_index)
