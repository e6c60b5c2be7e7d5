"""Weight-only int8/int4 quantization: the formats' error bounds, the Triton matmul against the dequantise-then-matmul
reference (CPU through the Triton interpreter, and CUDA), QuantLinear, and whole quantized models (logit error,
state-dict round trip, the empty structure a loader fills, weight memory, errors, torch.compile)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from safetensors.torch import load, save

from moeformer import CausalLM, ModelConfig, build_model, build_quantized, quantize, quantized_weights
from moeformer.layers import triton_dispatch
from moeformer.layers.quant import (
    QuantizedWeight,
    QuantLinear,
    dequantize,
    quant_matmul_reference,
    quantize_int4,
    quantize_int8,
)
from moeformer.layers.quant.formats import GROUP_SIZES, pack_int4, unpack_int4

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton kernels run on CUDA, or on CPU through the interpreter (tests/conftest.py turns it on without CUDA)
KERNEL_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and triton_dispatch.INTERPRETER), reason="needs triton's interpreter (TRITON_INTERPRET=1)"
        ),
    ),
    pytest.param("cuda", marks=gpu),
]
# One unit in the last place of the output: bf16 rounds to nearest on GPUs, the interpreter truncates (< 1 ulp).
OUTPUT_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
# fp32 accumulation over K terms errs by at most K * 2^-24 of the sum of |terms|; 4x that allows the GPU's
# tensor-core accumulation, which aligns addends with fewer guard bits.
ACCUMULATION_UNIT = 2.0**-22


def weight_unit(mode: str, dtype: torch.dtype) -> float:
    """Relative error of each weight as the kernels multiply it: int4 tensor-core tiles round the dequantised weight
    once to the activations' dtype (one ulp at most); int8 codes are exact."""
    return OUTPUT_ULP[dtype] if mode == "int4" else 0.0


def quantized(w: torch.Tensor, mode: str, group: int, dtype: torch.dtype):
    """(codes, scale, offset) of w (N, K) with scales in `dtype`."""
    if mode == "int8":
        return (*quantize_int8(w, dtype), None)
    return quantize_int4(w, group, dtype)


def magnitude(codes, scale, offset, mode: str, group: int) -> torch.Tensor:
    """|terms| the kernel sums for each weight: |q| * s (int8), q * s + |offset| (int4; q, s >= 0)."""
    if mode == "int8":
        return dequantize(codes, scale, None, mode, group).abs()
    return dequantize(codes, scale, offset.abs(), mode, group)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (out.double() - ref.double()).abs() - bound.double()
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"error {(out.double() - ref.double()).abs().flatten()[worst]:.3g} exceeds bound "
        f"{bound.flatten()[worst]:.3g} at {worst.item()}"
    )


