"""Parameter counts of a config, total and active per token, without allocating weights."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from moeformer.models.config import ModelConfig
from moeformer.models.model import CausalLM


class ParamCount(NamedTuple):
    total: int
    active: int  # parameters used per token: routed experts count top_k / num_experts


def count_params(config: ModelConfig) -> ParamCount:
    """Count parameters by building the model on the meta device (no memory is allocated); a quantized config
    counts the weights its codes stand for."""
    with torch.device("meta"):
        model = CausalLM(dataclasses.replace(config, quantization=None))
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for block in model.layers:
        if block.is_moe:
            moe = config.moe
            routed = sum(p.numel() for p in block.mlp.experts.parameters())
            inactive += routed * (moe.num_experts - moe.top_k) // moe.num_experts
    return ParamCount(total=total, active=total - inactive)
