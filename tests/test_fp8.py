"""FP8 training (moeformer.layers.fp8, moe/fp8_gemm.py) against full precision.

Bounds come from e4m3's arithmetic: 3 mantissa bits, so rounding a normal value moves it by at most u = 2^-4 of
itself (round to nearest), a subnormal one by at most half the smallest spacing, 2^-10 in scaled units (at most
2^-10 * amax / 224 unscaled: the power-of-two scale puts amax in [224, 448]). A product of two rounded operands is
then within (2u + u^2)|a||b| + the subnormal terms of the exact one (`e4m3_matmul_bound`, elementwise, whatever the
data). In bulk, the rounding errors are unbiased and about u / sqrt(3) RMS per operand (mantissas spread over a
binade), so a GEMM's relative Frobenius error is about sqrt(2/3) u ~ 0.051: asserted below u (RELATIVE_FP8_GEMM).
e5m2 (the linears' output gradients, tensorwise recipe) has u = 2^-3.

GPU tests (@pytest.mark.gpu) run the real kernels: torch._scaled_grouped_mm (compute capability 9.0/10.x) and
torchao's Float8Linear, eager and compiled, and a few training steps of a tiny MoE through scripts/train.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from moeformer import ConfigError, ModelConfig, build_model
from moeformer.layers.fp8 import FP8_LINEARS, enable_fp8, fp8_unsupported
from moeformer.layers.moe import MoE, MoEConfig
from moeformer.layers.moe.fp8_gemm import (
    ALIGN,
    E4M3,
    E4M3_MAX,
    aligned_rows,
    fp8_grouped_mm,
    fp8_grouped_mm_available,
    fp8_scale,
    quantize_rows,
    scaled_grouped_mm,
    scaled_grouped_mm_reference,
    to_e4m3,
)
from moeformer.training.config import load_config
from tests.workers import run_train, worker_env

U_E4M3 = 2.0**-4
U_E5M2 = 2.0**-3
U_BF16 = 2.0**-8
SUBNORMAL = 2.0**-10 / 224  # the largest subnormal rounding error relative to a row's or column's amax
RELATIVE_FP8_GEMM = U_E4M3  # one FP8 GEMM's relative Frobenius error (expected ~0.051, see the docstring)

pytest.importorskip("torchao", reason="FP8 training uses torchao (pip install 'moeformer[fp8]')")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_fp8_config(**overrides) -> ModelConfig:
    """A tiny MoE whose widths are multiples of 16, with a shared expert and a dense first layer."""
    moe = {"num_experts": 4, "top_k": 2, "ffn_dim": 32, "num_shared_experts": 1, "backend": "grouped"}
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96, "vocab_size": 96}
    return ModelConfig.from_name("tiny-moe", **{**base, "first_k_dense": 1, "moe": moe, **overrides})


# ---- the quantizer -----------------------------------------------------------------------------------------------
def test_scales_are_powers_of_two_that_put_amax_in_the_top_binade():
    # amax whose quotient 448 / amax lies just below a power of two (where a rounded log2 would round it up)
    edge = E4M3_MAX / (2.0 ** torch.arange(-20.0, 40.0) * (1 - 2.0**-24))
    amax = torch.cat([torch.logspace(-8, 8, 97), torch.tensor([1.0, 448.0, 224.0, 3e-3]), edge])
    scale = fp8_scale(amax)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # exact: scaling adds no rounding
    scaled = amax * scale
    assert (scaled <= E4M3_MAX).all() and (scaled > E4M3_MAX / 2).all()
    assert torch.isfinite(fp8_scale(torch.zeros(3))).all()  # an all-zero row: finite scale, zero codes
    assert fp8_scale(torch.tensor([float("inf")])).item() == 0.0  # inf reaches the output as NaN (not hidden)


def test_e4m3_rounding_is_within_half_an_ulp_and_saturates():
    torch.manual_seed(0)
    t = torch.randn(4096) * torch.logspace(-4, 2.5, 4096)
    q = to_e4m3(t, torch.tensor(1.0)).float()
    normal = (t.abs() >= 2.0**-6) & (t.abs() <= E4M3_MAX)
    assert ((q - t).abs()[normal] <= U_E4M3 * t.abs()[normal]).all()
    assert ((q - t).abs()[t.abs() < 2.0**-6] <= 2.0**-10).all()
    assert (q[t.abs() > E4M3_MAX].abs() == E4M3_MAX).all()
    big = torch.tensor([500.0, -1e6, 449.0])
    assert torch.equal(to_e4m3(big, torch.tensor(1.0)).float(), torch.tensor([448.0, -448.0, 448.0]))
    assert torch.isnan(to_e4m3(torch.tensor([float("nan")]), torch.tensor(1.0)).float()).all()


def test_rowwise_quantization_dequantises_within_e4m3_rounding():
    torch.manual_seed(1)
    t = torch.randn(64, 48, dtype=torch.bfloat16) * torch.logspace(-3, 3, 64, dtype=torch.bfloat16)[:, None]
    t[5] = 0
    codes, factor = quantize_rows(t)
    assert codes.dtype == E4M3 and codes.is_contiguous() and factor.shape == (64,) and factor.dtype == torch.float32
    back = codes.float() * factor[:, None]
    amax = t.float().abs().amax(1, keepdim=True)
    assert ((back - t.float()).abs() <= U_E4M3 * t.float().abs() + SUBNORMAL * amax).all()
    assert torch.equal(back[5], torch.zeros(48))
    assert (codes.float().abs().amax(1)[amax[:, 0] > 0] > E4M3_MAX / 2 - 16).all()  # the range is used


# ---- the grouped GEMM ----------------------------------------------------------------------------------------------
def e4m3_matmul_bound(a: torch.Tensor, b: torch.Tensor, a_amax: torch.Tensor, b_amax: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fp8(a) @ fp8(b) - a @ b| (fp32, bf16 output): a (M, K) quantized with amax a_amax (M,)
    per row, b (K, N) with b_amax (N,) per column (see the module docstring), plus the bf16 rounding of the output."""
    k = a.shape[1]
    a, b = a.abs().double(), b.abs().double()
    alpha, beta = SUBNORMAL * a_amax.double(), SUBNORMAL * b_amax.double()
    err = (
        (2 * U_E4M3 + U_E4M3**2) * (a @ b)
        + (1 + U_E4M3) * (alpha[:, None] * b.sum(0)[None] + beta[None] * a.sum(1)[:, None])
        + k * alpha[:, None] * beta[None]
        + k * 2.0**-24 * (1 + U_E4M3) ** 2 * (a @ b)  # fp32 accumulation
    )
    return err + U_BF16 * ((a @ b) + err)  # |exact| <= |a| @ |b|


