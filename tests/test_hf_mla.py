"""Multi-head latent attention: against a plain reference, across backends and dtypes, with its latent cache and the
absorbed decode path over it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moeformer.layers.attention import AttentionMask
from moeformer.layers.mla import MLAttention, mla_softmax_scale
from moeformer.layers.rope import RotaryEmbedding, apply_rotary
from moeformer.models.config import MLAConfig, ModelConfig

SHAPES = [  # (n_heads, MLAConfig kwargs)
    (4, dict(q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)),
    (3, dict(q_lora_rank=10, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=8, v_head_dim=20)),
    (2, dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)),
]


def make(n_heads: int, mla: dict, dtype=torch.float32) -> tuple[MLAttention, RotaryEmbedding]:
    torch.manual_seed(0)
    layer = MLAttention(24, n_heads, MLAConfig(**mla), norm_eps=1e-6, backend="eager")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return layer.to(dtype), RotaryEmbedding(mla["qk_rope_head_dim"], theta=100.0)


def reference(layer: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain causal MLA: explicit per-head keys/values from the latent and an fp32 softmax."""
    B, T, _ = x.shape
    H, nope, rope, vd = layer.n_heads, layer.nope, layer.rope_dim, layer.v_dim
    q = layer._queries(x).view(B, T, H, nope + rope).transpose(1, 2).float()
    latent, k_rot = layer.kv_a_proj(x).split((layer.kv_lora_rank, rope), dim=-1)
    kv = layer.kv_b_proj(layer.kv_a_norm(latent)).view(B, T, H, nope + vd).transpose(1, 2).float()
    k_rot = apply_rotary(k_rot[:, None].float(), cos, sin).expand(B, H, T, rope)
    q = torch.cat((q[..., :nope], apply_rotary(q[..., nope:], cos, sin)), dim=-1)
    k = torch.cat((kv[..., :nope], k_rot), dim=-1)
    scores = (q @ k.transpose(-1, -2)) * layer.scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ kv[..., nope:]
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * vd).to(x.dtype))


@pytest.mark.parametrize("n_heads,mla", SHAPES)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_matches_reference(n_heads, mla, backend):
    layer, rope = make(n_heads, mla)
    x = torch.randn(2, 9, 24)
    cos, sin = rope(torch.arange(9).expand(2, 9))
    with torch.no_grad():
        out = layer(x, (cos, sin), AttentionMask(), backend=backend)
        assert (out - reference(layer, x, cos, sin)).abs().max() < 1e-5


@pytest.mark.parametrize("n_heads,mla", SHAPES)
def test_bf16_close_to_fp32(n_heads, mla):
    layer, rope = make(n_heads, mla)
    x = torch.randn(2, 9, 24)
    cos, sin = rope(torch.arange(9).expand(2, 9))
    with torch.no_grad():
        full = layer(x, (cos, sin), AttentionMask())
        half = layer.to(torch.bfloat16)(x.bfloat16(), (cos, sin), AttentionMask())
    assert half.dtype == torch.bfloat16
    err = (half.float() - full).abs().max() / full.abs().max()
    assert 0 < err < 0.05


@pytest.mark.parametrize("n_heads,mla", SHAPES)
def test_latent_cache_decoding_matches_full_forward(n_heads, mla):
    layer, rope = make(n_heads, mla)
    x = torch.randn(2, 10, 24)
    cos, sin = rope(torch.arange(10).expand(2, 10))
    with torch.no_grad():
        full = layer(x, (cos, sin), AttentionMask())
        cache = layer.init_cache(2, 10, torch.float32, "cpu")
        steps = [layer(x[:, :6], (cos[:, :6], sin[:, :6]), AttentionMask(), cache)]
        for t in range(6, 10):
            rope_t = (cos[:, t : t + 1], sin[:, t : t + 1])
            steps.append(layer(x[:, t : t + 1], rope_t, AttentionMask(q_offset=t), cache))
    assert cache.length == 10 and cache.latent.shape == (2, 10, mla["kv_lora_rank"])
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="overflow"):
        cache.update(torch.zeros(2, 1, mla["kv_lora_rank"]), torch.zeros(2, 1, mla["qk_rope_head_dim"]))


