"""Transformer models, their configs and the model zoo."""

from moeformer.models.cache import StaticCache
from moeformer.models.compress import ExpertUsage, expert_usage, merge_experts, prune_experts
from moeformer.models.config import MLAConfig, ModelConfig
from moeformer.models.generation import Decoder
from moeformer.models.model import CausalLM, CausalLMOutput, build_model, compile_blocks
from moeformer.models.params import ParamCount, count_params
from moeformer.models.quantize import build_quantized, quantize, quantized_weights
from moeformer.models.zoo import list_models

__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "Decoder",
    "ExpertUsage",
    "MLAConfig",
    "ModelConfig",
    "ParamCount",
    "StaticCache",
    "build_model",
    "build_quantized",
    "compile_blocks",
    "count_params",
    "expert_usage",
    "list_models",
    "merge_experts",
    "prune_experts",
    "quantize",
    "quantized_weights",
]
