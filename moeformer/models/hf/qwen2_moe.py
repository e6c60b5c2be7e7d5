"""Qwen2-MoE (Qwen1.5-MoE): q/k/v bias, softmax top-k routing, a shared expert behind a sigmoid gate, and MoE
placement by `decoder_sparse_step` / `mlp_only_layers`."""

from __future__ import annotations

from typing import Any

from moeformer.layers.moe.config import MoEConfig
from moeformer.models.config import ModelConfig
from moeformer.models.hf.common import Family, base_config, base_to_hf, llama_like_maps, moe_layers_from_hf, required


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    shared = hf.get("shared_expert_intermediate_size") or 0
    moe = MoEConfig(
        num_experts=required(hf, "num_experts", "num_local_experts"),
        top_k=required(hf, "num_experts_per_tok"),
        ffn_dim=required(hf, "moe_intermediate_size"),
        router="softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        num_shared_experts=1 if shared else 0,
        shared_ffn_dim=shared or None,
        shared_expert_gate=bool(shared),
    )
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2-MoE use_sliding_window=True (per-layer windows) is not supported")
    base = base_config(hf)
    moe_layers = moe_layers_from_hf(base["n_layers"], hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or [])
    return ModelConfig(**base, attn_bias=bool(hf.get("qkv_bias", True)), moe=moe, moe_layers=moe_layers)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    moe = config.moe
    if moe is None or moe.router != "softmax" or moe.router_bias or moe.num_shared_experts > 1:
        raise ValueError("HF 'qwen2_moe' needs softmax routing, no router bias and at most one shared expert")
    if moe.num_shared_experts and not moe.shared_expert_gate:
        raise ValueError("HF 'qwen2_moe' gates its shared expert; set moe.shared_expert_gate=True")
    if config.qk_norm or config.sliding_window or config.mlp_bias or not config.attn_bias:
        raise ValueError("HF 'qwen2_moe' has q/k/v bias and no qk-norm, sliding window or MLP bias")
    moe_layers = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    return base_to_hf(
        config,
        FAMILY,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.ffn_dim,
        shared_expert_intermediate_size=moe.shared_hidden,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.aux_loss_coef,
        qkv_bias=True,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(config.n_layers) if i not in moe_layers],
        use_sliding_window=False,
    )


def tensor_maps(config: ModelConfig):
    return llama_like_maps(config, dict(shared="shared_expert"))


FAMILY = Family(("qwen2_moe",), "Qwen2MoeForCausalLM", config_from_hf, config_to_hf, tensor_maps)
