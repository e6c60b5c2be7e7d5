"""Mixture-of-experts layer: routers, router losses, grouped-GEMM and fused (decode, quantized) experts and the MoE
module."""

from __future__ import annotations

from .config import ROUTERS, MoEConfig
from .experts import EXPERT_IMPLS, FUSED_MAX_TOKENS, DispatchPlan, Experts, grouped_mm_available, plan_dispatch
from .fused_experts import fused_experts, fused_experts_reference
from .layer import MoE, MoEStats, update_router_biases, validate_moe_config
from .losses import load_balancing_loss, router_z_loss, sequence_aux_loss
from .reference import moe_reference
from .router import Router, Routing, expert_capacity, expert_choice_routing, limit_to_groups, topk_routing

__all__ = [
    "EXPERT_IMPLS",
    "FUSED_MAX_TOKENS",
    "ROUTERS",
    "DispatchPlan",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "Router",
    "Routing",
    "expert_capacity",
    "expert_choice_routing",
    "fused_experts",
    "fused_experts_reference",
    "grouped_mm_available",
    "limit_to_groups",
    "load_balancing_loss",
    "moe_reference",
    "plan_dispatch",
    "router_z_loss",
    "sequence_aux_loss",
    "update_router_biases",
    "topk_routing",
    "validate_moe_config",
]
