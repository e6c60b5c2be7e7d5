"""Triton kernels of the FP8 grouped GEMM's quantisation (imported only where triton is installed): each computes an
amax, the power-of-two scale and the e4m3 codes of moe/fp8_gemm.py's PyTorch quantisers (`quantize_rows_reference`,
with `column_amax_reference` from the same read; `quantize_weight_reference`: both layouts of a weight;
`quantize_columns_reference`, the gather into the aligned layout included), bit for bit the same codes and factors.
A row of up to ROW_TILE elements is read once (its tile stays in registers), longer ones twice; a column reduction
(the weight's, or the column amax a column cast needs when not given) is a pass of its own. The amax is an integer
maximum of |v|'s bits (NaN above inf: a NaN reaches it, as in torch.amax), across programs by atomic maxima into a
zeroed int32 buffer read as fp32 (no partial maxima left for a torch reduction). The codes are written as their uint8
bit patterns: on a GPU by its fp32 -> e4m3 conversion (cvt.rn.satfinite: round to nearest even, saturating, NaN
kept), under the interpreter by integer arithmetic (its cast rounds ties away from zero and turns NaN into 384). As
in triton_kernels.py, `OPS` holds the launchers registered as torch custom ops for torch.compile."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from moeformer.layers.moe.fp8_gemm import AMAX_FLOOR, E4M3_MAX

_MAX = tl.constexpr(E4M3_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)

ROW_TILE = 8192  # elements of a row kernel's tile (a power of two): rows up to this long are read once
ROW_WARPS = 4
MULTI_PASS_ROWS = 16  # rows of a tile when a row is longer than ROW_TILE (read in pieces of ROW_TILE // 16)
COLUMN_AMAX_ROWS = 128  # rows per program of a row kernel that also reduces its columns (one atomic per column each)
CHUNK_ROWS = 1024  # rows per program of the column-amax pass (one atomic per column each)
COLUMN_BLOCK_P, COLUMN_BLOCK_C, COLUMN_WARPS = 128, 64, 4  # the column cast's tile: aligned-layout rows x columns
WEIGHT_BLOCK, WEIGHT_WARPS = 64, 4  # the weight kernels' square tile


@triton.jit
def _abs_bits(v):
    """The bits of fp32 |v| as int32: ordered as the values with NaN above inf, so that their integer maximum is the
    amax with NaN propagated (as torch.amax), in one instruction per element."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _scale(amax):
    """2^floor(log2(448 / max(amax, 1e-12))) in fp32 (0 for an infinite amax, NaN for a NaN one): the exponent bits
    of the correctly rounded quotient."""
    q = tl.math.div_rn(tl.full(amax.shape, _MAX, tl.float32), tl.where(amax < _FLOOR, _FLOOR, amax))
    power = (q.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(q != q, q, power)


@triton.jit
def _factor(scale):
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


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
def _e4m3(p, HW_CAST: tl.constexpr):
    """The e4m3 codes (uint8) of fp32 p saturated at +-448: the GPU's conversion (HW_CAST) or `_e4m3_bits`."""
    if HW_CAST:
        return p.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        return _e4m3_bits(p).to(tl.uint8)


@triton.jit
def _quantize_rows_kernel(
    src,
    codes,
    factors,
    col_amax,
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
    HW_CAST: tl.constexpr,
    ONE_PASS: tl.constexpr,
    TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows m of batch b of src (B, M, K) (any strides): amax over K, scale, codes at o_* strides, factor (B, M), for
    TILES tiles of BLOCK_M rows, each read once (ONE_PASS: K <= BLOCK_K) or in BLOCK_K-wide pieces twice (amax, cast).
    COL_AMAX (2-D src): also col_amax[k] = max of its bits and those of |src[m, k]| over the rows before offs[G - 1]."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    src += b * s_b
    codes += b * o_b
    factors += b * M
    if COL_AMAX:
        end = tl.load(offs + G - 1)
    k_range = tl.arange(0, BLOCK_K)
    col_bits = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)  # elementwise over the tiles, reduced once at the end
    for tile in range(TILES):
        rows = (pid * TILES + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        base = src + rows.to(tl.int64)[:, None] * s_m
        out = codes + rows.to(tl.int64)[:, None] * o_m
        if ONE_PASS:
            mask = row_ok[:, None] & (k_range < K)[None, :]
            v = tl.load(base + k_range.to(tl.int64)[None, :] * s_k, mask=mask, other=0.0).to(tl.float32)
            bits = _abs_bits(v)
            scale = _scale(tl.max(bits, 1).to(tl.float32, bitcast=True))
            tl.store(out + k_range.to(tl.int64)[None, :] * o_k, _e4m3(v * scale[:, None], HW_CAST), mask=mask)
            if COL_AMAX:
                col_bits = tl.maximum(col_bits, tl.where((rows < end)[:, None], bits, 0))
        else:
            row_bits = tl.zeros([BLOCK_M], dtype=tl.int32)
            for start in range(0, K, BLOCK_K):
                cols = start + k_range
                mask = row_ok[:, None] & (cols < K)[None, :]
                v = tl.load(base + cols.to(tl.int64)[None, :] * s_k, mask=mask, other=0.0).to(tl.float32)
                bits = _abs_bits(v)
                row_bits = tl.maximum(row_bits, tl.max(bits, 1))
                if COL_AMAX:
                    column = tl.max(tl.where((rows < end)[:, None], bits, 0), 0)
                    tl.atomic_max(col_amax + cols, column, mask=cols < K, sem="relaxed")
            scale = _scale(row_bits.to(tl.float32, bitcast=True))
            for start in range(0, K, BLOCK_K):
                cols = start + k_range
                mask = row_ok[:, None] & (cols < K)[None, :]
                v = tl.load(base + cols.to(tl.int64)[None, :] * s_k, mask=mask, other=0.0).to(tl.float32)
                tl.store(out + cols.to(tl.int64)[None, :] * o_k, _e4m3(v * scale[:, None], HW_CAST), mask=mask)
        tl.store(factors + rows, _factor(scale), mask=row_ok)
    if COL_AMAX and ONE_PASS:
        tl.atomic_max(col_amax + k_range, tl.max(col_bits, 0), mask=k_range < K, sem="relaxed")


@triton.jit
def _column_amax_kernel(src, offs, amax_bits, C, G, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """amax_bits[c] = max of its bits and those of |src[r, c]| over the chunk's rows r < offs[G - 1] (src (R, C)
    contiguous)."""
    chunk = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    end = tl.load(offs + G - 1)
    amax = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & col_ok[None, :]
        v = tl.load(src + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(_abs_bits(v), 0))
    tl.atomic_max(amax_bits + cols, amax, mask=col_ok, sem="relaxed")


@triton.jit
def _column_cast_kernel(
    src, source, amax, codes, factors, C, P, HW_CAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
):
    """codes[c, p] = e4m3(src[source[p], c] * scale[c]) (0 where source[p] < 0): the rows gathered into the aligned
    layout and transposed as they are cast (the tile's codes transposed in registers: runs of BLOCK_P bytes per
    column stored); scale from the column amax."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = _scale(tl.load(amax + cols, mask=col_ok, other=0.0))
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = tl.load(source + pos, mask=pos < P, other=-1)
    mask = (row >= 0)[:, None] & col_ok[None, :]
    v = tl.load(src + row.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bits = tl.trans(_e4m3(v * scale[None, :], HW_CAST))
    tl.store(codes + cols.to(tl.int64)[:, None] * P + pos[None, :], bits, mask=col_ok[:, None] & (pos < P)[None, :])
    if tl.program_id(1) == 0:
        tl.store(factors + cols, _factor(scale), mask=col_ok)


@triton.jit
def _weight_amax_kernel(w, row_bits, col_bits, K, N, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (i, j) of expert e of w (E, K, N) contiguous: its columns' amax bits into col_bits[e, n] and (ROWS) its
    rows' into row_bits[e, k] (atomic maxima)."""
    i, j, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K)[:, None] & (cols < N)[None, :]
    bits = _abs_bits(tl.load(w + e * K * N + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32))
    tl.atomic_max(col_bits + e * N + cols, tl.max(bits, 0), mask=cols < N, sem="relaxed")
    if ROWS:
        tl.atomic_max(row_bits + e * K + rows, tl.max(bits, 1), mask=rows < K, sem="relaxed")


@triton.jit
def _weight_cast_kernel(
    w,
    row_amax,
    col_amax,
    codes,
    factors,
    codes_t,
    factors_t,
    K,
    N,
    ROWS: tl.constexpr,
    HW_CAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Tile (i, j) of expert e of w (E, K, N), read once, cast per column (codes (E, N, K), factors (E, N)) and (ROWS)
    per row (codes_t (E, K, N), factors_t (E, K))."""
    i, j, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < K, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    v = tl.load(w + e * K * N + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    col_scale = _scale(tl.load(col_amax + e * N + cols, mask=col_ok, other=0.0))
    bits = tl.trans(_e4m3(v * col_scale[None, :], HW_CAST))
    tl.store(codes + e * N * K + cols[:, None] * K + rows[None, :], bits, mask=col_ok[:, None] & row_ok[None, :])
    if i == 0:
        tl.store(factors + e * N + cols, _factor(col_scale), mask=col_ok)
    if ROWS:
        row_scale = _scale(tl.load(row_amax + e * K + rows, mask=row_ok, other=0.0))
        bits = _e4m3(v * row_scale[:, None], HW_CAST)
        tl.store(codes_t + e * K * N + rows[:, None] * N + cols[None, :], bits, mask=mask)
        if j == 0:
            tl.store(factors_t + e * K + rows, _factor(row_scale), mask=row_ok)


@functools.cache
def _hw_cast(device: torch.device) -> bool:
    """Whether device converts fp32 to e4m3 in hardware as the references round (NVIDIA, compute capability 8.9+);
    elsewhere (the interpreter, older GPUs, ROCm) the kernels round by integer arithmetic."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _weight(w: Tensor, rows: bool) -> tuple[Tensor, ...]:
    """w (E, K, N) contiguous per output column (codes (E, N, K), factors (E, N)) and, with rows, per row (codes
    (E, K, N), factors (E, K)), from two reads (amax, cast) in square tiles."""
    e, k, n = w.shape
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    factors = torch.empty(e, n, dtype=torch.float32, device=w.device)
    codes_t = torch.empty(e, k, n if rows else 0, dtype=torch.float8_e4m3fn, device=w.device)
    factors_t = torch.empty(e, k if rows else 0, dtype=torch.float32, device=w.device)
    if w.numel():
        block_k, block_n = min(WEIGHT_BLOCK, triton.next_power_of_2(k)), min(WEIGHT_BLOCK, triton.next_power_of_2(n))
        grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n), e)
        amax = torch.zeros(e * (n + (k if rows else 0)), dtype=torch.int32, device=w.device)  # columns', rows' bits
        col_amax, row_amax = amax[: e * n], amax[e * n :]
        tiles = dict(BLOCK_K=block_k, BLOCK_N=block_n, num_warps=WEIGHT_WARPS)
        _weight_amax_kernel[grid](w, row_amax, col_amax, k, n, ROWS=rows, **tiles)
        _weight_cast_kernel[grid](
            w, row_amax.view(torch.float32), col_amax.view(torch.float32), codes.view(torch.uint8), factors,
            codes_t.view(torch.uint8), factors_t, k, n, ROWS=rows, HW_CAST=_hw_cast(w.device), **tiles,
        )  # fmt: skip
    return (codes, factors, codes_t, factors_t) if rows else (codes, factors)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`fp8_gemm.quantize_weight_reference`: w (E, K, N) in both layouts from two reads (amax, cast)."""
    return _weight(w.contiguous(), rows=True)


def _rows(t: Tensor, offs: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    t3 = t.reshape(1, *t.shape) if t.dim() == 2 else t
    batch, m, k = t3.shape
    codes = torch.empty(t3.shape, dtype=torch.float8_e4m3fn, device=t.device)
    factors = torch.empty(batch, m, dtype=torch.float32, device=t.device)
    one_pass = k <= ROW_TILE
    if one_pass:  # the whole row in the tile, as many rows as fit
        block_k = triton.next_power_of_2(max(k, 1))
        block_m = ROW_TILE // block_k
        tiles = max(1, COLUMN_AMAX_ROWS // block_m) if offs is not None else 1
    else:
        block_m, block_k, tiles = MULTI_PASS_ROWS, ROW_TILE // MULTI_PASS_ROWS, 1
    programs = triton.cdiv(m, block_m * tiles)
    col_amax = factors if offs is None else torch.zeros(k, dtype=torch.int32, device=t.device)  # |t|'s bits
    if codes.numel():
        _quantize_rows_kernel[(programs, batch)](
            t3, codes.view(torch.uint8), factors, col_amax, factors if offs is None else offs,
            0 if offs is None else offs.shape[0], m, k, *t3.stride(), *codes.stride(), COL_AMAX=offs is not None,
            HW_CAST=_hw_cast(t.device), ONE_PASS=one_pass, TILES=tiles, BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=ROW_WARPS,
        )  # fmt: skip
    return codes.view(t.shape), factors.view(t.shape[:-1]), None if offs is None else col_amax.view(torch.float32)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """`fp8_gemm.quantize_rows_reference` (t (..., K) of any strides, at most 3-D): contiguous e4m3 codes and the
    fp32 factors shaped t.shape[:-1]. A transposed contiguous weight (E, N, K) (the forward's, when x needs no
    gradient) goes to the weight kernels, whose tiles read it along its rows."""
    if t.dim() == 3 and t.stride(-1) != 1 and t.transpose(-2, -1).is_contiguous():
        return _weight(t.transpose(-2, -1), rows=False)
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
    block_c = min(COLUMN_BLOCK_C, triton.next_power_of_2(max(c, 1)))
    if c and p and offs.numel():
        if amax is None:
            chunks = max(1, triton.cdiv(r, CHUNK_ROWS))
            bits = torch.zeros(c, dtype=torch.int32, device=t.device)
            _column_amax_kernel[(triton.cdiv(c, block_c), chunks)](
                t, offs, bits, c, offs.shape[0], CHUNK=CHUNK_ROWS, BLOCK_R=32, BLOCK_C=block_c
            )
            amax = bits.view(torch.float32)
        _column_cast_kernel[(triton.cdiv(c, block_c), triton.cdiv(p, COLUMN_BLOCK_P))](
            t, source, amax, codes.view(torch.uint8), factors, c, p, HW_CAST=_hw_cast(t.device),
            BLOCK_P=COLUMN_BLOCK_P, BLOCK_C=block_c, num_warps=COLUMN_WARPS,
        )  # fmt: skip
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
