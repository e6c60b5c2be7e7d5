"""FP8 training form of the experts' grouped GEMM (`fp8_grouped_mm`, a drop-in for torch._grouped_mm's 2d x 3d call
over expert-sorted rows), on torch._scaled_grouped_mm (CUDA, compute capability 9.0 or 10.x) or, elsewhere, its
reference: the same fp8 operands and scales dequantised and multiplied in fp32 (`scaled_grouped_mm_reference`).

Scaling recipe (all three GEMMs of a training step in float8_e4m3fn, dynamic scales recomputed every call, each a
power of two, 2^floor(log2(448 / amax)), so that scaling is exact and the largest element lands in [224, 448]):
- forward, out = x @ w[e]: x rowwise (one scale per row), w per output column of each expert (over K);
- grad_input = grad @ w[e]^T: grad rowwise, w per row of each expert (over N);
- grad_weight[e] = x_e^T @ grad_e: one 2d x 2d grouped GEMM whose groups run along the contraction (the rows);
  x and grad scaled per column (over all rows of all groups: one amax pass, no per-group reduction), each group's
  rows moved to a 16-aligned start (the kernel's TMA needs 16-byte aligned group starts along K) with zero rows
  between, and an empty group given 16 zero rows so that its gradient is exactly 0.
The quantisers run as Triton kernels (moe/fp8_triton.py: amax, scale and cast in one pass; the weight gradient's
gather into the aligned layout fused into its cast; the column amax it needs computed by the rowwise kernels that
read x and the output gradient anyway) where Triton serves the tensor, else as the PyTorch references here, which
they match bit for bit. The forward quantises w in both its layouts (one read) and keeps grad_input's (E*K*N bytes,
half the bf16 weight's) for the backward. With `fp8_wgrad=False` the weight gradient is one bf16 grouped GEMM instead
(torchao's "rowwise_with_gw_hp" recipe: no columnwise quantisation, no aligned copy).
The two GEMMs that contract over a layer width (forward, grad_input) use Hopper's fast FP8 accumulation; the weight
gradient, which sums over every row of a group (thousands of tokens), accumulates in full precision. Weights are
quantised from their bf16 values in every step (nothing fp8 is kept between steps)."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

from moeformer.layers.autograd_output import cast_output
from moeformer.layers.triton_dispatch import launchers

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
AMAX_FLOOR = 1e-12  # an all-zero row or column gets a finite scale (its codes are zeros)
ALIGN = 16  # rows, bytes of an e4m3 element: the alignment torch._scaled_grouped_mm needs of dims and group starts

try:  # at import, not per call: torch.compile cannot trace a lazy import (after the constants, which it imports)
    from moeformer.layers.moe import fp8_triton as _triton
except ImportError:  # no triton: the references serve everywhere
    _triton = None


def _kernels(t: Tensor) -> ModuleType | SimpleNamespace | None:
    """fp8_triton.py's quantisers for t, or None: use the references (`triton_dispatch.launchers`)."""
    return launchers(_triton, t)


