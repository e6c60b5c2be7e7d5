"""Norms, MLP and rotary embeddings against plain formulas and Hugging Face transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeformer.layers.mlp import MLP
from moeformer.layers.norms import LayerNorm, RMSNorm, build_norm
from moeformer.layers.rope import RotaryEmbedding, apply_rotary

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary  # noqa: E402
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding  # noqa: E402


# ---- norms ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_llama(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        ref.weight.copy_(ours.weight)
    x = (3 * torch.randn(2, 5, 48)).to(dtype)
    assert torch.equal(ours(x), ref(x))
    xf = x.float()
    plain = xf / xf.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * ours.weight
    torch.testing.assert_close(ours(x).float(), plain, **({} if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)))


def test_norms_keep_dtype_of_a_bf16_model():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    for norm in (RMSNorm(16).to(torch.bfloat16), LayerNorm(16).to(torch.bfloat16), LayerNorm(16, bias=False)):
        assert norm(x).dtype == torch.bfloat16


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    torch.manual_seed(0)
    ours, ref = LayerNorm(24, eps=1e-5, bias=bias), torch.nn.LayerNorm(24, eps=1e-5, bias=bias)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.normal_()
            ref.bias.copy_(ours.bias)
    assert (ours.bias is None) == (not bias)
    x = torch.randn(4, 7, 24) * 5 + 2
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_build_norm():
    assert isinstance(build_norm("rmsnorm", 8, 1e-6), RMSNorm)
    ln = build_norm("layernorm", 8, 1e-3)
    assert isinstance(ln, LayerNorm) and ln.eps == 1e-3
    with pytest.raises(ValueError, match="rmsnorm"):
        build_norm("batchnorm", 8, 1e-6)


# ---- MLP -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_formula(bias):
    torch.manual_seed(0)
    mlp = MLP(16, 40, "swiglu", bias=bias)
    x = torch.randn(2, 3, 16)
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    if bias:
        gate, up = gate + mlp.gate_proj.bias, up + mlp.up_proj.bias
    out = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T
    out = out + mlp.down_proj.bias if bias else out
    torch.testing.assert_close(mlp(x), out, atol=1e-6, rtol=1e-5)
    assert (mlp.up_proj.bias is not None) == bias


def test_gelu_mlp_is_exact_erf_gelu():
    torch.manual_seed(0)
    mlp = MLP(16, 32, "gelu")
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(5, 16) * 3
    h = x @ mlp.up_proj.weight.T
    out = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), out, atol=1e-6, rtol=1e-5)
    tanh_out = mlp.down_proj(F.gelu(mlp.up_proj(x), approximate="tanh"))
    assert not torch.allclose(mlp(x), tanh_out, atol=1e-7, rtol=0)


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="relu"):
        MLP(8, 16, "relu")


# ---- rotary --------------------------------------------------------------------------------------------------------
SCALINGS = {
    "default": None,
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn_mscale": {
        "type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "yarn_attention_factor": {
        "type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 128,
        "attention_factor": 0.9,
        "truncate": False,
    },
    "llama3": {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
}
MAX_LEN = 256


def _hf_rope(scaling, head_dim, partial=1.0):
    params = (
        {"rope_type": "default"}
        if scaling is None
        else {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    )
    params = {**params, "rope_theta": 10000.0, "partial_rotary_factor": partial}
    kwargs = dict(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=MAX_LEN,
        rope_parameters=params,
    )
    if partial == 1.0:
        return LlamaRotaryEmbedding(transformers.LlamaConfig(**kwargs))
    kwargs.pop("head_dim")
    return PhiRotaryEmbedding(transformers.PhiConfig(**kwargs))


def _positions():
    """Two rows: plain 0..T-1 and a left-padded row (zeros then 0..), long enough to pass MAX_LEN (dynamic NTK)."""
    T = 600
    row = torch.arange(T)
    return torch.stack([row, (row - 37).clamp(min=0)])


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("head_dim,partial", [(32, 1.0), (64, 0.5)])
def test_rotary_matches_transformers(name, head_dim, partial):
    rotary_dim = int(head_dim * partial)
    scaling = SCALINGS[name]
    for positions in (_positions(), _positions()[:, :50]):  # dynamic: beyond and within the original length
        hf = _hf_rope(scaling, head_dim, partial)
        ours = RotaryEmbedding(rotary_dim, theta=10000.0, max_seq_len=MAX_LEN, scaling=scaling)
        cos, sin = ours(positions)
        ref_cos, ref_sin = hf(torch.zeros(1), positions)
        assert cos.shape == (2, positions.shape[1], rotary_dim) and cos.dtype == torch.float32
        torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
        assert ours.attention_scaling == pytest.approx(hf.attention_scaling, abs=1e-12)


def test_scalings_change_frequencies():
    """Every scaling actually differs from plain rope (guards against a silently ignored config)."""
    positions = _positions()
    plain_cos, _ = RotaryEmbedding(32, max_seq_len=MAX_LEN)(positions)
    for name, scaling in SCALINGS.items():
        cos, _ = RotaryEmbedding(32, max_seq_len=MAX_LEN, scaling=scaling)(positions)
        assert (name == "default") == torch.allclose(cos, plain_cos), name


def test_dynamic_ntk_only_beyond_original_length():
    plain, dynamic = (
        RotaryEmbedding(32, max_seq_len=64),
        RotaryEmbedding(32, max_seq_len=64, scaling={"type": "dynamic", "factor": 2.0}),
    )
    short, long = torch.arange(64)[None], torch.arange(65)[None]
    assert torch.equal(plain(short)[0], dynamic(short)[0])
    assert not torch.allclose(plain(long)[0], dynamic(long)[0])


def _rotate_pairs(x, positions, inv_freq):
    """Reference: treat (x[i], x[i + R/2]) as a complex number and multiply by exp(i * pos * inv_freq[i])."""
    half = inv_freq.numel()
    z = torch.complex(x[..., :half].double(), x[..., half : 2 * half].double())
    z = z * torch.polar(torch.ones(()).double(), positions[:, None, :, None].double() * inv_freq.double())
    return torch.cat([z.real, z.imag, x[..., 2 * half :].double()], dim=-1)


@pytest.mark.parametrize("rotary_dim", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_complex_reference(rotary_dim, dtype):
    torch.manual_seed(0)
    rope = RotaryEmbedding(rotary_dim)
    x = torch.randn(2, 3, 7, 16).to(dtype)
    positions = torch.stack([torch.arange(7), torch.arange(7) + 100])
    cos, sin = rope(positions)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    ref = _rotate_pairs(x, positions, rope.inv_freq())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    if rotary_dim == 16:
        hf_q, _ = hf_apply_rotary(x.float(), x.float(), cos, sin)
        torch.testing.assert_close(out.float(), hf_q, atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rotary_dim=7), "even"),
        (dict(rotary_dim=8, scaling={"type": "ntk", "factor": 2.0}), "unknown rope scaling type"),
        (dict(rotary_dim=8, scaling={"type": "llama3", "factor": 2.0}), "low_freq_factor"),
        (dict(rotary_dim=8, scaling={"type": "linear", "factor": 2.0, "beta_fast": 3}), "beta_fast"),
    ],
)
def test_rotary_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(**kwargs)


def test_apply_rotary_rejects_wide_tables():
    cos, sin = RotaryEmbedding(32)(torch.arange(4)[None])
    with pytest.raises(ValueError, match="head_dim"):
        apply_rotary(torch.randn(1, 2, 4, 16), cos, sin)
