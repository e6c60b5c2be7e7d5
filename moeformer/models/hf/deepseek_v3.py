"""DeepSeek-V3 and DeepSeek-V2: multi-head latent attention, first-k dense layers, shared experts, routed scaling,
group-limited top-k; V3 routes with sigmoid scores and a selection bias, V2 with softmax.

HF stores the rope rows of q and of the shared rope key interleaved (pairs (x0, x1), ...); V2 always, V3 when
`rope_interleave` (the default). We permute those rows on load to the rotate-half layout and back on export.
"""

from __future__ import annotations

import re
from typing import Any

from moeformer.layers.moe.config import MoEConfig
from moeformer.models.config import MLAConfig, ModelConfig
from moeformer.models.hf.common import (
    Family,
    Layout,
    TensorMap,
    base_config,
    base_to_hf,
    copy,
    llama_like_maps,
    required,
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    v3 = hf.get("model_type") == "deepseek_v3"
    if hf.get("attention_bias"):
        raise ValueError("DeepSeek attention_bias=True is not supported")
    top_k_method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    grouped = top_k_method in ("noaux_tc", "group_limited_greedy")
    moe = MoEConfig(
        num_experts=required(hf, "n_routed_experts", "num_local_experts", "num_experts"),
        top_k=required(hf, "num_experts_per_tok"),
        ffn_dim=required(hf, "moe_intermediate_size"),
        router="sigmoid" if v3 else "softmax",
        # transformers' DeepSeek-V2 never renormalises the top-k weights, whatever norm_topk_prob says
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if v3 else False,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5 if v3 else 1.0)),
        router_bias=v3,
        num_groups=(hf.get("n_group") or 1) if grouped else 1,
        topk_groups=(hf.get("topk_group") or 1) if grouped else 1,
        aux_loss_coef=0.0 if v3 else hf.get("aux_loss_alpha", 0.001),
        num_shared_experts=hf.get("n_shared_experts") or 0,
    )
    mla = MLAConfig(
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=required(hf, "kv_lora_rank"),
        qk_nope_head_dim=required(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=required(hf, "qk_rope_head_dim"),
        v_head_dim=required(hf, "v_head_dim"),
    )
    base = base_config(hf)
    base.update(n_kv_heads=base["n_heads"], head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    return ModelConfig(
        **base, attention_types=["mla"], mla=mla, moe=moe, first_k_dense=hf.get("first_k_dense_replace") or 0
    )


def rope_interleaved(config: ModelConfig) -> bool:
    hf = config.extra.get("hf_config") or {}
    return hf.get("model_type") == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    moe, mla = config.moe, config.mla
    if mla is None or config.attention_types != ["mla"] or moe is None:
        raise ValueError("HF DeepSeek needs MLA attention in every layer and a MoE config")
    if config.moe_layers is not None or config.moe_every != 1 or config.mlp_bias:
        raise ValueError("HF DeepSeek places MoE in every layer from first_k_dense on, without MLP bias")
    v3 = moe.router == "sigmoid"
    if v3 != moe.router_bias or (not v3 and moe.norm_topk_prob):
        raise ValueError(
            "HF DeepSeek-V3 is sigmoid routing with a selection bias; V2 softmax without bias or "
            "renormalised top-k weights"
        )
    if moe.shared_expert_gate or (moe.num_shared_experts and moe.shared_hidden != moe.ffn_dim * moe.num_shared_experts):
        raise ValueError("HF DeepSeek shared experts are ungated and n_shared_experts * moe_intermediate_size wide")
    model_type = "deepseek_v3" if v3 else "deepseek_v2"
    grouped = moe.num_groups > 1
    return base_to_hf(
        config,
        FAMILY,
        model_type=model_type,
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        num_key_value_heads=config.n_heads,
        head_dim=mla.qk_rope_head_dim,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.ffn_dim,
        n_shared_experts=moe.num_shared_experts,
        routed_scaling_factor=moe.routed_scaling_factor,
        norm_topk_prob=moe.norm_topk_prob,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
        topk_method="noaux_tc" if v3 else ("group_limited_greedy" if grouped else "greedy"),
        scoring_func="sigmoid" if v3 else "softmax",
        first_k_dense_replace=config.first_k_dense,
        moe_layer_freq=1,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        attention_bias=False,
        **({"rope_interleave": rope_interleaved(config)} if v3 else {}),
    )


def mla_maps(config: ModelConfig, i: int) -> list[TensorMap]:
    mla, H = config.mla, config.n_heads
    ours, hf = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    interleaved = rope_interleaved(config)

    def rope_rows(our_name: str, hf_name: str, groups: int, nope: int) -> TensorMap:
        if not interleaved:
            return copy(f"{ours}.{our_name}.weight", f"{hf}.{hf_name}.weight")
        layout = Layout((f"{hf}.{hf_name}.weight",), "rope_rows", (groups, nope, mla.qk_rope_head_dim))
        return TensorMap(f"{ours}.{our_name}.weight", (layout,))

    if mla.q_lora_rank is None:
        maps = [rope_rows("q_proj", "q_proj", H, mla.qk_nope_head_dim)]
    else:
        maps = [
            copy(f"{ours}.q_a_proj.weight", f"{hf}.q_a_proj.weight"),
            copy(f"{ours}.q_a_norm.weight", f"{hf}.q_a_layernorm.weight"),
            rope_rows("q_b_proj", "q_b_proj", H, mla.qk_nope_head_dim),
        ]
    return maps + [
        rope_rows("kv_a_proj", "kv_a_proj_with_mqa", 1, mla.kv_lora_rank),
        copy(f"{ours}.kv_a_norm.weight", f"{hf}.kv_a_layernorm.weight"),
        copy(f"{ours}.kv_b_proj.weight", f"{hf}.kv_b_proj.weight"),
        copy(f"{ours}.o_proj.weight", f"{hf}.o_proj.weight"),
    ]


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    return llama_like_maps(config, dict(shared="shared_experts"), attention=mla_maps)


def ignore(name: str, config: ModelConfig) -> bool:
    """DeepSeek-V3 checkpoints carry the multi-token-prediction layer(s) after the last decoder layer."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= config.n_layers


FAMILY = Family(
    ("deepseek_v3", "deepseek_v2"), "DeepseekV3ForCausalLM", config_from_hf, config_to_hf, tensor_maps, ignore
)
