"""Reusable transformer layers: norms, rotary embeddings, MLPs, softmax attention, MoE."""

from moeformer.layers.attention import BACKENDS, Attention, AttentionMask, KVCache, attend
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import MoE, MoEConfig, MoEStats
from moeformer.layers.norms import LayerNorm, RMSNorm, build_norm
from moeformer.layers.rope import RotaryEmbedding, apply_rotary

__all__ = [
    "BACKENDS",
    "MLP",
    "Attention",
    "AttentionMask",
    "KVCache",
    "LayerNorm",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "attend",
    "build_norm",
]