def fp8_grouped_mm_available(device: torch.device) -> bool:
    """torch._scaled_grouped_mm's kernel: CUDA with compute capability 9.0 or 10.x (Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def fp8_scale(amax: Tensor) -> Tensor:
    """The power-of-two multiplier that puts `amax` at most at E4M3_MAX (fp32; 0 for an infinite amax, so that its
    non-finite values reach the output as NaN rather than being hidden): 2^floor(log2(E4M3_MAX / amax)), exactly, as
    the exponent bits of the quotient (a rounded log2 can round a quotient just below 2^(k+1) up)."""
    quotient = E4M3_MAX / amax.float().clamp(min=AMAX_FLOOR)
    power = (quotient.view(torch.int32) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isnan(quotient), quotient, power)


def to_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    """t * scale rounded to float8_e4m3fn, saturating at +-E4M3_MAX (a plain cast turns overflow into NaN)."""
    return (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_rows_reference` by the Triton kernel where it serves t (at most 3-D, any strides)."""
    kernels = _kernels(t)
    return kernels.quantize_rows(t) if kernels is not None else quantize_rows_reference(t)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`quantize_weight_reference` by the Triton kernels (one read of w for both layouts) where they serve w."""
    kernels = _kernels(w)
    return kernels.quantize_weight(w) if kernels is not None else quantize_weight_reference(w)


def quantize_weight_reference(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """w (E, K, N) for the forward (codes (E, N, K), one scale per output column) and for grad_input (codes (E, K, N),
    one scale per row), each with its factors: `quantize_rows_reference` of w^T and of w."""
    return *quantize_rows_reference(w.transpose(-2, -1)), *quantize_rows_reference(w)


def quantize_rows_and_column_amax(t: Tensor, offs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`quantize_rows` of t (R, C) and `column_amax_reference(t, offs)`, from one read of t by the Triton kernel."""
    kernels = _kernels(t)
    if kernels is not None:
        return kernels.quantize_rows_and_column_amax(t, offs)
    return *quantize_rows_reference(t), column_amax_reference(t, offs)


def column_amax_reference(t: Tensor, offs: Tensor) -> Tensor:
    """max |t[r, c]| over the rows r before offs[-1] (the grouped rows), per column: the weight gradient's amax."""
    grouped = torch.arange(t.shape[0], device=t.device) < offs[-1]
    return torch.where(grouped.unsqueeze(-1), t.abs(), 0).amax(dim=0)


def quantize_rows_reference(t: Tensor) -> tuple[Tensor, Tensor]:
    """t (..., K) as contiguous e4m3 codes with one scale per row (over the last dim), and the fp32 factors that
    dequantise them (codes * factor ~ t), shaped t.shape[:-1]."""
    scale = fp8_scale(t.abs().amax(dim=-1))
    return to_e4m3(t, scale.unsqueeze(-1)).contiguous(), scale.reciprocal().contiguous()


def scaled_grouped_mm_reference(
    a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offs: Tensor, use_fast_accum: bool = False
) -> Tensor:
    """torch._scaled_grouped_mm's result for its 2d x 3d and 2d x 2d forms, in fp32 on the dequantised operands (a
    product of two e4m3 values is exact in fp32), rounded to bf16; with its argument checks, so that layouts that
    would fail on the GPU fail here too. Rows past the groups (2d x 3d) are 0 here, undefined there."""
    _check_scaled_grouped_mm(a, b, scale_a, scale_b, offs)
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    af, bf = a.float(), b.float()
    if b.dim() == 3:  # groups of rows: out[rows of e] = a[rows] @ b[e]
        out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float32, device=a.device)
        for e, (start, end) in enumerate(zip(starts, ends)):
            out[start:end] = af[start:end] @ bf[e] * scale_a[start:end, None] * scale_b[e]
        return out.to(torch.bfloat16)
    m, n = a.shape[0], b.shape[1]  # groups along the contraction: out[e] = a[:, cols of e] @ b[rows of e]
    out = torch.empty(len(ends), m, n, dtype=torch.float32, device=a.device)
    for e, (start, end) in enumerate(zip(starts, ends)):
        out[e] = af[:, start:end] @ bf[start:end] * scale_a[e * m : (e + 1) * m, None] * scale_b[e * n : (e + 1) * n]
    return out.to(torch.bfloat16)


