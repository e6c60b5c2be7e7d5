"""Qwen3-MoE: per-head RMS qk-norm, softmax top-k routing with `norm_topk_prob`, no shared expert."""

from __future__ import annotations

from typing import Any

from moeformer.layers.moe.config import MoEConfig
from moeformer.models.config import ModelConfig
from moeformer.models.hf.common import Family, base_config, base_to_hf, llama_like_maps, moe_layers_from_hf, required


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    moe = MoEConfig(
        num_experts=required(hf, "num_experts", "num_local_experts"),
        top_k=required(hf, "num_experts_per_tok"),
        ffn_dim=required(hf, "moe_intermediate_size"),
        router="softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
    )
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen3-MoE use_sliding_window=True (per-layer windows) is not supported")
    base = base_config(hf)
    moe_layers = moe_layers_from_hf(base["n_layers"], hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or [])
    return ModelConfig(
        **base, attn_bias=bool(hf.get("attention_bias", False)), qk_norm="head", moe=moe, moe_layers=moe_layers
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    moe = config.moe
    if moe is None or moe.router != "softmax" or moe.router_bias or moe.num_shared_experts:
        raise ValueError("HF 'qwen3_moe' needs softmax routing without router bias or shared experts")
    if config.qk_norm != "head" or config.sliding_window or config.mlp_bias:
        raise ValueError("HF 'qwen3_moe' has per-head qk-norm and no sliding window or MLP bias")
    moe_layers = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    return base_to_hf(
        config,
        FAMILY,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.ffn_dim,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.aux_loss_coef,
        attention_bias=config.attn_bias,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(config.n_layers) if i not in moe_layers],
        use_sliding_window=False,
    )


FAMILY = Family(("qwen3_moe",), "Qwen3MoeForCausalLM", config_from_hf, config_to_hf, llama_like_maps)
