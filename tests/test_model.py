"""CausalLM: configs and zoo, losses, padding, KV cache, generation, training signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moeformer
from moeformer import ModelConfig, build_model, count_params
from moeformer.models.generation import sample_next


def tiny(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=97,
        dim=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=64,
        attn_backend="eager",
        moe={"num_experts": 4, "top_k": 2, "ffn_dim": 32, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
    )
    base.update(overrides)
    return ModelConfig(**base)


# ---- configs and the zoo ------------------------------------------------------------------


@pytest.mark.parametrize("name", moeformer.list_models())
def test_every_zoo_config_loads_and_counts(name):
    config = ModelConfig.from_name(name)
    assert config.name == name
    total, active = count_params(config)
    assert 0 < active <= total
    if config.moe is None:
        assert active == total


def test_mixtral_param_count_matches_published():
    total, active = count_params(ModelConfig.from_name("mixtral-8x7b"))
    assert abs(total / 46.7e9 - 1) < 0.01, total
    assert abs(active / 12.9e9 - 1) < 0.01, active


def test_small_moe_sizes():
    moe, dense = count_params(ModelConfig.from_name("small-moe")), count_params(ModelConfig.from_name("small-dense"))
    assert 90e6 < moe.total < 115e6
    router = 8 * 8 * 512  # n_layers * num_experts * dim
    assert moe.active == dense.total + router  # the dense twin has the MoE's active parameters but the routers


def test_unknown_zoo_name_lists_known_models():
    with pytest.raises(KeyError, match="tiny-moe"):
        ModelConfig.from_name("no-such-model")


def test_bad_config_keys_and_values():
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="capacty_factor"):
        ModelConfig.from_dict({"moe": {"capacty_factor": 1.0}})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        tiny().replace(n_layerz=2)


def test_yaml_round_trip(tmp_path):
    config = tiny(rope_scaling={"type": "linear", "factor": 2.0}, tie_embeddings=True)
    config.save(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == config
    config.save(tmp_path / "c.json")
    assert ModelConfig.from_dict(__import__("json").loads((tmp_path / "c.json").read_text())) == config


def test_moe_placement():
    c = tiny(n_layers=6, first_k_dense=1, moe_every=2)
    assert [c.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    c = tiny(n_layers=4, moe_layers=[0, 3])
    assert [c.is_moe_layer(i) for i in range(4)] == [True, False, False, True]
    model = build_model(c)
    assert [b.is_moe for b in model.layers] == [True, False, False, True]
    assert not any(b.is_moe for b in build_model(tiny(moe=None)).layers)


def test_tied_embeddings_share_storage():
    model = build_model(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.tok_embeddings.weight
    untied = count_params(tiny()).total - count_params(tiny(tie_embeddings=True)).total
    assert untied == 97 * 32


# ---- forward and loss ----------------------------------------------------------------------


def test_loss_is_next_token_ce_plus_aux():
    torch.manual_seed(0)
    model = build_model(tiny())
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ref, rtol=1e-6, atol=1e-6)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, ref + out.aux_loss)
    assert len(out.moe_stats) == 3


def test_loss_without_logits_equals_loss_with_logits():
    torch.manual_seed(2)
    model = build_model(tiny(loss_chunk_size=5))
    ids = torch.randint(0, 97, (2, 12))
    a = model(ids, labels=ids)
    b = model(ids, labels=ids, return_logits=False)  # the fused linear cross-entropy
    assert b.logits is None
    torch.testing.assert_close(a.loss, b.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    for ga, gb in zip(torch.autograd.grad(a.loss, params), torch.autograd.grad(b.loss, params)):
        torch.testing.assert_close(ga, gb)


def test_document_ids_mask_cross_document_targets():
    torch.manual_seed(3)
    model = build_model(tiny(moe=None))
    ids = torch.randint(0, 97, (1, 8))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    out = model(ids, labels=ids, document_ids=docs)
    logits = out.logits[0]
    targets = torch.tensor([ids[0, 1], ids[0, 2], -100, ids[0, 4], ids[0, 5], ids[0, 6], ids[0, 7], -100])
    torch.testing.assert_close(out.ce_loss, F.cross_entropy(logits, targets, ignore_index=-100))


def test_left_padding_gives_the_unpadded_logits():
    torch.manual_seed(4)
    model = build_model(tiny()).eval()
    short = torch.randint(0, 97, (1, 5))
    long = torch.randint(0, 97, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    padded = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(padded[0, 3:], model(short).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], model(long).logits[0], rtol=1e-5, atol=1e-5)


def decode_stepwise(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of `ids` from a cached prefill of `prefill` tokens, then one token per call."""
    cache = model.new_cache(ids.shape[0], 16)
    parts = [model(ids[:, :prefill], cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(parts, 1)


def test_incremental_decoding_with_cache_equals_full_forward():
    torch.manual_seed(5)
    model = build_model(tiny()).eval()
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids).logits
    torch.testing.assert_close(decode_stepwise(model, ids, prefill=4), full, rtol=1e-5, atol=1e-5)


def test_same_seed_same_model_and_outputs():
    ids = torch.randint(0, 97, (2, 7))
    torch.manual_seed(6)
    a = build_model(tiny())
    torch.manual_seed(6)
    b = build_model(tiny())
    oa, ob = a(ids, labels=ids), b(ids, labels=ids)
    assert torch.equal(oa.logits, ob.logits)
    for sa, sb in zip(oa.moe_stats, ob.moe_stats):
        assert torch.equal(sa.tokens_per_expert, sb.tokens_per_expert)


def test_bad_inputs_raise_clear_errors():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_bf16_model_runs_with_fp32_loss():
    model = build_model(tiny(), dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---- generation ----------------------------------------------------------------------------


def test_greedy_generate_equals_recomputing_the_full_sequence():
    torch.manual_seed(7)
    model = build_model(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=10, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_generate_left_padded_batch_matches_single_prompts():
    torch.manual_seed(8)
    model = build_model(tiny()).eval()
    a, b = torch.randint(0, 97, (1, 3)), torch.randint(0, 97, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    out = model.generate(batch, 6, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 3:], model.generate(a, 6, temperature=0)[0])
    assert torch.equal(out[1], model.generate(b, 6, temperature=0)[0])


def test_generate_stops_rows_at_eos():
    torch.manual_seed(9)
    model = build_model(tiny()).eval()
    prompt = torch.randint(0, 97, (3, 4))
    greedy = model.generate(prompt, 8, temperature=0)
    eos = int(greedy[0, 6])  # the third generated token of row 0
    out = model.generate(prompt, 8, temperature=0, eos=eos)
    row = out[0, 4:].tolist()
    first = row.index(eos)
    assert all(t == eos for t in row[first:])
    assert out[0, : 4 + first].tolist() == greedy[0, : 4 + first].tolist()


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.3, generator=g).item() == 1 for _ in range(20))
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError):
        sample_next(logits, -1.0)


