"""Expert parallelism: each rank of the expert-parallel group holds E / ep experts; token slots travel to the rank
of their expert with a variable-size all-to-all (dropless: split sizes are exchanged first), run through the same
`Experts` kernel there, and come back to be combined on the rank that owns the token.

`ExpertParallelExperts` replaces `MoE.experts` in place, so the MoE layer (router, losses, shared expert) and every
state-dict key are unchanged. It is also a `deepspeed.moe.layer.MoE`, which is how DeepSpeed's engine recognises an
MoE model; its parameters carry DeepSpeed's expert tags (`allreduce = False`, `group_name = "ep_size_<ep>"`), so
the engine and ZeRO-1/2 reduce (and partition) them over the expert-data-parallel group only, averaged over the
whole data-parallel world, while the other parameters are averaged over the data-parallel group as usual.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

from moeformer.layers.moe import DispatchPlan, Experts, MoE, plan_dispatch
from moeformer.layers.moe.experts import compute_dtype
from moeformer.parallel.comm import all_reduce, all_to_all, exchange_counts, reduce_grad
from moeformer.parallel.groups import ParallelGroups
from moeformer.parallel.reshard import sharded_parameter


class ExpertParallelExperts(DeepSpeedMoE, Experts):
    """This rank's slice of an `Experts` (experts [rank * L, (rank + 1) * L), L = E / ep) with all-to-all dispatch.
    Same call signature and result as `Experts.forward` on the full set of experts."""

    def __init__(self, experts: Experts, groups: ParallelGroups) -> None:
        ep = groups.config.ep
        if experts.num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={experts.num_experts}")
        with torch.device("meta"):  # settings only: the weights are replaced by this rank's slices below
            Experts.__init__(self, experts.num_experts // ep, experts.dim, experts.ffn_dim, experts.activation,
                             experts.impl)
        self.num_experts, self.num_local_experts, self.ep_size = experts.num_experts, experts.num_experts // ep, ep
        self.expert_group_name = groups.expert_group_name  # DeepSpeed's engine reads these three
        self.group, self.ep_rank = groups.expert, dist.get_rank(groups.expert)
        self.tensor_group = groups.tensor  # None without tensor parallelism
        self.w_in = sharded_parameter(experts.w_in, 0, self.group)
        self.w_out = sharded_parameter(experts.w_out, 0, self.group)
        for p in (self.w_in, self.w_out):
            p.allreduce = False
            p.group_name = self.expert_group_name
        self.register_load_state_dict_pre_hook(_stack_expert_keys)

    @property
    def global_expert_ids(self) -> range:
        """Indices, among all E experts, of the experts this rank holds."""
        return range(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)

    def per_expert_state(self, prefix: str) -> dict[int, dict[str, Tensor]]:
        """{global expert id: {"<prefix>w_in.<id>": its (dim, 2F) slice, "<prefix>w_out.<id>": ...}}."""
        return {
            g: {f"{prefix}{name}.{g}": getattr(self, name)[i].detach().clone() for name in ("w_in", "w_out")}
            for i, g in enumerate(self.global_expert_ids)
        }

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine; the groups were created by `init_parallel_groups` already."""
        from deepspeed.utils import groups as ds_groups

        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"DeepSpeed has no expert group {self.expert_group_name!r}; build the model with "
                               "moeformer.parallel.parallelize")

    def use_fused(self, x: Tensor, capacity: int | None) -> bool:
        """Never: tokens must travel to the ranks holding their experts, through `forward`."""
        return False

    def forward(
        self,
        x: Tensor,
        token_idx: Tensor,
        expert_idx: Tensor,
        weights: Tensor,
        valid: Tensor | None,
        capacity: int | None = None,
        slots_per_token: int | None = None,
    ) -> tuple[Tensor, DispatchPlan]:
        """Like `Experts.forward` (the exchange works on any slot layout, so `slots_per_token` changes nothing):
        x (N, dim) local tokens, per-slot (S,) routing over all E experts. A capacity
        applies per sending rank (each rank caps its own slots per expert). Under tensor parallelism the ranks of
        the tensor group hold the same tokens: each dispatches its 1/tp of them and the outputs are summed."""
        ep, local = self.ep_size, self.num_local_experts
        if self.tensor_group is not None:
            x, weights = reduce_grad(x, self.tensor_group), reduce_grad(weights, self.tensor_group)
            tp, tp_rank = dist.get_world_size(self.tensor_group), dist.get_rank(self.tensor_group)
            mine = token_idx * tp // x.shape[0] == tp_rank
            valid = mine if valid is None else valid & mine
        plan = plan_dispatch(expert_idx, valid, self.num_experts, capacity)
        send_counts = plan.group_sizes.view(ep, local)  # rows for each destination rank's local experts
        recv_counts = exchange_counts(send_counts, self.group)  # [source rank, local expert]
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        order = plan.order[: sum(send_splits)]  # the kept slots, sorted by expert
        tokens = token_idx[order]
        received = all_to_all(x[tokens].to(compute_dtype(x)), send_splits, recv_splits, self.group)
        # received rows are grouped by (source rank, local expert); the kernel wants them grouped by local expert
        local_expert = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        by_expert = torch.argsort(local_expert, stable=True)
        y_by_expert = self.ffn(received[by_expert], recv_counts.sum(0))
        y = torch.empty_like(y_by_expert).index_copy(0, by_expert, y_by_expert)
        y = all_to_all(y, recv_splits, send_splits, self.group).float() * weights[order].unsqueeze(-1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y)
        if self.tensor_group is not None:
            out = all_reduce(out, self.tensor_group)
            counts = torch.cat([plan.tokens_per_expert, plan.dropped.view(1)])
            dist.all_reduce(counts, group=self.tensor_group)
            plan = replace(plan, tokens_per_expert=counts[:-1], dropped=counts[-1])
        return out.to(x.dtype), plan


