"""The fused expert path (decoding, and every quantized forward): the Triton kernels against an fp64 slot-by-slot
loop with the error bound of their arithmetic (CPU through the Triton interpreter, and CUDA); the MoE layer's fused
path against the generic path and moe_reference; the rule choosing it; stats=False; torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeformer.layers import triton_dispatch
from moeformer.layers.moe import MoE, MoEConfig, moe_reference
from moeformer.layers.moe.experts import FUSED_MAX_TOKENS
from moeformer.layers.moe.fused_experts import fused_experts_reference
from moeformer.layers.quant import QuantizedWeight
from tests.test_quant import (
    ACCUMULATION_UNIT,
    KERNEL_DEVICES,
    OUTPUT_ULP,
    assert_within,
    gpu,
    magnitude,
    weight_unit,
)

SILU_SLOPE, GELU_SLOPE = 1.1, 1.13  # bounds of |silu'| and |gelu'|


def expert_weights(e: int, dim: int, f: int, activation: str, mode: str, group: int, dtype: torch.dtype, device: str):
    """(w_in, w_out) as the kernels take them (tensors, or QuantizedWeights), their fp64 values and |terms|."""
    width = 2 * f if activation == "swiglu" else f
    full = [torch.randn(e, dim, width, device=device) / dim**0.5, torch.randn(e, f, dim, device=device) / f**0.5]
    if mode == "none":
        weights = [w.to(dtype) for w in full]
        return weights, [w.double() for w in weights], [w.double().abs() for w in weights]
    quantized = [QuantizedWeight.from_tensor(w, mode, group, transposed=True, dtype=dtype) for w in full]
    values = [q.dequantize(torch.float64) for q in quantized]
    mags = [magnitude(q.codes, q.scale, q.offset, mode, group).transpose(-1, -2).double() for q in quantized]
    return quantized, values, mags


def slot_loop(
    x, token_idx, expert_idx, weights, w_in, w_out, mag_in, mag_out, activation: str, h_unit: float, w_unit: float = 0.0
):
    """fp64 per-slot outputs weight * expert(x[token]) and, to first order, the error bound of a kernel that sums in
    fp32 (ACCUMULATION_UNIT per term), multiplies weights with relative error w_unit, evaluates the activation in
    fp32 and rounds h with relative error h_unit."""
    s, dim = expert_idx.numel(), x.shape[1]
    f = w_out.shape[1]
    out = torch.zeros(s, dim, dtype=torch.float64, device=x.device)
    bound = torch.zeros_like(out)
    for i in range(s):
        e, xs, w = expert_idx[i], x[token_idx[i]].double(), weights[i].double()
        pre, d_pre = xs @ w_in[e], (dim * ACCUMULATION_UNIT + w_unit) * (xs.abs() @ mag_in[e])
        if activation == "swiglu":
            (gate, up), (d_gate, d_up) = pre.chunk(2), d_pre.chunk(2)
            h, d_h = F.silu(gate) * up, SILU_SLOPE * up.abs() * d_gate + F.silu(gate).abs() * d_up
        else:
            h, d_h = F.gelu(pre), GELU_SLOPE * d_pre
        h, d_h = w * h, w.abs() * d_h
        out[i] = h @ w_out[e]
        d_h = d_h + (h_unit + 2.0**-21) * h.abs()  # rounding of h, and a few fp32 ulps for the activation
        bound[i] = d_h @ mag_out[e] + (f * ACCUMULATION_UNIT + w_unit) * (h.abs() @ mag_out[e])
    return out, bound


KERNEL_CASES = [  # (tokens, k, experts, dim, ffn, activation, rows): by_slot below E slots, by_expert, sorted;
    # GEMV row tiles up to GEMV_ROWS tokens, tensor-core tiles beyond
    (1, 2, 4, 64, 32, "swiglu", "scan"),
    (1, 8, 16, 96, 64, "swiglu", "scan"),
    (3, 3, 8, 64, 64, "swiglu", "scan"),
    (5, 3, 8, 64, 96, "gelu", "scan"),
    (16, 2, 4, 96, 32, "swiglu", "scan"),
    (64, 4, 8, 64, 64, "swiglu", "scan"),
    (40, 2, 4, 96, 64, "gelu", "sorted"),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode,group", [("none", 0), ("int8", 128), ("int4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,e,dim,f,activation,rows", KERNEL_CASES)
def test_fused_kernels_match_the_slot_loop(device, mode, group, dtype, n, k, e, dim, f, activation, rows):
    from moeformer.layers.moe import fused_experts_triton

    torch.manual_seed(n * k + e + dim)
    (w_in, w_out), (v_in, v_out), (m_in, m_out) = expert_weights(e, dim, f, activation, mode, group, dtype, device)
    x = torch.randn(n, dim, device=device).to(dtype)
    expert_idx = torch.rand(n, e, device=device).argsort(-1)[:, :k].flatten()  # k distinct experts per token
    token_idx = torch.arange(n, device=device).repeat_interleave(k)
    weights = torch.rand(n * k, device=device) * (torch.rand(n * k, device=device) > 0.2)  # some padding slots
    order = counts = None
    if rows == "sorted":
        order, counts = torch.argsort(expert_idx, stable=True), torch.bincount(expert_idx, minlength=e)
    parts = [(w, None, None) if mode == "none" else (w.codes, w.scale, w.offset) for w in (w_in, w_out)]
    y = fused_experts_triton.fused_experts(
        x,
        None if n % 2 else token_idx,
        expert_idx,
        weights,
        *parts[0],
        *parts[1],
        {"none": 0, "int8": 8, "int4": 4}[mode],
        group,
        f,
        activation == "swiglu",
        order,
        counts,
    )
    h_unit = 0.0 if dtype == torch.float32 else OUTPUT_ULP[dtype]
    ref, bound = slot_loop(
        x, token_idx, expert_idx, weights, v_in, v_out, m_in, m_out, activation, h_unit, weight_unit(mode, dtype)
    )
    assert y.dtype == torch.float32 and y.shape[1:] == (n * k, dim)
    assert_within(y.sum(0), ref, bound)


@pytest.mark.parametrize("mode,group", [("none", 0), ("int8", 128), ("int4", 64)])
def test_reference_matches_the_slot_loop(mode, group):
    torch.manual_seed(1)
    n, k, e, dim, f = 7, 3, 5, 64, 128
    (w_in, w_out), (v_in, v_out), (m_in, m_out) = expert_weights(e, dim, f, "swiglu", mode, group, torch.float32, "cpu")
    x, weights = torch.randn(n, dim), torch.rand(n * k)
    expert_idx, token_idx = torch.randint(0, e, (n * k,)), torch.arange(n).repeat_interleave(k)
    parts = [(w, None, None) if mode == "none" else (w.codes, w.scale, w.offset) for w in (w_in, w_out)]
    y = fused_experts_reference(x, token_idx, expert_idx, weights, *parts[0], *parts[1], mode, group, "swiglu")
    ref, bound = slot_loop(x, token_idx, expert_idx, weights, v_in, v_out, m_in, m_out, "swiglu", 0.0)
    assert_within(y[0], ref, bound)


# ---- the MoE layer ---------------------------------------------------------------------------------------------
LAYERS = {
    "softmax": dict(num_experts=4, top_k=2),
    "sigmoid_groups_shared_gate": dict(
        num_experts=8,
        top_k=3,
        router="sigmoid",
        num_groups=4,
        topk_groups=2,
        num_shared_experts=1,
        shared_expert_gate=True,
    ),
    "gelu_top1": dict(num_experts=3, top_k=1, activation="gelu", norm_topk_prob=False),
    "expert_choice": dict(num_experts=4, top_k=2, router="expert_choice", dispatcher="capacity", capacity_factor=1.0),
}
SHAPES = [(1, 1), (3, 1), (2, 7), (4, 16)]  # decode batches up to FUSED_MAX_TOKENS tokens, and a short prefill


def make_layer(name: str, dim: int = 32, ffn_dim: int = 48, capacity_factor: float | None = None) -> MoE:
    torch.manual_seed(len(name))
    cfg = LAYERS[name] | (
        {} if capacity_factor is None else dict(dispatcher="capacity", capacity_factor=capacity_factor)
    )
    return MoE(dim, MoEConfig(ffn_dim=ffn_dim, **cfg)).eval()


def padding(b: int, t: int, device: str = "cpu") -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[-1, : t // 2] = False  # left padding in the last row
    return mask


def scaled_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Route CPU tensors to the Triton kernels (the interpreter)."""
    if not triton_dispatch.INTERPRETER:
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b,t", SHAPES)
@pytest.mark.parametrize("name", LAYERS)
def test_fused_path_equals_generic_path_and_reference(name, b, t, dtype, tol, device, monkeypatch):
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", True)
    layer = make_layer(name).to(device, dtype)
    x = torch.randn(b, t, 32, device=device, dtype=dtype)
    mask = padding(b, t, device)
    with torch.no_grad():
        assert layer.experts.use_fused(x.view(-1, 32))
        fused, stats = layer(x, mask)
        reference = moe_reference(x, layer, mask)
    generic, generic_stats = layer(x, mask)  # parameters need gradients: the generic path
    assert fused.dtype == dtype and not fused.requires_grad and generic.requires_grad
    assert scaled_error(fused, generic) <= tol and scaled_error(fused, reference) <= tol
    assert torch.equal(stats.tokens_per_expert, generic_stats.tokens_per_expert)
    torch.testing.assert_close(stats.aux_loss, generic_stats.aux_loss)