def grouped_case(sizes: list[int], k: int, n: int, device="cpu", seed: int = 0):
    """Random bf16 x (sum(sizes) rows, some scaled up), w (E, k, n), int32 end offsets and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))  # rows of varied magnitude
    w = torch.randn(len(sizes), k, n, generator=g) / k**0.5
    grad = torch.randn(m, n, generator=g)
    offs = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)
    return [t.to(device, torch.bfloat16) for t in (x, w, grad)] + [offs.to(device)]


def check_grouped_mm_against_exact(sizes, k, n, device="cpu", accumulation: float = 0.0):
    """fp8_grouped_mm's output, input and weight gradients against fp32 per-group matmuls on the same bf16 values:
    each group within `e4m3_matmul_bound` (plus `accumulation` of |a| @ |b|: a reduced-precision accumulator) and
    the whole within RELATIVE_FP8_GEMM."""
    x, w, grad, offs = grouped_case(sizes, k, n, device)
    xq, wq = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fp8_grouped_mm(xq, wq, offs)
    out.backward(grad)
    assert out.dtype == xq.grad.dtype == wq.grad.dtype == torch.bfloat16
    x, w, grad = x.double(), w.double(), grad.double()
    starts = [0, *offs.tolist()[:-1]]
    for e, (start, size) in enumerate(zip(starts, sizes)):
        rows = slice(start, start + size)
        xe, ge = x[rows], grad[rows]
        checks = {  # name: (got, a, b, amax of a's rows, amax of b's columns)
            "out": (out[rows], xe, w[e], xe.abs().amax(1), w[e].abs().amax(0)),
            "grad_x": (xq.grad[rows], ge, w[e].t(), ge.abs().amax(1), w[e].abs().amax(1)),
            # grad_w: x and grad scaled per column over all rows
            "grad_w": (wq.grad[e], xe.t(), ge, x.abs().amax(0), grad.abs().amax(0)),
        }
        for name, (got, a, b, a_amax, b_amax) in checks.items():
            if a.numel() == 0 or b.numel() == 0:
                assert (got.double() == 0).all(), (name, e)  # an empty group's weight gradient is exactly 0
                continue
            bound = e4m3_matmul_bound(a, b, a_amax, b_amax) + accumulation * (a.abs() @ b.abs())
            excess = (got.double() - a @ b).abs() - bound
            assert (excess <= 0).all(), f"{name} of group {e}: exceeds the e4m3 bound by {excess.max().item():.3g}"
    exact_out = torch.cat([x[s : s + z] @ w[e] for e, (s, z) in enumerate(zip(starts, sizes))])
    exact_grad_x = torch.cat([grad[s : s + z] @ w[e].t() for e, (s, z) in enumerate(zip(starts, sizes))])
    exact_grad_w = torch.stack([x[s : s + z].t() @ grad[s : s + z] for s, z in zip(starts, sizes)])
    for got, exact in ((out, exact_out), (xq.grad, exact_grad_x), (wq.grad, exact_grad_w)):
        assert relative(got, exact) <= RELATIVE_FP8_GEMM


@pytest.mark.parametrize(
    "sizes, k, n",
    [
        ([37, 0, 64, 5], 32, 48),  # unaligned groups and an empty one
        ([16, 16, 16], 64, 16),
        ([1, 90, 17, 33, 0, 2], 48, 80),
    ],
)
def test_fp8_grouped_mm_matches_exact_within_e4m3_bounds(sizes, k, n):
    check_grouped_mm_against_exact(sizes, k, n)


def test_weight_gradient_layout_aligns_every_group():
    sizes = torch.tensor([37, 0, 16, 1, 50])
    offs = torch.cumsum(sizes, 0).to(torch.int32)
    source, padded_ends = aligned_rows(offs, int(sizes.sum()) + 3)  # 3 rows past the groups
    assert source.shape[0] % ALIGN == 0 and source.shape[0] >= int(sizes.sum()) + ALIGN * len(sizes)
    starts = [0, *padded_ends.tolist()[:-1]]
    assert all(s % ALIGN == 0 for s in padded_ends.tolist())
    first = 0
    for start, end, size in zip(starts, padded_ends.tolist(), sizes.tolist()):
        assert end - start >= max(size, 1)  # an empty group gets zero rows: its gradient is exactly 0
        assert source[start : start + size].tolist() == list(range(first, first + size))
        assert (source[start + size : end] == -1).all()
        first += size
    assert (source[padded_ends[-1] :] == -1).all()  # rows past the groups are not gathered


def test_the_three_gemms_pass_torchs_own_checks(monkeypatch):
    """Every torch._scaled_grouped_mm call of a forward and backward, replayed on meta copies of its arguments
    (same strides): torch's meta function, which mirrors the CUDA op's checks (dtypes, row-major first and
    column-major second operand, 16-byte strides, scale shapes, offsets), accepts them and gives the shape used."""
    from moeformer.layers.moe import fp8_gemm

    calls = []

    def checked(a, b, scale_a, scale_b, offs, use_fast_accum=False):
        meta = [t.to("meta") for t in (a, b, scale_a, scale_b, offs)]
        out = torch._scaled_grouped_mm(*meta[:4], offs=meta[4], out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum)
        calls.append((b.dim(), tuple(out.shape)))
        return reference(a, b, scale_a, scale_b, offs, use_fast_accum)

    reference = fp8_gemm.scaled_grouped_mm_reference
    monkeypatch.setattr(fp8_gemm, "scaled_grouped_mm_reference", checked)
    x, w, grad, offs = grouped_case([30, 0, 50, 20], 64, 48)
    x.requires_grad_(), w.requires_grad_()
    fp8_grouped_mm(x, w, offs).backward(grad)
    assert calls == [(3, (100, 48)), (3, (100, 64)), (2, (4, 64, 48))]  # forward, grad_input, grad_weight
    with pytest.raises(RuntimeError, match="column major"):  # the oracle refuses a wrong layout
        torch._scaled_grouped_mm(
            *(t.to("meta") for t in (torch.zeros(32, 32).to(E4M3), torch.zeros(2, 32, 16).to(E4M3))),
            torch.ones(32, device="meta"),
            torch.ones(2, 16, device="meta"),
            offs=torch.tensor([10, 32], dtype=torch.int32, device="meta"),
            out_dtype=torch.bfloat16,
        )


def test_reference_refuses_what_the_kernel_refuses():
    """The CPU reference checks the kernel's layout rules, so a wrong layout fails here, not first on a GPU."""
    a = torch.zeros(32, 32).to(E4M3)
    b = torch.zeros(2, 32, 16).to(E4M3)
    sa, sb, offs = torch.ones(32), torch.ones(2, 16), torch.tensor([10, 32], dtype=torch.int32)
    column_major = lambda t: t.transpose(-2, -1).contiguous().transpose(-2, -1)
    scaled_grouped_mm_reference(a, column_major(b), sa, sb, offs)
    with pytest.raises(ValueError, match="column-major"):
        scaled_grouped_mm_reference(a, b, sa, sb, offs)
    with pytest.raises(ValueError, match="multiples of 16"):
        scaled_grouped_mm_reference(a[:, :24].contiguous(), column_major(b[:, :24]), sa, sb, offs)
    at, bt = torch.zeros(16, 32).to(E4M3), torch.zeros(16, 32).to(E4M3).t()  # 2d x 2d, groups along K
    with pytest.raises(ValueError, match="multiples of 16 along the contraction"):
        scaled_grouped_mm_reference(at, bt, torch.ones(32), torch.ones(32), offs)


