"""The MoE feed-forward layer: router -> routed experts (+ always-on shared expert), with its losses and load
statistics returned per forward in MoEStats."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..mlp import MLP
from .config import MoEConfig
from .dispatch import Slots, make_dispatcher
from .experts import Experts
from .losses import load_balancing_loss, router_z_loss, sequence_aux_loss
from .router import Router, Routing

# unweighted loss name -> the MoEConfig field holding its coefficient
LOSS_COEFS = {"load_balance": "aux_loss_coef", "z_loss": "z_loss_coef", "seq_aux": "seq_aux_loss_coef"}


@dataclass
class MoEStats:
    """What one MoE forward reports to the model and trainer."""

    aux_loss: Tensor  # scalar, coefficient-weighted sum of the enabled losses (differentiable)
    losses: dict[str, Tensor]  # unweighted: "load_balance", "z_loss", "seq_aux" when enabled
    tokens_per_expert: Tensor  # (E,) long, real-token slots routed to each expert (before capacity drops)
    dropped_tokens: Tensor  # () long, real-token slots dropped by the capacity limit
    router_logits: Tensor  # (N, E) fp32, not detached


def validate_moe_config(dim: int, config: MoEConfig) -> None:
    """Raise ValueError for settings MoEConfig accepts on its own but the layer cannot honour."""
    cfg = config
    if dim < 1 or cfg.ffn_dim < 1:
        raise ValueError(f"MoE needs dim >= 1 and ffn_dim >= 1, got dim={dim}, ffn_dim={cfg.ffn_dim}")
    if cfg.router == "expert_choice" and (cfg.router_bias or cfg.num_groups > 1):
        raise ValueError("expert_choice routing supports neither router_bias nor group-limited routing")
    if cfg.num_experts // cfg.num_groups * cfg.topk_groups < cfg.top_k:
        raise ValueError(
            f"topk_groups={cfg.topk_groups} groups of {cfg.num_experts // cfg.num_groups} experts cannot hold "
            f"top_k={cfg.top_k} experts"
        )
    if cfg.num_shared_experts < 0 or (cfg.shared_ffn_dim is not None and cfg.shared_ffn_dim < 1):
        raise ValueError(f"bad shared expert size: {cfg.num_shared_experts=} {cfg.shared_ffn_dim=}")
    if cfg.shared_expert_gate and cfg.num_shared_experts == 0:
        raise ValueError("shared_expert_gate needs num_shared_experts >= 1")
    for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "routed_scaling_factor"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(cfg, name)}")


class MoE(nn.Module):
    """Sparse feed-forward: each token's output is the weighted sum of its routed experts, plus the shared expert
    (optionally sigmoid-gated, Qwen2-MoE) when configured. The router picks slots, the dispatcher (dispatch.py;
    under expert parallelism its all-to-all form) sorts them into expert rows and combines the experts' rows back;
    `Experts` is the grouped FFN in between."""

    def __init__(self, dim: int, config: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__()
        validate_moe_config(dim, config)
        self.dim, self.config = dim, config
        self.router = Router(dim, config, init_std)
        self.experts = Experts(config.num_experts, dim, config.ffn_dim, config.activation, config.backend, init_std)
        self.dispatcher = make_dispatcher(config.dispatcher, config.num_experts, config.top_k, config.capacity_factor)
        self.shared_expert = MLP(dim, config.shared_hidden, config.activation) if config.shared_hidden else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if config.shared_expert_gate else None

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert slot limit of the capacity dispatcher (tokens counted with padding, so shapes stay static);
        None when dropless."""
        return self.dispatcher.capacity(num_tokens)

    def shared(self, x: Tensor) -> Tensor | None:
        """Shared-expert output for x (N, dim), gated when configured; None without a shared expert."""
        if self.shared_expert is None:
            return None
        out = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, stats: bool = True
    ) -> tuple[Tensor, MoEStats | None]:
        """x (B, T, dim), token_mask (B, T) bool with True = real token. Returns (output (B, T, dim), stats); with
        `stats=False` (decoding) the stats are None and neither the losses nor the load statistics are computed.
        The experts run fused (reading the chosen experts' weights in place) when `Experts.use_fused` says so:
        quantized experts, or decoding without gradients; else on the dispatcher's expert-sorted rows."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects x of shape (B, T, {self.dim}), got {tuple(x.shape)}")
        b, t, d = x.shape
        if token_mask is not None and token_mask.shape != (b, t):
            raise ValueError(f"token_mask must have shape {(b, t)}, got {tuple(token_mask.shape)}")
        flat = x.reshape(b * t, d)
        mask = None if token_mask is None else token_mask.reshape(b * t).bool()
        routing = self.router(flat, mask, stats=stats)
        valid = None if mask is None else mask[routing.token_idx]
        top_k = None if self.config.router == "expert_choice" else self.config.top_k
        slots = Slots(routing.token_idx, routing.expert_idx, routing.weights, valid, top_k)
        if self.experts.use_fused(flat):
            keep, tokens_per_expert, dropped = self.dispatcher.keep(slots, b * t, count_load=stats or self.training)
            out = self.experts.forward_fused(flat, slots, keep)
            shared = self.shared(flat)
        else:
            dispatched = self.dispatcher.dispatch(flat, slots)
            shared = self.shared(flat)  # overlaps the dispatcher's communication, if any
            out = self.dispatcher.combine(self.dispatcher.run_experts(self.experts, dispatched), dispatched)
            tokens_per_expert, dropped = dispatched.tokens_per_expert, dispatched.dropped
        if shared is not None:
            out = out + shared
        if self.training:
            self.router.observe_load(tokens_per_expert)
        if not stats:
            return out.view(b, t, d), None
        losses = self.losses(routing, b, t, mask)
        weighted = (getattr(self.config, LOSS_COEFS[name]) * value for name, value in losses.items())
        aux_loss = sum(weighted, routing.logits.new_zeros(()))
        return out.view(b, t, d), MoEStats(aux_loss, losses, tokens_per_expert, dropped, routing.logits)

    def losses(self, routing: Routing, batch: int, seq_len: int, token_mask: Tensor | None) -> dict[str, Tensor]:
        """The unweighted losses whose coefficient is non-zero."""
        cfg, k = self.config, self.config.top_k
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coef:
            losses["load_balance"] = load_balancing_loss(routing.probs, routing.assigned, k, token_mask)
        if cfg.z_loss_coef:
            losses["z_loss"] = router_z_loss(routing.logits, token_mask)
        if cfg.seq_aux_loss_coef:
            shape = (batch, seq_len, cfg.num_experts)
            mask = None if token_mask is None else token_mask.view(batch, seq_len)
            losses["seq_aux"] = sequence_aux_loss(routing.probs.view(shape), routing.assigned.view(shape), k, mask)
        return losses

    def update_bias(self, group=None) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): nudge each expert's selection bias toward the mean load
        (summed over the ranks of `group`, default all)."""
        self.router.update_bias(group)


def update_router_biases(model: nn.Module, group=None) -> None:
    """Aux-loss-free bias step of every MoE layer in `model` (a whole model or the part one pipeline stage holds),
    loads summed over the ranks of `group` (default all); call after each optimizer step."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias(group)
