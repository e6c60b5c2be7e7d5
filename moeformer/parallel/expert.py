"""Expert parallelism: each rank of the expert-parallel group holds E / ep experts. `AllToAllDispatcher` wraps the
layer's local dispatcher: its rows (sorted by global expert, so each destination rank's rows are contiguous) travel
to the ranks holding their experts in one all-to-all, are regrouped there by local expert with a computed
permutation (no sort), run through the grouped FFN and come back the same way to be combined by the local
dispatcher on the rank that owns the token. Dropless: the split sizes are exchanged first, the one host sync per
layer; capacity: the splits are static. The forward all-to-alls run while the shared expert computes.

`ExpertParallelExperts` replaces `MoE.experts` in place, so the MoE layer (router, losses, shared expert) and every
state-dict key are unchanged. It is also a `deepspeed.moe.layer.MoE`, which is how DeepSpeed's engine recognises an
MoE model; its parameters carry DeepSpeed's expert tags (`allreduce = False`, `group_name = "ep_size_<ep>"`), so
the engine and ZeRO-1/2 reduce (and partition) them over the expert-data-parallel group only, averaged over the
whole data-parallel world, while the other parameters are averaged over the data-parallel group as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

from moeformer.layers.moe import (
    Dispatched,
    Dispatcher,
    ExpertRows,
    Experts,
    MoE,
    Slots,
    source_major_to_expert_major,
)
from moeformer.layers.moe.kernels import PermuteRows
from moeformer.parallel.comm import all_reduce, all_to_all, exchange_counts, reduce_grad
from moeformer.parallel.groups import ParallelGroups
from moeformer.parallel.reshard import sharded_parameter


@dataclass
class _Exchange:
    """An all-to-all dispatch in flight (`Dispatched.state` of `AllToAllDispatcher`)."""

    local: Dispatched  # the local dispatcher's result, for its combine
    send_splits: list[int]
    recv_splits: list[int]
    recv_counts: Tensor | None  # [source rank, local expert] rows received (None: static capacity layout)
    capacity: int | None
    received: tuple[Tensor, Tensor] | None  # rows and their weights, valid once `pending` is done
    pending: list
    share: tuple[int, int, int] | None  # under tensor parallelism: this rank's tokens [lo, hi) of n
    permutation: tuple[Tensor, Tensor] | None = None  # (dest, src) of the regrouping by local expert


class AllToAllDispatcher:
    """`local` (a dispatcher over all E experts) across the expert-parallel `group`; rank r holds experts
    [r * L, (r + 1) * L). Under tensor parallelism the ranks of `tensor_group` hold the same tokens: each
    dispatches its 1/tp of them and the outputs are summed. A capacity applies per sending rank."""

    def __init__(self, local: Dispatcher, group, tensor_group=None) -> None:
        self.local, self.group, self.tensor_group = local, group, tensor_group
        self.num_experts, self.ep = local.num_experts, dist.get_world_size(group)
        self.num_local = self.num_experts // self.ep

    def capacity(self, num_tokens: int) -> int | None:
        return self.local.capacity(num_tokens)

    @torch.compiler.disable  # communication and a host sync: eager between the compiled parts
    def dispatch(self, x: Tensor, slots: Slots) -> Dispatched:
        """Start the all-to-all of this rank's rows; `expert_rows` waits for it."""
        share = None
        if self.tensor_group is not None:
            x, slots, share = self._tensor_share(x, slots)
        local = self.local.dispatch(x, slots)
        rows, ep, pending = local.rows, self.ep, []
        if rows.capacity is not None:  # static: L groups of `capacity` rows for each rank
            send_splits = recv_splits = [self.num_local * rows.capacity] * ep
            recv_counts = None
        else:
            send_counts = rows.group_sizes.view(ep, self.num_local)
            recv_counts = exchange_counts(send_counts, self.group)  # [source rank, local expert]
            send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # host sync
        x_recv = all_to_all(rows.x, send_splits, recv_splits, self.group, pending)
        w_recv = all_to_all(rows.row_weights(), send_splits, recv_splits, self.group, pending)
        tokens_per_expert, dropped = local.tokens_per_expert, local.dropped
        if self.tensor_group is not None:
            counts = torch.cat([tokens_per_expert, dropped.view(1)])
            dist.all_reduce(counts, group=self.tensor_group)
            tokens_per_expert, dropped = counts[:-1], counts[-1]
        exchange = _Exchange(
            local, send_splits, recv_splits, recv_counts, rows.capacity, (x_recv, w_recv), pending, share
        )
        return Dispatched(None, tokens_per_expert, dropped, exchange)

    @torch.compiler.disable
    def expert_rows(self, dispatched: Dispatched) -> ExpertRows:
        """The received rows grouped by local expert, once they have arrived."""
        ex: _Exchange = dispatched.state
        for work in ex.pending:
            work.wait()
        (x_recv, w_recv), ex.received, ex.pending = ex.received, None, []
        if ex.capacity is not None:  # (source, expert, row) -> (expert, source, row): a transpose
            c, ep, local = ex.capacity, self.ep, self.num_local
            group_sizes = torch.full((local,), ep * c, dtype=torch.long, device=x_recv.device)
            x_sorted = x_recv.view(ep, local, c, -1).transpose(0, 1).reshape(x_recv.shape)
            return ExpertRows(
                x_sorted, group_sizes, w_recv.view(ep, local, c).transpose(0, 1).flatten(), capacity=ep * c
            )
        ex.permutation = dest, src = source_major_to_expert_major(ex.recv_counts, sum(ex.recv_splits))
        return ExpertRows(PermuteRows.apply(x_recv, src, dest, 1), ex.recv_counts.sum(0), w_recv, src)

    @torch.compiler.disable
    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        """The rows back to their source ranks (in the order they were sent), then the local combine."""
        ex: _Exchange = dispatched.state
        if ex.capacity is not None:
            y = y.view(self.num_local, self.ep, ex.capacity, -1).transpose(0, 1).reshape(y.shape)
        else:
            dest, src = ex.permutation
            y = PermuteRows.apply(y, dest, src, 1)
        out = self.local.combine(all_to_all(y, ex.recv_splits, ex.send_splits, self.group), ex.local)
        if self.tensor_group is None:
            return out
        if ex.share is not None:  # this rank's tokens [lo, hi) of n, zero elsewhere
            lo, hi, n = ex.share
            out = F.pad(out, (0, 0, lo, n - hi))
        return all_reduce(out, self.tensor_group)

    def _tensor_share(self, x: Tensor, slots: Slots) -> tuple[Tensor, Slots, tuple[int, int, int] | None]:
        """This tensor rank's 1/tp of the tokens (the ranks of the tensor group hold the same ones; gradients summed
        over them): token-major dropless slots are cut to its contiguous share [lo, hi) of the tokens (returned as
        (lo, hi, n)), other layouts (the capacity buffer is static anyway) mask the other ranks' slots."""
        x, weights = reduce_grad(x, self.tensor_group), reduce_grad(slots.weights, self.tensor_group)
        tp, rank, n = dist.get_world_size(self.tensor_group), dist.get_rank(self.tensor_group), x.shape[0]
        k = slots.top_k
        if k is None or self.local.capacity(n) is not None:
            mine = slots.token_idx * tp // n == rank
            return x, replace(slots, weights=weights, valid=mine if slots.valid is None else slots.valid & mine), None
        lo, hi = -(-rank * n // tp), -(-(rank + 1) * n // tp)  # the tokens t with t * tp // n == rank
        cut = slice(lo * k, hi * k)
        valid = None if slots.valid is None else slots.valid[cut]
        return x[lo:hi], Slots(slots.token_idx[cut] - lo, slots.expert_idx[cut], weights[cut], valid, k), (lo, hi, n)


class ExpertParallelExperts(DeepSpeedMoE, Experts):
    """This rank's slice of an `Experts` (experts [rank * L, (rank + 1) * L), L = E / ep), tagged for DeepSpeed:
    the grouped FFN over the rows `AllToAllDispatcher` brings."""

    def __init__(self, experts: Experts, groups: ParallelGroups) -> None:
        ep = groups.config.ep
        if experts.num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={experts.num_experts}")
        with torch.device("meta"):  # settings only: the weights are replaced by this rank's slices below
            Experts.__init__(
                self, experts.num_experts // ep, experts.dim, experts.ffn_dim, experts.activation, experts.backend
            )
        # DeepSpeed's engine reads these four (num_experts: all of them, as DeepSpeed counts)
        self.num_experts, self.num_local_experts, self.ep_size = experts.num_experts, experts.num_experts // ep, ep
        self.expert_group_name = groups.expert_group_name
        self.group, self.ep_rank = groups.expert, dist.get_rank(groups.expert)
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
            raise RuntimeError(
                f"DeepSpeed has no expert group {self.expert_group_name!r}; build the model with "
                "moeformer.parallel.parallelize"
            )

    def use_fused(self, x: Tensor) -> bool:
        """Never: tokens must travel to the ranks holding their experts."""
        return False

    forward = Experts.forward  # not DeepSpeed's MoE.forward


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
                path = engine._get_expert_ckpt_name(
                    save_dir, layer_id, g, tag, checkpoint_mp_rank=engine.checkpoint_mp_rank
                )
                engine.checkpoint_engine.save(state, path)
        layer_id += 1
    dist.barrier()


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> list[ExpertParallelExperts]:
    """Shard the routed experts of every MoE layer of `model` over the expert-parallel group and give the layer the
    all-to-all dispatcher (in place); returns the new expert modules. No-op at ep=1."""
    if groups.config.ep == 1:
        return []
    replaced = []
    for module in list(model.modules()):
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, groups)
            module.dispatcher = AllToAllDispatcher(module.dispatcher, groups.expert, groups.tensor)
            replaced.append(module.experts)
    if not replaced:
        raise ValueError(f"ep={groups.config.ep} but the model has no MoE layer to shard")
    return replaced
