"""Softmax attention: the shared visibility rule, interchangeable kernels, a static KV cache and the layer."""

from __future__ import annotations

from moeformer.layers.attention.backends import BACKENDS, attend
from moeformer.layers.attention.cache import KVCache, cache_update
from moeformer.layers.attention.layer import Attention
from moeformer.layers.attention.mask import AttentionMask

__all__ = ["BACKENDS", "Attention", "AttentionMask", "KVCache", "attend", "cache_update"]