# ---- training signal -----------------------------------------------------------------------


@pytest.mark.parametrize("name,seed,steps", [("tiny-moe", 10, 30), ("tiny-hybrid", 14, 25)])
def test_tiny_zoo_model_learns_a_repeated_batch(name, seed, steps):
    torch.manual_seed(seed)
    config = ModelConfig.from_name(name)
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (4, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_biases()  # aux-loss-free bias step; a no-op without router_bias
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---- hybrid stacks (linear + softmax attention) and packed sequences --------------------------------------------

HYBRIDS = [["gla", "softmax"], ["retnet", "vanilla", "softmax"], ["deltanet", "softmax"]]


@pytest.mark.parametrize("types", HYBRIDS)
def test_hybrid_decoding_with_state_equals_full_forward(types):
    torch.manual_seed(11)
    model = build_model(tiny(attention_types=types, linear_attention={"chunk_size": 4})).eval()
    assert [model.config.attention_type(i) for i in range(3)] == [types[i % len(types)] for i in range(3)]
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids).logits
    torch.testing.assert_close(decode_stepwise(model, ids, prefill=6), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("types", [None, *HYBRIDS])
def test_packed_documents_equal_separate_documents(types):
    torch.manual_seed(12)
    model = build_model(tiny(attention_types=types, linear_attention={"chunk_size": 3})).eval()
    lengths = [5, 3, 6]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    ids = torch.cat(docs, 1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, position_ids=positions, document_ids=document_ids).logits
    alone = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_hybrid_left_padding_and_greedy_generation():
    torch.manual_seed(13)
    model = build_model(tiny(attention_types=["gla", "softmax"])).eval()
    short, long = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    torch.testing.assert_close(
        model(batch, attention_mask=mask).logits[0, 3:], model(short).logits[0], rtol=1e-4, atol=1e-4
    )
    out = model.generate(batch, 5, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 3:], model.generate(short, 5, temperature=0)[0])
    seq = long
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[1], seq[0])


def test_unknown_attention_type_is_an_error():
    with pytest.raises(ValueError, match="attention type"):
        tiny(attention_types=["mamba"])


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs CUDA with the grouped GEMM (compute capability >= 9.0)",
)
@pytest.mark.parametrize("packed", [False, True])  # SDPA, or the FlexAttention kernel over packed documents
def test_gpu_model_compiles_without_graph_breaks_and_matches_eager(packed):
    """The whole MoE model (attention, routing, dispatch, grouped GEMM, Triton kernels, fused LM-head loss) compiles
    with fullgraph=True, i.e. with no graph break, and its loss and gradients match eager in bf16."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(tiny(attn_backend="auto"), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    kwargs = {}
    if packed:
        steps = torch.arange(64, device="cuda")
        kwargs = {
            "position_ids": torch.where(steps >= 20, steps - 20, steps).expand(2, -1),
            "document_ids": (steps >= 20).long().expand(2, -1),
        }
    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels=ids, return_logits=False, **kwargs).loss
        loss.backward()
        results.append((loss.float(), [p.grad.float() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=1e-2)
    # bf16 with another fusion order: small gradients carry relative noise, a wrong or missing one would not match
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        assert (got - want).norm() <= 0.15 * want.norm()
    got, want = torch.cat([g.flatten() for g in compiled_grads]), torch.cat([g.flatten() for g in eager_grads])
    assert (got - want).norm() <= 0.03 * want.norm()
