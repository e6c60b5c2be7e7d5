"""Llama (dense baseline): config.json <-> ModelConfig and tensor names."""

from __future__ import annotations

from typing import Any

from moeformer.models.config import ModelConfig
from moeformer.models.hf.common import Family, base_config, base_to_hf, llama_like_maps


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("attention_bias"):
        raise ValueError("Llama attention_bias=True puts a bias on o_proj, which moeformer's Attention does not have")
    return ModelConfig(**base_config(hf), mlp_bias=bool(hf.get("mlp_bias", False)))


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.moe is not None or config.qk_norm is not None or config.attn_bias or config.sliding_window:
        raise ValueError("HF 'llama' has no MoE, qk-norm, q/k/v bias or sliding window; pick another family")
    return base_to_hf(config, FAMILY, attention_bias=False, mlp_bias=config.mlp_bias)


def ignore(name: str, config: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # saved by old transformers versions


FAMILY = Family(("llama",), "LlamaForCausalLM", config_from_hf, config_to_hf, llama_like_maps, ignore)