# ---- the model ------------------------------------------------------------------------------------------------------
def test_enable_fp8_converts_the_dense_linears_and_the_experts():
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = build_model(tiny_fp8_config())
    keys = list(model.state_dict())
    done = enable_fp8(model, emulate=True)
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert fp8 == set(done.linears) and fp8
    assert {name.rsplit(".", 1)[-1] for name in fp8} <= set(FP8_LINEARS)
    assert any(".attn.q_proj" in n for n in fp8) and any(".shared_expert." in n for n in fp8)
    assert any(n.startswith("layers.0.mlp.") for n in fp8)  # the dense layer's MLP
    assert done.experts == ["layers.1.mlp.experts"] and model.layers[1].mlp.experts.fp8
    assert type(model.lm_head) is not Float8Linear and not done.skipped  # the LM head stays bf16
    assert list(model.state_dict()) == keys  # checkpoints keep their names


def test_enable_fp8_leaves_widths_not_multiple_of_16_in_bf16():
    model = build_model(tiny_fp8_config(dim=40, n_heads=4, moe={"ffn_dim": 24}))
    done = enable_fp8(model, emulate=True)
    assert not done.experts and "layers.1.mlp.experts" in done.skipped
    assert "layers.0.attn.q_proj" in done.skipped  # 40 -> 40
    assert not any(".attn." in name for name in done.linears)