PATHS = [  # the reference implementation on CPU, the kernels on CPU (interpreter) and on CUDA
    pytest.param("cpu", False, id="cpu-reference"),
    pytest.param("cpu", True, id="cpu-kernels", marks=KERNEL_DEVICES[0].marks),
    pytest.param("cuda", True, id="cuda", marks=gpu),
]


@pytest.mark.parametrize("device,kernels", PATHS)
@pytest.mark.parametrize("mode,group", [("int8", 128), ("int4", 32)])
@pytest.mark.parametrize(
    "name,capacity_factor",
    [
        ("softmax", None),
        ("softmax", 0.5),
        ("gelu_top1", None),
        ("sigmoid_groups_shared_gate", None),
        ("expert_choice", None),
    ],
)
def test_quantized_experts_equal_the_reference_on_their_dequantised_weights(
    name, capacity_factor, mode, group, device, kernels, monkeypatch
):
    """Every forward of quantized experts is fused, any batch and layout: padding, capacity drops, expert choice;
    with or without gradients (the reference path then)."""
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", kernels)
    layer = make_layer(name, dim=64, ffn_dim=64, capacity_factor=capacity_factor).to(device)
    layer.experts.quantize_(mode, group)
    x = torch.randn(3, 5, 64, device=device)
    mask = padding(3, 5, device)
    with torch.no_grad():
        out, stats = layer(x, mask)
        reference = moe_reference(x, layer, mask)
    assert scaled_error(out, reference) <= 1e-5
    if capacity_factor is not None:
        assert stats.dropped_tokens.item() > 0
    x_grad = x.clone().requires_grad_()
    out_grad, _ = layer(x_grad, mask)
    assert scaled_error(out_grad.detach(), reference) <= 1e-5
    assert torch.autograd.grad(out_grad.sum(), x_grad)[0].abs().sum() > 0  # gradients reach the input


