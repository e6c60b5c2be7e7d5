"""Routed experts stored as 3-D weights and run over an expert-sorted buffer of token slots: one grouped GEMM
(torch._grouped_mm) where supported, else a reference loop over experts. Dropless, or capped per expert.

Three paths. The fused one (fused_experts.py) reads each chosen expert's weights in place, for inference: decoding
(few tokens, where sorting into a buffer costs more than the matmuls) and every quantized forward. Two training
dispatch paths share the expert FFN: the generic one (any slot layout, capacity limits) gathers slots into the
sorted buffer and scatter-adds the weighted outputs back; the token-major dropless one (token t owns slots t*k ..
t*k+k-1, the layout of top-k routing) applies the routing weights inside the activation, only gathers, in both
directions and in both passes, and sums each token's k outputs in one fused pass (moe/kernels.py): no atomics, no
fp32 copies of the buffer, no host sync."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeformer.layers.quant import QuantizedWeight

from .fused_experts import MAX_SCAN_SLOTS, fused_experts, triton_serves
from .kernels import Combine, PermuteRows, swiglu

EXPERT_IMPLS = ("auto", "grouped", "loop")
# Full-precision experts take the fused path up to this many tokens (decoding up to batch 64); beyond it the sorted
# buffer and grouped GEMM read each expert's weights once for many rows and win. To be tuned by measurement.
FUSED_MAX_TOKENS = 64


@dataclass
class DispatchPlan:
    """Layout of the expert-sorted buffer: rows [0, group_sizes.sum()) hold each expert's slots as contiguous
    groups in expert order; the rows behind them (padding and dropped slots) are not computed."""

    order: Tensor  # (S,) slot index of each buffer row
    group_sizes: Tensor  # (E,) long, rows computed by each expert
    kept: Tensor  # (S,) bool, buffer rows that belong to an expert group
    tokens_per_expert: Tensor  # (E,) long, real-token slots routed to each expert (before any capacity drop)
    dropped: Tensor  # () long, real-token slots dropped by the capacity limit


def _bincount(idx: Tensor, size: int) -> Tensor:
    """Counts of each value in [0, size) without the host sync of torch.bincount on CUDA (a scatter-add, which
    inductor also turns into one atomic-add kernel rather than a sort-based index_put)."""
    return torch.zeros(size, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def _stable_argsort(keys: Tensor, bound: int) -> Tensor:
    """argsort(keys, stable=True) for integer keys in [0, bound), sorted as the narrowest dtype that holds them: the
    radix sort's passes scale with the key's width (131k slots: int64 124 us, uint8 50 us on an H100)."""
    dtype = torch.uint8 if bound <= 256 else torch.int16 if bound <= 2**15 else torch.int32
    return torch.argsort(keys.to(dtype), stable=True)


def plan_dispatch(
    expert_idx: Tensor, valid: Tensor | None, num_experts: int, capacity: int | None = None
) -> DispatchPlan:
    """Stable-sort slots by expert, padding slots (valid=False; None: no padding) last. With a capacity, each expert
    keeps its first `capacity` slots in slot order, i.e. earlier tokens win; its later slots are dropped and moved
    behind."""
    e, s = num_experts, expert_idx.numel()
    key = expert_idx if valid is None else torch.where(valid, expert_idx, e)  # padding: a sentinel group at the end
    order = _stable_argsort(key, e + 1)
    counts = _bincount(key, e + 1)
    routed = counts[:e]
    group_sizes, dropped = routed, torch.zeros((), dtype=torch.long, device=key.device)
    if capacity is not None:
        sorted_key = key[order]
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(s, device=key.device) - starts[sorted_key]
        overflow = (sorted_key < e) & (position >= capacity)
        dropped = overflow.sum()
        order = order[_stable_argsort(torch.where(overflow, e, sorted_key), e + 1)]
        group_sizes = routed.clamp(max=capacity)
    kept = torch.arange(s, device=key.device) < group_sizes.sum()
    return DispatchPlan(order, group_sizes, kept, routed, dropped)


def grouped_mm_available(x: Tensor, dim: int, ffn_dim: int) -> bool:
    """torch._grouped_mm's fast kernel: CUDA with compute capability >= 9.0, bf16, and 16-byte aligned rows
    (model and expert widths multiples of 8)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and dim % 8 == 0
        and ffn_dim % 8 == 0
    )


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on (so bf16 autocast reaches the grouped GEMM),
    else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _loop_matmul(x: Tensor, w: Tensor, group_sizes: Tensor) -> Tensor:
    """Reference for torch._grouped_mm: one matmul per expert over its slice (syncs on the group sizes)."""
    sizes = group_sizes.tolist()
    rest = x.shape[0] - sum(sizes)
    chunks = x.split(sizes + [rest])
    outs = [chunk @ w[i] for i, chunk in enumerate(chunks[:-1])]
    return torch.cat(outs + [x.new_zeros(rest, w.shape[-1])])


