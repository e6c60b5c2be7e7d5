"""Triton matmuls whose weight is full precision, int8 or int4 (formats.py), dequantised tile by tile in registers:
no dequantised copy of the weight ever exists in memory. `weight_product` is the shared inner loop (also used by
the MoE expert kernels); `quant_matmul` is x @ W^T for one matrix. Imported only where triton is installed.

Dequantisation happens in registers, step by step: int8 multiplies the integer codes (exact in bf16/fp16) and
applies the per-channel scale once to the fp32 accumulator. int4 keeps each K-step inside one group (one scale and
offset per column): tensor-core tiles multiply the step's weights dequantised in fp32 and rounded once to the
activations' dtype (per-group scaling of a separate accumulator would need twice the accumulator registers), the
GEMV sums exact codes and adds scale * (x @ q) + offset * sum(x). A step of int4 bytes holds two contiguous runs of
inputs (the split-halves packing), so its activations load contiguously and its codes need no interleave: low
nibbles pair with the first run, high nibbles with the second.

Row tiles of 16 or more multiply on the tensor cores (tl.dot); narrower ones (decode, GEMV_ROWS rows at most) as a
GEMV on the CUDA cores: per row a broadcast multiply with the weight tile and a sum over K, with no 16-row padding
and no staging of the weight in shared memory.
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
GEMV_ROWS = 4  # up to this many rows, row tiles of 1, 2 or 4 on the CUDA cores (tl.dot needs 16 rows)
GEMV_TILE = 8192  # weight elements of a GEMV step (BK * BN), held in fp32: 64 registers a thread at 4 warps


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. fp32 operands multiply in full precision (no TF32). UPCAST computes 16-bit operands as
    fp32, which gives the same products (exact either way): the Triton interpreter's own 16-bit dot is wrong."""
    if UPCAST or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _operand(w, a):
    """w as a tl.dot operand beside a: integer codes converted (exactly) to a's dtype, via fp32 (the interpreter
    casts integers to bf16 wrongly)."""
    if w.dtype.is_int():  # static: an if/else, since Triton compiles every return that follows a static if
        return w.to(tl.float32).to(a.dtype)
    else:
        return w


@triton.jit
def _row(a, r, BM: tl.constexpr):
    """Row r of a (BM, BK) in fp32, as a (BK,) vector."""
    return tl.sum(tl.where(tl.arange(0, BM)[:, None] == r, a.to(tl.float32), 0.0), axis=0)


@triton.jit
def _add_row(acc, r, v, BM: tl.constexpr):
    """acc (BM, BN) with v (BN,) added to row r."""
    return tl.where(tl.arange(0, BM)[:, None] == r, acc + v[None, :], acc)


