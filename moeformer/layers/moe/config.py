"""Configuration of one mixture-of-experts layer (router, experts, losses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

ROUTERS = ("softmax", "sigmoid", "expert_choice")
DISPATCHERS = ("dropless", "capacity")
BACKENDS = ("auto", "grouped", "loop")


@dataclass
class MoEConfig:
    """Everything a routed MoE layer needs besides the model width.

    `dispatcher="dropless"` computes every routed slot; `"capacity"` gives each expert at most
    `ceil(capacity_factor * tokens * top_k / num_experts)` slots (token dropping; expert-choice routing, where each
    expert picks that many tokens, uses it too). `capacity_factor` is set for the capacity dispatcher only.
    """

    renamed_keys: ClassVar[dict[str, str]] = {"expert_impl": "backend"}  # old config key -> its name now

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
    dispatcher: str = "dropless"  # one of DISPATCHERS
    capacity_factor: float | None = None
    # losses (coefficients; 0 disables the loss)
    aux_loss_coef: float = 0.01  # Switch/GShard load balancing
    z_loss_coef: float = 0.0  # router z-loss
    seq_aux_loss_coef: float = 0.0  # sequence-level balancing (DeepSeek-V3)
    # shared experts, always on
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None  # hidden size of the fused shared expert; default ffn_dim * num_shared
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert output (Qwen2-MoE)
    # expert kernel (one of BACKENDS): "auto" picks grouped GEMM where supported, "loop" is the reference
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by num_groups={self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"MoEConfig.dispatcher must be one of {DISPATCHERS}, got {self.dispatcher!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MoEConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        self._check_dispatcher()
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"MoEConfig.activation must be 'swiglu' or 'gelu', got {self.activation!r}")

    def _check_dispatcher(self) -> None:
        """The one rule tying dispatcher, capacity_factor and router together."""
        if self.dispatcher == "capacity":
            if self.capacity_factor is None or self.capacity_factor <= 0:
                raise ValueError(
                    f"dispatcher='capacity' needs a positive capacity_factor (each expert keeps "
                    f"ceil(capacity_factor * tokens * top_k / num_experts) slots), got "
                    f"{self.capacity_factor}"
                )
        elif self.router == "expert_choice":
            raise ValueError(
                "router='expert_choice' gives each expert a fixed number of tokens: set "
                "dispatcher='capacity' and its capacity_factor"
            )
        elif self.capacity_factor is not None:
            raise ValueError(
                f"capacity_factor={self.capacity_factor} applies to dispatcher='capacity' only (token "
                "dropping): set dispatcher='capacity', or remove capacity_factor for the dropless "
                "dispatcher"
            )

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the fused shared expert (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_ffn_dim if self.shared_ffn_dim is not None else self.ffn_dim * self.num_shared_experts
