"""Token dispatchers: `dispatch` routes a forward's token slots to rows sorted by expert (the grouped FFN's input,
`ExpertRows`), `combine` brings the FFN's rows back to token order, each token's slots summed (the routing weights
are applied inside the activation). Two local dispatchers, chosen by `MoEConfig.dispatcher`:

- `DroplessDispatcher`: token-major slots (top-k routing), every real slot computed. One stable sort by expert
  (padding slots after every group, never computed); the permute, weighted SwiGLU and combine are gathers in both
  passes (moe/kernels.py: Triton on CUDA, PyTorch reference elsewhere); no atomics, no host sync.
- `CapacityDispatcher`: any slot layout (expert choice included); expert e keeps its first `capacity` slots in
  slot order and takes rows [e * capacity, (e + 1) * capacity) of a static (E * capacity)-row buffer (unfilled rows
  are zero with weight 0). Static shapes: no host sync, and expert parallelism needs no split-size exchange.

Expert parallelism wraps either in an all-to-all dispatcher (moeformer.parallel.expert), which groups the rows in
the order it sends them (`dispatch_in_order`) and runs the grouped FFN itself (`run_experts`), or the dropless one
in an all-gather dispatcher, which gathers every rank's tokens and marks the slots of other ranks' experts as
padding; the fused decode path
(fused_experts.py) skips the sorted rows altogether and asks the dispatcher only which slots it keeps (`keep`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import DISPATCHERS
from .kernels import Combine, PermuteRows, row_weights
from .router import expert_capacity

if TYPE_CHECKING:
    from .experts import Experts


@dataclass
class Slots:
    """One forward's routed token slots (from `Routing`): slot s sends token token_idx[s] to expert expert_idx[s]
    with weight weights[s]. `valid` (None: no padding) marks real tokens' slots; `top_k` is set when the slots are
    token-major (token t owns slots t*k .. t*k+k-1)."""

    token_idx: Tensor  # (S,) long
    expert_idx: Tensor  # (S,) long
    weights: Tensor  # (S,) fp32
    valid: Tensor | None  # (S,) bool
    top_k: int | None


@dataclass
class ExpertRows:
    """The grouped FFN's input: x's rows grouped by expert, group e holding group_sizes[e] rows; rows after the last
    group (padding) are not computed. Row i's activation is scaled by weights[i], or by weights[weight_index[i]]
    when `weight_index` (a permutation of weights' indices, -1 on the padding rows) is given. `capacity` is set
    when every group has exactly that many rows."""

    x: Tensor  # (R, D) in the compute dtype
    group_sizes: Tensor  # (E_local,) long
    weights: Tensor
    weight_index: Tensor | None = None
    capacity: int | None = None

    def row_weights(self) -> Tensor:
        """(R,) weight of each row."""
        return self.weights if self.weight_index is None else row_weights(self.weights, self.weight_index)


@dataclass
class Dispatched:
    """What `dispatch` returns: this rank's rows sorted by expert (under expert parallelism: in the order they are
    sent), the load of this forward's slots over all experts, and what the dispatcher's `run_experts` and
    `combine` need."""

    rows: ExpertRows
    tokens_per_expert: Tensor  # (E,) long, real-token slots routed to each expert (before any capacity drop)
    dropped: Tensor  # () long, real-token slots dropped by the capacity limit
    state: Any


def bincount(idx: Tensor, size: int) -> Tensor:
    """Counts of each value in [0, size) without the host sync of torch.bincount on CUDA (a scatter-add, which
    inductor also turns into one atomic-add kernel rather than a sort-based index_put)."""
    return torch.zeros(size, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def stable_argsort(keys: Tensor, bound: int) -> Tensor:
    """argsort(keys, stable=True) for integer keys in [0, bound), sorted as the narrowest dtype that holds them: the
    radix sort's passes scale with the key's width (131k slots: int64 124 us, uint8 50 us on an H100)."""
    dtype = torch.uint8 if bound <= 256 else torch.int16 if bound <= 2**15 else torch.int32
    return torch.argsort(keys.to(dtype), stable=True)


def inverse_permutation(perm: Tensor) -> Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on (so bf16 autocast reaches the grouped GEMM),
    else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dispatch_in_order(dispatcher: Dispatcher, x: Tensor, slots: Slots, position: Tensor) -> Dispatched:
    """`dispatcher.dispatch` with the rows grouped as if expert e were expert position[e] (a permutation of the
    experts: the order an all-to-all sends them in); the load counts stay in the experts' own order."""
    dispatched = dispatcher.dispatch(x, replace(slots, expert_idx=position.index_select(0, slots.expert_idx)))
    return replace(dispatched, tokens_per_expert=dispatched.tokens_per_expert.index_select(0, position))


class LocalDispatcher:
    """A dispatcher whose experts are all on this rank: the rows are ready when `dispatch` returns."""

    num_experts: int

    def run_experts(self, experts: Experts, dispatched: Dispatched) -> Tensor:
        """The experts' output rows, in the order `combine` reads them."""
        return experts(dispatched.rows)