# ---- formats ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 64)])
def test_int8_round_trip_is_within_half_a_step(dtype, shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3).to(dtype)
    w[..., 0, :] = 0  # an all-zero row: its scale must stay positive, its codes zero
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == shape[:-1]
    assert codes.abs().max() <= 127 and (scale > 0).all() and (codes[..., 0, :] == 0).all()
    error = (dequantize(codes, scale, None, "int8", 0) - w.float()).abs()
    # |w - q s| <= s / 2 for the stored scale; the fp32 division adds at most one rounding of w / s
    assert (error <= scale.float().unsqueeze(-1) / 2 * (1 + 2**-20)).all()
    assert codes.abs().amax(-1)[..., 1:].min() >= 126  # each row's largest weight uses (nearly) the full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_group_step(dtype, group):
    torch.manual_seed(group)
    w = (torch.randn(2, 6, 256) + torch.randn(2, 6, 1)).to(dtype)  # per-row offsets: the asymmetric range matters
    w[0, 0, :group] = 0.75  # a constant group
    packed, scale, offset = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 6, 128)
    assert scale.shape == offset.shape == (2, 6, 256 // group) and scale.dtype == dtype
    step = scale.float().repeat_interleave(group, dim=-1)
    error = (dequantize(packed, scale, offset, "int4", group) - w.float()).abs()
    assert (error <= step / 2 * (1 + 2**-20)).all()
    codes = unpack_int4(packed, group)
    assert torch.equal(pack_int4(codes, group), packed) and codes.max() <= 15
    assert (codes.view(2, 6, -1, group).amax(-1)[:, 1:] == 15).all()  # the group's maximum is code 15


def test_fp32_weights_into_bf16_scales_keep_the_bound():
    """Scales rounded up and offsets down when stored in a narrower dtype (a loader quantizing an fp32 checkpoint
    into a bf16 model): every code stays in range."""
    torch.manual_seed(1)
    w = torch.randn(16, 128) * 0.37 + 0.011
    codes, scale = quantize_int8(w, torch.bfloat16)
    assert (w.abs().amax(-1) <= 127 * scale.float()).all()
    assert ((dequantize(codes, scale, None, "int8", 0) - w).abs() <= scale.float().unsqueeze(-1) / 2 + 1e-6).all()
    packed, scale, offset = quantize_int4(w, 32, torch.bfloat16)
    step = scale.float().repeat_interleave(32, dim=-1)
    assert ((dequantize(packed, scale, offset, "int4", 32) - w).abs() <= step / 2 + 1e-6).all()


def test_quantized_weight_transposed_and_chunked_equals_the_formats():
    torch.manual_seed(2)
    w = torch.randn(3, 64, 40)  # experts (E, in, out)
    q = QuantizedWeight.from_tensor(w, "int4", 32, transposed=True)
    packed, scale, offset = quantize_int4(w.transpose(1, 2), 32)
    assert torch.equal(q.codes, packed) and torch.equal(q.scale, scale) and torch.equal(q.offset, offset)
    assert q.dequantize().shape == w.shape and q.in_features == 64 and q.out_features == 40
    with pytest.raises(ValueError, match="shape"):
        q.quantize_(w[:2])
    one_by_one = QuantizedWeight(tuple(w.shape), "int4", 32, device="meta", transposed=True)
    for e in (2, 0, 1):  # a loader filling one expert at a time
        one_by_one.quantize_(w[e], index=e)
    assert torch.equal(one_by_one.codes, q.codes) and torch.equal(one_by_one.offset, q.offset)
    with pytest.raises(ValueError, match="index 3"):
        q.quantize_(w[0], index=3)


def test_int4_packing_is_split_halves_per_group():
    """The layout the kernels read: byte j of group g holds input g * G + j in its low nibble and g * G + G / 2 + j
    in its high nibble; pack and unpack are inverse bijections of codes and bytes."""
    torch.manual_seed(11)
    for group in GROUP_SIZES:
        q = torch.randint(0, 16, (3, 4 * group), dtype=torch.uint8)
        packed = pack_int4(q, group)
        byte = torch.arange(2 * group)
        first = byte // (group // 2) * group + byte % (group // 2)
        assert torch.equal(packed, q[:, first] | (q[:, first + group // 2] << 4))
        assert torch.equal(unpack_int4(packed, group), q)
        every_byte = torch.randint(0, 256, (2, 5, group), dtype=torch.uint8)
        assert torch.equal(pack_int4(unpack_int4(every_byte, group), group), every_byte)


# ---- the Triton matmul -----------------------------------------------------------------------------------------
MATMUL_CASES = [  # (M, N, K, mode, group): M spans the GEMV, decode and prefill tiles, N and K off the block sizes
    (1, 40, 96, "int8", 0),
    (3, 70, 200, "int8", 0),
    (16, 33, 256, "int8", 0),
    (64, 20, 130, "int8", 0),
    (200, 65, 72, "int8", 0),
] + [  # int4: every group size at each tile kind; 8 groups at M = 1 split K
    (m, 17 + 8 * i, (8 if m == 1 else 3) * group, "int4", group)
    for i, (m, group) in enumerate((m, g) for m in (1, 3, 16, 64, 200) for g in GROUP_SIZES)
]


def check_matmul(device: str, dtype: torch.dtype, m: int, n: int, k: int, mode: str, group: int) -> None:
    """The Triton matmul (with the bias where M is odd) against the fp32 reference, within rounding bounds."""
    from moeformer.layers.quant import triton_kernels

    torch.manual_seed(m * n + k)
    x = torch.randn(m, k, device=device).to(dtype)
    codes, scale, offset = quantized(torch.randn(n, k, device=device), mode, group, dtype)
    bias = torch.randn(n, device=device).to(dtype) if m % 2 else None
    bits = 8 if mode == "int8" else 4
    out = triton_kernels.quant_matmul(x, codes, scale, offset, bias, bits, group)
    if out.dim() == 3:  # a split K: fp32 partial products
        assert triton_kernels.matmul_config(m, n, k, bits, group).split == out.shape[0] > 1
        out = out.sum(0) + (0 if bias is None else bias.float())
    ref = quant_matmul_reference(x.float(), codes, scale, offset, None if bias is None else bias.float(), mode, group)
    mag = x.float().abs() @ magnitude(codes, scale, offset, mode, group).t()
    bound = OUTPUT_ULP[dtype] * ref.abs() + (k * ACCUMULATION_UNIT + weight_unit(mode, dtype)) * mag
    assert_within(out.float(), ref, bound)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,mode,group", MATMUL_CASES)
def test_quant_matmul_kernel_matches_reference(device, dtype, m, n, k, mode, group):
    check_matmul(device, dtype, m, n, k, mode, group)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("m,tiles", [(2, (2, 16, 32, 2)), (16, (16, 32, 64, 2)), (16, (16, 16, 32, 1))])
def test_int4_steps_within_a_group_match_reference(device, m, tiles, monkeypatch):
    """Tile configurations the sweep may pick: K-steps of half or a quarter of a group of 128 (the GEMV and the
    tensor-core path), with and without a K split."""
    from moeformer.layers.quant import triton_kernels

    cfg = triton_kernels.MatmulConfig(*tiles, num_warps=4, num_stages=2)
    monkeypatch.setattr(triton_kernels, "matmul_config", lambda *args: cfg)
    check_matmul(device, torch.bfloat16, m, 24, 512, "int4", 128)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode,group", [("int8", 128), ("int4", 32)])
def test_quant_linear_kernel_path_equals_reference_path(device, mode, group, monkeypatch):
    """QuantLinear on a 3-D input: the kernel path (no gradient) and the reference path (gradient to x) agree, and
    the reference's gradient is the one through the dequantised weight."""
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", True)
    torch.manual_seed(3)
    linear = torch.nn.Linear(128, 48, bias=True, device=device)
    layer = QuantLinear.from_linear(linear, mode, group)
    assert not layer.bias.requires_grad and layer.weight.codes.device.type == device
    x = torch.randn(2, 5, 128, device=device, requires_grad=True)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x)
    assert fast.shape == slow.shape == (2, 5, 48)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(slow.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, layer.weight.dequantize(), layer.bias)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.square().sum(), x_ref)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,group", [("int8", 128), ("int4", 32), ("int4", 128)])
def test_quant_linear_error_within_the_half_step_bound(mode, group):
    """|x @ (W_q - W)^T| <= sum_k |x_k| * step_k / 2: the per-element bound carried through one layer."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(256, 64, bias=False)
    layer = QuantLinear.from_linear(linear, mode, group)
    x = torch.randn(7, 256)
    w = layer.weight
    step = w.scale.unsqueeze(-1).expand(64, 256) if mode == "int8" else w.scale.repeat_interleave(group, -1)
    bound = x.abs() @ (step / 2).t() + 256 * ACCUMULATION_UNIT * (x.abs() @ linear.weight.abs().t())
    with torch.no_grad():
        assert_within(layer(x), linear(x), bound)


# ---- whole models ----------------------------------------------------------------------------------------------
def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_name("tiny-moe", n_layers=2, **overrides)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("mode,group,rho_bound", [("int8", 128, 0.012), ("int4", 32, 0.10), ("int4", 128, 0.12)])
def test_quantized_logits_close_to_full_precision(mode, group, rho_bound):
    """rho = ||W_q - W|| / ||W|| over the quantized weights follows from the step sizes: uniform rounding errors
    of s / 2 have rms s / sqrt(12), with s = absmax / 127 (int8: ~4 sigma / 127) or the group's range / 15 (int4: ~4
    to 5 sigma / 15), so rho ~ 1% (int8) and 8-10% (int4) for Gaussian weights. Each of the 13 quantized matmuls
    on a token's path perturbs the residual stream by ~rho independently; summed in quadrature, damped by the
    unquantized embeddings and residuals, the logits move by <= 3 rho (measured ~1.6 rho)."""
    torch.manual_seed(5)
    model = build_model(tiny()).eval()
    full = model.state_dict()
    q = quantize(copy.deepcopy(model), mode, group)
    errors = [(w.dequantize() - full[name].float()).square().sum() for name, w in quantized_weights(q).items()]
    rho = (sum(errors) / sum(full[name].float().square().sum() for name in quantized_weights(q))).sqrt().item()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        err = relative_error(q(ids).logits, model(ids).logits)
    assert 0 < rho <= rho_bound
    assert err <= 3 * rho, f"logits relative error {err:.4f} > 3 * rho = {3 * rho:.4f}"


def test_quantize_covers_the_right_layers():
    config = tiny(moe={"num_shared_experts": 1, "shared_expert_gate": True})
    model = quantize(build_model(config), "int8")
    names = set(quantized_weights(model))
    assert "layers.0.attn.q_proj.weight" in names and "layers.1.mlp.experts.w_in" in names
    assert "layers.0.mlp.shared_expert.down_proj.weight" in names and "lm_head.weight" in names
    assert isinstance(model.layers[0].mlp.shared_expert_gate, torch.nn.Linear)  # tiny gates stay full precision
    assert model.layers[0].mlp.router.weight.dtype == torch.float32 and not any(
        p.requires_grad for p in model.parameters()
    )
    assert model.config.quantization == {"mode": "int8", "group_size": 128}
    tied = quantize(build_model(tiny(tie_embeddings=True)), "int4", 32)
    assert "lm_head.weight" not in quantized_weights(tied)  # tied to the embeddings: kept
    assert tied.lm_head.weight is tied.tok_embeddings.weight


def test_state_dict_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(6)
    model = quantize(build_model(tiny(), dtype=torch.bfloat16), "int4", 64).eval()
    state = model.state_dict()
    assert state["layers.0.mlp.experts.w_in.codes"].dtype == torch.uint8
    assert state["layers.0.attn.q_proj.weight.scale"].dtype == torch.bfloat16
    model.config.save(tmp_path / "config.yaml")
    blob = save({k: v.contiguous() for k, v in state.items()})  # safetensors: no pickle
    config = ModelConfig.from_yaml(tmp_path / "config.yaml")
    assert config.quantization == {"mode": "int4", "group_size": 64}
    restored = build_model(config, dtype=torch.bfloat16).eval()  # the record rebuilds the quantized structure
    restored.load_state_dict(load(blob), strict=True)
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value), key
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)


def test_loader_fills_an_empty_structure_tensor_by_tensor():
    """What from_pretrained(quantize=...) does: build on meta, quantize each full-precision tensor into its target,
    load the rest; the result equals quantize(model) exactly."""
    torch.manual_seed(7)
    model = build_model(tiny())
    expected = quantize(copy.deepcopy(model), "int4", 32).state_dict()
    with torch.device("meta"):
        empty = build_quantized(CausalLM(tiny()), "int4", 32)
    assert empty.layers[0].attn.q_proj.weight.codes.is_meta
    state = model.state_dict()
    for name, target in quantized_weights(empty).items():
        target.quantize_(state.pop(name))
    empty.load_state_dict(state, strict=False, assign=True)
    loaded = empty.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_weight_memory_of_an_olmoe_shaped_model():
    def weight_bytes(config: ModelConfig) -> int:
        model = build_model(config, device="meta", dtype=torch.bfloat16)
        unique = {id(t): t for t in model.state_dict().values()}  # a tied head counts once
        return sum(t.numel() * t.element_size() for t in unique.values())

    config = ModelConfig.from_name("olmoe-1b-7b")
    bf16 = weight_bytes(config)
    int8 = weight_bytes(config.replace(quantization={"mode": "int8"}))
    int4 = weight_bytes(config.replace(quantization={"mode": "int4", "group_size": 128}))
    assert 13.5e9 < bf16 < 14.5e9  # 6.9B parameters
    assert int8 <= 0.55 * bf16 and int4 <= 0.30 * bf16, (int8 / bf16, int4 / bf16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="int3"), "unknown quantization mode"),
        (dict(mode="int4", group_size=48), "group_size must be one of"),
    ],
)
def test_bad_quantization_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(build_model(tiny()), **kwargs)


def test_group_size_must_divide_each_layer_input_and_nothing_changes_on_error():
    model = build_model(tiny(dim=96, n_heads=3, n_kv_heads=1))
    with pytest.raises(ValueError, match=r"input width 96 of layers\.0\.attn\.q_proj\.weight"):
        quantize(model, "int4", 64)
    assert not quantized_weights(model) and model.config.quantization is None


def test_quantizing_twice_is_an_error():
    model = quantize(build_model(tiny()), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int4")


@pytest.mark.parametrize(
    "record",
    [{"mode": "int2"}, {"mode": "int4", "group_size": 100}, {"group_size": 32}, {"mode": "int8", "bits": 8}, "int8"],
)
def test_bad_quantization_record_in_config(record):
    with pytest.raises(ValueError):
        tiny(quantization=record)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_decodes_like_full_recomputation(mode):
    """Cached decoding (a few tokens per forward) and recomputing the whole sequence go through the same quantized
    layers at other sizes: greedy tokens agree."""
    torch.manual_seed(10)
    model = quantize(build_model(tiny()), mode, 32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 4))
    out = model.generate(prompt, 6, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_compiled_quantized_model_matches_eager():
    """fullgraph: the quantized matmuls and the fused experts are single custom ops (CPU: the references)."""
    torch._dynamo.reset()
    torch.manual_seed(8)
    model = quantize(build_model(tiny()), "int4", 32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_gpu_compiled_quantized_model_matches_eager(mode, device):
    """inductor + CUDA graphs (reduce-overhead), bf16: the Triton kernels under torch.compile."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    model = quantize(build_model(tiny(), device=device, dtype=torch.bfloat16), mode, 32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        eager = model(ids).logits.float()
        for _ in range(3):  # warm-up, capture, replay
            out = compiled(ids).logits.float()
    assert relative_error(out, eager) <= 1e-2
