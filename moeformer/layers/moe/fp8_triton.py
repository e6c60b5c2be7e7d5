"""Triton kernels of the FP8 grouped GEMM's quantisation (imported only where triton is installed): each computes an
amax, the power-of-two scale and the e4m3 codes of moe/fp8_gemm.py's PyTorch quantisers (`quantize_rows_reference`,
with `column_amax_reference` from the same read; `quantize_weight_reference`: both layouts of a weight;
`quantize_columns_reference`, the gather into the aligned layout included) in one pass over the data (two where a
column reduction comes first), bit for bit the same codes and factors. The codes are written as their uint8 bit
patterns, rounded to nearest even by integer arithmetic, so that they do not depend on a backend's fp32 -> fp8
conversion (the Triton interpreter's rounds ties away from zero and turns NaN into 384). As in triton_kernels.py,
`OPS` holds the launchers registered as torch custom ops for torch.compile."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from moeformer.layers.moe.fp8_gemm import AMAX_FLOOR, E4M3_MAX

_MAX = tl.constexpr(E4M3_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)

CHUNK_ROWS = 1024  # rows per program of the column-amax pass (one partial maximum per column each)
COLUMN_BLOCK_P = 64  # aligned-layout rows per program of the column cast pass


@triton.jit
def _abs_max(v, axis: tl.constexpr):
    """max |v| along axis, NaN when any element is NaN (as torch.amax)."""
    nan = tl.max((v != v).to(tl.int32), axis=axis) > 0
    return tl.where(nan, float("nan"), tl.max(tl.where(v != v, 0.0, tl.abs(v)), axis=axis))


@triton.jit
def _max_nan(a, b):
    """Elementwise maximum, NaN where either is NaN (a GPU's max.f32 would return the other operand)."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def _scale(amax):
    """2^floor(log2(448 / max(amax, 1e-12))) in fp32 (0 for an infinite amax, NaN for a NaN one): the exponent bits
    of the correctly rounded quotient."""
    q = tl.math.div_rn(tl.full(amax.shape, _MAX, tl.float32), tl.where(amax < _FLOOR, _FLOOR, amax))
    power = (q.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(q != q, q, power)


@triton.jit
def _e4m3_bits(p):
    """The float8_e4m3fn bit pattern (int32 in [0, 255]) of fp32 p clamped to +-448, rounded to nearest even."""
    bits = p.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    y = tl.minimum(tl.abs(p), _MAX)
    a = y.to(tl.int32, bitcast=True)
    biased = tl.maximum((a >> 23) & 0xFF, 1)  # an fp32 subnormal has exponent field 0 and value m * 2^-149
    m = (a & 0x7FFFFF) | tl.where(((a >> 23) & 0xFF) > 0, 0x800000, 0)
    quantum = tl.maximum(biased - 127, -6) - 3  # e4m3's spacing at y: 2^quantum (2^-9 below its normal range)
    shift = tl.minimum(150 + quantum - biased, 30)  # y = m * 2^(biased - 150); n = round(y / 2^quantum)
    n = (m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift
    code = ((quantum + 10) << 3) + n - 8  # exponent field quantum + 10 (1 for subnormals, whose n < 8) and mantissa
    return tl.where(p != p, 0x7F, code) | sign


@triton.jit
def _quantize_rows_kernel(
    src,
    codes,
    factors,
    col_partial,
    offs,
    G,
    M,
    K,
    s_b,
    s_m,
    s_k,
    o_b,
    o_m,
    o_k,
    COL_AMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows m of batch b of src (B, M, K) (any strides): amax over K, scale, codes at o_* strides, factor (B, M).
    COL_AMAX (2-D src): also col_partial[program, k] = max |src[m, k]| over the program's rows before offs[G - 1]."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    base = src + b * s_b + rows.to(tl.int64)[:, None] * s_m
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    if COL_AMAX:
        grouped = rows < tl.load(offs + G - 1)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        v = tl.load(base + cols.to(tl.int64)[None, :] * s_k, mask=mask, other=0.0).to(tl.float32)
        amax = _max_nan(amax, _abs_max(v, 1))
        if COL_AMAX:
            column = _abs_max(tl.where(grouped[:, None], v, 0.0), 0)
            tl.store(col_partial + tl.program_id(0) * K + cols, column, mask=cols < K)
    scale = _scale(amax)
    out = codes + b * o_b + rows.to(tl.int64)[:, None] * o_m
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        v = tl.load(base + cols.to(tl.int64)[None, :] * s_k, mask=mask, other=0.0).to(tl.float32)
        bits = _e4m3_bits(v * scale[:, None])
        tl.store(out + cols.to(tl.int64)[None, :] * o_k, bits.to(tl.uint8), mask=mask)
    tl.store(factors + b * M + rows, tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale), mask=row_ok)


@triton.jit
def _column_amax_kernel(src, offs, partial, C, G, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[chunk, c] = max |src[r, c]| over the chunk's rows r < offs[G - 1] (src (R, C) contiguous)."""
    chunk = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    end = tl.load(offs + G - 1)
    amax = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & col_ok[None, :]
        v = tl.load(src + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = _max_nan(amax, _abs_max(v, 0))
    tl.store(partial + chunk * C + cols, amax, mask=col_ok)


@triton.jit
def _column_cast_kernel(src, source, amax, codes, factors, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """codes[c, p] = e4m3(src[source[p], c] * scale[c]) (0 where source[p] < 0): the rows gathered into the aligned
    layout and transposed as they are cast; scale from the column amax."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = _scale(tl.load(amax + cols, mask=col_ok, other=0.0))
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = tl.load(source + pos, mask=pos < P, other=-1)
    mask = (row >= 0)[:, None] & col_ok[None, :]
    v = tl.load(src + row.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bits = _e4m3_bits(v * scale[None, :])
    out = codes + cols.to(tl.int64)[None, :] * P + pos[:, None]
    tl.store(out, bits.to(tl.uint8), mask=(pos < P)[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(factors + cols, tl.math.div_rn(tl.full([BLOCK_C], 1.0, tl.float32), scale), mask=col_ok)


@triton.jit
def _weight_amax_kernel(w, row_part, col_part, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (i, j) of expert e of w (E, K, N) contiguous: its rows' amax into row_part[e, k, j] and its columns'
    into col_part[e, i, n]."""
    i, j, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K)[:, None] & (cols < N)[None, :]
    v = tl.load(w + e * K * N + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(row_part + (e * K + rows) * tl.num_programs(1) + j, _abs_max(v, 1), mask=rows < K)
    tl.store(col_part + (e * tl.num_programs(0) + i) * N + cols, _abs_max(v, 0), mask=cols < N)


@triton.jit
def _weight_cast_kernel(
    w, row_amax, col_amax, codes, factors, codes_t, factors_t, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Tile (i, j) of expert e of w (E, K, N), read once, cast twice: per column (codes (E, N, K), factors (E, N))
    and per row (codes_t (E, K, N), factors_t (E, K))."""
    i, j, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < K, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    v = tl.load(w + e * K * N + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    col_scale = _scale(tl.load(col_amax + e * N + cols, mask=col_ok, other=0.0))
    row_scale = _scale(tl.load(row_amax + e * K + rows, mask=row_ok, other=0.0))
    bits = _e4m3_bits(v * col_scale[None, :])
    tl.store(codes + e * N * K + cols[None, :] * K + rows[:, None], bits.to(tl.uint8), mask=mask)
    bits = _e4m3_bits(v * row_scale[:, None])
    tl.store(codes_t + e * K * N + rows[:, None] * N + cols[None, :], bits.to(tl.uint8), mask=mask)
    if i == 0:
        tl.store(factors + e * N + cols, tl.math.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), col_scale), mask=col_ok)
    if j == 0:
        tl.store(factors_t + e * K + rows, tl.math.div_rn(tl.full([BLOCK_K], 1.0, tl.float32), row_scale), mask=row_ok)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`fp8_gemm.quantize_weight_reference`: w (E, K, N) in both layouts from two reads (amax, cast)."""
    w = w.contiguous()
    e, k, n = w.shape
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    codes_t = torch.empty(e, k, n, dtype=torch.float8_e4m3fn, device=w.device)
    factors = torch.empty(e, n, dtype=torch.float32, device=w.device)
    factors_t = torch.empty(e, k, dtype=torch.float32, device=w.device)
    if w.numel():
        block_k, block_n = min(64, triton.next_power_of_2(k)), min(64, triton.next_power_of_2(n))
        grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n), e)
        row_part = torch.empty(e, k, grid[1], dtype=torch.float32, device=w.device)
        col_part = torch.empty(e, grid[0], n, dtype=torch.float32, device=w.device)
        _weight_amax_kernel[grid](w, row_part, col_part, k, n, BLOCK_K=block_k, BLOCK_N=block_n)
        _weight_cast_kernel[grid](
            w, row_part.amax(-1), col_part.amax(1), codes.view(torch.uint8), factors, codes_t.view(torch.uint8),
            factors_t, k, n, BLOCK_K=block_k, BLOCK_N=block_n,
        )  # fmt: skip
    return codes, factors, codes_t, factors_t


def _rows(t: Tensor, offs: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    t3 = t.reshape(1, *t.shape) if t.dim() == 2 else t
    batch, m, k = t3.shape
    codes = torch.empty(t3.shape, dtype=torch.float8_e4m3fn, device=t.device)
    factors = torch.empty(batch, m, dtype=torch.float32, device=t.device)
    # a tile of rows x K: rows that are strided columns (a transposed weight) read 64 consecutive elements each;
    # 64 rows when the tile also reduces its columns (fewer partial maxima)
    block_m, block_k = (64, 64) if t3.stride(1) == 1 or offs is not None else (16, 256)
    block_k = min(block_k, triton.next_power_of_2(max(k, 1)))
    partial = factors if offs is None else torch.empty(triton.cdiv(m, block_m), k, dtype=torch.float32, device=t.device)
    if codes.numel():
        _quantize_rows_kernel[(triton.cdiv(m, block_m), batch)](
            t3, codes.view(torch.uint8), factors, partial, factors if offs is None else offs,
            0 if offs is None else offs.shape[0], m, k, *t3.stride(), *codes.stride(),
            COL_AMAX=offs is not None, BLOCK_M=block_m, BLOCK_K=block_k,
        )  # fmt: skip
    column_amax = None if offs is None else partial.amax(0) if m else partial.new_zeros(k)
    return codes.view(t.shape), factors.view(t.shape[:-1]), column_amax


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """`fp8_gemm.quantize_rows_reference` (t (..., K) of any strides, at most 3-D): contiguous e4m3 codes and the
    fp32 factors shaped t.shape[:-1]."""
    codes, factors, _ = _rows(t, None)
    return codes, factors


def quantize_rows_and_column_amax(t: Tensor, offs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`quantize_rows` of t (R, C) and, from the same read, `fp8_gemm.column_amax_reference(t, offs)`."""
    return _rows(t, offs)


def quantize_columns(t: Tensor, source: Tensor, offs: Tensor, amax: Tensor | None) -> tuple[Tensor, Tensor]:
    """`fp8_gemm.quantize_columns_reference` for t (R, C) whose gathered rows (source >= 0) are the rows before
    offs[-1]: codes (C, len(source)) and factors (C,); `amax`: their column amax if known (one pass fewer)."""
    t, source = t.contiguous(), source.contiguous()
    r, c = t.shape
    p = source.shape[0]
    codes = torch.empty(c, p, dtype=torch.float8_e4m3fn, device=t.device)
    factors = torch.empty(c, dtype=torch.float32, device=t.device)
    block_c = min(64, triton.next_power_of_2(max(c, 1)))
    if c and p and offs.numel():
        if amax is None:
            chunks = max(1, triton.cdiv(r, CHUNK_ROWS))
            partial = torch.empty(chunks, c, dtype=torch.float32, device=t.device)
            _column_amax_kernel[(triton.cdiv(c, block_c), chunks)](
                t, offs, partial, c, offs.shape[0], CHUNK=CHUNK_ROWS, BLOCK_R=32, BLOCK_C=block_c
            )
            amax = partial.amax(0)  # NaN where any partial is (as the reference's amax)
        _column_cast_kernel[(triton.cdiv(c, block_c), triton.cdiv(p, COLUMN_BLOCK_P))](
            t, source, amax, codes.view(torch.uint8), factors, c, p, BLOCK_P=COLUMN_BLOCK_P, BLOCK_C=block_c
        )
    return codes, factors


OPS = SimpleNamespace(
    **{
        fn.__name__: torch.library.custom_op(f"moeformer::fp8_{fn.__name__}", fn, mutates_args=())
        for fn in (quantize_rows, quantize_rows_and_column_amax, quantize_columns, quantize_weight)
    }
)


@OPS.quantize_rows.register_fake
def _(t: Tensor) -> tuple[Tensor, Tensor]:
    return t.new_empty(t.shape, dtype=torch.float8_e4m3fn), t.new_empty(t.shape[:-1], dtype=torch.float32)


@OPS.quantize_rows_and_column_amax.register_fake
def _(t: Tensor, offs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    f32 = torch.float32
    return (
        t.new_empty(t.shape, dtype=torch.float8_e4m3fn),
        t.new_empty(t.shape[0], dtype=f32),
        t.new_empty(t.shape[1], dtype=f32),
    )


@OPS.quantize_columns.register_fake
def _(t: Tensor, source: Tensor, offs: Tensor, amax: Tensor | None) -> tuple[Tensor, Tensor]:
    c = t.shape[1]
    return t.new_empty(c, source.shape[0], dtype=torch.float8_e4m3fn), t.new_empty(c, dtype=torch.float32)


@OPS.quantize_weight.register_fake
def _(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    e, k, n = w.shape
    e4m3, f32 = torch.float8_e4m3fn, torch.float32
    return (
        w.new_empty(e, n, k, dtype=e4m3),
        w.new_empty(e, n, dtype=f32),
        w.new_empty(w.shape, dtype=e4m3),
        w.new_empty(e, k, dtype=f32),
    )
