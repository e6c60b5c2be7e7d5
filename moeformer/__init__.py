"""moeformer: sparse mixture-of-experts and efficient-attention transformers on PyTorch and DeepSpeed."""

from moeformer.errors import (CheckpointError, CheckpointNotFoundError, ConfigError, NonFiniteStateError,
                              ResumeConfigError)
from moeformer.layers.lm_head import linear_cross_entropy
from moeformer.layers.moe import MoEConfig
from moeformer.models.checkpoint import from_pretrained, save_pretrained
from moeformer.models import (
    CausalLM,
    CausalLMOutput,
    Decoder,
    MLAConfig,
    ModelConfig,
    ParamCount,
    StaticCache,
    build_model,
    build_quantized,
    compile_blocks,
    count_params,
    list_models,
    quantize,
    quantized_weights,
    upcycle,
)

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "Decoder",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "NonFiniteStateError",
    "ParamCount",
    "ResumeConfigError",
    "StaticCache",
    "build_model",
    "build_quantized",
    "compile_blocks",
    "count_params",
    "from_pretrained",
    "linear_cross_entropy",
    "list_models",
    "quantize",
    "quantized_weights",
    "save_pretrained",
    "upcycle",
]
