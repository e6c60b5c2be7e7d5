"""The FP8 grouped GEMM's Triton quantisers (moe/fp8_triton.py) against its PyTorch ones (moe/fp8_gemm.py), bit for
bit: the same power-of-two factors and the same e4m3 codes (the codes' bytes compared; NaN codes compared as NaN,
whatever their sign bit), on CPU through the Triton interpreter and, @pytest.mark.gpu, on CUDA. The PyTorch cast
(torch's fp32 -> float8_e4m3fn, round to nearest even) is the independent oracle of the kernels' integer rounding
(the interpreter's) and of the GPU conversion they use on CUDA."""

from __future__ import annotations

import pytest
import torch

from moeformer.layers import triton_dispatch
from moeformer.layers.moe import fp8_gemm
from moeformer.layers.moe.fp8_gemm import (
    E4M3,
    E4M3_MAX,
    aligned_rows,
    column_amax_reference,
    fp8_grouped_mm,
    quantize_columns_reference,
    quantize_rows_reference,
    quantize_weight_reference,
)
from tests.test_fp8 import grouped_case

fp8_triton = pytest.importorskip("moeformer.layers.moe.fp8_triton", reason="needs triton")
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.filterwarnings(  # numpy, under the interpreter, on the NaN/inf rows
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)


def assert_same_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == E4M3 and got.shape == want.shape and got.is_contiguous()
    nan_got, nan_want = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(nan_got, nan_want)
    diff = (got.view(torch.uint8) != want.view(torch.uint8)) & ~nan_got
    assert not diff.any(), f"{int(diff.sum())} codes differ, e.g. {got.float()[diff][:4]} vs {want.float()[diff][:4]}"


def assert_same_factors(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def varied(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows whose magnitudes span 1e-6..1e6, one all-zero row, a NaN and an inf in other rows."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * torch.exp(6 * torch.randn(*shape[:-1], 1, generator=g))
    flat = t.view(-1, shape[-1])
    if flat.shape[0] >= 4 and shape[-1]:
        flat[1] = 0
        flat[2, shape[-1] // 2] = float("nan")
        flat[3, -1] = -float("inf")
    return t.to(dtype)


@pytest.fixture(params=[fp8_triton.ROW_TILE, 64, 32], ids=["default", "tiles", "two-pass"])
def row_tile(request, monkeypatch):
    """The row kernel's tile: rows read once (several tiles per program where a program also reduces columns: 64)
    and, at 32, rows longer than the tile read twice in pieces."""
    monkeypatch.setattr(fp8_triton, "ROW_TILE", request.param)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape, transposed",
    [
        ((37, 45), False),
        ((3, 19, 50), False),
        ((2, 48, 33), True),
        ((45, 37), True),
        ((1, 1), False),
        ((0, 16), False),
    ],
)
def test_rowwise_kernel_matches_the_reference_bit_for_bit(shape, transposed, dtype, row_tile):
    """Odd widths, an empty tensor, a 3-D weight and its transposed view (the forward's layout when x needs no
    gradient: the weight kernels), a transposed 2-D tensor (rows strided)."""
    t = varied(shape, dtype, seed=len(shape) + shape[-1])
    if transposed:
        t = t.transpose(-2, -1)
    codes, factors = fp8_triton.quantize_rows(t)
    want_codes, want_factors = quantize_rows_reference(t)
    assert_same_codes(codes, want_codes)
    assert_same_factors(factors, want_factors)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])],
)
def test_kernel_cast_rounds_to_nearest_even_at_every_e4m3_step(device):
    """Rows anchored at 448 (scale 1): every finite e4m3 value, every midpoint between neighbours (ties: to the even
    code), the fp32 values either side of each midpoint, the subnormal range and fp32 subnormals, the top of the
    range rounding up to 448 (saturation's edge), and random fp32 values over the whole range; on CPU the integer
    rounding, on CUDA the GPU's conversion."""
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[torch.isfinite(grid)].unique()  # -448..448
    mids = (grid[1:] + grid[:-1]) / 2
    eps = torch.finfo(torch.float32).eps
    near = torch.cat([mids * (1 - eps), mids * (1 + eps), mids.nextafter(torch.tensor(float("inf")))])
    tiny = torch.tensor([2.0**-10, 2.0**-11, 3 * 2.0**-11, 1e-40, -1e-40, 2.0**-9 * 1.5, 447.9, 440.0, 432.0, -432.0])
    rand = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 2.6, 1000)
    values = torch.cat([grid, mids, near, tiny, rand.clamp(-E4M3_MAX, E4M3_MAX)])
    width = 64
    rows = torch.nn.functional.pad(values, (0, -len(values) % (width - 1))).view(-1, width - 1)
    t = torch.cat([rows, torch.full((rows.shape[0], 1), E4M3_MAX)], 1).to(device)
    codes, factors = fp8_triton.quantize_rows(t)
    assert (factors == 1).all()
    assert_same_codes(codes, t.to(E4M3))  # torch's own cast
    assert_same_codes(codes, quantize_rows_reference(t)[0])


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 70, 33), (1, 1, 1)])
def test_weight_kernel_gives_both_layouts_of_the_reference_bit_for_bit(shape):
    """Expert weights (E, K, N), read once for the forward's layout (per output column, codes (E, N, K)) and
    grad_input's (per row, codes (E, K, N)); odd sizes span partial tiles."""
    w = varied(shape, torch.bfloat16, seed=shape[1])
    got, want = fp8_triton.quantize_weight(w), quantize_weight_reference(w)
    for codes, want_codes in zip(got[::2], want[::2]):
        assert_same_codes(codes, want_codes)
    for factors, want_factors in zip(got[1::2], want[1::2]):
        assert_same_factors(factors, want_factors)