class Experts(nn.Module):
    """E feed-forward experts: w_in (E, dim, 2F as [gate | up] for swiglu, F for gelu), w_out (E, F, dim)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        activation: str = "swiglu",
        impl: str = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"expert activation must be 'swiglu' or 'gelu', got {activation!r}")
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.activation, self.impl = activation, impl
        in_width = 2 * ffn_dim if activation == "swiglu" else ffn_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std)

    @property
    def quantized(self) -> bool:
        return isinstance(self.w_in, QuantizedWeight)

    @torch.no_grad()
    def quantize_(self, mode: str, group_size: int = 128, empty: bool = False) -> None:
        """Replace w_in and w_out by int8/int4 `QuantizedWeight`s (codes (E, out, in)): quantized from the current
        weights, or `empty` (shapes only, on the weights' device, meta included) for a loader to fill."""
        quantized = {}
        for name in ("w_in", "w_out"):
            w = getattr(self, name)
            q = QuantizedWeight(tuple(w.shape), mode, group_size, w.dtype, w.device if empty else "meta",
                                transposed=True)
            quantized[name] = q if empty else q.quantize_(w.detach())
        for name, q in quantized.items():
            delattr(self, name)
            setattr(self, name, q)

    def dense_weights(self) -> tuple[Tensor, Tensor]:
        """(w_in, w_out) in full precision: the parameters, or the dequantised codes in fp32."""
        if self.quantized:
            return self.w_in.dequantize(), self.w_out.dequantize()
        return self.w_in, self.w_out

    def use_fused(self, x: Tensor, capacity: int | None) -> bool:
        """Whether `forward_fused` serves x (N, dim). Always for quantized experts (the only path that reads codes).
        Full-precision experts take it to decode: not training, no gradient needed, at most FUSED_MAX_TOKENS tokens,
        dropless, the Triton kernels available for x and the weights in the compute dtype."""
        if self.quantized:
            return True
        grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad or self.w_out.requires_grad)
        return (not self.training and not grad and capacity is None and x.shape[0] <= FUSED_MAX_TOKENS
                and triton_serves(x) and self.w_in.dtype == compute_dtype(x))

    def forward_fused(
        self,
        x: Tensor,
        token_idx: Tensor,
        expert_idx: Tensor,
        weights: Tensor,
        valid: Tensor | None,
        capacity: int | None = None,
        slots_per_token: int | None = None,
        count_load: bool = True,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """`forward` through the fused kernels: same arguments and output; padding and dropped slots get weight 0.
        Returns (out, (tokens_per_expert, dropped)), the load only when `count_load` (or a capacity needs it)."""
        e = self.num_experts
        keep, load = valid, None
        if capacity is not None:
            plan = plan_dispatch(expert_idx, valid, e, capacity)
            keep = torch.zeros_like(expert_idx, dtype=torch.bool).scatter_(0, plan.order, plan.kept)
            load = (plan.tokens_per_expert, plan.dropped)
        elif count_load:
            real = expert_idx if valid is None else torch.where(valid, expert_idx, e)
            load = (_bincount(real, e + 1)[:e], torch.zeros((), dtype=torch.long, device=x.device))
        if keep is not None:
            weights = torch.where(keep, weights, 0.0)
        order = counts = None
        if expert_idx.numel() > MAX_SCAN_SLOTS:
            order, counts = _stable_argsort(expert_idx, e), _bincount(expert_idx, e)
        y = fused_experts(x.to(compute_dtype(x)), None if slots_per_token else token_idx, expert_idx, weights,
                          self.w_in, self.w_out, self.activation, order, counts)
        if slots_per_token is not None:  # token-major: each token's k slots are consecutive
            out = y.view(y.shape[0], x.shape[0], slots_per_token, x.shape[1]).sum((0, 2))
        else:
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_idx, y.sum(0))
        return out.to(x.dtype), load

    def use_grouped_mm(self, x: Tensor) -> bool:
        """Whether this input goes through torch._grouped_mm ("grouped" forces it, "loop" never)."""
        if self.impl == "auto":
            return grouped_mm_available(x, self.dim, self.ffn_dim)
        return self.impl == "grouped"

    def ffn(self, x_sorted: Tensor, group_sizes: Tensor, weight: Tensor | None = None,
            rows: Tensor | None = None) -> Tensor:
        """Expert e's FFN on its group of rows of the sorted buffer; rows past the groups are undefined. With
        `weight`, buffer row i's activation is scaled by weight[rows[i]] (`rows` a permutation of weight's indices):
        the output is then already weighted."""
        if self.use_grouped_mm(x_sorted):
            # rows of group e (ending at offs[e]) times w[e] in one kernel; rows past the groups come back undefined
            matmul = functools.partial(torch._grouped_mm, offs=torch.cumsum(group_sizes, 0, dtype=torch.int32))
        else:
            matmul = functools.partial(_loop_matmul, group_sizes=group_sizes)
        h = matmul(x_sorted, self.w_in.to(x_sorted.dtype))
        if self.activation == "swiglu":
            h = swiglu(h, weight, rows)
        else:
            h = F.gelu(h)
            if weight is not None:
                h = (h.float() * weight.index_select(0, rows).unsqueeze(-1)).to(x_sorted.dtype)
        return matmul(h, self.w_out.to(x_sorted.dtype))

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
        """Sum over each token's slots of weight * expert(x[token]). x (N, dim); token_idx, expert_idx, weights,
        valid (S,) per slot (valid None: no padding). Padding (valid=False) and dropped slots contribute zero.
        `slots_per_token=k` declares token-major slots (token_idx == arange(N).repeat_interleave(k)) and, when
        dropless, takes the gather-only path."""
        if capacity is None and slots_per_token is not None:
            return self.forward_token_major(x, expert_idx, weights, valid, slots_per_token)
        plan = plan_dispatch(expert_idx, valid, self.num_experts, capacity)
        tokens = token_idx[plan.order]
        kept = plan.kept.unsqueeze(-1)
        # masking both sides keeps the undefined rows (values and gradients) of the grouped GEMM out of the result
        x_sorted = torch.where(kept, x[tokens], 0).to(compute_dtype(x))
        y = torch.where(kept, self.ffn(x_sorted, plan.group_sizes), 0)
        y = y.float() * weights[plan.order].unsqueeze(-1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y)
        return out.to(x.dtype), plan

    def forward_token_major(
        self, x: Tensor, expert_idx: Tensor, weights: Tensor, valid: Tensor | None, k: int
    ) -> tuple[Tensor, DispatchPlan]:
        """Dropless path for token-major slots. Every slot is computed (padding slots get weight 0), so the grouped
        GEMM has no undefined rows; the activation applies the weights and the combine is out[t] = sum_j y[slot
        t*k + j], accumulated in fp32."""
        n, e, s = x.shape[0], self.num_experts, expert_idx.numel()
        if s != n * k:
            raise ValueError(f"token-major dispatch needs {n} x {k} slots, got {s}")
        order = _stable_argsort(expert_idx, e)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(s, device=order.device))
        rows = order // k
        if valid is None:
            tokens_per_expert = group_sizes = _bincount(expert_idx, e)
        else:
            counts = _bincount(torch.where(valid, expert_idx, expert_idx + e), 2 * e)  # real slots, then padding
            tokens_per_expert, group_sizes = counts[:e], counts[:e] + counts[e:]
            weights = torch.where(valid, weights, 0.0)
        y = self.ffn(PermuteRows.apply(x.to(compute_dtype(x)), rows, inverse, k), group_sizes, weights, order)
        out = Combine.apply(y, rows, inverse, k)
        kept = torch.ones_like(expert_idx, dtype=torch.bool)
        return out.to(x.dtype), DispatchPlan(order, group_sizes, kept, tokens_per_expert, group_sizes.new_zeros(()))
