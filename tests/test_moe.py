"""MoE layer: fast paths against the per-token reference, routers, losses by hand, balancing, configs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moeformer.layers.moe import (
    Experts,
    MoE,
    MoEConfig,
    load_balancing_loss,
    moe_reference,
    router_z_loss,
    sequence_aux_loss,
)
from moeformer.layers.moe.kernels import PermuteRows

CONFIGS = {
    "softmax": dict(num_experts=4, top_k=2),
    "softmax_top1_unnormed": dict(num_experts=3, top_k=1, norm_topk_prob=False),
    "sigmoid_bias": dict(num_experts=8, top_k=2, router="sigmoid", router_bias=True, routed_scaling_factor=2.5),
    "sigmoid_groups": dict(num_experts=8, top_k=3, router="sigmoid", num_groups=4, topk_groups=2),
    "softmax_groups_gelu": dict(num_experts=6, top_k=2, num_groups=3, topk_groups=2, activation="gelu"),
    "shared_gate": dict(num_experts=4, top_k=2, num_shared_experts=2, shared_expert_gate=True),
    "shared_gelu": dict(num_experts=4, top_k=1, num_shared_experts=1, activation="gelu"),
    "expert_choice": dict(num_experts=4, top_k=2, router="expert_choice"),
}


def make_moe(dim: int = 12, seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    cfg = dict(ffn_dim=16, backend="loop", z_loss_coef=1e-3, seq_aux_loss_coef=1e-3) | overrides
    if cfg.get("capacity_factor") is None and cfg.get("router") == "expert_choice":
        cfg["capacity_factor"] = 1.0  # expert choice: each expert takes its share of the slots
    if cfg.get("capacity_factor") is not None:
        cfg["dispatcher"] = "capacity"
    layer = MoE(dim, MoEConfig(**cfg))
    if layer.router.expert_bias is not None:  # a non-trivial bias so that it matters for selection
        layer.router.expert_bias.copy_(torch.randn(layer.config.num_experts) * 0.1)
    return layer


def padded_mask(b: int, t: int) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, t // 2 :] = False
    return mask


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_matches_reference_fp32(name, capacity_factor, impl):
    layer = make_moe(capacity_factor=capacity_factor, backend=impl, **CONFIGS[name])
    for b, t, masked in [(2, 7, False), (3, 5, True)]:
        x = torch.randn(b, t, 12)
        mask = padded_mask(b, t) if masked else None
        out, stats = layer(x, mask)
        torch.testing.assert_close(out, moe_reference(x, layer, mask), atol=1e-5, rtol=1e-5)
        assert out.shape == x.shape and stats.router_logits.shape == (b * t, layer.config.num_experts)


@pytest.mark.parametrize("name", ["softmax", "sigmoid_groups", "shared_gate", "shared_gelu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_matches_reference_bf16(name, capacity_factor):
    layer = make_moe(dim=16, capacity_factor=capacity_factor, backend="loop", **CONFIGS[name])
    x = torch.randn(2, 9, 16)
    ref32 = moe_reference(x, layer)
    layer = layer.to(torch.bfloat16)
    out, _ = layer(x.bfloat16())
    ref = moe_reference(x.bfloat16(), layer)
    assert out.dtype == torch.bfloat16
    assert layer(x.bfloat16())[1].router_logits.dtype == torch.float32  # the router runs in fp32
    scale = ref32.abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= 2e-2 * scale
    assert (out.float() - ref32).abs().max().item() <= 5e-2 * scale


def test_autocast_bf16_close_to_fp32():
    layer = make_moe(dim=16, **CONFIGS["shared_gate"])
    x = torch.randn(2, 9, 16)
    ref = moe_reference(x, layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = layer(x)
    assert stats.router_logits.dtype == torch.float32
    assert (out.float() - ref).abs().max().item() <= 5e-2 * ref.abs().max().item()


@pytest.mark.parametrize("name", ["softmax", "sigmoid_bias", "sigmoid_groups"])
def test_large_capacity_drops_nothing_and_equals_dropless(name):
    cfg = CONFIGS[name]
    dropless = make_moe(**cfg)
    capped = make_moe(capacity_factor=cfg["num_experts"] / cfg["top_k"], **cfg)
    x = torch.randn(2, 8, 12)
    out, stats = dropless(x)
    out_capped, stats_capped = capped(x)
    assert stats_capped.dropped_tokens.item() == 0
    # the dropless layer takes the token-major gather path, the capped one the generic path: same math, other order
    torch.testing.assert_close(out_capped, out, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats_capped.tokens_per_expert, stats.tokens_per_expert)


def test_small_capacity_drops_hand_counted_slots():
    layer = make_moe(num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(2, 10, 12)
    out, stats = layer(x)
    capacity = math.ceil(0.5 * 20 * 2 / 4)
    chosen = stats.router_logits.topk(2, dim=-1).indices  # softmax is monotone: same experts as the router
    load = [0] * 4
    for token_experts in chosen.tolist():
        for e in token_experts:
            load[e] += 1
    hand_dropped = sum(max(0, n - capacity) for n in load)
    assert hand_dropped > 0
    assert stats.dropped_tokens.item() == hand_dropped
    assert stats.tokens_per_expert.tolist() == load
    torch.testing.assert_close(out, moe_reference(x, layer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 2), (7, 3)])
def test_permute_rows_equals_index_select_with_gather_backward(n, k):
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(n * k)
    inverse = torch.argsort(perm)
    rows = perm // k
    out = PermuteRows.apply(x, rows, inverse, k)
    assert torch.equal(out, x.index_select(0, rows))
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    (reference,) = torch.autograd.grad(x.index_select(0, rows), x, grad)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t: PermuteRows.apply(t, rows, inverse, k), (x,))


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("name", ["softmax", "sigmoid_groups", "shared_gate", "expert_choice"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_gradients_match_reference(impl, name, capacity_factor):
    layer = make_moe(capacity_factor=capacity_factor, backend=impl, **CONFIGS[name])
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(3, 6, 12)
    mask = padded_mask(3, 6)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn_like(x)
    out, stats = layer(x_fast, mask)
    ((out * target).sum() + stats.aux_loss).backward()
    ref_out = moe_reference(x_ref, ref_layer, mask)
    _, ref_stats = ref_layer(x_ref.detach(), mask)  # the same losses, through the reference's parameters
    ((ref_out * target).sum() + ref_stats.aux_loss).backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for (name_, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
        assert p.grad is not None, name_
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name_)


def identity_router_moe(**overrides) -> MoE:
    """Two experts, dim 2, router weight = identity: the router logits are the input itself."""
    layer = make_moe(dim=2, num_experts=2, top_k=1, **overrides)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    return layer


LN3 = math.log(3.0)
# softmax probs [.75, .25], [.75, .25], [.25, .75], [.75, .25]: top-1 experts 0, 0, 1, 0
HAND_LOGITS = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, LN3], [LN3, 0.0]])


def test_load_balancing_loss_by_hand():
    probs = HAND_LOGITS.softmax(-1)
    assigned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # f = [3/4, 1/4], P = [(3 * .75 + .25) / 4, (3 * .25 + .75) / 4] = [.625, .375]; 2 * (.75*.625 + .25*.375)
    assert load_balancing_loss(probs, assigned, top_k=1).item() == pytest.approx(1.125)
    # last token masked: f = [2/3, 1/3], P = [1.75/3, 1.25/3]; 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9
    mask = torch.tensor([True, True, True, False])
    assert load_balancing_loss(probs, assigned, 1, mask).item() == pytest.approx(9.5 / 9)
    # the layer routes the same way and reports the same value; aux_loss carries the coefficient
    layer = identity_router_moe(aux_loss_coef=0.1, z_loss_coef=0.0, seq_aux_loss_coef=0.0)
    _, stats = layer(HAND_LOGITS.view(1, 4, 2))
    assert stats.tokens_per_expert.tolist() == [3, 1]
    assert stats.losses["load_balance"].item() == pytest.approx(1.125)
    assert stats.aux_loss.item() == pytest.approx(0.1125)
    assert set(stats.losses) == {"load_balance"}


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    # logsumexp = ln 2 and ln 4 = 2 ln 2: mean of squares = (1 + 4) / 2 * ln(2)^2
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)
    assert router_z_loss(logits, torch.tensor([False, True])).item() == pytest.approx(4 * math.log(2) ** 2)


def test_sequence_aux_loss_by_hand():
    probs = HAND_LOGITS.softmax(-1).view(2, 2, 2)
    assigned = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # seq 0: f = 2/(1*2) * [2, 0] = [2, 0], P = [.75, .25] -> 1.5; seq 1: f = [1, 1], P = [.5, .5] -> 1.0
    assert sequence_aux_loss(probs, assigned, top_k=1).item() == pytest.approx(1.25)
    # masking token 1 of seq 0: f = 2/1 * [1, 0], P = [.75, .25] -> 1.5; the mean stays 1.25
    mask = torch.tensor([[True, False], [True, True]])
    assert sequence_aux_loss(probs, assigned, 1, mask).item() == pytest.approx(1.25)
    layer = identity_router_moe(aux_loss_coef=0.0, seq_aux_loss_coef=1.0)
    _, stats = layer(HAND_LOGITS.view(2, 2, 2))
    assert stats.losses["seq_aux"].item() == pytest.approx(1.25)


def test_balanced_routing_gives_unit_losses():
    probs = torch.full((8, 4), 0.25)
    assigned = torch.eye(4).repeat(2, 1)
    assert load_balancing_loss(probs, assigned, 1).item() == pytest.approx(1.0)
    assert sequence_aux_loss(probs.view(2, 4, 4), assigned.view(2, 4, 4), 1).item() == pytest.approx(1.0)


def test_bias_update_moves_load_toward_balance():
    layer = make_moe(dim=8, num_experts=4, top_k=1, router="sigmoid", router_bias=True, bias_update_rate=0.02)
    layer.router.expert_bias.zero_()
    torch.manual_seed(1)
    x = torch.randn(4, 16, 8)
    x[..., 0] += 1.0
    with torch.no_grad():
        layer.router.weight[0, 0] = 1.0  # expert 0 wins most tokens
    layer.train()
    first = layer(x)[1].tokens_per_expert[0].item()
    assert layer.router.expert_load[0].item() == first
    layer.update_bias()
    assert layer.router.expert_load.sum().item() == 0  # update_bias reset the accumulator
    for _ in range(20):
        layer(x)
        layer.update_bias()
    last = layer(x)[1].tokens_per_expert[0].item()
    bias = layer.router.expert_bias
    assert first > 32  # 64 tokens over 4 experts: mean load 16
    assert last < first / 2
    assert bias[0] < bias[1:].min()  # only relative biases matter: the overloaded expert is pushed lowest
    # eval forwards do not accumulate load
    load = layer.router.expert_load.clone()
    layer.eval()
    layer(x)
    assert torch.equal(layer.router.expert_load, load)


def test_expert_choice_gives_each_expert_capacity_tokens():
    for factor, (b, t) in [(1.0, (2, 8)), (2.0, (3, 5))]:
        layer = make_moe(num_experts=4, top_k=2, router="expert_choice", capacity_factor=factor)
        _, stats = layer(torch.randn(b, t, 12))
        capacity = math.ceil(factor * b * t * 2 / 4)
        assert stats.tokens_per_expert.tolist() == [capacity] * 4
        assert stats.dropped_tokens.item() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router="topk"),
        dict(top_k=0),
        dict(num_experts=6, num_groups=4),
        dict(num_groups=2, topk_groups=3),
        dict(activation="relu"),
        dict(backend="cutlass"),
        dict(dispatcher="dropping"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(capacity_factor=1.25), "capacity_factor=1.25 applies to dispatcher='capacity' only"),
        (dict(dispatcher="capacity"), "dispatcher='capacity' needs a positive capacity_factor"),
        (dict(dispatcher="capacity", capacity_factor=0.0), "dispatcher='capacity' needs a positive capacity_factor"),
        (dict(router="expert_choice"), "router='expert_choice' .* set dispatcher='capacity'"),
        (dict(router="expert_choice", capacity_factor=1.0), "router='expert_choice' .* set dispatcher='capacity'"),
    ],
)
def test_dispatcher_capacity_factor_and_router_must_agree(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_old_config_keys_name_the_new_ones():
    from moeformer.models.config import ModelConfig

    base = dict(name="m", vocab_size=32, dim=8, n_layers=1, n_heads=2, max_seq_len=16)
    with pytest.raises(ValueError, match=r"model.moe.expert_impl was renamed: use model.moe.backend"):
        ModelConfig.from_dict(base | {"moe": {"expert_impl": "loop"}})
    with pytest.raises(ValueError, match="set dispatcher='capacity'"):  # the old way to ask for token dropping
        ModelConfig.from_dict(base | {"moe": {"capacity_factor": 1.25}})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router="expert_choice", dispatcher="capacity", capacity_factor=1.0, router_bias=True),
        dict(router="expert_choice", dispatcher="capacity", capacity_factor=1.0, num_groups=2),
        dict(num_experts=8, top_k=4, num_groups=4, topk_groups=1),
        dict(shared_expert_gate=True),
        dict(aux_loss_coef=-1.0),
    ],
)
def test_bad_layer_config_raises(kwargs):
    with pytest.raises(ValueError):
        MoE(8, MoEConfig(**kwargs))


def test_bad_input_shapes_raise():
    layer = make_moe(dim=8)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))


def test_same_seed_same_routing_and_output():
    x = torch.randn(2, 6, 12)
    a, b = make_moe(seed=3, **CONFIGS["sigmoid_bias"]), make_moe(seed=3, **CONFIGS["sigmoid_bias"])
    (out_a, stats_a), (out_b, stats_b) = a(x), b(x)
    assert torch.equal(out_a, out_b)
    assert torch.equal(stats_a.router_logits, stats_b.router_logits)
    assert torch.equal(stats_a.tokens_per_expert, stats_b.tokens_per_expert)
    assert not torch.equal(out_a, make_moe(seed=4, **CONFIGS["sigmoid_bias"])(x)[0])


def test_token_mask_excludes_padding():
    layer = make_moe(num_experts=4, top_k=2)
    x = torch.randn(2, 6, 12)
    mask = padded_mask(2, 6)  # 9 real tokens
    out, stats = layer(x, mask)
    assert stats.tokens_per_expert.sum().item() == 9 * 2
    real = x[mask].view(1, 9, 12)
    out_real, stats_real = layer(real)
    assert torch.equal(stats.tokens_per_expert, stats_real.tokens_per_expert)
    torch.testing.assert_close(out[mask], out_real.view(9, 12), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.losses["load_balance"], stats_real.losses["load_balance"])
    torch.testing.assert_close(stats.losses["z_loss"], stats_real.losses["z_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gemm_bf16_matches_loop_on_cuda():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, ffn_dim=96, router="sigmoid", num_shared_experts=1)
    fast = MoE(64, cfg).cuda().bfloat16()
    loop = copy.deepcopy(fast)
    loop.experts.backend = "loop"
    x = torch.randn(3, 37, 64, device="cuda", dtype=torch.bfloat16)  # 222 slots: ragged, unaligned groups
    mask = torch.ones(3, 37, dtype=torch.bool, device="cuda")
    mask[2, 20:] = False
    grouped_possible = torch.cuda.get_device_capability() >= (9, 0) and hasattr(torch, "_grouped_mm")
    assert fast.experts.use_grouped_mm(x) == grouped_possible
    xs = [x.clone().requires_grad_() for _ in range(2)]
    target = torch.randn_like(x)
    outs = []
    for layer, xi in zip((fast, loop), xs, strict=True):
        out, stats = layer(xi, mask)
        ((out.float() * target).sum() + stats.aux_loss).backward()
        outs.append(out.float())
    scale = outs[1].abs().max().item()
    assert (outs[0] - outs[1]).abs().max().item() <= 2e-2 * scale
    # bf16 autocast over fp32 weights also takes the grouped GEMM
    fp32 = copy.deepcopy(loop).float()
    fp32.experts.backend = "auto"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_autocast, _ = fp32(x.float(), mask)
    assert (out_autocast.float() - outs[1]).abs().max().item() <= 2e-2 * scale
    for a, b in [(xs[0].grad, xs[1].grad)] + [
        (p.grad, q.grad) for p, q in zip(fast.parameters(), loop.parameters(), strict=True)
    ]:
        assert torch.isfinite(a).all()
        assert (a.float() - b.float()).abs().max().item() <= 3e-2 * b.float().abs().max().item() + 1e-6


def test_expert_bias_stays_fp32_when_the_layer_is_cast_to_bf16():
    layer = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=8, router="sigmoid", router_bias=True))
    layer.router.expert_bias += 1e-4  # below bf16's resolution around 1.0 once updates accumulate on top of it
    layer = layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16
    assert layer.router.expert_bias.dtype == torch.float32
    assert torch.equal(layer.router.expert_bias, torch.full((4,), 1e-4))