@pytest.mark.parametrize(
    "sizes, past, width",
    [([37, 0, 16, 1, 50], 3, 40), ([0, 0, 5], 0, 17), ([2000], 11, 16)],  # 2000 rows: two column-amax chunks
)
def test_columnwise_kernel_matches_the_reference_bit_for_bit(sizes, past, width, row_tile):
    """The weight gradient's operand: rows gathered into the aligned layout, transposed and cast per column, its
    column amax computed by the column pass or by the rowwise kernel (the forward's and grad_input's quantisation);
    rows past the groups (NaN here) do not count, a NaN inside a group reaches its column."""
    offs = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)
    rows = sum(sizes)
    t = varied((rows + past, width), torch.bfloat16, seed=rows)
    t[rows:] = float("nan")
    source, _ = aligned_rows(offs, rows + past)
    codes, factors = fp8_triton.quantize_columns(t, source, offs, None)
    want_codes, want_factors = quantize_columns_reference(t, source)
    assert_same_codes(codes, want_codes)
    assert_same_factors(factors, want_factors)
    assert torch.isnan(factors).any() == (rows >= 4)  # varied() put a NaN in row 2 when there are 4 rows
    row_codes, row_factors, amax = fp8_triton.quantize_rows_and_column_amax(t, offs)
    want_amax = column_amax_reference(t, offs)
    assert_same_factors(amax, want_amax.float())
    assert_same_codes(row_codes, quantize_rows_reference(t)[0])
    assert_same_factors(row_factors, quantize_rows_reference(t)[1])
    codes, factors = fp8_triton.quantize_columns(t, source, offs, amax)
    assert_same_codes(codes, want_codes)
    assert_same_factors(factors, want_factors)