def _stack_expert_keys(module: ExpertParallelExperts, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: replace per-expert keys "<prefix>w_in.<g>" of this rank's experts by the stacked "<prefix>w_in"."""
    for name in ("w_in", "w_out"):
        keys = [f"{prefix}{name}.{g}" for g in module.global_expert_ids]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


def save_expert_checkpoint(engine, save_dir: str | Path, tag: str | None = None) -> None:
    """Write the expert files DeepSpeed's `load_checkpoint` reads (layer_<l>_expert_<g>_mp_rank_<mp>_model_states.pt)
    for the checkpoint `engine.save_checkpoint(save_dir, tag)` just wrote; one writer per expert shard."""
    from deepspeed.utils import groups as ds_groups

    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    layer_id = 0
    for name, module in engine.module.named_modules():
        if not isinstance(module, DeepSpeedMoE):
            continue
        if not isinstance(module, ExpertParallelExperts):
            raise TypeError(f"{name}: {type(module).__name__} is not an ExpertParallelExperts")
        if ds_groups._get_expert_data_parallel_rank(module.expert_group_name) == 0:
            for g, state in module.per_expert_state(f"{name}.").items():
                path = engine._get_expert_ckpt_name(save_dir, layer_id, g, tag,
                                                    checkpoint_mp_rank=engine.checkpoint_mp_rank)
                engine.checkpoint_engine.save(state, path)
        layer_id += 1
    dist.barrier()


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> list[ExpertParallelExperts]:
    """Shard the routed experts of every MoE layer of `model` over the expert-parallel group (in place); returns
    the new expert modules. No-op at ep=1."""
    if groups.config.ep == 1:
        return []
    replaced = []
    for module in list(model.modules()):
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, groups)
            replaced.append(module.experts)
    if not replaced:
        raise ValueError(f"ep={groups.config.ep} but the model has no MoE layer to shard")
    return replaced