def _check_scaled_grouped_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offs: Tensor) -> None:
    """What torch._scaled_grouped_mm (and its kernel's device asserts) require of the 2d x 3d and 2d x 2d forms."""
    if a.dtype != E4M3 or b.dtype != E4M3:
        raise ValueError(f"operands must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() not in (2, 3):
        raise ValueError(f"expected a 2-D first operand and a 2-D or 3-D second one, got {a.dim()}-D, {b.dim()}-D")
    if not (a.stride(-1) == 1 and a.stride(-2) >= a.shape[-1]):
        raise ValueError(f"the first operand must be row-major, got strides {a.stride()}")
    if not (b.stride(-2) == 1 and b.stride(-1) >= b.shape[-2]):
        raise ValueError(f"the second operand must be column-major, got strides {b.stride()}")
    if a.shape[-1] % ALIGN or b.shape[-2] % ALIGN or b.shape[-1] % ALIGN:
        raise ValueError(f"dims must be multiples of {ALIGN}, got {tuple(a.shape)} and {tuple(b.shape)}")
    if offs.dtype != torch.int32 or offs.dim() != 1:
        raise ValueError(f"offsets must be a 1-D int32 tensor, got {offs.dtype} {tuple(offs.shape)}")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32 or not scale_a.is_contiguous():
        raise ValueError("scales must be fp32, the first contiguous")
    groups = offs.shape[0]
    if b.dim() == 3:
        expected = ((a.shape[0],), (groups, b.shape[-1]))
        if b.shape[0] != groups or a.shape[1] != b.shape[1]:
            raise ValueError(f"shapes {tuple(a.shape)} x {tuple(b.shape)} do not fit {groups} groups")
    else:
        expected = ((groups * a.shape[0],), (groups * b.shape[1],))
        sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1)).tolist()
        if any(size % ALIGN for size in sizes[:-1]):
            raise ValueError(f"2d x 2d groups must start at multiples of {ALIGN} along the contraction, got {sizes}")
    if (tuple(scale_a.shape), tuple(scale_b.shape)) != expected:
        raise ValueError(f"scale shapes {tuple(scale_a.shape)}, {tuple(scale_b.shape)}; expected {expected}")
    if offs.numel() and offs[-1].item() > (a.shape[0] if b.dim() == 3 else a.shape[1]):
        raise ValueError("offsets run past the operand")


def scaled_grouped_mm(
    a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offs: Tensor, use_fast_accum: bool = False
) -> Tensor:
    """torch._scaled_grouped_mm (bf16 output) on CUDA (`fp8_grouped_mm_available` says where it runs; no device
    query here, inside compiled code), else its reference."""
    if a.is_cuda:
        return torch._scaled_grouped_mm(
            a, b, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum
        )
    return scaled_grouped_mm_reference(a, b, scale_a, scale_b, offs, use_fast_accum)


