"""Mixture-of-experts layer: routers, router losses, token dispatchers, grouped-GEMM and fused (decode, quantized)
experts and the MoE module."""

from __future__ import annotations

from .config import BACKENDS, DISPATCHERS, ROUTERS, MoEConfig
from .dispatch import (
    CapacityDispatcher,
    Dispatched,
    Dispatcher,
    DroplessDispatcher,
    ExpertRows,
    Slots,
    dispatch_in_order,
    make_dispatcher,
)
from .experts import FUSED_MAX_TOKENS, Experts, grouped_mm_available
from .fused_experts import fused_experts, fused_experts_reference
from .layer import MoE, MoEStats, update_router_biases, validate_moe_config
from .losses import load_balancing_loss, router_z_loss, sequence_aux_loss
from .reference import moe_reference
from .router import (
    Router,
    Routing,
    expert_capacity,
    expert_choice_routing,
    limit_to_groups,
    topk_routing,
)

__all__ = [
    "BACKENDS",
    "DISPATCHERS",
    "FUSED_MAX_TOKENS",
    "ROUTERS",
    "CapacityDispatcher",
    "Dispatched",
    "Dispatcher",
    "DroplessDispatcher",
    "ExpertRows",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "Router",
    "Routing",
    "Slots",
    "expert_capacity",
    "expert_choice_routing",
    "fused_experts",
    "fused_experts_reference",
    "dispatch_in_order",
    "grouped_mm_available",
    "limit_to_groups",
    "load_balancing_loss",
    "make_dispatcher",
    "moe_reference",
    "router_z_loss",
    "sequence_aux_loss",
    "topk_routing",
    "update_router_biases",
    "validate_moe_config",
]
