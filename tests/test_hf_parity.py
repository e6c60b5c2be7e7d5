"""Hugging Face interop: tiny random transformers models of every family load with logit, aux-loss and greedy
generation parity, and export back to transformers with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeformer.models.checkpoint import save_pretrained  # noqa: E402
from moeformer.models.model import from_pretrained  # noqa: E402
from tests.hf_aux_loss import hf_load_balancing_loss  # noqa: E402

TOL = 1e-4
BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "rope_theta": 10000.0,
}
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24)
MLA = dict(
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    num_key_value_heads=4,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    num_experts_per_tok=2,
)

# (id, model_type, config overrides, checkpoint options). "fused": transformers' 3-D expert layout on disk;
# "shard": a small max_shard_size so the checkpoint is split.
CASES = [
    ("llama-gqa", "llama", {}, {}),
    (
        "llama-mqa-odd-tied-llama3",
        "llama",
        dict(
            hidden_size=24,
            num_attention_heads=3,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
        ),
        {"shard": True},
    ),
    (
        "llama-headdim-mlpbias-linear",
        "llama",
        dict(head_dim=12, mlp_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        {},
    ),
    ("mixtral-gqa", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2), {}),
    (
        "mixtral-odd-tied-fused-yarn",
        "mixtral",
        dict(
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=5,
            head_dim=8,
            num_local_experts=5,
            num_experts_per_tok=3,
            tie_word_embeddings=True,
            rope_parameters=YARN,
        ),
        {"fused": True, "shard": True},
    ),
    ("qwen2-moe", "qwen2_moe", dict(**MOE, shared_expert_intermediate_size=20), {"shard": True}),
    (
        "qwen2-moe-sparse-step-norm",
        "qwen2_moe",
        dict(
            **MOE,
            shared_expert_intermediate_size=28,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
        {"fused": True},
    ),
    ("qwen3-moe", "qwen3_moe", dict(**MOE, head_dim=16, norm_topk_prob=True), {}),
    (
        "qwen3-moe-mlp-only-tied-odd",
        "qwen3_moe",
        dict(
            **MOE,
            head_dim=6,
            num_attention_heads=3,
            num_key_value_heads=1,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
        {"fused": True},
    ),
    ("olmoe", "olmoe", dict(num_experts=4, num_experts_per_tok=2), {"shard": True}),
    (
        "olmoe-mha-fused",
        "olmoe",
        dict(num_experts=6, num_experts_per_tok=3, num_key_value_heads=4, norm_topk_prob=True),
        {"fused": True},
    ),
    (
        "deepseek-v3-yarn",
        "deepseek_v3",
        dict(**MLA, n_routed_experts=8, q_lora_rank=16, n_group=4, topk_group=2, rope_parameters=YARN),
        {"shard": True},
    ),
    (
        "deepseek-v3-no-interleave-tied-wide-v",
        "deepseek_v3",
        dict(
            **{**MLA, "v_head_dim": 14},
            n_routed_experts=6,
            q_lora_rank=None,
            n_group=1,
            topk_group=1,
            rope_interleave=False,
            tie_word_embeddings=True,
        ),
        {"fused": True},
    ),
    (
        "deepseek-v2-greedy",
        "deepseek_v2",
        dict(**MLA, n_routed_experts=6, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5),
        {},
    ),
    (
        "deepseek-v2-group-limited",
        "deepseek_v2",
        dict(
            **MLA,
            n_routed_experts=8,
            q_lora_rank=10,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            rope_parameters=YARN,
        ),
        {"fused": True},
    ),
]


def build_hf(model_type: str, overrides: dict) -> torch.nn.Module:
    """A random transformers model whose norms, biases and router biases are all perturbed away from their
    initial constants, so that swapped or skipped tensors change the logits."""
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def save_hf(model, path, fused: bool = False, shard: bool = False) -> None:
    model.save_pretrained(path, save_original_format=not fused, max_shard_size="20KB" if shard else "50GB")


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def pair(request, tmp_path):
    """(transformers model, our model loaded from its checkpoint, checkpoint dir)."""
    _, model_type, overrides, options = request.param
    hf = build_hf(model_type, overrides)
    save_hf(hf, tmp_path / "hf", **options)
    if options.get("shard"):
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = from_pretrained(tmp_path / "hf")
    return hf, ours, tmp_path


def input_ids(vocab: int, batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_logits_aux_loss_and_generation_match_transformers(pair):
    hf, ours, _ = pair
    ids = input_ids(hf.config.vocab_size)
    moe = ours.config.moe is not None and not hf.config.model_type.startswith("deepseek")
    ref = hf(ids, output_router_logits=True) if moe else hf(ids)
    out = ours(ids)
    assert ours.training is False and out.logits.dtype == torch.float32
    assert max_err(out.logits, ref.logits) <= TOL
    if moe:  # transformers reports its load-balancing loss over all layers pooled
        aux = hf_load_balancing_loss([s.router_logits for s in out.moe_stats], ours.config.moe.top_k)
        assert abs(aux.item() - ref.aux_loss.item()) <= 1e-5
    prompt = ids[:, :5]
    ref_tokens = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    tokens = ours.generate(prompt, 16, temperature=0.0)
    assert torch.equal(tokens, ref_tokens)


@torch.no_grad()
def test_export_reloads_in_transformers_with_same_logits(pair):
    hf, ours, tmp_path = pair
    export = tmp_path / "export"
    save_pretrained(ours, export, max_shard_size="16KB")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.config.model_type == hf.config.model_type
    ids = input_ids(hf.config.vocab_size)
    assert max_err(reloaded(ids).logits, ours(ids).logits) <= TOL
    assert max_err(from_pretrained(export)(ids).logits, hf(ids).logits) <= TOL  # and back into moeformer


def test_bf16_load_is_close(tmp_path):
    hf = build_hf("qwen2_moe", dict(**MOE, shared_expert_intermediate_size=20))
    save_hf(hf, tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    ids = input_ids(hf.config.vocab_size)
    with torch.no_grad():
        err = max_err(ours(ids).logits, hf(ids).logits)
    assert 0 < err < 0.1


def test_config_json_uses_family_names(tmp_path):
    hf = build_hf("deepseek_v3", dict(**MLA, n_routed_experts=8, q_lora_rank=16, n_group=4, topk_group=2))
    save_hf(hf, tmp_path / "in")
    save_pretrained(from_pretrained(tmp_path / "in"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "deepseek_v3" and written["architectures"] == ["DeepseekV3ForCausalLM"]
    assert written["n_routed_experts"] == 8 and written["n_group"] == 4 and written["first_k_dense_replace"] == 1
    assert written["dtype"] == "float32"