def test_fp8_refuses_a_device_without_fp8():
    assert "compute capability >= 8.9" in fp8_unsupported("cpu") and "cpu" in fp8_unsupported("cpu")
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        enable_fp8(nn.Linear(16, 16))


def test_fp8_moe_layer_matches_full_precision():
    """An MoE layer (shared expert included) with FP8 expert GEMMs and linears (emulated) against the same layer in
    fp32: output and every gradient within two FP8 GEMMs' error (2 RELATIVE_FP8_GEMM)."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, ffn_dim=48, num_shared_experts=1, backend="grouped")
    exact = MoE(64, config)
    fp8 = MoE(64, config)
    fp8.load_state_dict(exact.state_dict())
    exact.experts.backend = "loop"
    assert enable_fp8(fp8, emulate=True).experts == ["experts"]
    x = torch.randn(2, 40, 64)
    results = []
    for layer in (exact, fp8):
        xg = x.clone().requires_grad_()
        out, _ = layer(xg)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out, xg.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out, grad_x, grads), (out8, grad_x8, grads8) = results
    assert relative(out8, out) <= 2 * RELATIVE_FP8_GEMM and relative(grad_x8, grad_x) <= 2 * RELATIVE_FP8_GEMM
    for name in ("experts.w_in", "experts.w_out", "shared_expert.down_proj.weight"):
        # the linears' output gradients are e5m2
        assert relative(grads8[name], grads[name]) <= 2 * RELATIVE_FP8_GEMM + U_E5M2, name


def test_fp8_moe_layer_with_bf16_weight_gradients():
    """enable_fp8(fp8_wgrad=False): the same output and input gradient as the FP8 recipe (its forward and grad_input
    GEMMs are unchanged), the experts' weight gradients from the unquantised operands: within one FP8 GEMM's error
    of fp32 (the output gradient reaching w_in went through FP8 GEMMs), and not the FP8 weight gradient."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, ffn_dim=48, backend="grouped")
    layers = [MoE(64, config) for _ in range(3)]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    layers[0].experts.backend = "loop"
    enable_fp8(layers[1], emulate=True)
    assert enable_fp8(layers[2], emulate=True, fp8_wgrad=False).experts == ["experts"]
    assert layers[1].experts.fp8_wgrad and not layers[2].experts.fp8_wgrad
    x = torch.randn(2, 40, 64)
    grad = torch.randn(2, 40, 64)
    results = []
    for layer in layers:
        xg = x.clone().requires_grad_()
        out, _ = layer(xg)
        out.backward(grad)
        results.append((out, xg.grad, layer.experts.w_out.grad, layer.experts.w_in.grad))
    exact, fp8, bf16_wgrad = results
    assert torch.equal(bf16_wgrad[0], fp8[0]) and torch.equal(bf16_wgrad[1], fp8[1])
    for i in (2, 3):
        assert relative(bf16_wgrad[i], exact[i]) <= RELATIVE_FP8_GEMM
        assert not torch.equal(bf16_wgrad[i], fp8[i])
    assert relative(bf16_wgrad[2], exact[2]) < relative(fp8[2], exact[2])  # w_out: only its input h was FP8


