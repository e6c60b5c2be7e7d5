"""moeformer: sparse mixture-of-experts and efficient-attention transformers on PyTorch and DeepSpeed."""

from moeformer.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    NonFiniteStateError,
    ResumeConfigError,
)
from moeformer.layers.fp8 import enable_fp8
from moeformer.layers.lm_head import linear_cross_entropy, linear_distill_loss
from moeformer.layers.moe import MoEConfig
from moeformer.models import (
    CausalLM,
    CausalLMOutput,
    Decoder,
    ExpertUsage,
    MLAConfig,
    ModelConfig,
    ParamCount,
    StaticCache,
    build_model,
    build_quantized,
    compile_blocks,
    count_params,
    expert_usage,
    list_models,
    merge_experts,
    prune_experts,
    quantize,
    quantized_weights,
    upcycle,
)
from moeformer.models.checkpoint import save_pretrained
from moeformer.models.model import from_pretrained
from moeformer.serving import Engine, SamplingParams, StepOutput

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "Decoder",
    "Engine",
    "ExpertUsage",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "NonFiniteStateError",
    "ParamCount",
    "ResumeConfigError",
    "SamplingParams",
    "StaticCache",
    "StepOutput",
    "build_model",
    "build_quantized",
    "compile_blocks",
    "count_params",
    "enable_fp8",
    "expert_usage",
    "from_pretrained",
    "linear_cross_entropy",
    "linear_distill_loss",
    "list_models",
    "merge_experts",
    "prune_experts",
    "quantize",
    "quantized_weights",
    "save_pretrained",
    "upcycle",
]
