"""Hugging Face interop: one key-map module per model family, looked up by config.json's `model_type`."""

from __future__ import annotations

from moeformer.models.config import ModelConfig
from moeformer.models.hf import deepseek_v3, llama, mixtral, olmoe, qwen2_moe, qwen3_moe
from moeformer.models.hf.common import Family, Layout, TensorMap

FAMILIES: dict[str, Family] = {
    t: module.FAMILY
    for module in (llama, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3)
    for t in module.FAMILY.model_types
}


def get_family(model_type: str | None) -> Family:
    """The family of an HF `model_type`; KeyError listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise KeyError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_for_config(config: ModelConfig) -> Family:
    """The HF family to export `config` as: the one it was imported from, else inferred from its features."""
    imported = (config.extra.get("hf_config") or {}).get("model_type")
    if imported in FAMILIES:
        return FAMILIES[imported]
    if config.mla is not None:
        return FAMILIES["deepseek_v3"]
    if config.moe is None:
        return FAMILIES["llama"]
    if config.moe.num_shared_experts or config.attn_bias:
        return FAMILIES["qwen2_moe"]
    return FAMILIES[{"head": "qwen3_moe", "full": "olmoe"}.get(config.qk_norm, "mixtral")]


__all__ = ["FAMILIES", "Family", "Layout", "TensorMap", "family_for_config", "get_family"]