def test_fp8_training_steps_follow_full_precision():
    """A few AdamW steps of a tiny MoE model with FP8 (emulated) and in fp32 from the same start on the same batch:
    finite, and each step's loss within 2% of the fp32 one (FP8's per-GEMM errors are zero-mean: the loss averages
    them over every token)."""
    torch.manual_seed(0)
    reference = build_model(tiny_fp8_config())
    model = build_model(tiny_fp8_config())
    model.load_state_dict(reference.state_dict())
    enable_fp8(model, emulate=True)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(2)).expand(6, 4, 24)  # memorised
    curves = []
    for m in (reference, model):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for batch in ids:
            loss = m(batch, labels=batch, return_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert all(map(torch.isfinite, map(torch.tensor, curves[1])))
    assert curves[0][-1] < curves[0][0]  # the steps train
    for got, want in zip(curves[1], curves[0]):
        assert abs(got - want) <= 0.02 * want, curves


def test_fp8_model_recomputes_exactly_under_activation_checkpointing():
    """Checkpointed blocks recompute their FP8 forward in backward (DeepSpeed's non-reentrant checkpoint): the same
    loss and gradients as without checkpointing (quantization is deterministic)."""
    from moeformer.training.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    reference = build_model(tiny_fp8_config())
    model = build_model(tiny_fp8_config())
    model.load_state_dict(reference.state_dict())
    for m in (reference, model):
        enable_fp8(m, emulate=True)
    assert len(apply_activation_checkpointing(model, "full")) == 2
    ids = torch.randint(0, 96, (2, 24))
    losses = []
    for m in (reference, model):
        loss = m(ids, labels=ids, return_logits=False).loss
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == losses[1].item()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-7, msg=name)


# ---- configuration and the trainer --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"train.zero_stage": 3},
        {"parallel.pp": 2, "train.zero_stage": 1},
        {"parallel.tp": 2},
        {"train.dtype": "fp32"},
    ],
)
def test_train_fp8_refuses_what_it_does_not_support(overrides):
    with pytest.raises(ConfigError, match="train.fp8=true is not supported"):
        load_config(None, {"train.fp8": True, **overrides})
    load_config(None, {"train.fp8": True, "parallel.ep": 2})  # expert parallelism is supported


