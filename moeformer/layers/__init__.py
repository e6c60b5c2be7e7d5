"""Reusable transformer layers: norms, rotary embeddings, MLPs, softmax attention, MoE, the LM head and its loss."""

from moeformer.layers.attention import BACKENDS, Attention, AttentionMask, KVCache, attend
from moeformer.layers.fp8 import Fp8Conversion, enable_fp8
from moeformer.layers.lm_head import LMHead, linear_cross_entropy
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import MoE, MoEConfig, MoEStats
from moeformer.layers.norms import LayerNorm, RMSNorm, build_norm
from moeformer.layers.quant import QuantizedWeight, QuantLinear
from moeformer.layers.rope import RotaryEmbedding, apply_rotary

__all__ = [
    "BACKENDS",
    "MLP",
    "Attention",
    "AttentionMask",
    "Fp8Conversion",
    "KVCache",
    "LMHead",
    "LayerNorm",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "QuantLinear",
    "QuantizedWeight",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "attend",
    "build_norm",
    "enable_fp8",
    "linear_cross_entropy",
]
