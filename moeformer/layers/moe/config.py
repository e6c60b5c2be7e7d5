"""Configuration of one mixture-of-experts layer (router, experts, losses)."""

from __future__ import annotations

from dataclasses import dataclass

ROUTERS = ("softmax", "sigmoid", "expert_choice")


@dataclass
class MoEConfig:
    """Everything a routed MoE layer needs besides the model width.

    `capacity_factor=None` selects the dropless path; a number selects the capacity path
    (each expert takes at most `ceil(capacity_factor * tokens * top_k / num_experts)` tokens).
    """

    num_experts: int = 8
    top_k: int = 2
    ffn_dim: int = 256
    activation: str = "swiglu"  # "swiglu" | "gelu"
    router: str = "softmax"  # one of ROUTERS
    norm_topk_prob: bool = True  # renormalise the selected top-k weights to sum to one
    routed_scaling_factor: float = 1.0  # multiplies routed-expert output (DeepSeek-V3)
    # aux-loss-free balancing: a non-learned per-expert bias added to scores for selection only
    router_bias: bool = False
    bias_update_rate: float = 1e-3
    # group-limited routing: pick `topk_groups` of `num_groups` expert groups first
    num_groups: int = 1
    topk_groups: int = 1
    capacity_factor: float | None = None
    # losses (coefficients; 0 disables the loss)
    aux_loss_coef: float = 0.01  # Switch/GShard load balancing
    z_loss_coef: float = 0.0  # router z-loss
    seq_aux_loss_coef: float = 0.0  # sequence-level balancing (DeepSeek-V3)
    # shared experts, always on
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None  # hidden size of the fused shared expert; default ffn_dim * num_shared
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert output (Qwen2-MoE)
    # expert kernel: "auto" picks grouped GEMM where supported, "loop" is the reference
    expert_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by num_groups={self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"MoEConfig.activation must be 'swiglu' or 'gelu', got {self.activation!r}")

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the fused shared expert (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_ffn_dim if self.shared_ffn_dim is not None else self.ffn_dim * self.num_shared_experts