def scenario_trainer_emulated(work: Path) -> dict:
    """Worker (2 ranks): the trainer (DeepSpeed, bf16, experts split over the ranks) on a tiny MoE, bf16 with
    ZeRO-1, then train.fp8 emulated (the device check passed, torchao's emulated matmuls, the experts' reference
    GEMM) with ZeRO-2 and the MoE sublayers checkpointed: per-step losses and the exported weights' names."""
    from safetensors.torch import load_file

    from moeformer.training import trainer
    from tests.test_train_distributed import run_config

    refusal = load_config(None, {"train.fp8": True, "data.dir": str(work / "none")})
    out = {"refusal": None}
    try:
        trainer.Trainer(refusal)
    except ConfigError as e:  # this machine has no FP8 GPU: the trainer refuses before reading any data
        out["refusal"] = str(e)
    trainer.fp8_unsupported = lambda device: None
    trainer.enable_fp8 = functools.partial(enable_fp8, emulate=True)
    fp8 = {"train.fp8": True, "train.zero_stage": 2, "train.activation_checkpointing": "moe"}
    runs = {"bf16": {"parallel.ep": 2}, "fp8": {"parallel.ep": 2, **fp8}}
    for name, overrides in runs.items():
        shape = {"model.moe.num_shared_experts": 1, "model.moe.backend": "grouped", "model.first_k_dense": 1}
        config = run_config(
            work, name, **{"train.dtype": "bf16", "train.steps": 4, "checkpoint.export": "native", **shape, **overrides}
        )
        summary = trainer.Trainer(config).train()
        out[name] = {
            "losses": [summary["losses"][step] for step in sorted(summary["losses"])],
            "exported": sorted(load_file(work / name / "model" / "model.safetensors")),
        }
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU: the GPU has its own trainer test")
def test_trainer_runs_fp8_with_expert_parallelism_zero2_and_checkpointing(tmp_path):
    """train.fp8 through the trainer on 2 ranks: refused on this CPU machine (one clear ConfigError), then emulated:
    the model converted after expert parallelism and before DeepSpeed, ZeRO-2 and activation checkpointing composing
    with it; finite losses within 2% of bf16's, the same exported names."""
    from moeformer.training.data import prepare_corpus

    prepare_corpus(tmp_path / "data", max_files=20, val_fraction=0.2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launcher, __file__, "trainer_emulated", str(tmp_path)],
        capture_output=True,
        text=True,
        env=worker_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "fp8: " in proc.stdout + proc.stderr and "linears and 1 expert modules in FP8" in proc.stdout + proc.stderr
    runs = json.loads((tmp_path / "trainer_emulated.json").read_text())
    assert runs["refusal"].startswith("train.fp8=true: FP8 training needs a CUDA GPU of compute capability >= 8.9")
    assert runs["refusal"].endswith("this process runs on cpu; set train.fp8=false")
    assert runs["fp8"]["exported"] == runs["bf16"]["exported"]
    assert len(runs["fp8"]["losses"]) == 4
    for got, want in zip(runs["fp8"]["losses"], runs["bf16"]["losses"]):
        assert math.isfinite(got) and abs(got - want) <= 0.02 * want, runs


# ---- on the GPU -----------------------------------------------------------------------------------------------------
def needs_fp8_gpu(grouped: bool = True):
    """Skip unless CUDA with FP8 (grouped: torch._scaled_grouped_mm's compute capability 9.0/10.x)."""
    cuda = torch.cuda.is_available()
    ok = cuda and (fp8_grouped_mm_available(torch.device("cuda")) if grouped else fp8_unsupported("cuda") is None)
    return pytest.mark.skipif(
        not ok, reason="needs a GPU with FP8" + (" grouped GEMMs (cc 9.0/10.x)" if grouped else "")
    )


@pytest.mark.gpu
@needs_fp8_gpu()
@pytest.mark.parametrize("fast_accum", [True, False])
def test_scaled_grouped_mm_kernel_matches_its_reference(fast_accum):
    """torch._scaled_grouped_mm against the CPU reference on the same fp8 operands and scales, both forms: only the
    bf16 output rounding (2^-8, each) and the accumulation order may differ (fast accumulation: a ~14-bit
    accumulator over K=256, relative error well below 2^-7)."""
    g = torch.Generator().manual_seed(0)
    sizes = [37, 0, 64, 5, 150]  # 2d x 3d: rows in unaligned groups
    m, k, n = sum(sizes), 256, 96
    one = torch.tensor(1.0)
    a = to_e4m3(torch.randn(m, k, generator=g) * 100, one)
    b = to_e4m3(torch.randn(len(sizes), n, k, generator=g) * 100, one).transpose(-2, -1)
    sa, sb = torch.rand(m, generator=g) / 1e4, torch.rand(len(sizes), n, generator=g) / 1e4
    offs = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)
    aligned = torch.tensor([32, 32, 64, 128], dtype=torch.int32).cumsum(0).to(torch.int32)  # 2d x 2d, along K
    at = to_e4m3(torch.randn(48, 256, generator=g) * 100, one)
    bt = to_e4m3(torch.randn(80, 256, generator=g) * 100, one).t()
    sat, sbt = torch.rand(4 * 48, generator=g) / 1e4, torch.rand(4 * 80, generator=g) / 1e4
    for args, rows in (((a, b, sa, sb, offs), slice(0, m)), ((at, bt, sat, sbt, aligned), slice(None))):
        want = scaled_grouped_mm_reference(*args).float()[rows]
        got = scaled_grouped_mm(*(t.cuda() for t in args), use_fast_accum=fast_accum).float().cpu()[rows]
        assert relative(got, want) <= 2**-7, fast_accum


