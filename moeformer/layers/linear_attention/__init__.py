"""Linear attention family (feature-map, RetNet, GLA, DeltaNet) in naive, chunked, recurrent and fla forms."""

from __future__ import annotations

from moeformer.layers.linear_attention.decayed import (
    decayed_linear_attn_chunked,
    decayed_linear_attn_naive,
    decayed_linear_attn_recurrent,
    gla_log_decay,
    retnet_log_decay,
)
from moeformer.layers.linear_attention.delta import delta_rule_chunked, delta_rule_naive, delta_rule_recurrent
from moeformer.layers.linear_attention.fla_backend import (
    fla_available,
    fla_chunk_bthd,
    fla_delta_rule_bthd,
    fla_gated_backward_ok,
)
from moeformer.layers.linear_attention.layer import BACKENDS, KINDS, LinearAttention
from moeformer.layers.linear_attention.mixer import CausalLinearAttention, RecurrentCache
from moeformer.layers.linear_attention.packing import segment_ids
from moeformer.layers.linear_attention.vanilla import (
    FEATURE_MAPS,
    PerformerFeatureMap,
    build_feature_map,
)

__all__ = [
    "BACKENDS",
    "CausalLinearAttention",
    "RecurrentCache",
    "FEATURE_MAPS",
    "KINDS",
    "LinearAttention",
    "PerformerFeatureMap",
    "build_feature_map",
    "decayed_linear_attn_chunked",
    "decayed_linear_attn_naive",
    "decayed_linear_attn_recurrent",
    "delta_rule_chunked",
    "delta_rule_naive",
    "delta_rule_recurrent",
    "fla_available",
    "fla_chunk_bthd",
    "fla_delta_rule_bthd",
    "fla_gated_backward_ok",
    "gla_log_decay",
    "retnet_log_decay",
    "segment_ids",
]
