"""Linear attention: chunked / recurrent / fla forms against the quadratic reference, decoding, packing, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from moeformer.layers.linear_attention import (
    LinearAttention,
    build_feature_map,
    decayed_linear_attn_chunked,
    decayed_linear_attn_naive,
    decayed_linear_attn_recurrent,
    delta_rule_chunked,
    delta_rule_naive,
    delta_rule_recurrent,
    fla_available,
    fla_chunk_bthd,
    fla_delta_rule_bthd,
    fla_gated_backward_ok,
    gla_log_decay,
    retnet_log_decay,
)


def _bhtd(fn):
    """A (B, T, H, D) fla form in the (B, H, T, D) layout of the PyTorch forms (gates (B, H, T) -> (B, T, H))."""

    def wrapped(q, k, v, gate=None, **kwargs):
        gate = gate.transpose(1, 2) if gate is not None and gate.dim() == 3 else gate
        o, final = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate, **kwargs)
        return o.transpose(1, 2), final

    return wrapped


decayed_linear_attn_fla, delta_rule_fla = _bhtd(fla_chunk_bthd), _bhtd(fla_delta_rule_bthd)


def linear_attn_naive(q, k, v, **kwargs):  # vanilla linear attention: the decayed forms without decay
    return decayed_linear_attn_naive(q, k, v, None, **kwargs)


def linear_attn_chunked(q, k, v, **kwargs):
    return decayed_linear_attn_chunked(q, k, v, None, **kwargs)


def linear_attn_recurrent(q, k, v, **kwargs):
    return decayed_linear_attn_recurrent(q, k, v, None, **kwargs)


FORMS = {"chunked": decayed_linear_attn_chunked, "recurrent": decayed_linear_attn_recurrent}
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla-core")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def make_inputs(batch, heads, seq_len, d_k, d_v, decay, normalize, *, device="cpu", dtype=torch.float32, gen=None):
    """Fresh random q, k, v, log decay g and an initial state; positive q, k when normalising."""
    q, k = (torch.randn(batch, heads, seq_len, d_k, generator=gen) for _ in range(2))
    if normalize:
        q, k = q.sigmoid(), k.sigmoid()
    v = torch.randn(batch, heads, seq_len, d_v, generator=gen)
    g = {
        "none": None,
        "retnet": retnet_log_decay(heads),
        "gla": gla_log_decay(torch.randn(batch, heads, seq_len, generator=gen), 4.0),
    }[decay]
    state = torch.randn(batch, heads, d_k, d_v + int(normalize), generator=gen).abs()
    to = lambda x: None if x is None else x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return to(q), to(k), to(v), None if g is None else g.to(device), state.to(device)


def random_documents(batch, seq_len, gen):
    """(B, T) document ids with a few random boundaries per row (ids need not be consecutive)."""
    starts = torch.rand(batch, seq_len, generator=gen) < 0.15
    starts[:, 0] = False
    return starts.long().cumsum(1) * 3 + 7


def loop_reference(q, k, v, g, scale, normalize, eps, state, documents):
    """Literal double loop over (t, s): o_t = scale * sum_s prod_{s<j<=t} exp(g_j) q_t.k_s v_s, within a document."""
    batch, heads, seq_len, _ = q.shape
    g = (
        torch.zeros(batch, heads, seq_len)
        if g is None
        else (g[None, :, None].expand(batch, heads, seq_len) if g.dim() == 1 else g)
    )
    out = torch.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            for t in range(seq_len):
                num, den = torch.zeros(v.shape[-1]), torch.zeros(())
                for s in range(t + 1):
                    if documents[b, s] != documents[b, t]:
                        continue
                    w = torch.exp(g[b, h, s + 1 : t + 1].sum()) * scale * (q[b, h, t] @ k[b, h, s])
                    num, den = num + w * v[b, h, s], den + w
                if (documents[b, : t + 1] == documents[b, 0]).all():
                    carry = torch.exp(g[b, h, : t + 1].sum()) * scale * q[b, h, t] @ state[b, h]
                    num, den = num + carry[: v.shape[-1]], den + (carry[-1] if normalize else 0)
                out[b, h, t] = num / (den + eps) if normalize else num
    return out


@pytest.mark.parametrize("decay", ["none", "retnet", "gla"])
@pytest.mark.parametrize("normalize", [False, True])
def test_naive_reference_matches_literal_loop(decay, normalize):
    gen = torch.Generator().manual_seed(11)
    q, k, v, g, state = make_inputs(2, 2, 9, 3, 4, decay, normalize, gen=gen)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [4] * 9])
    o, _ = decayed_linear_attn_naive(
        q, k, v, g, scale=0.7, normalize=normalize, eps=1e-3, initial_state=state, document_ids=documents
    )
    expected = loop_reference(q, k, v, g, 0.7, normalize, 1e-3, state, documents)
    assert rel_err(o, expected) < 1e-5


@pytest.mark.parametrize("decay", ["none", "retnet", "gla"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 37, 8, 8), (1, 2, 64, 16, 4), (3, 1, 5, 4, 6)])
def test_chunked_and_recurrent_match_naive(decay, normalize, shape):
    gen = torch.Generator().manual_seed(100 * len(decay) + 10 * normalize + shape[2])
    q, k, v, g, state = make_inputs(*shape, decay, normalize, gen=gen)
    for initial_state in (None, state):
        kwargs = dict(normalize=normalize, initial_state=initial_state, output_final_state=True)
        ref, ref_state = decayed_linear_attn_naive(q, k, v, g, **kwargs)
        for chunk_size in (1, 7, 16, 64):  # 7 divides none of the lengths
            o, final = decayed_linear_attn_chunked(q, k, v, g, chunk_size=chunk_size, **kwargs)
            assert rel_err(o, ref) < 1e-4, chunk_size
            assert rel_err(final, ref_state) < 1e-4, chunk_size
        o, final = decayed_linear_attn_recurrent(q, k, v, g, **kwargs)
        assert rel_err(o, ref) < 1e-4 and rel_err(final, ref_state) < 1e-4


def test_vanilla_forms_are_the_undecayed_core_and_causal():
    gen = torch.Generator().manual_seed(3)
    q, k, v, _, _ = make_inputs(2, 2, 20, 4, 4, "none", True, gen=gen)
    ref, _ = linear_attn_naive(q, k, v, normalize=True)
    expected = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), 2)  # sum_{s<=t} k_s v_s^T
    num = torch.einsum("bhtk,bhtkv->bhtv", q, expected)
    den = torch.einsum("bhtk,bhtk->bht", q, k.cumsum(2)).unsqueeze(-1)
    assert rel_err(ref, num / (den + 1e-6 * 4**0.5)) < 1e-5  # eps applies to the scaled denominator
    assert rel_err(linear_attn_chunked(q, k, v, normalize=True, chunk_size=6)[0], ref) < 1e-4
    assert rel_err(linear_attn_recurrent(q, k, v, normalize=True)[0], ref) < 1e-4
    v2 = v.clone()
    v2[:, :, 12:] = torch.randn(2, 2, 8, 4, generator=gen)  # future tokens must not change the past
    assert torch.equal(
        linear_attn_chunked(q, k, v2, chunk_size=5)[0][:, :, :12],
        linear_attn_chunked(q, k, v, chunk_size=5)[0][:, :, :12],
    )


def test_strong_decay_long_sequence_is_finite():
    gen = torch.Generator().manual_seed(4)
    q, k, v, _, _ = make_inputs(1, 2, 300, 8, 8, "none", False, gen=gen)
    g = -5.0 * torch.rand(1, 2, 300, generator=gen)  # cumulative log decay reaches about -750
    o, final = decayed_linear_attn_chunked(q, k, v, g, chunk_size=64, output_final_state=True)
    ref, ref_final = decayed_linear_attn_recurrent(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and rel_err(o, ref) < 1e-4 and rel_err(final, ref_final) < 1e-4


@pytest.mark.parametrize("decay", ["none", "retnet", "gla"])
@pytest.mark.parametrize("form", ["naive", "chunked", "recurrent"])
def test_packed_documents_match_separate_runs(decay, form):
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, state = make_inputs(2, 2, 30, 4, 5, decay, True, gen=gen)
    documents = random_documents(2, 30, gen)
    fn = {"naive": decayed_linear_attn_naive, **FORMS}[form]
    extra = {"chunk_size": 8} if form == "chunked" else {}
    o, final = fn(
        q, k, v, g, normalize=True, initial_state=state, output_final_state=True, document_ids=documents, **extra
    )
    for b in range(2):
        bounds = torch.nonzero(torch.diff(documents[b]), as_tuple=True)[0] + 1
        edges = [0, *bounds.tolist(), 30]
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            gb = g if g is None or g.dim() == 1 else g[b : b + 1, :, lo:hi]
            alone, alone_final = decayed_linear_attn_naive(
                q[b : b + 1, :, lo:hi],
                k[b : b + 1, :, lo:hi],
                v[b : b + 1, :, lo:hi],
                gb,
                normalize=True,
                initial_state=state[b : b + 1] if i == 0 else None,
                output_final_state=True,
            )
            assert rel_err(o[b : b + 1, :, lo:hi], alone) < 1e-4
        assert rel_err(final[b : b + 1], alone_final) < 1e-4  # the last document's state


@pytest.mark.parametrize("form", ["naive", "chunked", "recurrent"])
def test_cu_seqlens_equals_document_ids(form):
    gen = torch.Generator().manual_seed(6)
    q, k, v, g, _ = make_inputs(1, 2, 25, 4, 4, "gla", False, gen=gen)
    fn = {"naive": decayed_linear_attn_naive, **FORMS}[form]
    documents = torch.tensor([[0] * 4 + [1] * 13 + [2] * 8])
    a, _ = fn(q, k, v, g, document_ids=documents)
    b, _ = fn(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 17, 25]))
    whole, _ = fn(q, k, v, g)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, whole, atol=1e-3)


@pytest.mark.parametrize("decay", ["none", "retnet", "gla"])
@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_gradients_match_naive(decay, normalize):
    gen = torch.Generator().manual_seed(7)
    inputs = make_inputs(2, 2, 19, 4, 3, decay, normalize, gen=gen)
    documents = random_documents(2, 19, gen)
    cotangent = torch.randn(2, 2, 19, 3, generator=gen)
    state_cotangent = torch.randn(2, 2, 4, 3 + int(normalize), generator=gen)
    grads = {}
    for name, fn, extra in (
        ("naive", decayed_linear_attn_naive, {}),
        ("chunked", decayed_linear_attn_chunked, {"chunk_size": 6}),
    ):
        leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
        q, k, v, g, state = leaves
        o, final = fn(
            q,
            k,
            v,
            g,
            normalize=normalize,
            initial_state=state,
            output_final_state=True,
            document_ids=documents,
            **extra,
        )
        ((o * cotangent).sum() + (final * state_cotangent).sum()).backward()
        grads[name] = [x.grad for x in leaves if x is not None]
    for got, want in zip(grads["chunked"], grads["naive"]):
        assert rel_err(got, want) < 1e-4


def test_bf16_inputs_stay_close_to_fp32():
    gen = torch.Generator().manual_seed(8)
    q, k, v, g, _ = make_inputs(2, 2, 40, 8, 8, "gla", True, gen=gen)
    ref, _ = decayed_linear_attn_naive(q, k, v, g, normalize=True)
    low = [x.bfloat16() for x in (q, k, v)]
    for fn, extra in ((decayed_linear_attn_chunked, {"chunk_size": 16}), (decayed_linear_attn_recurrent, {})):
        o, _ = fn(*low, g, normalize=True, **extra)
        assert o.dtype == torch.bfloat16 and rel_err(o, ref) < 3e-2


def make_delta_inputs(batch, heads, seq_len, d_k, d_v, gen):
    q, k, v = (torch.randn(batch, heads, seq_len, d, generator=gen) for d in (d_k, d_k, d_v))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(batch, heads, seq_len, generator=gen)
    return q, k, v, beta, torch.randn(batch, heads, d_k, d_v, generator=gen)


@pytest.mark.parametrize("shape", [(2, 3, 37, 8, 8), (1, 2, 64, 16, 4), (3, 1, 5, 4, 6)])
@pytest.mark.parametrize("packed", [False, True])
def test_delta_rule_chunked_and_naive_match_recurrent(shape, packed):
    gen = torch.Generator().manual_seed(shape[2] + packed)
    q, k, v, beta, state = make_delta_inputs(*shape, gen)
    documents = random_documents(shape[0], shape[2], gen) if packed else None
    for initial_state in (None, state):
        kwargs = dict(initial_state=initial_state, output_final_state=True, document_ids=documents)
        ref, ref_state = delta_rule_recurrent(q, k, v, beta, **kwargs)
        candidates = [delta_rule_naive(q, k, v, beta, **kwargs)]
        candidates += [delta_rule_chunked(q, k, v, beta, chunk_size=c, **kwargs) for c in (1, 7, 16, 64)]
        for o, final in candidates:
            assert rel_err(o, ref) < 1e-4 and rel_err(final, ref_state) < 1e-4


def test_delta_rule_overwrites_memory():
    keys = torch.linalg.qr(torch.randn(4, 4)).Q.T  # orthonormal keys
    k = torch.stack([keys[0], keys[1], keys[0]]).view(1, 1, 3, 4)  # key 0 is written twice
    v = torch.randn(1, 1, 3, 5)
    o, _ = delta_rule_chunked(k, k, v, torch.ones(1, 1, 3), scale=1.0, chunk_size=2)
    assert torch.allclose(o[0, 0], v[0, 0], atol=1e-5)  # beta = 1: reading a key returns its latest value
    o, _ = linear_attn_chunked(k, k, v, scale=1.0)
    assert torch.allclose(o[0, 0, 2], v[0, 0, 0] + v[0, 0, 2], atol=1e-5)  # plain linear attention only adds


def test_delta_rule_gradients_match_recurrent():
    gen = torch.Generator().manual_seed(12)
    inputs = make_delta_inputs(2, 2, 19, 4, 3, gen)
    documents = random_documents(2, 19, gen)
    cotangent = torch.randn(2, 2, 19, 3, generator=gen)
    grads = {}
    for name, fn, extra in (
        ("recurrent", delta_rule_recurrent, {}),
        ("chunked", delta_rule_chunked, {"chunk_size": 6}),
    ):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, final = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, document_ids=documents, **extra)
        ((o * cotangent).sum() + final.square().sum()).backward()
        grads[name] = [x.grad for x in leaves]
    for got, want in zip(grads["chunked"], grads["recurrent"]):
        assert rel_err(got, want) < 1e-4


def test_feature_maps():
    x = torch.randn(3, 2, 5, 8)
    assert torch.allclose(build_feature_map("elu", 8)(x), torch.nn.functional.elu(x) + 1)
    assert (build_feature_map("elu", 8)(x) > 0).all() and (build_feature_map("relu", 8)(x) >= 0).all()
    assert torch.equal(build_feature_map("identity", 8)(x), x)
    performer = build_feature_map("performer", 8, num_features=12, seed=1)
    assert performer(x).shape == (3, 2, 5, 12) and (performer(x) > 0).all()
    assert "projection" in performer.state_dict()
    assert torch.equal(performer.projection, build_feature_map("performer", 8, 12, seed=1).projection)
    assert not torch.equal(performer.projection, build_feature_map("performer", 8, 12, seed=2).projection)
    block = performer.projection[:8] / performer.projection[:8].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(8), atol=1e-5)  # orthogonal random features
    saved = performer.projection.clone()
    performer.projection.zero_()
    performer.reset_parameters()
    assert torch.equal(performer.projection, saved)


def test_performer_features_estimate_softmax_kernel():
    d = 4
    performer = build_feature_map("performer", d, num_features=8192, seed=0)
    q, k = 0.5 * torch.randn(6, d), 0.5 * torch.randn(6, d)
    estimate = performer(q) @ performer(k).T
    exact = torch.exp(q @ k.T / math.sqrt(d))
    assert ((estimate - exact).abs() / exact).max() < 0.1


LAYER_CASES = [
    ("vanilla", "elu", False),
    ("vanilla", "relu", True),
    ("vanilla", "performer", True),
    ("vanilla", "identity", False),
    ("retnet", None, False),
    ("gla", None, False),
    ("gla", "elu", True),
    ("deltanet", None, False),
]


def make_layer(kind, feature_map, normalize, **kwargs):
    torch.manual_seed(0)
    return LinearAttention(32, 4, 8, kind=kind, feature_map=feature_map, normalize=normalize, chunk_size=5, **kwargs)


@pytest.mark.parametrize("kind,feature_map,normalize", LAYER_CASES)
def test_layer_decoding_matches_parallel_forward(kind, feature_map, normalize):
    layer = make_layer(kind, feature_map, normalize)
    x = torch.randn(2, 17, 32)
    parallel, _ = layer(x)
    naive, _ = layer(x, backend="naive")
    assert rel_err(parallel, naive) < 1e-4
    prefix, state = layer(x[:, :6], state=layer.init_state(2))  # prefill, then one token at a time
    steps = [prefix]
    for t in range(6, 17):
        y, state = layer(x[:, t : t + 1], state=state)
        steps.append(y)
    assert state.shape == (2, 4, layer.feature_map.out_dim, 8 + int(normalize)) and state.dtype == torch.float32
    assert rel_err(torch.cat(steps, 1), parallel) < 1e-4


@pytest.mark.parametrize("kind", ["vanilla", "retnet", "gla", "deltanet"])
@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
def test_layer_packed_rows_match_each_document_alone(kind, backend):
    layer = make_layer(kind, None, False, backend=backend)
    docs = [torch.randn(1, n, 32) for n in (7, 3, 12)]
    packed, _ = layer(torch.cat(docs, 1), document_ids=torch.tensor([[0] * 7 + [1] * 3 + [2] * 12]))
    alone = torch.cat([layer(d)[0] for d in docs], 1)
    assert rel_err(packed, alone) < 1e-4


@pytest.mark.parametrize("kind,feature_map,normalize", [("gla", "elu", True), ("deltanet", None, False)])
def test_layer_gradients_chunked_match_naive(kind, feature_map, normalize):
    layer = make_layer(kind, feature_map, normalize)
    x = torch.randn(2, 13, 32)
    documents = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    grads = {}
    for backend in ("naive", "chunked"):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        layer(xi, document_ids=documents, backend=backend)[0].square().sum().backward()
        grads[backend] = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
    for got, want in zip(grads["chunked"], grads["naive"]):
        assert rel_err(got, want) < 1e-4


def test_layer_bf16_close_to_fp32():
    layer = make_layer("retnet", None, False)
    x = torch.randn(2, 24, 32)
    ref, _ = layer(x)
    low, _ = layer.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16 and rel_err(low, ref) < 5e-2


def test_layer_structure_and_auto_backend():
    layer = make_layer("gla", None, False)
    assert layer.decay_proj.weight.shape == (4, 32) and layer.q_proj.weight.shape == (32, 32)
    assert make_layer("retnet", None, False).decay_proj is None
    assert make_layer("deltanet", None, False).beta_proj.weight.shape == (4, 32)
    assert layer.resolve_backend("auto", torch.randn(1, 1, 32)) == "recurrent"
    assert layer.resolve_backend("auto", torch.randn(1, 9, 32)) == "chunked"
    assert layer(torch.randn(1, 4, 32))[1] is None  # no state requested
    assert torch.allclose(retnet_log_decay(3).exp(), torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "mamba"},
        {"backend": "fast"},
        {"feature_map": "cosine"},
        {"feature_map": "identity", "normalize": True},
        {"chunk_size": 0},
        {"feature_map": "elu", "num_features": 16},
        {"kind": "deltanet", "normalize": True},
    ],
)
def test_layer_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LinearAttention(32, 4, 8, **kwargs)


def test_bad_inputs_raise():
    q, k, v, g, state = make_inputs(1, 2, 6, 4, 4, "gla", False)
    bad_calls = [
        lambda: decayed_linear_attn_chunked(q, k[..., :3], v),
        lambda: decayed_linear_attn_chunked(q, k, v[:, :, :5]),
        lambda: decayed_linear_attn_chunked(q, k, v, g[..., :5]),
        lambda: decayed_linear_attn_chunked(q, k, v, chunk_size=0),
        lambda: decayed_linear_attn_recurrent(q, k, v, initial_state=state[..., :3]),
        lambda: decayed_linear_attn_naive(q, k, v, normalize=True, initial_state=state),  # misses the sum column
        lambda: decayed_linear_attn_chunked(q, k, v, document_ids=torch.zeros(1, 5, dtype=torch.long)),
        lambda: decayed_linear_attn_chunked(q, k, v, cu_seqlens=torch.tensor([0, 3, 5])),
        lambda: decayed_linear_attn_chunked(
            q, k, v, cu_seqlens=torch.tensor([0, 6]), document_ids=torch.zeros(1, 6, dtype=torch.long)
        ),
        lambda: decayed_linear_attn_chunked(
            q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 6])
        ),
        lambda: decayed_linear_attn_naive(q[:, :, :0], k[:, :, :0], v[:, :, :0]),
        lambda: make_layer("vanilla", None, False)(torch.randn(32)),
        lambda: delta_rule_chunked(q, k, v, torch.rand(1, 2, 5)),
        lambda: make_layer("deltanet", None, False)(torch.randn(1, 4, 32), state=torch.zeros(1, 4, 8, 9)),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    if not fla_available():
        with pytest.raises(RuntimeError, match="fla-core"):
            make_layer("vanilla", None, False)(torch.randn(1, 4, 32), backend="fla")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["none", "retnet", "gla"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_matches_naive(decay, normalize, packed):
    gen = torch.Generator().manual_seed(9)
    q, k, v, g, state = make_inputs(2, 4, 300, 64, 64, decay, normalize, gen=gen)
    documents = random_documents(2, 300, gen).cuda() if packed else None
    backward = decay != "gla" or fla_gated_backward_ok()
    # fla takes RetNet's fixed decay as g_gamma and gives it no gradient
    leaves = [None if x is None else x.cuda().requires_grad_(backward and x.dim() > 1) for x in (q, k, v, g, state)]
    results = {}
    for name, fn in (("naive", decayed_linear_attn_naive), ("fla", decayed_linear_attn_fla)):
        for x in leaves:
            if x is not None:
                x.grad = None
        o, final = fn(
            *leaves[:4], normalize=normalize, initial_state=leaves[4], output_final_state=True, document_ids=documents
        )
        if backward:
            (o.square().sum() + final.sum()).backward()
        results[name] = [o.detach(), final.detach()] + [x.grad for x in leaves if x is not None and x.requires_grad]
    assert len(results["fla"]) == (2 + 3 + (decay == "gla") + 1 if backward else 2)
    for got, want in zip(results["fla"], results["naive"]):
        assert rel_err(got, want) < 1e-2  # fla's kernels use tf32 dots in fp32 (errors seen: up to 3e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["vanilla", "retnet", "gla", "deltanet"])
def test_layer_auto_backend_uses_fla_on_cuda_bf16(kind):
    layer = make_layer(kind, None, False).cuda().bfloat16()
    x = torch.randn(2, 256, 32, device="cuda", dtype=torch.bfloat16)
    documents = torch.tensor([[0] * 100 + [1] * 156, [0] * 256], device="cuda")
    with torch.no_grad():  # fla's gated backward may be unavailable (see fla_gated_backward_ok); inference uses fla
        assert layer.resolve_backend("auto", x) == "fla"
        fast, fast_state = layer(x, state=layer.init_state(2, device="cuda"), document_ids=documents)
    ref, ref_state = layer(x, state=layer.init_state(2, device="cuda"), document_ids=documents, backend="naive")
    assert rel_err(fast, ref) < 3e-2 and rel_err(fast_state, ref_state) < 3e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_fla_delta_rule_matches_recurrent(packed):
    gen = torch.Generator().manual_seed(13)
    inputs = [x.cuda() for x in make_delta_inputs(2, 4, 200, 64, 64, gen)]
    documents = random_documents(2, 200, gen).cuda() if packed else None
    kwargs = dict(initial_state=inputs[4], output_final_state=True, document_ids=documents)
    ref, ref_state = delta_rule_recurrent(*inputs[:4], **kwargs)
    o, final = delta_rule_fla(*(x.bfloat16() for x in inputs[:4]), **kwargs)
    assert o.dtype == torch.bfloat16 and rel_err(o, ref) < 3e-2 and rel_err(final, ref_state) < 3e-2
