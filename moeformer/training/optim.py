"""Optimizer parameter groups, with expert parameters in their own groups the way DeepSpeed's MoE support expects.

DeepSpeed recognises an expert parameter by two attributes that its own `Experts` module sets: `allreduce = False`
(do not reduce over the whole data-parallel group) and `group_name = "ep_size_<n>"` (reduce over that expert-data-
parallel group instead). `split_params_into_different_moe_groups_for_optimizer` then moves tagged parameters into
groups marked `moe: True` named after their group, which ZeRO-1/2 partition over the expert-data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from moeformer.training.config import OptimConfig


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' stacked weights (`experts.w_in`, `experts.w_out`) of every MoE layer."""
    return [p for name, p in model.named_parameters() if name.endswith(("experts.w_in", "experts.w_out"))]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Named AdamW groups: matrices with weight decay, vectors (norms, biases, router bias) without, and experts
    apart. Expert parameters carrying DeepSpeed's expert tag (expert parallelism sets it) become DeepSpeed MoE
    groups; untagged experts form an ordinary group reduced over the whole data-parallel group (correct at
    expert-parallel size 1)."""
    experts = {id(p) for p in expert_parameters(model)}
    groups = {
        "decay": {"name": "decay", "params": [], "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0},
        "experts": {"name": "experts", "params": [], "weight_decay": weight_decay},
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in experts and not is_moe_param(p):
            groups["experts"]["params"].append(p)
        else:
            groups["decay" if p.dim() >= 2 else "no_decay"]["params"].append(p)
    out = [g for g in groups.values() if g["params"]]
    if any(is_moe_param(p) for g in out for p in g["params"]):
        out = split_params_into_different_moe_groups_for_optimizer(out)
    return out


class SkippableAdamW(torch.optim.AdamW):
    """AdamW that skips an update, leaving weights and moments exactly as they were, while `skip` is set (the
    trainer's verdict on a step with a non-finite loss) or, with `check_gradients` on, when any rank's gradients
    hold NaN/inf. A skip sets `overflow`, which DeepSpeed's engine reads after each step: it counts the step in
    `skipped_steps` and holds the lr schedule, as for its own wrappers' overflow skips.

    `check_gradients` is for an engine that steps this optimizer directly (ZeRO-0 without bf16: no DeepSpeed
    wrapper checks the gradient norm), where every rank calls `step` once per optimizer step; DeepSpeed's ZeRO and
    bf16 wrappers skip a non-finite gradient norm themselves and may call `step` once per parameter group."""

    skip = False
    check_gradients = False
    overflow = False

    def step(self, closure=None):
        self.overflow = self.skip or (self.check_gradients and not _gradients_finite(self.param_groups))
        return None if self.overflow else super().step(closure)


def _gradients_finite(param_groups: list[dict]) -> bool:
    """Whether the gradients in `param_groups` are finite on every rank (their norm, so an overflowing one is not)."""
    params = [p for group in param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)
    finite = torch.isfinite(norm).float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def build_optimizer(model: nn.Module, config: OptimConfig) -> SkippableAdamW:
    """AdamW over `param_groups` at the peak lr (the schedule scales it); fused on CUDA."""
    fused = next(model.parameters()).is_cuda
    return SkippableAdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
    )
