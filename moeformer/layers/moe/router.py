"""Routers: each token picks its top-k experts (softmax or sigmoid scores, optionally group-limited), or each
expert picks its top-C tokens (expert choice). Routing is computed in fp32."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


class Routing(NamedTuple):
    """One forward's routing as flat (token, expert, weight) slots, plus the dense tensors the losses need.
    A NamedTuple rather than a dataclass: ZeRO-3 finds the tensors a module returns only inside tuples."""

    logits: Tensor  # (N, E) fp32 router logits
    probs: Tensor | None  # (N, E) fp32 distribution over experts: softmax, or sigmoid scores over their sum
    assigned: Tensor | None  # (N, E) fp32, 1 where the token is routed to the expert (None: not asked for)
    token_idx: Tensor  # (S,) long; token-choice slots are token-major (token 0's k slots, then token 1's, ...)
    expert_idx: Tensor  # (S,) long
    weights: Tensor  # (S,) fp32 combine weights, routed_scaling_factor included


class _HalfLinearFp32Out(torch.autograd.Function):
    """x @ w.T for half-precision x and w as one tensor-core GEMM with an fp32 result; the backward GEMMs take the
    gradient rounded to the inputs' dtype and accumulate in fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        g = grad.to(x.dtype)
        dx = torch.mm(g, w) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # the rows are the weight gradient's summed dimension; at 4,097 of them torch 2.11's fp32-out GEMM on an
            # H200 was off by about one row's products (3.4%), padded to 4,104 it is exact: zero rows add nothing
            pad = -x.shape[0] % 8
            if pad:
                g, x = F.pad(g, (0, 0, 0, pad)), F.pad(x, (0, 0, 0, pad))
            dw = torch.mm(g.t(), x, out_dtype=torch.float32).to(w.dtype)
        return dx, dw


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """fp32 logits x @ weight.T for x (N, dim). bf16/fp16 x and weight on CUDA take one tensor-core GEMM with an
    fp32 result: products of half-precision values are exact in fp32, so it equals the fp32 GEMM on fp32 copies
    (the reference, used everywhere else) up to summation order, without those copies or a SIMT fp32 GEMM."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and x.dim() == 2:
        return _HalfLinearFp32Out.apply(x, weight)
    return F.linear(x.float(), weight.float())


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert, ceil(factor * tokens * top_k / experts), never more than the number of tokens."""
    return min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts))


def limit_to_groups(scores: Tensor, num_groups: int, topk_groups: int, group_score: str) -> Tensor:
    """Mask (to -inf) the experts outside each token's `topk_groups` best groups. A group scores by its best
    expert ("max") or by the sum of its best two experts ("top2", DeepSeek-V3)."""
    n, e = scores.shape
    grouped = scores.view(n, num_groups, e // num_groups)
    if group_score == "max":
        group_scores = grouped.amax(dim=-1)
    elif group_score == "top2":
        group_scores = grouped.topk(min(2, e // num_groups), dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"group_score must be 'max' or 'top2', got {group_score!r}")
    chosen = group_scores.topk(topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    return scores.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape(n, e), float("-inf"))


def topk_routing(
    scores: Tensor,
    top_k: int,
    *,
    bias: Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Token choice: pick the top-k experts of `scores + bias` (bias steers selection only) and weight them by
    their unbiased scores, renormalised to sum to one when `norm_topk_prob`. Returns (indices, weights), (N, k)."""
    choice = scores.detach() if bias is None else scores.detach() + bias
    if num_groups > 1:
        choice = limit_to_groups(choice, num_groups, topk_groups, group_score)
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return indices, weights if scaling == 1.0 else weights * scaling


def expert_choice_routing(probs: Tensor, capacity: int, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Expert choice: every expert takes its `capacity` highest-probability tokens (padding only if it must).
    Returns (token indices, weights), each (E, capacity). Non-causal: a token's routing depends on the others."""
    choice = probs.detach()
    if token_mask is not None:
        choice = choice.masked_fill(~token_mask.unsqueeze(-1), -1.0)
    token_idx = choice.t().topk(capacity, dim=-1).indices
    return token_idx, probs.t().gather(1, token_idx)


class Router(nn.Module):
    """Linear scorer (E, dim) plus, for aux-loss-free balancing, a non-learned selection bias per expert."""

    def __init__(self, dim: int, config: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, dim))
        nn.init.normal_(self.weight, std=init_std)
        if config.router_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
            # token slots routed to each expert since the last update_bias (integer: immune to model.to(bf16))
            self.register_buffer("expert_load", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
        else:
            self.expert_bias = None
            self.expert_load = None

    def forward(self, x: Tensor, token_mask: Tensor | None = None, stats: bool = True) -> Routing:
        """Route x (N, dim); token_mask (N,) bool keeps padding out of expert choice. With `stats=False` the
        tensors only the losses need (`assigned`, and `probs` of token-choice sigmoid routing) are None."""
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = router_logits(x, self.weight)
        n, e = logits.shape
        if cfg.router == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True) if stats else None
        else:
            scores = probs = logits.softmax(dim=-1)
        if cfg.router == "expert_choice":  # weights are the raw probabilities: norm_topk_prob does not apply
            capacity = expert_capacity(n, e, cfg.top_k, cfg.capacity_factor)  # the capacity dispatcher's
            token_idx, weights = expert_choice_routing(probs, capacity, token_mask)
            assigned = torch.zeros(e, n, device=x.device).scatter_(1, token_idx, 1.0).t() if stats else None
            expert_idx = torch.arange(e, device=x.device).repeat_interleave(capacity)
            weights = weights.flatten() * cfg.routed_scaling_factor
            return Routing(logits, probs, assigned, token_idx.flatten(), expert_idx, weights)
        bias = None if self.expert_bias is None else self.expert_bias.float()
        indices, weights = topk_routing(
            scores,
            cfg.top_k,
            bias=bias,
            num_groups=cfg.num_groups,
            topk_groups=cfg.topk_groups,
            group_score="top2" if cfg.router == "sigmoid" else "max",
            norm_topk_prob=cfg.norm_topk_prob,
            scaling=cfg.routed_scaling_factor,
        )
        assigned = torch.zeros_like(scores).scatter_(1, indices, 1.0) if stats else None
        token_idx = torch.arange(n, device=x.device).repeat_interleave(cfg.top_k)
        return Routing(logits, probs, assigned, token_idx, indices.flatten(), weights.flatten())

    def _apply(self, fn, recurse: bool = True):
        """Keep `expert_bias` in fp32 when the module is cast (`.to(bf16)`, DeepSpeed's bf16 mode): its updates are
        steps of `bias_update_rate` that low precision would round away. Device moves still apply."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != bias.dtype:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Zero the load accumulator (it is not saved in checkpoints)."""
        if self.expert_load is not None:
            self.expert_load.zero_()

    @torch.no_grad()
    def observe_load(self, tokens_per_expert: Tensor) -> None:
        """Accumulate routed load for the next update_bias (no-op without router_bias)."""
        if self.expert_load is not None:
            self.expert_load += tokens_per_expert

    @torch.no_grad()
    def update_bias(self, group=None) -> None:
        """expert_bias += rate * sign(mean_load - load), then reset the load. Loads are summed over the ranks of
        `group` (default: all; those holding this layer) first so every replica keeps the same bias."""
        if self.expert_bias is None:
            return
        load = self.expert_load.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=group)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
        self.reset_buffers()
