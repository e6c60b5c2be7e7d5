"""Triton matmuls whose weight is full precision, int8 or int4 (formats.py), dequantised tile by tile in registers:
no dequantised copy of the weight ever exists in memory. `weight_product` is the shared inner loop (also used by
the MoE expert kernels); `quant_matmul` is x @ W^T for one matrix. Imported only where triton is installed.

Dequantisation is folded into the products: int8 multiplies the integer codes (exact in bf16/fp16) and applies the
per-channel scale once to the fp32 accumulator; int4 keeps each K-tile inside one group, so a tile contributes
scale * (x @ q) + offset * sum(x) with q in [0, 15], again exact operands and fp32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moeformer.layers.triton_dispatch import INTERPRETER

# Programs to aim for when splitting K: a few per SM of an H100/H200 (132 SMs), so that a GEMV of a square
# 2048-wide layer still keeps enough loads in flight. To be tuned by measurement (scripts/bench_quant.py).
TARGET_PROGRAMS = 512
MAX_SPLIT = 8  # inductor unrolls reductions of <= 8 terms, so the partial sums fuse into the consumer


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. fp32 operands multiply in full precision (no TF32). UPCAST computes 16-bit operands as
    fp32, which gives the same products (exact either way): the Triton interpreter's own 16-bit dot is wrong."""
    if UPCAST or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dense_step(acc, a, w_cols, kk, kmask, col_mask, stride_wk, QUANT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ W[kk, cols] for a full-precision or int8 weight (int8: still unscaled); w_cols (BN,) points at
    input 0 of each column."""
    tile = tl.load(w_cols[None, :] + kk[:, None] * stride_wk, mask=kmask[:, None] & col_mask[None, :], other=0)
    if QUANT == 8:
        tile = tile.to(tl.float32).to(a.dtype)  # via fp32: the interpreter casts integers to bf16 wrongly
    return mma(a, tile, acc, UPCAST)


@triton.jit
def _int4_step(acc, a_even, a_odd, a_sum, w_cols, scale_cols, offset_cols, kb, kmask, col_mask, stride_wk,
               UPCAST: tl.constexpr):
    """acc + a @ W[tile, cols] for one K-tile inside one group of an int4 weight: bytes kb hold the codes of inputs
    2kb (low nibble) and 2kb + 1 (high nibble); scale_cols/offset_cols point at the group's scales and offsets."""
    packed = tl.load(w_cols[None, :] + kb[:, None] * stride_wk, mask=kmask[:, None] & col_mask[None, :], other=0)
    low = (packed & 15).to(tl.float32).to(a_even.dtype)
    high = (packed >> 4).to(tl.float32).to(a_even.dtype)
    codes_dot = mma(a_odd, high, mma(a_even, low, None, UPCAST), UPCAST)
    s = tl.load(scale_cols, mask=col_mask, other=0.0).to(tl.float32)
    m = tl.load(offset_cols, mask=col_mask, other=0.0).to(tl.float32)
    return acc + codes_dot * s[None, :] + a_sum[:, None] * m[None, :]


@triton.jit
def weight_product(a_rows, row_mask, w, scale, offset, cols, col_mask, pair_w, pair_s, stride_wk, stride_wn,
                   stride_sn, stride_sg, k_start, k_stop, QUANT: tl.constexpr, GROUP: tl.constexpr,
                   PAIR: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 (BM, BN) products of activation rows with weight columns over inputs k in [k_start, k_stop).

    a_rows (BM,): pointers to each row's input 0 (inputs contiguous). The weight W[k, n] sits at
    w + k * stride_wk + n * stride_wn (int4: k counts bytes, two inputs each); scales and offsets at
    n * stride_sn + group * stride_sg. With PAIR, also the columns cols + pair (weight pointer + pair_w, scales
    + pair_s) from the same activation loads, returned second (SwiGLU's up half); otherwise the second is zeros.
    k_start must be a multiple of BK, and for int4 BK must divide GROUP. EVEN_K declares k_stop - k_start a multiple
    of BK (always so for int4, whose K is a multiple of GROUP): loads then need no mask along K and vectorise."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    w_cols = w + cols.to(tl.int64) * stride_wn
    s_cols = scale + cols.to(tl.int64) * stride_sn
    o_cols = offset + cols.to(tl.int64) * stride_sn
    if QUANT == 4:
        HALF: tl.constexpr = BK // 2
        i = tl.arange(0, HALF)
        kmask = tl.full([HALF], 1, tl.int1)
        for k0 in range(k_start, k_stop, BK):
            ke = k0 + 2 * i
            amask = row_mask[:, None] & kmask[None, :]
            a_even = tl.load(a_rows[:, None] + ke[None, :], mask=amask, other=0.0)
            a_odd = tl.load(a_rows[:, None] + ke[None, :] + 1, mask=amask, other=0.0)
            a_sum = tl.sum(a_even.to(tl.float32) + a_odd.to(tl.float32), axis=1)
            kb = k0 // 2 + i
            group = (k0 // GROUP) * stride_sg
            acc = _int4_step(acc, a_even, a_odd, a_sum, w_cols, s_cols + group, o_cols + group, kb, kmask, col_mask,
                             stride_wk, UPCAST)
            if PAIR:
                acc2 = _int4_step(acc2, a_even, a_odd, a_sum, w_cols + pair_w, s_cols + pair_s + group,
                                  o_cols + pair_s + group, kb, kmask, col_mask, stride_wk, UPCAST)
    else:
        k = tl.arange(0, BK)
        for k0 in range(k_start, k_stop, BK):
            kk = k0 + k
            if EVEN_K:
                kmask = tl.full([BK], 1, tl.int1)
            else:
                kmask = kk < k_stop
            a = tl.load(a_rows[:, None] + kk[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
            acc = _dense_step(acc, a, w_cols, kk, kmask, col_mask, stride_wk, QUANT, UPCAST)
            if PAIR:
                acc2 = _dense_step(acc2, a, w_cols + pair_w, kk, kmask, col_mask, stride_wk, QUANT, UPCAST)
        if QUANT == 8:
            acc = acc * tl.load(s_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if PAIR:
                acc2 = acc2 * tl.load(s_cols + pair_s, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc, acc2


@triton.jit
def _quant_matmul_kernel(x, w, scale, offset, bias, out, M, N, K, stride_xm, stride_wn, stride_wk, stride_sn,
                         stride_sg, k_per_split, QUANT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SPLIT: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    part = tl.program_id(2)
    row_mask, col_mask = rows < M, cols < N
    k_start = part * k_per_split
    k_stop = tl.minimum(K, k_start + k_per_split)
    acc, _ = weight_product(x + rows.to(tl.int64) * stride_xm, row_mask, w, scale, offset, cols, col_mask, 0, 0,
                            stride_wk, stride_wn, stride_sn, stride_sg, k_start, k_stop, QUANT, GROUP, False, EVEN_K,
                            BM, BN, BK, UPCAST)
    where = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out + where, acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(out + part.to(tl.int64) * M * N + where, acc, mask=mask)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and K-split of one quant_matmul launch."""

    bm: int
    bn: int
    bk: int
    split: int
    num_warps: int
    num_stages: int


def k_split(k: int, bk: int, programs: int) -> int:
    """How many K-ranges (powers of two, each at least two K-tiles) bring `programs` up to TARGET_PROGRAMS."""
    split = 1
    while split < MAX_SPLIT and programs * split < TARGET_PROGRAMS and k >= 4 * bk * split:
        split *= 2
    return split


def matmul_config(m: int, n: int, k: int, quant: int, group: int) -> MatmulConfig:
    """Tiles by the number of rows M. Small M (decode): 16-row tiles (the smallest tensor-core tile), narrow column
    tiles and a K split for enough programs, i.e. a GEMV that streams the weight once. Large M (prefill): 128 x 128
    tiles. int4 K-tiles never cross a quantization group."""
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 32, 256, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 32 if m <= 32 else 64, 64, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if quant == 4:
        bk = min(bk, group)
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = k_split(k, bk, programs) if m <= 64 else 1
    return MatmulConfig(bm, bn, bk, split, warps, stages)


def scale_strides(scale: Tensor | None, quant: int) -> tuple[int, int]:
    """(stride along N, stride along the groups) of the scales (0 where absent)."""
    if quant == 4:
        return scale.stride(-2), scale.stride(-1)
    if quant == 8:
        return scale.stride(-1), 0
    return 0, 0


def quant_matmul(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None, quant: int,
                 group: int) -> Tensor:
    """x (M, K) @ W^T for W (N, K) quantized as codes/scale/offset. Returns (M, N) in x's dtype with the bias
    added, or, when K is split, the fp32 partial products (split, M, N) for the caller to sum (then add the bias)."""
    m, k = x.shape
    n = codes.shape[0]
    cfg = matmul_config(m, n, k, quant, group)
    if cfg.split == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(cfg.split, m, n, dtype=torch.float32, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split), cfg.bk) * cfg.bk
    stride_sn, stride_sg = scale_strides(scale, quant)
    grid = (triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bn), cfg.split)
    _quant_matmul_kernel[grid](
        x, codes, scale, offset if offset is not None else scale, bias if bias is not None else scale, out, m, n, k,
        x.stride(0), codes.stride(0), codes.stride(1), stride_sn, stride_sg, k_per_split, QUANT=quant, GROUP=group,
        HAS_BIAS=bias is not None, SPLIT=cfg.split, EVEN_K=k % cfg.bk == 0 and k_per_split % cfg.bk == 0,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, UPCAST=INTERPRETER,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
