"""Collectives used by the parallel layers: differentiable ones (forward op and its adjoint in backward) and the
expert-parallel all-to-all."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group


def start_all_to_all(out: Tensor, x: Tensor, send_splits: list[int], recv_splits: list[int], group):
    """Start the variable-size all-to-all of x's rows into `out` (rows [sum(send_splits[:j]), ...) go to rank j,
    `out` holds rank j's rows in order) and return its work handle: wait on it before reading `out`. Not
    differentiable: the expert-parallel dispatcher pairs each with its adjoint itself."""
    return dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group, async_op=True)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """counts (G, ...) with row j meant for rank j of `group` -> rows received, row j from rank j."""
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


class _AllReduce(torch.autograd.Function):
    """Sum over the group in forward, identity in backward (the output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ReduceGrad(torch.autograd.Function):
    """Identity in forward, sum of the gradients over the group in backward (the input of a column-parallel layer,
    and parameters that every rank uses for a different part of the output)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Concatenate the ranks' last-dim shards in forward; keep this rank's slice of the gradient in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


class _RowCollective(torch.autograd.Function):
    """All-gather of the ranks' rows (stacked in rank order) or reduce-scatter (rows summed over the ranks, each rank
    keeping its block): each is the other's adjoint, so backward runs the other one on the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group, gather: bool) -> Tensor:
        ctx.group, ctx.gather = group, gather
        return _row_collective(x, group, gather)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _row_collective(grad, ctx.group, not ctx.gather), None, None


# The row collectives are c10d's own (the caller's stream waits for them; the host does not), registered as custom
# ops so that torch.compile keeps each as one call. Functional collectives would trace natively but cost ~5x the
# host time per call (150 vs 31 us for an all-gather on an H200 pair, torch 2.11): six of them per layer made a
# compiled expert-parallel step host-bound.
def _gathered(x: Tensor, group_name: str) -> Tensor:
    """An empty all-gather output for x (also the op's fake: its shape)."""
    return x.new_empty((dist.get_world_size(_resolve_process_group(group_name)) * x.shape[0], *x.shape[1:]))


def _scattered(x: Tensor, group_name: str) -> Tensor:
    """An empty reduce-scatter output for x (also the op's fake)."""
    return x.new_empty((x.shape[0] // dist.get_world_size(_resolve_process_group(group_name)), *x.shape[1:]))


def _all_gather_into(x: Tensor, group_name: str) -> Tensor:
    out = _gathered(x, group_name)
    dist.all_gather_into_tensor(out, x, group=_resolve_process_group(group_name))
    return out


def _reduce_scatter_into(x: Tensor, group_name: str) -> Tensor:
    out = _scattered(x, group_name)
    dist.reduce_scatter_tensor(out, x, group=_resolve_process_group(group_name))
    return out


_ALL_GATHER = torch.library.custom_op("moeformer::all_gather_into", _all_gather_into, mutates_args=())
_ALL_GATHER.register_fake(_gathered)
_REDUCE_SCATTER = torch.library.custom_op("moeformer::reduce_scatter_into", _reduce_scatter_into, mutates_args=())
_REDUCE_SCATTER.register_fake(_scattered)
_ROW_OPS = {True: (_all_gather_into, _ALL_GATHER), False: (_reduce_scatter_into, _REDUCE_SCATTER)}  # (eager, traced)


def _row_collective(x: Tensor, group, gather: bool) -> Tensor:
    """The all-gather (`gather`) or reduce-scatter of x's rows: the custom op while torch.compile traces, the function
    itself in eager (no custom-op dispatch)."""
    eager, traced = _ROW_OPS[gather]
    return (traced if torch.compiler.is_compiling() else eager)(x.contiguous(), group.group_name)


def all_gather_rows(x: Tensor, group) -> Tensor:
    return _RowCollective.apply(x, group, True)


def reduce_scatter_rows(x: Tensor, group) -> Tensor:
    return _RowCollective.apply(x, group, False)


def all_reduce(x: Tensor, group) -> Tensor:
    return _AllReduce.apply(x, group)


def reduce_grad(x: Tensor, group) -> Tensor:
    return _ReduceGrad.apply(x, group)


def gather_last_dim(x: Tensor, group) -> Tensor:
    return _GatherLastDim.apply(x, group)