def aligned_rows(offs: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """The layout of the weight-gradient GEMM: each group (ending at offs[e]) moved to start at a multiple of ALIGN,
    at least ALIGN rows each, in a static buffer of round_up(num_rows + ALIGN * E, ALIGN) rows (room for any group
    sizes: no host sync). Returns (source row of each buffer row, -1 for the zero rows; the groups' end offsets in
    the buffer, int32)."""
    groups = offs.shape[0]
    ends = offs.long()
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (sizes.clamp(min=1) + ALIGN - 1) // ALIGN * ALIGN
    padded_ends = torch.cumsum(padded, 0)
    length = (num_rows + ALIGN * groups + ALIGN - 1) // ALIGN * ALIGN
    pos = torch.arange(length, device=offs.device)
    group = torch.searchsorted(padded_ends, pos, right=True)  # E past the last group
    g = group.clamp(max=groups - 1)
    within = pos - (padded_ends - padded).index_select(0, g)
    inside = (group < groups) & (within < sizes.index_select(0, g))
    source = torch.where(inside, (ends - sizes).index_select(0, g) + within, -1)
    return source, padded_ends.to(torch.int32)


def quantize_columns(t: Tensor, source: Tensor, offs: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`quantize_columns_reference` (source from `aligned_rows(offs, ...)`) by the Triton kernels where they serve t."""
    kernels = _kernels(t)
    if kernels is not None:
        return kernels.quantize_columns(t, source, offs, amax)
    return quantize_columns_reference(t, source, amax)


def quantize_columns_reference(t: Tensor, source: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows `source` of t (N, C) (zeros where -1), transposed: contiguous e4m3 codes (C, len(source)) with one scale
    per column of t, and the fp32 factors (C,) that dequantise them. `amax`: the gathered rows' column amax, when
    known (`column_amax_reference`)."""
    rows = torch.where((source >= 0).unsqueeze(-1), t.index_select(0, source.clamp(min=0)), 0)
    scale = fp8_scale(rows.abs().amax(dim=0) if amax is None else amax)
    return to_e4m3(rows.t(), scale.unsqueeze(-1)).contiguous(), scale.reciprocal()


def weight_grad(
    x: Tensor, grad: Tensor, offs: Tensor, x_amax: Tensor | None = None, grad_amax: Tensor | None = None
) -> Tensor:
    """grad_w[e] = x[rows of e]^T @ grad[rows of e] (E, K, N) as one fp8 2d x 2d grouped GEMM (see the recipe);
    the operands' column amax (`column_amax_reference`) where already computed."""
    groups = offs.shape[0]
    source, padded_ends = aligned_rows(offs, x.shape[0])
    xt, x_factor = quantize_columns(x, source, offs, x_amax)  # (K, P)
    gt, g_factor = quantize_columns(grad, source, offs, grad_amax)  # (N, P)
    return scaled_grouped_mm(xt, gt.t(), x_factor.repeat(groups), g_factor.repeat(groups), padded_ends)


class _Fp8GroupedMM(torch.autograd.Function):
    """x (M, K) @ w[e] (E, K, N) over the row groups ending at offs (int32, as torch._grouped_mm), the GEMMs in e4m3
    (the module docstring's recipe; the weight gradient in bf16 unless fp8_wgrad)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offs: Tensor, fp8_wgrad: bool) -> Tensor:
        ctx.fp8_wgrad = fp8_wgrad and ctx.needs_input_grad[1]
        x_amax = None
        if ctx.fp8_wgrad:  # the weight gradient's column amax of x, from the read that quantises its rows
            xq, x_factor, x_amax = quantize_rows_and_column_amax(x, offs)
        else:
            xq, x_factor = quantize_rows(x)
        wq_t = wt_factor = None
        if ctx.needs_input_grad[0]:  # grad_input's layout of w too, from the same reads (kept for the backward)
            wq, w_factor, wq_t, wt_factor = quantize_weight(w)
        else:
            wq, w_factor = quantize_rows(w.transpose(-2, -1))  # (E, N, K): column-major w, a scale per output column
        ctx.save_for_backward(x, w, offs, x_amax, wq_t, wt_factor)
        out = scaled_grouped_mm(xq, wq.transpose(-2, -1), x_factor, w_factor, offs, use_fast_accum=True)
        return cast_output(out, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, w, offs, x_amax, wq_t, wt_factor = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = g_amax = None
        if ctx.needs_input_grad[0]:
            if ctx.fp8_wgrad:
                gq, g_factor, g_amax = quantize_rows_and_column_amax(grad, offs)
            else:
                gq, g_factor = quantize_rows(grad)
            # wq_t (E, K, N), one scale per row: its transpose is the column-major second operand
            grad_x = scaled_grouped_mm(gq, wq_t.transpose(-2, -1), g_factor, wt_factor, offs, use_fast_accum=True)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.fp8_wgrad:
                grad_w = weight_grad(x, grad, offs, x_amax, g_amax)
            else:  # what torch._grouped_mm's own backward computes
                grad_w = torch._grouped_mm(x.transpose(-2, -1), grad.to(x.dtype), offs=offs)
            grad_w = grad_w.to(w.dtype)
        return grad_x, grad_w, None, None


def fp8_grouped_mm(x: Tensor, w: Tensor, offs: Tensor, fp8_wgrad: bool = True) -> Tensor:
    """torch._grouped_mm(x, w, offs=offs) for x (M, K) and w (E, K, N), K and N multiples of 16, in FP8 (forward and
    backward; `fp8_wgrad=False`: the weight gradient in x's precision); rows past the last group come back undefined,
    as there."""
    return _Fp8GroupedMM.apply(x, w, offs, fp8_wgrad)
