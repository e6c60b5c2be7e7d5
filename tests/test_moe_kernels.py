"""Token-major MoE ops: the PyTorch references against autograd and explicit loops, and the Triton kernels against
the references (CUDA; or on CPU under TRITON_INTERPRET=1 when triton is installed)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from moeformer.layers.moe.kernels import (
    Combine,
    PermuteRows,
    gather_sum_reference,
    swiglu_reference,
)

SHAPES = [(1, 1, 1), (5, 2, 7), (33, 3, 1000), (16, 8, 1500), (9, 6, 2048)]  # (tokens, k, width)


def routing(n: int, k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation of the n*k slots (as an expert sort would give) and its inverse."""
    order = torch.randperm(n * k, device=device)
    return order, torch.argsort(order)


@pytest.mark.parametrize("n,k,d", SHAPES[:3])
def test_gather_sum_reference_by_loop(n, k, d):
    src = torch.randn(n * k, d, dtype=torch.float64)
    _, inverse = routing(n, k)
    expected = torch.stack([sum(src[inverse[t * k + j]] for j in range(k)) for t in range(n)])
    torch.testing.assert_close(gather_sum_reference(src, inverse, k), expected)


@pytest.mark.parametrize("n,k,d", SHAPES[:3] + [(4, 3, 5)])
def test_combine_is_the_gather_sum_with_a_gather_backward(n, k, d):
    y = torch.randn(n * k, d, dtype=torch.float64, requires_grad=True)
    order, inverse = routing(n, k)
    grad = torch.randn(n, d, dtype=torch.float64)
    out = Combine.apply(y, order // k, inverse, k)
    ref = gather_sum_reference(y, inverse, k)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, y, grad)[0], torch.autograd.grad(ref, y, grad)[0])
    if y.numel() <= 64:  # gradcheck builds the full Jacobian
        assert torch.autograd.gradcheck(lambda a: Combine.apply(a, order // k, inverse, k), (y,))


@pytest.mark.parametrize("s,f", [(1, 1), (6, 5), (9, 12)])
def test_weighted_swiglu_reference_by_loop(s, f):
    torch.manual_seed(s + f)
    h, weight = torch.randn(s, 2 * f, dtype=torch.float64), torch.rand(s, dtype=torch.float64)
    rows = torch.randperm(s)
    unweighted = torch.stack([torch.nn.functional.silu(h[i, :f]) * h[i, f:] for i in range(s)])
    torch.testing.assert_close(swiglu_reference(h), unweighted)
    torch.testing.assert_close(swiglu_reference(h, weight, rows), weight[rows].unsqueeze(-1) * unweighted)


def test_negative_indices_read_as_zero_rows_and_are_not_computed():
    """-1 marks a row that is not there (a padding slot; another rank's under expert parallelism): the gather-sum
    skips it, the weighted SwiGLU zeroes such a row whatever it holds (NaN included) and gives its weight no
    gradient."""
    src = torch.randn(7, 5, dtype=torch.float64)
    index = torch.tensor([3, -1, -1, -1, 0, 6])
    expected = torch.stack([src[3], torch.zeros(5), src[0] + src[6]])
    torch.testing.assert_close(gather_sum_reference(src, index, 2), expected)
    torch.testing.assert_close(gather_sum_reference(src, index, 1)[1], torch.zeros(5, dtype=torch.float64))
    h = torch.randn(4, 6, dtype=torch.float64)
    h[2] = float("nan")
    h.requires_grad_()
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([1, 0, -1, 3])
    out = swiglu_reference(h, weight, rows)
    assert out[2].eq(0).all() and out.isfinite().all()
    out.sum().backward()
    assert weight.grad[2] == 0 and h.grad.isfinite().all() and h.grad[2].eq(0).all()
    live = [0, 1, 3]
    torch.testing.assert_close(out[live], swiglu_reference(h[live].detach(), weight.detach(), rows[live]))


def test_permute_rows_dispatch_and_combine_round_trip():
    """Dispatch k copies of each token into expert order, then combine them: k times the input, both ways."""
    n, k = 6, 3
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    order, inverse = routing(n, k)
    out = Combine.apply(PermuteRows.apply(x, order // k, inverse, k), order // k, inverse, k)
    torch.testing.assert_close(out, k * x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, torch.full_like(x, k))


def triton_device() -> str | None:
    """Where the Triton kernels can run here: CUDA, or the CPU interpreter, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


needs_triton = pytest.mark.skipif(triton_device() is None, reason="needs triton on CUDA (or TRITON_INTERPRET=1)")
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.float().abs().max().item() or 1.0
    assert (ours.float() - ref.float()).abs().max().item() <= TOLERANCES[dtype] * scale


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_triton_gather_sum_matches_reference(n, k, d, dtype):
    from moeformer.layers.moe import triton_kernels

    device = triton_device()
    torch.manual_seed(n + k + d)
    y = torch.randn(n * k, d, device=device, dtype=dtype)
    _, inverse = routing(n, k, device)
    close(triton_kernels.gather_sum(y, inverse, k), gather_sum_reference(y, inverse, k), dtype)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("s,f", [(1, 1), (7, 5), (130, 1000), (3, 1400), (5, 2500)])
def test_triton_swiglu_matches_reference(s, f, dtype, weighted):
    """Forward and both gradients against the fp32 reference; widths past one block (1024) loop in the backward."""
    from moeformer.layers.moe import triton_kernels

    device = triton_device()
    torch.manual_seed(s + f)
    h = torch.randn(s, 2 * f, device=device, dtype=dtype)
    grad = torch.randn(s, f, device=device, dtype=dtype)
    weight, rows = (torch.rand(s, device=device), torch.randperm(s, device=device)) if weighted else (None, None)
    ref_h = h.float().requires_grad_()  # fp32 reference on the same (rounded) inputs
    ref_w = weight.clone().requires_grad_() if weighted else None
    ref_out = swiglu_reference(ref_h, ref_w, rows)
    ref_grads = torch.autograd.grad(ref_out, [ref_h] + ([ref_w] if weighted else []), grad.float())
    close(triton_kernels.swiglu_forward(h, weight, rows), ref_out, dtype)
    grad_h, grad_w = triton_kernels.swiglu_backward(h, grad, weight, rows)
    close(grad_h, ref_grads[0], dtype)
    if weighted:  # an fp32 sum of fp32 products: tight in both dtypes
        close(grad_w, ref_grads[1], torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_triton_kernels_skip_negative_indices_as_the_references_do(dtype):
    """Rows marked -1: the gather-sum reads them as zero, the SwiGLU kernels leave them alone (garbage and NaN in
    them change nothing) and give their weight slot a zero gradient, as the references."""
    from moeformer.layers.moe import triton_kernels

    device = triton_device()
    torch.manual_seed(7)
    s, f, k = 10, 24, 2
    y = torch.randn(s, f, device=device, dtype=dtype)
    index = torch.randperm(s, device=device)
    index[torch.rand(s, device=device) < 0.4] = -1
    index[0] = -1
    close(triton_kernels.gather_sum(y, index, k), gather_sum_reference(y, index, k), dtype)
    close(triton_kernels.gather_sum(y, index, 1), gather_sum_reference(y, index, 1), dtype)
    h, grad = torch.randn(s, 2 * f, device=device, dtype=dtype), torch.randn(s, f, device=device, dtype=dtype)
    weight, rows = torch.rand(s, device=device), index
    h[rows < 0], grad[rows < 0] = float("nan"), float("nan")  # what a row past the groups may hold
    live = rows >= 0
    ref_h = h.float().requires_grad_()
    ref_w = weight.clone().requires_grad_()
    ref_out = swiglu_reference(ref_h, ref_w, rows)
    ref_grad_h, ref_grad_w = torch.autograd.grad(ref_out, [ref_h, ref_w], grad.float().nan_to_num(0.0))
    close(triton_kernels.swiglu_forward(h, weight, rows)[live], ref_out[live], dtype)
    grad_h, grad_w = triton_kernels.swiglu_backward(h, grad, weight, rows)
    close(grad_h[live], ref_grad_h[live], dtype)
    close(grad_w, ref_grad_w, torch.float32)
    assert grad_w[[i for i in range(s) if i not in rows.tolist()]].eq(0).all()


@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_triton_launchers_read_rows_with_padded_strides(dtype):
    """A compiled graph hands a custom op tensors that keep only their stride order (inductor may pad each row), so
    the launchers must not assume dense rows: inputs viewed out of wider buffers give the dense inputs' results."""
    from moeformer.layers.moe import triton_kernels

    device, (s, f, k) = triton_device(), (6, 40, 2)
    torch.manual_seed(5)

    def padded(rows: int, width: int) -> torch.Tensor:
        return torch.randn(rows, width + 8, device=device, dtype=dtype)[:, :width]

    h, grad, y = padded(s, 2 * f), padded(s, f), padded(s * k, f)
    weight, rows = torch.rand(s, device=device), torch.randperm(s, device=device)
    _, inverse = routing(s, k, device)
    assert not h.is_contiguous() and not grad.is_contiguous()
    dense = [t.contiguous() for t in (h, grad, y)]
    torch.testing.assert_close(
        triton_kernels.gather_sum(y, inverse, k), triton_kernels.gather_sum(dense[2], inverse, k)
    )
    torch.testing.assert_close(
        triton_kernels.swiglu_forward(h, weight, rows), triton_kernels.swiglu_forward(dense[0], weight, rows)
    )
    for ours, ref in zip(
        triton_kernels.swiglu_backward(h, grad, weight, rows),
        triton_kernels.swiglu_backward(dense[0], dense[1], weight, rows),
    ):
        assert ours.is_contiguous()
        torch.testing.assert_close(ours, ref)


@pytest.mark.gpu
@needs_triton
def test_layer_with_triton_ops_compiles_in_one_graph_and_matches_eager(monkeypatch):
    from moeformer.layers.moe import MoE, MoEConfig, kernels, triton_kernels

    device = triton_device()
    if device == "cpu":  # the interpreter: route CPU tensors to the Triton ops too
        monkeypatch.setattr(
            kernels, "triton_kernels", lambda x: triton_kernels.OPS if torch.compiler.is_compiling() else triton_kernels
        )
    torch.manual_seed(0)
    # bf16: the grouped GEMM's meta function (what compile traces with) only takes bf16
    layer = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=8, backend="grouped")).to(device, torch.bfloat16)
    x = torch.randn(2, 5, 16, device=device, dtype=torch.bfloat16)
    results = []
    for module in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        out, stats = module(x)
        layer.zero_grad(set_to_none=True)
        (out.float().square().sum() + stats.aux_loss).backward()
        results.append((out, [p.grad.clone() for p in layer.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-2, rtol=1e-2)
    for g, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, ref, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,d,e", [(1, 16, 4), (1000, 512, 8), (4097, 2048, 64), (8193, 1024, 16)])
def test_half_router_logits_match_the_fp32_reference(n, d, e):
    from moeformer.layers.moe.router import router_logits

    torch.manual_seed(n + e)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(e, d, device="cuda") / d**0.5).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn(n, e, device="cuda")
    logits = router_logits(x, w)
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)  # exact products, fp32 sums
    got, want = torch.autograd.grad(logits, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r.float()).abs().max() <= 0.02 * r.float().abs().max()
