"""Mixtral: softmax top-k routing over SwiGLU experts named w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from typing import Any

from moeformer.layers.moe.config import MoEConfig
from moeformer.models.config import ModelConfig
from moeformer.models.hf.common import Family, base_config, base_to_hf, llama_like_maps, required

MOE_NAMES = dict(
    hf="model.layers.{i}.block_sparse_moe", fused_hf="model.layers.{i}.mlp", expert_names=("w1", "w3", "w2")
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    moe = MoEConfig(
        num_experts=required(hf, "num_local_experts", "num_experts"),
        top_k=required(hf, "num_experts_per_tok"),
        ffn_dim=required(hf, "intermediate_size"),
        router="softmax",
        norm_topk_prob=True,
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
    )
    return ModelConfig(**base_config(hf), sliding_window=hf.get("sliding_window"), moe=moe)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    moe = config.moe
    if moe is None or not moe.norm_topk_prob or moe.router != "softmax" or moe.num_shared_experts or moe.router_bias:
        raise ValueError("HF 'mixtral' needs softmax top-k routing with renormalised weights and no shared experts")
    if config.moe_layers is not None or config.first_k_dense or config.moe_every != 1:
        raise ValueError("HF 'mixtral' has a MoE in every layer")
    if config.qk_norm or config.attn_bias:
        raise ValueError("HF 'mixtral' has no qk-norm and no q/k/v bias")
    return base_to_hf(
        config,
        FAMILY,
        intermediate_size=moe.ffn_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        sliding_window=config.sliding_window,
    )


def tensor_maps(config: ModelConfig):
    return llama_like_maps(config, MOE_NAMES)


FAMILY = Family(("mixtral",), "MixtralForCausalLM", config_from_hf, config_to_hf, tensor_maps)