def test_padding_keys_are_ignored():
    layer, rope = make(*SHAPES[0])
    x = torch.randn(1, 8, 24)
    cos, sin = rope(torch.arange(8).expand(1, 8))
    padded = torch.cat((torch.randn(1, 3, 24), x), dim=1)
    pcos, psin = rope(torch.cat((torch.zeros(3, dtype=torch.long), torch.arange(8))).view(1, 11))
    keep = torch.tensor([[False] * 3 + [True] * 8])
    with torch.no_grad():
        out = layer(x, (cos, sin), AttentionMask())
        out_padded = layer(padded, (pcos, psin), AttentionMask(key_padding=keep), backend="sdpa")
    assert (out_padded[:, 3:] - out).abs().max() < 1e-5


def test_softmax_scale_follows_yarn_mscale():
    mla = MLAConfig(qk_nope_head_dim=128, qk_rope_head_dim=64)
    plain = 192**-0.5
    assert mla_softmax_scale(mla, None) == plain
    assert mla_softmax_scale(mla, {"type": "linear", "factor": 4.0}) == plain
    assert mla_softmax_scale(mla, {"type": "yarn", "factor": 40.0}) == plain  # no mscale_all_dim: rope carries it
    yarn = {"type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert math.isclose(mla_softmax_scale(mla, yarn), plain * (0.1 * 0.707 * math.log(40.0) + 1) ** 2)
    layer = MLAttention(
        32, 2, MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4), softmax_scale=0.5
    )
    assert layer.scale == 0.5 and not hasattr(layer, "q_a_proj")


# ---- compressed-cache decoding (absorbed up-projections) ----------------------------------------------------------
@pytest.mark.parametrize("n_heads,mla", SHAPES)
@pytest.mark.parametrize("in_buffer", [False, True])  # host-side cache length, or a device offset into the buffer
def test_absorbed_decoding_equals_expanded(n_heads, mla, in_buffer):
    """Decoding over the compressed cache with kv_b_proj absorbed into the query and output (MQA over one shared
    latent head) gives the outputs of expanding every cached latent into per-head keys and values: fp32, both
    layers sharing weights and inputs, outputs of size ~1 within 1e-5."""
    absorbed, rope = make(n_heads, mla)
    expanded = copy.deepcopy(absorbed)
    absorbed.absorb, expanded.absorb = True, False
    x = torch.randn(2, 10, 24)
    cos, sin = rope(torch.arange(10).expand(2, 10))
    caches = [layer.init_cache(2, 12, torch.float32, "cpu") for layer in (absorbed, expanded)]
    padding = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        for t in range(10):
            if in_buffer:
                mask = AttentionMask(q_offset=torch.tensor(t), key_padding=padding & (torch.arange(12) <= t))
            else:
                mask = AttentionMask(q_offset=t)
            rope_t = (cos[:, t : t + 1], sin[:, t : t + 1])
            out = [layer(x[:, t : t + 1], rope_t, mask, cache) for layer, cache in zip((absorbed, expanded), caches)]
            assert out[1].abs().max() > 0.1 and (out[0] - out[1]).abs().max() < 1e-5


def test_compressed_cache_bytes_per_token():
    """DeepSeek-V2-Lite's MLA caches kv_lora_rank + rope dims per token and layer (576 bf16 values, 1152 bytes),
    against 16 heads * (192 key + 128 value dims) for the keys and values it stands for: about 8.9x less. With a
    cache, its decode steps take the absorbed path; a prompt of 2k tokens is cheaper expanded."""
    config = ModelConfig.from_name("deepseek-v2-lite")
    mla, heads = config.mla, config.n_heads
    layer = MLAttention(config.dim, heads, mla, backend="eager").to("meta")
    cache = layer.init_cache(batch=4, max_len=100, dtype=torch.bfloat16, device="meta")
    per_token = cache.kv.nbytes // (4 * 100)
    assert per_token == (mla.kv_lora_rank + mla.qk_rope_head_dim) * 2 == 1152
    full_kv = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim) * 2
    assert full_kv / per_token == pytest.approx(8.89, abs=0.01)
    assert layer.absorbs(1) and layer.absorbs(64) and not layer.absorbs(2048)
