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
    combine_backward_reference,
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
    src, weight = torch.randn(n * k, d, dtype=torch.float64), torch.rand(n * k, dtype=torch.float64)
    order, inverse = routing(n, k)
    expected = torch.stack([sum(weight[t * k + j] * src[inverse[t * k + j]] for j in range(k)) for t in range(n)])
    torch.testing.assert_close(gather_sum_reference(src, inverse, weight, k), expected)
    unweighted = torch.stack([sum(src[inverse[t * k + j]] for j in range(k)) for t in range(n)])
    torch.testing.assert_close(gather_sum_reference(src, inverse, None, k), unweighted)


@pytest.mark.parametrize("n,k,d", SHAPES[:3] + [(4, 3, 5)])
def test_combine_backward_reference_is_the_gradient(n, k, d):
    y = torch.randn(n * k, d, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(n * k, dtype=torch.float64, requires_grad=True)
    order, inverse = routing(n, k)
    grad = torch.randn(n, d, dtype=torch.float64)
    expected = torch.autograd.grad(gather_sum_reference(y, inverse, weight, k), (y, weight), grad)
    for ours, ref in zip(combine_backward_reference(grad, y.detach(), order, weight.detach(), k), expected):
        torch.testing.assert_close(ours, ref)
    if y.numel() <= 64:  # gradcheck builds the full Jacobian
        assert torch.autograd.gradcheck(lambda a, b: Combine.apply(a, order, inverse, b, k), (y, weight))


def test_permute_rows_dispatch_and_combine_round_trip():
    """Dispatch k copies of each token into expert order, then combine with weights summing to one: identity."""
    n, k = 6, 3
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    order, inverse = routing(n, k)
    y = PermuteRows.apply(x, order // k, inverse, k)
    weight = torch.full((n * k,), 1 / k, dtype=torch.float64)
    out = Combine.apply(y, order, inverse, weight, k)
    torch.testing.assert_close(out, x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, torch.ones_like(x))


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
def test_triton_gather_sum_and_combine_backward_match_references(n, k, d, dtype):
    from moeformer.layers.moe import triton_kernels

    device = triton_device()
    torch.manual_seed(n + k + d)
    y = torch.randn(n * k, d, device=device, dtype=dtype)
    weight = torch.rand(n * k, device=device)
    grad = torch.randn(n, d, device=device, dtype=dtype)
    order, inverse = routing(n, k, device)
    for w in (weight, None):
        close(triton_kernels.gather_sum(y, inverse, w, k), gather_sum_reference(y, inverse, w, k), dtype)
    grad_y, grad_w = triton_kernels.combine_backward(grad, y, order, weight, k)
    ref_y, ref_w = combine_backward_reference(grad, y, order, weight, k)
    close(grad_y, ref_y, dtype)
    close(grad_w, ref_w, dtype)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("s,f", [(1, 1), (7, 5), (130, 1000), (3, 1400)])
def test_triton_swiglu_matches_reference(s, f, dtype):
    from moeformer.layers.moe import triton_kernels

    device = triton_device()
    h = torch.randn(s, 2 * f, device=device, dtype=torch.float32)
    grad = torch.randn(s, f, device=device, dtype=torch.float32)
    ref_h = h.clone().requires_grad_()
    ref_out = swiglu_reference(ref_h)
    (ref_grad,) = torch.autograd.grad(ref_out, ref_h, grad)  # fp32 reference for both dtypes
    h, grad = h.to(dtype), grad.to(dtype)
    close(triton_kernels.swiglu_forward(h), ref_out, dtype)
    close(triton_kernels.swiglu_backward(h, grad), ref_grad, dtype)


@pytest.mark.gpu
@needs_triton
def test_layer_with_triton_ops_compiles_in_one_graph_and_matches_eager(monkeypatch):
    from moeformer.layers.moe import MoE, MoEConfig, kernels, triton_kernels

    device = triton_device()
    if device == "cpu":  # the interpreter: route CPU tensors to the Triton ops too
        monkeypatch.setattr(kernels, "triton_kernels", lambda x: triton_kernels)
    torch.manual_seed(0)
    # bf16: the grouped GEMM's meta function (what compile traces with) only takes bf16
    layer = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=8, expert_impl="grouped")).to(device, torch.bfloat16)
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
@pytest.mark.parametrize("n,d,e", [(1, 16, 4), (1000, 512, 8), (4097, 2048, 64)])
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
