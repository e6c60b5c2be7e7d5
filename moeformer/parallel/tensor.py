"""Tensor parallelism on the tensor group (Megatron-style): attention heads and MLP hidden units split over the
ranks (column-parallel in, row-parallel out, one all-reduce per sublayer), vocab-parallel embedding and LM head
(its cross-entropy reduced over the ranks, never gathering the logits). Norms and routers stay replicated (their
inputs are identical on every rank of the group); routed experts too, unless expert tensor parallelism splits each
expert's hidden units. With fewer kv heads than ranks, every rank keeps all of k_proj / v_proj and computes only
the kv head its query heads use.

Sharded parameters are marked `tensor_model_parallel = True` (DeepSpeed's gradient-norm bookkeeping) and carry a
`Shard` for resharding; the transform keeps every state-dict key.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moeformer.layers.attention import Attention
from moeformer.layers.lm_head import VocabSplit, linear_cross_entropy
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import Experts, MoE
from moeformer.parallel.comm import all_reduce, gather_last_dim, reduce_grad
from moeformer.parallel.groups import ParallelGroups
from moeformer.parallel.reshard import sharded_parameter


def _shard(full: Tensor, dim: int, group, blocks: int = 1) -> nn.Parameter:
    param = sharded_parameter(full, dim, group, blocks)
    param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """This rank's slice of the output features; the input is replicated (its gradient is summed over the group)."""

    def __init__(self, linear: nn.Linear, group) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(linear.weight, 0, group)
        self.bias = _shard(linear.bias, 0, group) if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(reduce_grad(x, self.group), self.weight, self.bias)


class VocabParallelLMHead(nn.Module):
    """The LM head's rows [start, start + V / tp) on this rank. Answers `LMHead`'s call: full logits (gathered) for
    `x` alone, or with targets the mean cross-entropy through `linear_cross_entropy` over the split vocabulary,
    chunked and fused, without gathering any logits."""

    def __init__(self, head: nn.Linear, group) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(head.weight, 0, group)

    def forward(self, x: Tensor, targets: Tensor | None = None, chunk_size: int = 4096) -> Tensor:
        x = reduce_grad(x, self.group)  # each rank's part of the input gradient is summed
        if targets is None:
            return gather_last_dim(F.linear(x, self.weight), self.group)
        return linear_cross_entropy(x, self.weight, targets, chunk_size, split=self.split)

    @property
    def split(self) -> VocabSplit:
        return VocabSplit(
            dist.get_rank(self.group) * self.weight.shape[0],
            functools.partial(_all_reduce_, op=dist.ReduceOp.MAX, group=self.group),
            functools.partial(_all_reduce_, op=dist.ReduceOp.SUM, group=self.group),
        )


def _all_reduce_(x: Tensor, op, group) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


class RowParallelLinear(nn.Module):
    """This rank's slice of the input features; partial products are summed over the group, then the bias."""

    def __init__(self, linear: nn.Linear, group) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(linear.weight, 1, group)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class HeadSelectLinear(nn.Module):
    """A replicated projection of which this rank computes only output rows [start, stop) (its kv head); gradients
    of the weight and input are summed over the group, so every replica sees the full gradient."""

    def __init__(self, linear: nn.Linear, group, start: int, stop: int) -> None:
        super().__init__()
        self.group, self.start, self.stop = group, start, stop
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        weight = reduce_grad(self.weight, self.group)[self.start : self.stop]
        bias = reduce_grad(self.bias, self.group)[self.start : self.stop] if self.bias is not None else None
        return F.linear(reduce_grad(x, self.group), weight, bias)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V / tp) of the table on this rank; other ids contribute zero, outputs summed."""

    def __init__(self, embedding: nn.Embedding, group) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(embedding.weight, 0, group)
        self.start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        return all_reduce(torch.where(inside.unsqueeze(-1), out, 0), self.group)


class TensorParallelExperts(Experts):
    """Expert tensor parallelism: every expert keeps 1/tp of its hidden units on each rank of the tensor group
    (w_in's gate and up halves split alike, w_out's rows); the ranks see the same tokens and sum their partial
    expert outputs. Dispatch and combine are `Experts`' own."""

    def __init__(self, experts: Experts, group) -> None:
        with torch.device("meta"):  # settings only: the weights are replaced by this rank's slices below
            super().__init__(
                experts.num_experts,
                experts.dim,
                experts.ffn_dim // dist.get_world_size(group),
                experts.activation,
                experts.backend,
            )
        self.group = group
        self.w_in = _shard(experts.w_in, 2, group, blocks=2 if experts.activation == "swiglu" else 1)
        self.w_out = _shard(experts.w_out, 1, group)

    def use_fused(self, x: Tensor) -> bool:
        """Never: the partial expert outputs are summed over the group inside `ffn`."""
        return False

    def ffn(
        self, x_sorted: Tensor, group_sizes: Tensor, weight: Tensor | None = None, rows: Tensor | None = None
    ) -> Tensor:
        # each rank's weight gradient sums over its slice of the activation only: reduce it like x's
        weight = None if weight is None else reduce_grad(weight, self.group)
        return all_reduce(super().ffn(reduce_grad(x_sorted, self.group), group_sizes, weight, rows), self.group)


def _parallel_attention(attn: Attention, group) -> None:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    attn.q_proj, attn.o_proj = ColumnParallelLinear(attn.q_proj, group), RowParallelLinear(attn.o_proj, group)
    if attn.n_kv_heads % tp == 0:
        attn.k_proj, attn.v_proj = ColumnParallelLinear(attn.k_proj, group), ColumnParallelLinear(attn.v_proj, group)
        attn.n_kv_heads //= tp
    else:  # fewer kv heads than ranks: each rank computes the one kv head of its query heads
        head = rank * attn.n_kv_heads // tp
        rows = (head * attn.head_dim, (head + 1) * attn.head_dim)
        attn.k_proj, attn.v_proj = (HeadSelectLinear(p, group, *rows) for p in (attn.k_proj, attn.v_proj))
        attn.n_kv_heads = 1
    attn.n_heads //= tp


def _parallel_mlp(mlp: MLP, group) -> None:
    if mlp.activation == "swiglu":
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, group)
    mlp.up_proj, mlp.down_proj = ColumnParallelLinear(mlp.up_proj, group), RowParallelLinear(mlp.down_proj, group)


def apply_tensor_parallel(model: nn.Module, groups: ParallelGroups) -> None:
    """Split `model` (a CausalLM) over the tensor group in place (routed experts too with `expert_tp`); no-op at
    tp=1."""
    group = groups.tensor
    if groups.config.tp == 1:
        return
    tp = groups.config.tp
    for i, block in enumerate(model.layers):  # checked before anything changes
        if not isinstance(block.attn, Attention):
            raise NotImplementedError(
                f"layer {i}: tensor parallelism supports softmax attention only, got {type(block.attn).__name__}"
            )
        if block.attn.qk_norm == "full":
            raise NotImplementedError(
                f"layer {i}: tensor parallelism with qk_norm='full' (one norm over all heads) is not supported"
            )
    if model.config.vocab_size % tp:
        raise ValueError(f"tp={tp} does not divide vocab_size={model.config.vocab_size}")
    for module in list(model.modules()):
        if isinstance(module, Attention):
            _parallel_attention(module, group)
        elif isinstance(module, MLP):
            _parallel_mlp(module, group)
        elif groups.config.expert_tp and isinstance(module, MoE):
            module.experts = TensorParallelExperts(module.experts, group)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group)
    model.lm_head = VocabParallelLMHead(model.lm_head, group)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