def test_custom_ops_pass_torchs_op_checks():
    """The kernels as torch custom ops (what torch.compile sees): schema, fake tensors (shapes, dtypes, strides of
    the real outputs, weight layout included) and AOT dispatch agree with the launchers."""
    x, w = torch.randn(37, 48, dtype=torch.bfloat16), torch.randn(2, 32, 48, dtype=torch.bfloat16)  # finite: NaN != NaN
    offs = torch.tensor([10, 30], dtype=torch.int32)
    source, _ = aligned_rows(offs, 37)
    ops = fp8_triton.OPS
    for op, args in (
        (ops.quantize_rows, (w.transpose(-2, -1),)),
        (ops.quantize_rows_and_column_amax, (x, offs)),
        (ops.quantize_columns, (x, source, offs, None)),
        (ops.quantize_weight, (w,)),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def grouped_mm_results(x, w, grad, offs, **kwargs):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fp8_grouped_mm(xg, wg, offs, **kwargs)
    out.backward(grad)
    return out, xg.grad, wg.grad


def test_fp8_grouped_mm_through_the_kernels_equals_the_reference_path(monkeypatch):
    """The whole forward and backward with every quantisation by the kernels (interpreted) gives the bits of the
    PyTorch path: the kernels are a drop-in."""
    case = grouped_case([21, 0, 40, 3], 32, 48)
    reference = grouped_mm_results(*case)
    calls = []
    for name in ("quantize_rows", "quantize_rows_and_column_amax", "quantize_columns", "quantize_weight"):
        kernel = getattr(fp8_triton, name)
        monkeypatch.setattr(fp8_triton, name, lambda *a, kernel=kernel: calls.append(kernel.__name__) or kernel(*a))
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", True)
    kernels = grouped_mm_results(*case)
    # forward: x (with its column amax for the weight gradient), w in both layouts; backward: the output gradient
    # (and its column amax), then the weight gradient's two operands; w is not read again
    forward, backward = ["quantize_rows_and_column_amax", "quantize_weight"], ["quantize_rows_and_column_amax"]
    assert calls == forward + backward + ["quantize_columns"] * 2
    for got, want in zip(kernels, reference):
        assert torch.equal(got[:64], want[:64])


def test_bf16_weight_gradient_recipe():
    """fp8_wgrad=False: the output and input gradient of the FP8 recipe, the weight gradient of torch._grouped_mm's
    own backward (the bf16 layer's), bit for bit."""
    x, w, grad, offs = grouped_case([21, 0, 40, 3], 32, 48, seed=1)
    out8, grad_x8, _ = grouped_mm_results(x, w, grad, offs)
    out, grad_x, grad_w = grouped_mm_results(x, w, grad, offs, fp8_wgrad=False)
    wg = w.clone().requires_grad_()
    torch._grouped_mm(x, wg, offs=offs).backward(grad)
    assert torch.equal(out, out8) and torch.equal(grad_x, grad_x8)
    assert grad_w.dtype == torch.bfloat16 and torch.equal(grad_w, wg.grad)


@torch.library.custom_op("moeformer_tests::scaled_grouped_mm_reference", mutates_args=())
def opaque_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    offs: torch.Tensor,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """The CPU reference of torch._scaled_grouped_mm (host syncs: untraceable) as one opaque op, as the CUDA op is."""
    return fp8_gemm.scaled_grouped_mm_reference(a, b, scale_a, scale_b, offs).clone()


@opaque_reference.register_fake
def _(a, b, scale_a, scale_b, offs, use_fast_accum=False):
    shape = (a.shape[0], b.shape[-1]) if b.dim() == 3 else (offs.shape[0], a.shape[0], b.shape[1])
    return a.new_empty(shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "references"])
@pytest.mark.parametrize("fp8_wgrad", [True, False])
def test_fp8_grouped_mm_compiles_as_one_graph_with_the_kernels(monkeypatch, fp8_wgrad, kernels):
    """torch.compile(fullgraph=True) traces the autograd function with the quantisers as custom ops (or as the
    PyTorch references) and no graph break, no host sync (the scaled GEMM stood in by an opaque op on CPU), and
    computes the eager bits, gradients included (torch 2.11's dynamo gave every gradient 0 when the forward ended in
    a no-op dtype cast)."""
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", kernels)
    monkeypatch.setattr(fp8_gemm, "scaled_grouped_mm", opaque_reference)
    case = grouped_case([30, 0, 50, 20], 32, 48, seed=2)
    eager = grouped_mm_results(*case, fp8_wgrad=fp8_wgrad)
    torch._dynamo.reset()
    compiled = torch.compile(fp8_grouped_mm, backend="aot_eager", fullgraph=True)
    x, w, grad, offs = case
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = compiled(xg, wg, offs, fp8_wgrad=fp8_wgrad)
    out.backward(grad)
    for got, want in zip((out, xg.grad, wg.grad), eager):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernels_on_gpu_match_the_reference_bit_for_bit(row_tile):
    """On CUDA (fp8_gemm's dispatch picks the kernels there): rowwise (both weight layouts, and both from one read)
    and columnwise (with and without a known amax), against the PyTorch quantisers on the same device, at a size
    with many programs per launch."""
    x = varied((3000, 272), torch.bfloat16, seed=0).cuda()
    w = varied((4, 272, 96), torch.bfloat16, seed=1).cuda()
    for t in (x, w, w.transpose(-2, -1)):
        codes, factors = fp8_gemm.quantize_rows(t)
        want_codes, want_factors = quantize_rows_reference(t)
        assert_same_codes(codes, want_codes)
        assert_same_factors(factors, want_factors)
    got, want = fp8_gemm.quantize_weight(w), quantize_weight_reference(w)
    for i, (a, b) in enumerate(zip(got, want)):
        (assert_same_factors if i % 2 else assert_same_codes)(a, b)
    offs = torch.tensor([1000, 1000, 2500, 2990], dtype=torch.int32, device="cuda")
    source, _ = aligned_rows(offs, 3000)
    want_codes, want_factors = quantize_columns_reference(x, source)
    for amax in (None, fp8_gemm.quantize_rows_and_column_amax(x, offs)[2]):
        codes, factors = fp8_gemm.quantize_columns(x, source, offs, amax)
        assert_same_codes(codes, want_codes)
        assert_same_factors(factors, want_factors)