@pytest.mark.gpu
@needs_fp8_gpu()
@pytest.mark.parametrize("sizes, k, n", [([37, 0, 64, 5], 32, 48), ([300, 1, 17, 128], 256, 128)])
def test_fp8_grouped_mm_on_gpu_matches_exact_within_e4m3_bounds(sizes, k, n):
    check_grouped_mm_against_exact(sizes, k, n, device="cuda", accumulation=k * 2.0**-14)


def moe_pair(seed: int = 0) -> tuple[MoE, MoE]:
    """The same bf16 MoE layer on CUDA twice, the second with FP8 expert GEMMs and shared expert."""
    torch.manual_seed(seed)
    config = MoEConfig(num_experts=8, top_k=2, ffn_dim=256, num_shared_experts=1)
    bf16 = MoE(512, config).cuda().to(torch.bfloat16)
    fp8 = MoE(512, config).cuda().to(torch.bfloat16)
    fp8.load_state_dict(bf16.state_dict())
    assert enable_fp8(fp8).experts == ["experts"]
    return bf16, fp8


def forward_backward(layer, x, grad, run=None):
    """Output, input gradient and parameter gradients (by name) of `run` (default: layer itself; e.g. compiled)."""
    xg = x.clone().requires_grad_()
    out, _ = (layer if run is None else run)(xg)  # not `run or layer`: a compiled module has no truth value
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out, xg.grad, grads


