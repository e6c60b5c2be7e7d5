"""Tensor parallelism on the tensor group (Megatron-style): attention heads and MLP hidden units split over the
ranks (column-parallel in, row-parallel out, one all-reduce per sublayer), vocab-parallel embedding and LM head,
and a vocab-parallel cross-entropy. Norms and routers stay replicated (their inputs are identical on every rank of the
group); routed experts too, unless expert tensor parallelism splits each expert's hidden units. With fewer kv heads than ranks, every rank keeps all of k_proj / v_proj and computes
only the kv head its query heads use.

Sharded parameters are marked `tensor_model_parallel = True` (DeepSpeed's gradient-norm bookkeeping) and carry a
`Shard` for resharding; the transform keeps every state-dict key.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moeformer.layers.attention import Attention
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import Experts, MoE
from moeformer.models.model import IGNORE_INDEX
from moeformer.parallel.comm import all_reduce, gather_last_dim, reduce_grad
from moeformer.parallel.groups import ParallelGroups
from moeformer.parallel.reshard import sharded_parameter


def _shard(full: Tensor, dim: int, group, blocks: int = 1) -> nn.Parameter:
    param = sharded_parameter(full, dim, group, blocks)
    param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """This rank's slice of the output features; the input is replicated (its gradient is summed over the group).
    `gather_output` concatenates the slices (used by the LM head so callers see full logits)."""

    def __init__(self, linear: nn.Linear, group, gather_output: bool = False) -> None:
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.weight = _shard(linear.weight, 0, group)
        self.bias = _shard(linear.bias, 0, group) if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(reduce_grad(x, self.group), self.weight, self.bias)
        return gather_last_dim(y, self.group) if self.gather_output else y


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
            super().__init__(experts.num_experts, experts.dim, experts.ffn_dim // dist.get_world_size(group),
                             experts.activation, experts.backend)
        self.group = group
        self.w_in = _shard(experts.w_in, 2, group, blocks=2 if experts.activation == "swiglu" else 1)
        self.w_out = _shard(experts.w_out, 1, group)

    def use_fused(self, x: Tensor) -> bool:
        """Never: the partial expert outputs are summed over the group inside `ffn`."""
        return False

    def ffn(self, x_sorted: Tensor, group_sizes: Tensor, weight: Tensor | None = None,
            rows: Tensor | None = None) -> Tensor:
        # each rank's weight gradient sums over its slice of the activation only: reduce it like x's
        weight = None if weight is None else reduce_grad(weight, self.group)
        return all_reduce(super().ffn(reduce_grad(x_sorted, self.group), group_sizes, weight, rows), self.group)


def vocab_parallel_cross_entropy(local_logits: Tensor, targets: Tensor, group) -> Tensor:
    """Mean cross-entropy of logits split over the vocabulary (rank r holds columns [r * V_r, (r + 1) * V_r))
    without gathering them: max, sum of exponentials and the target logit are reduced over the group (fp32).
    Targets equal to -100 are ignored."""
    logits = local_logits.float().reshape(-1, local_logits.shape[-1])
    targets = targets.reshape(-1)
    part = logits.shape[-1]
    start = dist.get_rank(group) * part
    peak = logits.detach().amax(dim=-1)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak.unsqueeze(-1)
    sum_exp = all_reduce(shifted.exp().sum(dim=-1), group)
    local = targets - start
    inside = (local >= 0) & (local < part)
    picked = shifted.gather(-1, torch.where(inside, local, 0).unsqueeze(-1)).squeeze(-1)
    target_logit = all_reduce(torch.where(inside, picked, 0.0), group)
    valid = targets != IGNORE_INDEX
    losses = torch.where(valid, sum_exp.log() - target_logit, 0.0)
    return losses.sum() / valid.sum().clamp(min=1)


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
            raise NotImplementedError(f"layer {i}: tensor parallelism supports softmax attention only, got "
                                      f"{type(block.attn).__name__}")
        if block.attn.qk_norm == "full":
            raise NotImplementedError(f"layer {i}: tensor parallelism with qk_norm='full' (one norm over all heads) "
                                      "is not supported")
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
    model.lm_head = ColumnParallelLinear(model.lm_head, group, gather_output=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