class DroplessDispatcher(LocalDispatcher):
    """Every real slot of token-major routing is computed; padding slots sort after every group and are not (their
    rows and inverse positions are -1, which the kernels read as zero). One stable sort by expert, gathers in both
    directions."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def capacity(self, num_tokens: int) -> int | None:
        return None

    def keep(self, slots: Slots, num_tokens: int, count_load: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(slots computed (None: all), tokens_per_expert (None unless `count_load`), dropped): for paths that read
        the slots in place."""
        e, load = self.num_experts, None
        if count_load:
            real = slots.expert_idx if slots.valid is None else torch.where(slots.valid, slots.expert_idx, e)
            load = bincount(real, e + 1)[:e]
        return slots.valid, load, torch.zeros((), dtype=torch.long, device=slots.expert_idx.device)

    def dispatch(self, x: Tensor, slots: Slots) -> Dispatched:
        k, e, s = slots.top_k, self.num_experts, slots.expert_idx.numel()
        if k is None or s != x.shape[0] * k:
            raise ValueError(
                f"the dropless dispatcher needs token-major slots ({x.shape[0]} tokens x top_k), got "
                f"{s} slots with top_k={k}"
            )
        masked = slots.valid is not None
        key = torch.where(slots.valid, slots.expert_idx, e) if masked else slots.expert_idx
        order = stable_argsort(key, e + masked)
        inverse = inverse_permutation(order)
        rows, weight_index = order // k, order
        group_sizes = bincount(key, e + masked)[:e]
        if masked:  # the padding slots' rows (after the groups) and inverse positions: -1, never read
            inverse = torch.where(slots.valid, inverse, -1)
            computed = torch.arange(s, device=order.device) < group_sizes.sum()
            rows, weight_index = torch.where(computed, rows, -1), torch.where(computed, order, -1)
        sorted_x = PermuteRows.apply(x.to(compute_dtype(x)), rows, inverse, k, masked)
        return Dispatched(
            ExpertRows(sorted_x, group_sizes, slots.weights, weight_index),
            group_sizes,
            group_sizes.new_zeros(()),
            (rows, inverse, k, x.dtype, masked),
        )

    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        """out[t] = sum of token t's computed rows, accumulated in fp32."""
        rows, inverse, k, dtype, masked = dispatched.state
        return Combine.apply(y, rows, inverse, k, masked).to(dtype)


class CapacityDispatcher(LocalDispatcher):
    """Expert e keeps its first `capacity(N)` slots (earlier tokens win) in rows [e * C, (e + 1) * C) of a static
    buffer; later slots are dropped. Any slot layout: top-k, or expert choice (exactly C slots per expert)."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float) -> None:
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert, counted with padding so shapes stay static."""
        return expert_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)

    def place(self, slots: Slots, num_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(buffer row of each slot (E * C where not kept), kept (S,) bool, tokens_per_expert, dropped)."""
        e, c, s = self.num_experts, self.capacity(num_tokens), slots.expert_idx.numel()
        key = slots.expert_idx if slots.valid is None else torch.where(slots.valid, slots.expert_idx, e)
        order = stable_argsort(key, e + 1)
        counts = bincount(key, e + 1)
        sorted_key = key.index_select(0, order)
        rank_in_expert = torch.arange(s, device=key.device) - (torch.cumsum(counts, 0) - counts)[sorted_key]
        position = torch.empty_like(order).scatter_(0, order, rank_in_expert)
        kept = (key < e) & (position < c)
        tokens_per_expert = counts[:e]
        return (
            torch.where(kept, key * c + position, e * c),
            kept,
            tokens_per_expert,
            tokens_per_expert.sum() - kept.sum(),
        )

    def keep(self, slots: Slots, num_tokens: int, count_load: bool) -> tuple[Tensor, Tensor, Tensor]:
        _, kept, tokens_per_expert, dropped = self.place(slots, num_tokens)
        return kept, tokens_per_expert, dropped

    def dispatch(self, x: Tensor, slots: Slots) -> Dispatched:
        n, e, s = x.shape[0], self.num_experts, slots.expert_idx.numel()
        c = self.capacity(n)
        dest, _, tokens_per_expert, dropped = self.place(slots, n)
        # buffer row -> slot (s: none; dropped slots all land on the extra row e * c, cut off)
        row_slot = torch.full((e * c + 1,), s, dtype=torch.long, device=x.device)
        row_slot = row_slot.scatter_(0, dest, torch.arange(s, device=x.device))[: e * c]
        row_token = torch.cat([slots.token_idx, slots.token_idx.new_full((1,), n)]).index_select(0, row_slot)
        xc = x.to(compute_dtype(x))
        buffer = torch.cat([xc, xc.new_zeros(1, x.shape[1])]).index_select(0, row_token)
        weights = torch.cat([slots.weights, slots.weights.new_zeros(1)]).index_select(0, row_slot)
        rows = ExpertRows(buffer, torch.full((e,), c, dtype=torch.long, device=x.device), weights, capacity=c)
        return Dispatched(rows, tokens_per_expert, dropped, (row_token, n, x.dtype))

    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        """out[t] = sum of the rows token t filled (fp32 accumulation); unfilled rows go to a cut-off extra row."""
        row_token, n, dtype = dispatched.state
        out = torch.zeros(n + 1, y.shape[1], dtype=torch.float32, device=y.device).index_add_(0, row_token, y.float())
        return out[:n].to(dtype)


Dispatcher = DroplessDispatcher | CapacityDispatcher


def make_dispatcher(name: str, num_experts: int, top_k: int, capacity_factor: float | None) -> Dispatcher:
    """The local dispatcher `MoEConfig.dispatcher` names."""
    if name == "dropless":
        return DroplessDispatcher(num_experts)
    if name == "capacity":
        return CapacityDispatcher(num_experts, top_k, capacity_factor)
    raise ValueError(f"MoEConfig.dispatcher must be one of {DISPATCHERS}, got {name!r}")