@pytest.mark.gpu
@needs_fp8_gpu()
def test_fp8_moe_layer_on_gpu_eager_and_compiled_match_bf16():
    """The FP8 layer eager and compiled (inductor) against the bf16 layer: within two FP8 GEMMs' error (+ e5m2
    gradients for the shared expert's linears); compiled against eager within one FP8 rounding (u: fused
    intermediates may round a few values to the neighbouring e4m3 code)."""
    bf16, fp8 = moe_pair()
    x = torch.randn(4, 1024, 512, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    ref = forward_backward(bf16, x, grad)
    eager = forward_backward(fp8, x, grad)
    compiled = forward_backward(fp8, x, grad, run=torch.compile(fp8))
    for got in (eager, compiled):
        assert relative(got[0], ref[0]) <= 2 * RELATIVE_FP8_GEMM
        assert relative(got[1], ref[1]) <= 2 * RELATIVE_FP8_GEMM + U_E5M2
        for name in ("experts.w_in", "experts.w_out"):
            assert relative(got[2][name], ref[2][name]) <= 2 * RELATIVE_FP8_GEMM, name
        assert all(torch.isfinite(g).all() for g in got[2].values())
    assert relative(compiled[0], eager[0]) <= U_E4M3
    assert relative(compiled[2]["experts.w_in"], eager[2]["experts.w_in"]) <= U_E4M3


@pytest.mark.gpu
@needs_fp8_gpu()
def test_fp8_moe_layer_never_syncs_with_the_host():
    """A forward+backward of the FP8 layer is captured in one CUDA graph (a capture fails on any device-to-host
    copy): the aligned weight-gradient layout is computed on the device, like the bf16 path's."""
    from moeformer.models.generation import capture_graph

    _, fp8 = moe_pair()
    x = torch.randn(2, 512, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        fp8.zero_grad(set_to_none=True)
        fp8(x)[0].backward(grad)
        return x.grad

    graph, _ = capture_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(fp8.experts.w_in.grad).all()


@pytest.mark.gpu
@needs_fp8_gpu(grouped=False)
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_linears_on_gpu_match_bf16(compiled):
    """torchao's Float8Linear (tensorwise) against nn.Linear in bf16: output within one e4m3 GEMM's error, gradients
    within e5m2's (u = 2^-3: the output gradient is e5m2)."""
    torch.manual_seed(0)
    mlp = nn.Sequential()
    mlp.add_module("up_proj", nn.Linear(512, 1024, bias=False))
    mlp.add_module("down_proj", nn.Linear(1024, 512, bias=False))
    mlp = mlp.cuda().to(torch.bfloat16)
    fp8 = nn.Sequential()
    for name, m in mlp.named_children():
        fp8.add_module(name, nn.Linear(m.in_features, m.out_features, bias=False))
    fp8 = fp8.cuda().to(torch.bfloat16)
    fp8.load_state_dict(mlp.state_dict())
    assert enable_fp8(fp8).linears == ["up_proj", "down_proj"]
    run = torch.compile(fp8) if compiled else fp8
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    outs = []
    for module in (mlp, run):
        xg = x.clone().requires_grad_()
        out = module(xg)
        out.backward(grad)
        outs.append((out, xg.grad, [p.grad for p in module.parameters()]))
    (out, gx, gw), (out8, gx8, gw8) = outs
    assert relative(out8, out) <= 2 * RELATIVE_FP8_GEMM  # two linears in series
    assert relative(gx8, gx) <= 2 * (RELATIVE_FP8_GEMM + U_E5M2)
    for got, want in zip(gw8, gw):
        assert relative(got, want) <= 2 * (RELATIVE_FP8_GEMM + U_E5M2)


TRAIN_FLAGS = [
    "--model.name=tiny-moe",
    "--model.dim=128",
    "--model.ffn_dim=256",
    "--model.vocab_size=258",
    "--model.moe.ffn_dim=128",
    "--model.moe.num_shared_experts=1",
    "--data.seq_len=128",
    "--data.micro_batch_size=8",
    "--train.steps=20",
    "--train.eval_every=0",
    "--train.eval_batches=2",
    "--train.progress_bar=false",
    "--train.compile=true",
    "--optim.warmup_steps=5",
    "--optim.lr=2e-3",
    "--checkpoint.export=none",
]
TRAIN_RUNS = {
    "bf16": [],
    "fp8": ["--train.fp8=true"],
    "fp8_zero2_checkpointed": ["--train.fp8=true", "--train.zero_stage=2", "--train.activation_checkpointing=moe"],
}


@pytest.mark.gpu
@needs_fp8_gpu()
def test_fp8_training_steps_on_gpu_are_finite_and_close_to_bf16(tmp_path):
    """scripts/train.py (DeepSpeed, bf16, compiled blocks) on a tiny MoE: bf16, FP8 with ZeRO-1, FP8 with ZeRO-2 and
    the MoE sublayers checkpointed; every FP8 step finite, the mean loss of the last 10 steps and the final
    validation loss within 3% of bf16's."""
    from moeformer.training.data import prepare_corpus
    from moeformer.training.metrics import read_metrics

    prepare_corpus(tmp_path / "data", max_files=20, val_fraction=0.2)
    curves, val = {}, {}
    for name, flags in TRAIN_RUNS.items():
        out = tmp_path / name
        proc = run_train([*TRAIN_FLAGS, f"--data.dir={tmp_path / 'data'}", f"--out_dir={out}", *flags], timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        records = read_metrics(out)
        train = [r for r in records if r["split"] == "train"]
        assert len(train) == 20 and not any(r["skipped"] for r in train), name
        curves[name] = [r["loss"] for r in train]
        val[name] = [r["loss"] for r in records if r["split"] == "val"][-1]
    print(json.dumps({"curves": curves, "val": val}), file=sys.stderr)
    tail = {name: sum(c[-10:]) / 10 for name, c in curves.items()}
    for name in ("fp8", "fp8_zero2_checkpointed"):
        assert abs(tail[name] - tail["bf16"]) <= 0.03 * tail["bf16"], (name, tail)
        assert abs(val[name] - val["bf16"]) <= 0.03 * val["bf16"], (name, val)


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    result = globals()[f"scenario_{scenario}"](workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        (workdir / f"{scenario}.json").write_text(json.dumps(result))
