"""OLMoE: RMS qk-norm over all heads at once, softmax top-k routing without renormalisation."""

from __future__ import annotations

from typing import Any

from moeformer.layers.moe.config import MoEConfig
from moeformer.models.config import ModelConfig
from moeformer.models.hf.common import Family, base_config, base_to_hf, llama_like_maps, required


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"OLMoE clip_qkv={hf['clip_qkv']} is not supported")
    if hf.get("attention_bias"):
        raise ValueError("OLMoE attention_bias=True puts a bias on o_proj, which moeformer's Attention does not have")
    moe = MoEConfig(
        num_experts=required(hf, "num_experts", "num_local_experts"),
        top_k=required(hf, "num_experts_per_tok"),
        ffn_dim=required(hf, "intermediate_size"),
        router="softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.01),
    )
    return ModelConfig(**base_config(hf), qk_norm="full", moe=moe)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    moe = config.moe
    if moe is None or moe.router != "softmax" or moe.router_bias or moe.num_shared_experts:
        raise ValueError("HF 'olmoe' needs softmax routing without router bias or shared experts")
    if config.qk_norm != "full" or config.attn_bias or config.sliding_window:
        raise ValueError("HF 'olmoe' has full-width qk-norm and no q/k/v bias or sliding window")
    if config.moe_layers is not None or config.first_k_dense or config.moe_every != 1:
        raise ValueError("HF 'olmoe' has a MoE in every layer")
    return base_to_hf(
        config,
        FAMILY,
        intermediate_size=moe.ffn_dim,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.aux_loss_coef,
        clip_qkv=None,
        attention_bias=False,
    )


FAMILY = Family(("olmoe",), "OlmoeForCausalLM", config_from_hf, config_to_hf, llama_like_maps)
