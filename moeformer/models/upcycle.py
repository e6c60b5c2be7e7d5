"""Sparse upcycling: turn a dense model into a mixture of experts whose experts start as copies of its MLPs.

With `noise=0` the upcycled model computes the dense function: the routed top-k weights are renormalised to sum
to one over identical experts, and with a shared expert each half of the output comes from one side (the shared
expert's sigmoid gate starts at zero, i.e. 0.5, and the routed experts' down projections are halved). The router
starts random, so routing is spread over experts from step 0; `noise` perturbs each routed expert's copy to break
the symmetry between experts (Gaussian, `noise` times the standard deviation of the dense weight).
"""

from __future__ import annotations

import dataclasses

import torch

from moeformer.errors import ConfigError
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import MoEConfig
from moeformer.models.model import CausalLM


def upcycled_config(dense, num_experts: int, top_k: int, shared_expert: bool = False):
    """The MoE config of `dense` (a dense ModelConfig): every MLP becomes `num_experts` experts of the MLP's width,
    top-k softmax routing with renormalised weights; with `shared_expert`, one gated shared expert as wide again
    and q/k/v biases (zero-initialised when the dense model had none) so it exports in the Qwen2-MoE layout."""
    if dense.moe is not None:
        raise ConfigError(f"{dense.name} is already a mixture of experts; upcycling takes a dense model")
    if dense.mlp_bias:
        raise ConfigError(f"{dense.name} has MLP biases; experts have none, so it cannot be upcycled exactly")
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ConfigError(f"need 1 <= top_k <= num_experts; got num_experts={num_experts}, top_k={top_k}")
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        ffn_dim=dense.ffn_dim,
        activation=dense.activation,
        router="softmax",
        norm_topk_prob=True,
        num_shared_experts=int(shared_expert),
        shared_ffn_dim=dense.ffn_dim if shared_expert else None,
        shared_expert_gate=shared_expert,
    )
    extra = {k: v for k, v in dense.extra.items() if k != "hf_config"}  # the export family follows the new shape
    return dataclasses.replace(
        dense,
        name=f"{dense.name}-upcycled-{num_experts}x",
        moe=moe,
        moe_layers=None,
        first_k_dense=0,
        moe_every=1,
        attn_bias=dense.attn_bias or shared_expert,
        extra=extra,
    )


@torch.no_grad()
def upcycle(
    dense: CausalLM,
    num_experts: int,
    top_k: int,
    noise: float = 0.0,
    shared_expert: bool = False,
    generator: torch.Generator | None = None,
) -> CausalLM:
    """A new MoE `CausalLM` (same device and dtype as `dense`) whose experts are copies of `dense`'s MLPs.

    Attention, norms, embeddings and head are copied; routers are drawn from N(0, init_std) with `generator` (a
    CPU generator; the draws are made on the CPU and moved)."""
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    if dense.config.quantization:
        raise ConfigError("upcycle the full-precision model, then quantize")
    config = upcycled_config(dense.config, num_experts, top_k, shared_expert)
    weight = next(dense.parameters())
    moe = CausalLM(config).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    copied_mlp = {k for k in unexpected if ".mlp." in k}
    if set(unexpected) != copied_mlp:
        raise ConfigError(f"dense tensors with no place in the MoE: {sorted(set(unexpected) - copied_mlp)}")
    for dense_block, block in zip(dense.layers, moe.layers):
        mlp: MLP = dense_block.mlp
        gate_up = [mlp.gate_proj.weight, mlp.up_proj.weight] if mlp.activation == "swiglu" else [mlp.up_proj.weight]
        w_in = torch.cat([w.t() for w in gate_up], dim=1)  # (dim, width) = [gate | up], as Experts stores it
        w_out = mlp.down_proj.weight.t() * (0.5 if shared_expert else 1.0)
        experts = block.mlp.experts
        for e in range(num_experts):
            experts.w_in[e] = _perturbed(w_in, noise, generator)
            experts.w_out[e] = _perturbed(w_out, noise, generator)
        router = block.mlp.router.weight
        router.copy_(_randn(router.shape, generator) * config.init_std)
        if shared_expert:
            block.mlp.shared_expert.load_state_dict(mlp.state_dict())
            block.mlp.shared_expert_gate.weight.zero_()
    added = [name for name in missing if ".mlp." not in name]
    for name in added:  # q/k/v biases a shared-expert upcycle adds: zero, so attention is unchanged
        if not name.endswith(".bias"):
            raise ConfigError(f"the MoE has a tensor the dense model lacks: {name}")
        moe.get_parameter(name).zero_()
    return moe.train(dense.training)


def _perturbed(w: torch.Tensor, noise: float, generator: torch.Generator | None) -> torch.Tensor:
    if noise == 0:
        return w
    return w + (_randn(w.shape, generator) * (noise * w.float().std().item())).to(w)


def _randn(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws on the CPU (a CPU `generator` seeds them the same for every device)."""
    return torch.randn(shape, generator=generator)