def test_fused_path_rule(monkeypatch):
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", True)
    layer = make_layer("softmax")
    experts = layer.experts
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert experts.use_fused(x)  # eval, no gradient, kernels for CPU tensors (the interpreter)
        assert not experts.use_fused(torch.randn(FUSED_MAX_TOKENS + 1, 32))
        assert not experts.use_fused(x.bfloat16())  # weights not in the compute dtype
        layer.train()
        assert not experts.use_fused(x)
        layer.eval()
    assert not experts.use_fused(x)  # gradients wanted (the parameters require them)
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", False)
    with torch.no_grad():
        assert not experts.use_fused(x)  # no kernels for CPU tensors: the generic path is faster there
    experts.quantize_("int8")
    layer.train()
    assert experts.use_fused(x)  # quantized experts have only the fused path


@pytest.mark.parametrize("name", ["softmax", "sigmoid_groups_shared_gate", "expert_choice"])
def test_stats_false_skips_the_statistics_not_the_output(name):
    layer = make_layer(name)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        out, stats = layer(x, padding(2, 3))
        bare, none = layer(x, padding(2, 3), stats=False)
        routing = layer.router(x.view(-1, 32), stats=False)
    assert none is None and stats is not None and torch.equal(bare, out)
    assert routing.assigned is None and routing.logits.shape == (6, layer.config.num_experts)


@pytest.mark.parametrize("quantize_mode", [None, "int4"])
def test_compiled_decode_layer_matches_eager(quantize_mode, kernels_on_cpu):
    """The fused path inside torch.compile(fullgraph=True): one custom op, no graph break (kernels interpreted)."""
    torch._dynamo.reset()
    layer = make_layer("sigmoid_groups_shared_gate", dim=64, ffn_dim=64)
    if quantize_mode:
        layer.experts.quantize_(quantize_mode, 32)
    x = torch.randn(2, 1, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, _ = layer(x, stats=False)
        out, stats = compiled(x, stats=False)
    assert stats is None
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_gpu_olmoe_decode_layer_in_a_cuda_graph(mode, batch, device):
    """An OLMoE-sized layer (dim 2048, 64 experts top-8, F 1024) in bf16, compiled with CUDA graphs at decode batch
    sizes: equals the eager generic path (bf16) within bf16 rounding of its intermediates."""
    torch._dynamo.reset()
    torch.manual_seed(batch)
    config = MoEConfig(num_experts=64, top_k=8, ffn_dim=1024, norm_topk_prob=False)
    layer = MoE(2048, config).to(device, torch.bfloat16).eval()
    x = torch.randn(batch, 1, 2048, device=device, dtype=torch.bfloat16)
    if mode == "none":
        generic, _ = layer(x)  # gradients wanted: the sorted grouped path
    else:
        layer.experts.quantize_(mode, 128)
    with torch.no_grad():
        reference = moe_reference(x, layer)
        compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, capture, replay
            out, _ = compiled(x, stats=False)
    assert scaled_error(out, reference) <= 2e-2
    if mode == "none":
        assert scaled_error(out, generic.detach()) <= 2e-2