@triton.jit
def _dense_step(acc, a, w_cols, kk, kmask, col_mask, stride_wk, BM: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ W[kk, cols] for a full-precision or int8 weight (int8: still unscaled); w_cols (BN,) points at
    input 0 of each column. The GEMV multiplies row by row with the whole tile, which keeps its loaded layout."""
    tile = tl.load(w_cols[None, :] + kk[:, None] * stride_wk, mask=kmask[:, None] & col_mask[None, :], other=0)
    if BM >= 16:
        acc = mma(a, _operand(tile, a), acc, UPCAST)
    else:
        w = tile.to(tl.float32)
        for r in tl.static_range(BM):
            acc = _add_row(acc, r, tl.sum(_row(a, r, BM)[:, None] * w, axis=0), BM)
    return acc


@triton.jit
def _int4_step(
    acc, a_lo, a_hi, w_cols, scale_cols, offset_cols, kb, col_mask, stride_wk, BM: tl.constexpr, UPCAST: tl.constexpr
):
    """acc + a @ W[step, cols] for one K-step inside one group of an int4 weight: bytes kb hold the codes of a_lo's
    inputs (low nibbles) and a_hi's (high nibbles); scale_cols/offset_cols point at the group's scales and
    offsets. Tensor cores take the weights dequantised (fp32 scale * q + offset, rounded once to the activations'
    dtype), chained into one accumulator; the GEMV sums exact codes and applies the group's scale and offset to
    the sums: scale * (a @ q) + offset * sum(a)."""
    packed = tl.load(w_cols[None, :] + kb[:, None] * stride_wk, mask=col_mask[None, :], other=0)
    s = tl.load(scale_cols, mask=col_mask, other=0.0).to(tl.float32)
    m = tl.load(offset_cols, mask=col_mask, other=0.0).to(tl.float32)
    low, high = (packed & 15).to(tl.float32), (packed >> 4).to(tl.float32)
    if BM >= 16:
        w_lo = (low * s[None, :] + m[None, :]).to(a_lo.dtype)
        w_hi = (high * s[None, :] + m[None, :]).to(a_hi.dtype)
        acc = mma(a_hi, w_hi, mma(a_lo, w_lo, acc, UPCAST), UPCAST)
    else:
        codes_dot = tl.zeros_like(acc)
        for r in tl.static_range(BM):
            terms = _row(a_lo, r, BM)[:, None] * low + _row(a_hi, r, BM)[:, None] * high
            codes_dot = _add_row(codes_dot, r, tl.sum(terms, axis=0), BM)
        a_sum = tl.sum(a_lo.to(tl.float32) + a_hi.to(tl.float32), axis=1)
        acc = acc + codes_dot * s[None, :] + a_sum[:, None] * m[None, :]
    return acc


@triton.jit
def weight_product(
    a_rows,
    row_mask,
    w,
    scale,
    offset,
    cols,
    col_mask,
    pair_w,
    pair_s,
    stride_wk,
    stride_wn,
    stride_sn,
    stride_sg,
    k_start,
    k_stop,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    PAIR: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """fp32 (BM, BN) products of activation rows with weight columns over inputs k in [k_start, k_stop).

    a_rows (BM,): pointers to each row's input 0 (inputs contiguous). The weight W[k, n] sits at
    w + k * stride_wk + n * stride_wn (int4: the byte of k's code, see formats.py); scales and offsets at
    n * stride_sn + group * stride_sg. With PAIR, also the columns cols + pair (weight pointer + pair_w, scales
    + pair_s) from the same activation loads, returned second (SwiGLU's up half); otherwise the second is zeros.
    k_start must be a multiple of BK, and for int4 BK must divide GROUP. EVEN_K declares k_stop - k_start a multiple
    of BK (always so for int4, whose K is a multiple of GROUP): loads then need no mask along K and vectorise.
    The loop pipelines its loads over STAGES steps (also without tl.dot: the GEMV)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    w_cols = w + cols.to(tl.int64) * stride_wn
    s_cols = scale + cols.to(tl.int64) * stride_sn
    o_cols = offset + cols.to(tl.int64) * stride_sn
    if QUANT == 4:
        HALF: tl.constexpr = BK // 2  # bytes per column and step, inside one group's GROUP / 2 bytes
        i = tl.arange(0, HALF)
        for k0 in tl.range(k_start, k_stop, BK, num_stages=STAGES):
            # byte k0 / 2 + i holds inputs lo + i (low nibble) and lo + GROUP / 2 + i (high nibble)
            lo = k0 - k0 % GROUP + (k0 % GROUP) // 2
            k_lo = tl.max_contiguous(tl.multiple_of(lo + i, HALF), HALF)
            kb = tl.max_contiguous(tl.multiple_of(k0 // 2 + i, HALF), HALF)
            a_lo = tl.load(a_rows[:, None] + k_lo[None, :], mask=row_mask[:, None], other=0.0)
            a_hi = tl.load(a_rows[:, None] + (k_lo + GROUP // 2)[None, :], mask=row_mask[:, None], other=0.0)
            group = (k0 // GROUP) * stride_sg
            acc = _int4_step(
                acc, a_lo, a_hi, w_cols, s_cols + group, o_cols + group, kb, col_mask, stride_wk, BM, UPCAST
            )
            if PAIR:
                acc2 = _int4_step(
                    acc2,
                    a_lo,
                    a_hi,
                    w_cols + pair_w,
                    s_cols + pair_s + group,
                    o_cols + pair_s + group,
                    kb,
                    col_mask,
                    stride_wk,
                    BM,
                    UPCAST,
                )
    else:
        k = tl.arange(0, BK)
        for k0 in tl.range(k_start, k_stop, BK, num_stages=STAGES):
            kk = tl.max_contiguous(tl.multiple_of(k0 + k, BK), BK)
            if EVEN_K:
                kmask = tl.full([BK], 1, tl.int1)
            else:
                kmask = kk < k_stop
            a = tl.load(a_rows[:, None] + kk[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
            acc = _dense_step(acc, a, w_cols, kk, kmask, col_mask, stride_wk, BM, UPCAST)
            if PAIR:
                acc2 = _dense_step(acc2, a, w_cols + pair_w, kk, kmask, col_mask, stride_wk, BM, UPCAST)
        if QUANT == 8:
            acc = acc * tl.load(s_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if PAIR:
                acc2 = acc2 * tl.load(s_cols + pair_s, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc, acc2


@triton.jit
def _quant_matmul_kernel(
    x,
    w,
    scale,
    offset,
    bias,
    out,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    k_per_split,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    part = tl.program_id(2)
    row_mask, col_mask = rows < M, cols < N
    k_start = part * k_per_split
    k_stop = tl.minimum(K, k_start + k_per_split)
    acc, _ = weight_product(
        x + rows.to(tl.int64) * stride_xm,
        row_mask,
        w,
        scale,
        offset,
        cols,
        col_mask,
        0,
        0,
        stride_wk,
        stride_wn,
        stride_sn,
        stride_sg,
        k_start,
        k_stop,
        QUANT,
        GROUP,
        False,
        EVEN_K,
        BM,
        BN,
        BK,
        STAGES,
        UPCAST,
    )
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
    """Tiles by the number of rows M. Decode: up to GEMV_ROWS rows a CUDA-core GEMV (row tiles of 1, 2 or 4;
    256 bytes of each int8 column or a whole int4 group per step), then 16-row tensor-core tiles; narrow
    column tiles and a K split for enough programs: the weight streams once. Prefill: 128 x 128 x 64 tiles on 8
    warps (128 registers a thread and 74-82 KB of shared memory: two programs share an SM, one dequantising while
    the other multiplies). int4 K-steps never cross a group. Measured and tuned with scripts/bench_quant.py
    --sweep."""
    most = group if quant == 4 else 256  # the widest K-step
    if m <= GEMV_ROWS:
        bm, bk, warps, stages = triton.next_power_of_2(m), most, 4, 4
        bn = min(128, GEMV_TILE // bk)
    elif m <= 16:
        bm, bn, bk, warps, stages = 16, 32, min(256, most), 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 32 if m <= 32 else 64, 64, min(128, most), 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, min(64, most), 8, 3
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


def quant_matmul(
    x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None, quant: int, group: int
) -> Tensor:
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
        x,
        codes,
        scale,
        offset if offset is not None else scale,
        bias if bias is not None else scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        codes.stride(0),
        codes.stride(1),
        stride_sn,
        stride_sg,
        k_per_split,
        QUANT=quant,
        GROUP=group,
        HAS_BIAS=bias is not None,
        SPLIT=cfg.split,
        EVEN_K=k % cfg.bk == 0 and k_per_split % cfg.bk == 0,
        BM=cfg.bm,
        BN=cfg.bn,
        BK=cfg.bk,
        STAGES=cfg.num_stages,
        UPCAST=INTERPRETER,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
