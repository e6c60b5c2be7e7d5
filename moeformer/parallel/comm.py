"""Differentiable collectives used by the parallel layers (forward op and its adjoint in backward)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_to_all(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group, pending: list | None = None
) -> Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(
        out, x.contiguous(), recv_splits, send_splits, group=group, async_op=pending is not None
    )
    if pending is not None:
        pending.append(work)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send_splits[:j]), ...) go to rank j; backward returns the gradients along the reversed splits."""

    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group, pending: list | None) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group, pending)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None, None


def all_to_all(x: Tensor, send_splits: list[int], recv_splits: list[int], group, pending: list | None = None) -> Tensor:
    """Variable-size all-to-all of the rows of x over `group` (autograd-aware). With `pending` (a list) the forward
    only starts it, appending its work handle: wait on that before reading the result."""
    return _AllToAll.apply(x, send_splits, recv_splits, group, pending)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """counts (G, ...) with row j meant for rank j of `group` -> rows received, row j from rank j."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
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


def all_reduce(x: Tensor, group) -> Tensor:
    return _AllReduce.apply(x, group)


def reduce_grad(x: Tensor, group) -> Tensor:
    return _ReduceGrad.apply(x, group)


def gather_last_dim(x: Tensor, group) -> Tensor:
    return _GatherLastDim.apply(x, group)
