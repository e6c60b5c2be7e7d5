"""Expert parallelism: each rank of the expert-parallel group holds E / ep experts. `AllToAllDispatcher` wraps the
layer's local dispatcher, which groups this rank's rows by expert in the order they are sent: `chunks` blocks of
local experts, each block's rows for this rank first, then those for the other ranks in rank order. The rows of
each block travel in one all-to-all; the grouped FFN then runs piece by piece, each piece the rows of one block from
one source rank (already grouped by expert, so nothing is regrouped), and each block's output rows travel back as
soon as its pieces are done, straight into the rows the local dispatcher combines. Overlap, forward: the shared
expert and this rank's own rows (which never travel) compute while the blocks arrive, and block c's return travels
while block c + 1 computes; backward, the same in reverse, block by block. The parameter gradients of the pieces are
summed by autograd (one extra add of the expert gradients per extra source rank: the price of not regrouping the
rows). Dropless: the split sizes are exchanged first, the one host sync per layer; capacity: the splits are static.

`ExpertParallelExperts` replaces `MoE.experts` in place, so the MoE layer (router, losses, shared expert) and every
state-dict key are unchanged. It is also a `deepspeed.moe.layer.MoE`, which is how DeepSpeed's engine recognises an
MoE model; its parameters carry DeepSpeed's expert tags (`allreduce = False`, `group_name = "ep_size_<ep>"`), so
the engine and ZeRO-1/2 reduce (and partition) them over the expert-data-parallel group only, averaged over the
whole data-parallel world, while the other parameters are averaged over the data-parallel group as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

from moeformer.layers.moe import (
    Dispatched,
    Dispatcher,
    DroplessDispatcher,
    Experts,
    MoE,
    Slots,
    dispatch_in_order,
)
from moeformer.layers.moe.dispatch import bincount, compute_dtype
from moeformer.parallel.comm import (
    all_gather_rows,
    all_reduce,
    exchange_counts,
    reduce_grad,
    reduce_scatter_rows,
    start_all_to_all,
)
from moeformer.parallel.config import check_ep_dispatcher
from moeformer.parallel.groups import ParallelGroups
from moeformer.parallel.reshard import sharded_parameter

# "auto" takes the all-gather dispatcher up to this expert-parallel size: at ep=2 on two H200s it trained medium-moe
# 1.45x faster than the all-to-all and ran the OLMoE-shaped layer 1.3x faster; larger sizes are not yet measured
ALL_GATHER_MAX_EP = 2


@dataclass(frozen=True)
class _Piece:
    """The rows of expert block `chunk` from rank `source`: rows [start, start + size) of the send buffer (this
    rank's own rows) or of block `chunk`'s receive buffer (another rank's)."""

    chunk: int
    source: int
    start: int
    size: int
    group_sizes: Tensor  # (experts per block,) rows of each expert


@dataclass
class _Exchange:
    """One forward's all-to-all dispatch (`Dispatched.state` of `AllToAllDispatcher`) and, in backward, its
    gradients. Send order: block c's rows start at `chunk_start[c]`, this rank's own first (`own[c]` rows), then
    the other ranks' in rank order (`send[c][r]` rows for rank r, 0 for this rank); block c's receive buffer holds
    the other ranks' rows in rank order (`recv[c][r]`, 0 for this rank). The row buffers live for the forward only
    (`release`): backward allocates its own."""

    local: Dispatched  # the local dispatcher's result, for its combine
    group: object
    rank: int
    x: Tensor | None  # (R, D) the rows in send order (detached)
    w: Tensor | None  # (R,) their routing weights (detached)
    own: list[int]
    send: list[list[int]]
    recv: list[list[int]]
    chunk_start: list[int]
    own_sizes: Tensor  # (C, L / C) this rank's rows per local expert
    recv_sizes: Tensor  # (C, ep, L / C) rows received per source rank and local expert
    share: tuple[int, int, int] | None  # under tensor parallelism: this rank's tokens [lo, hi) of n
    pending: dict = field(default_factory=dict)  # key -> work handles to wait on
    x_recv: list = field(default_factory=list)  # per block: the rows and weights received
    w_recv: list = field(default_factory=list)
    y: Tensor | None = None  # (R, D) the experts' output rows in send order
    token: Tensor | None = None  # what the pieces depend on (`_Start`'s output)
    grad_x: Tensor | None = None  # backward: gradients of x and w, filled block by block
    grad_w: Tensor | None = None
    grads: dict = field(default_factory=dict)  # backward: block -> [(source, (grad x, grad w))] to send back
    next_return: int = -1  # backward: the next block whose gradients go back (blocks go in descending order)
    x_meta: tuple | None = None  # (shape, x dtype, w dtype, device) once the row buffers are released

    def remote(self, c: int) -> slice:
        """Rows of block c sent to the other ranks."""
        start = self.chunk_start[c] + self.own[c]
        return slice(start, start + sum(self.send[c]))

    def exchange(self, key, pairs: list[tuple[Tensor, Tensor]], send: list[int], recv: list[int]) -> None:
        """Start the all-to-alls of (output, input) pairs; `wait(key)` before reading the outputs."""
        self.pending[key] = [start_all_to_all(out, x, send, recv, self.group) for out, x in pairs]

    def wait(self, key) -> None:
        for work in self.pending.pop(key, ()):
            work.wait()

    def pieces(self, c: int) -> list[_Piece]:
        """Block c's non-empty pieces from the other ranks, in rank order."""
        out, start = [], 0
        for source, size in enumerate(self.recv[c]):
            if size:
                out.append(_Piece(c, source, start, size, self.recv_sizes[c, source]))
            start += size
        return out

    def own_piece(self, c: int) -> _Piece:
        return _Piece(c, self.rank, self.chunk_start[c], self.own[c], self.own_sizes[c])

    def release(self) -> Tensor:
        """End of forward: wait for every transfer, drop the row buffers (what backward needs is saved by the
        pieces' own graphs); returns the output rows."""
        for key in list(self.pending):
            self.wait(key)
        y, self.y, self.token = self.y, None, None
        self.x_meta = (self.x.shape, self.x.dtype, self.w.dtype, self.x.device)
        self.x = self.w = None
        self.x_recv, self.w_recv = [], []
        return y

    def start_backward(self) -> None:
        shape, x_dtype, w_dtype, device = self.x_meta
        self.grad_x = torch.empty(shape, dtype=x_dtype, device=device)
        self.grad_w = torch.empty(shape[0], dtype=w_dtype, device=device)
        self.next_return = len(self.send) - 1

    def return_gradients(self, force: bool = False) -> None:
        """Send back, in descending block order (the same on every rank), the input gradients of each block whose
        pieces are all done (`force`: of every block left, at the end of backward)."""
        while self.next_return >= 0:
            c = self.next_return
            done = sorted(self.grads.pop(c, []), key=lambda item: item[0])
            if not force and len(done) < sum(1 for n in self.recv[c] if n):
                self.grads[c] = done
                return
            gx = _rows([g for _, (g, _) in done], self.grad_x)
            gw = _rows([g for _, (_, g) in done], self.grad_w)
            rows = self.remote(c)
            self.exchange(("grad", c), [(self.grad_x[rows], gx), (self.grad_w[rows], gw)], self.recv[c], self.send[c])
            self.next_return -= 1


def _rows(parts: list[Tensor], like: Tensor) -> Tensor:
    """parts stacked along the rows (no copy for one part; empty like `like` for none)."""
    if not parts:
        return like.new_empty(0, *like.shape[1:])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Start(torch.autograd.Function):
    """Starts every block's all-to-all of the rows and their weights; returns an empty token that the pieces
    depend on. Backward: waits for the input gradients the pieces sent back and returns them."""

    @staticmethod
    def forward(ctx, ex: _Exchange, x: Tensor, w: Tensor, *anchor: Tensor) -> Tensor:
        ctx.ex = ex
        for c in range(len(ex.send)):
            recv = sum(ex.recv[c])
            ex.x_recv.append(ex.x.new_empty(recv, ex.x.shape[1]))
            ex.w_recv.append(ex.w.new_empty(recv))
            rows = ex.remote(c)
            ex.exchange(("rows", c), [(ex.x_recv[c], ex.x[rows]), (ex.w_recv[c], ex.w[rows])], ex.send[c], ex.recv[c])
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _token: Tensor):
        ex: _Exchange = ctx.ex
        ex.return_gradients(force=True)
        for key in list(ex.pending):  # the gradients sent back, and any block's transfer no piece waited for
            ex.wait(key)
        grad_x, grad_w, ex.grad_x, ex.grad_w = ex.grad_x, ex.grad_w, None, None
        return None, grad_x, grad_w, *(None for _ in ctx.needs_input_grad[3:])


class _Take(torch.autograd.Function):
    """A piece's rows and weights (once arrived, where they travel). Backward: this rank's own rows' gradients go
    into place; another rank's wait for the rest of their block, then go back to it."""

    @staticmethod
    def forward(ctx, ex: _Exchange, piece: _Piece, token: Tensor) -> tuple[Tensor, Tensor]:
        ctx.ex, ctx.piece = ex, piece
        rows = slice(piece.start, piece.start + piece.size)
        if piece.source == ex.rank:
            return ex.x[rows], ex.w[rows]
        ex.wait(("rows", piece.chunk))
        return ex.x_recv[piece.chunk][rows], ex.w_recv[piece.chunk][rows]

    @staticmethod
    def backward(ctx, grad_x: Tensor, grad_w: Tensor):
        ex, piece = ctx.ex, ctx.piece
        grad_w = grad_w.to(ex.grad_w.dtype)
        if piece.source == ex.rank:
            rows = slice(piece.start, piece.start + piece.size)
            ex.grad_x[rows].copy_(grad_x)
            ex.grad_w[rows].copy_(grad_w)
        else:
            ex.grads.setdefault(piece.chunk, []).append((piece.source, (grad_x, grad_w)))
            ex.return_gradients()
        return None, None, grad_x.new_zeros(0)


class _Arrived(torch.autograd.Function):
    """Identity on the output rows of another rank's piece; backward: waits for their gradient to arrive."""

    @staticmethod
    def forward(ctx, ex: _Exchange, chunk: int, y: Tensor) -> Tensor:
        ctx.ex, ctx.chunk = ex, chunk
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.ex.wait(("out", ctx.chunk))
        return None, None, grad


class _Gather(torch.autograd.Function):
    """The experts' output rows in send order, once the returns have arrived (the pieces' outputs are its inputs,
    in the order computed). Backward: starts every block's all-to-all of the output gradients (last block first,
    as backward reaches it first) and hands each piece its rows (`_Arrived` waits where they travel)."""

    @staticmethod
    def forward(ctx, ex: _Exchange, pieces: list[_Piece], *ys: Tensor) -> Tensor:
        ctx.ex, ctx.pieces = ex, pieces
        return ex.release()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ex: _Exchange = ctx.ex
        grad = grad.contiguous()
        ex.start_backward()
        received = {}
        for c in reversed(range(len(ex.send))):
            received[c] = grad.new_empty(sum(ex.recv[c]), grad.shape[1])
            ex.exchange(("out", c), [(received[c], grad[ex.remote(c)])], ex.send[c], ex.recv[c])
        rows = [(grad if p.source == ex.rank else received[p.chunk])[p.start : p.start + p.size] for p in ctx.pieces]
        return None, None, *rows


def _chunks(num_local: int, chunks: int) -> int:
    """The largest divisor of num_local that is at most `chunks`: blocks hold equally many experts."""
    return max(c for c in range(1, min(chunks, num_local) + 1) if num_local % c == 0)


class _ExpertGroupDispatcher:
    """What both expert-parallel dispatchers share: `local` (a dispatcher over all E experts) across the
    expert-parallel `group`, rank r holding experts [r * L, (r + 1) * L). Under tensor parallelism the ranks of
    `tensor_group` hold the same tokens: each dispatches its 1/tp of them and the outputs are summed."""

    def __init__(self, local: Dispatcher, group, tensor_group=None) -> None:
        self.local, self.group, self.tensor_group = local, group, tensor_group
        self.num_experts, self.ep, self.rank = local.num_experts, dist.get_world_size(group), dist.get_rank(group)
        self.num_local = self.num_experts // self.ep

    def capacity(self, num_tokens: int) -> int | None:
        return self.local.capacity(num_tokens)

    def _tensor_load(self, tokens_per_expert: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
        """The load counts of all the tensor group's tokens (each rank dispatched a share)."""
        if self.tensor_group is None:
            return tokens_per_expert, dropped
        counts = torch.cat([tokens_per_expert, dropped.view(1)])
        dist.all_reduce(counts, group=self.tensor_group)
        return counts[:-1], counts[-1]

    def _tensor_sum(self, out: Tensor, share: tuple[int, int, int] | None) -> Tensor:
        """This rank's combined output -> the tensor group's (summed; a share (lo, hi, n) padded back to n)."""
        if self.tensor_group is None:
            return out
        if share is not None:  # this rank's tokens [lo, hi) of n, zero elsewhere
            lo, hi, n = share
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


class AllToAllDispatcher(_ExpertGroupDispatcher):
    """Rows travel to the ranks holding their experts by all-to-all, in `chunks` blocks of consecutive local experts
    (fewer when `chunks` does not divide L). Any local dispatcher; a capacity applies per sending rank."""

    def __init__(self, local: Dispatcher, group, tensor_group=None, chunks: int = 1) -> None:
        super().__init__(local, group, tensor_group)
        self.chunks = _chunks(self.num_local, chunks)
        self._positions: dict[torch.device, Tensor] = {}

    def send_position(self, device: torch.device) -> Tensor:
        """position[e] of global expert e in the send order: block-major, then this rank, then the others in rank
        order, then the expert within the block (made once per device)."""
        if device not in self._positions:
            per_block = self.num_local // self.chunks
            e = torch.arange(self.num_experts, device=device)
            rank, block, j = e // self.num_local, e % self.num_local // per_block, e % per_block
            slot = torch.where(rank == self.rank, 0, rank + (rank < self.rank).long())
            self._positions[device] = (block * self.ep + slot) * per_block + j
        return self._positions[device]

    @torch.compiler.disable  # communication and a host sync: eager between the compiled parts
    def dispatch(self, x: Tensor, slots: Slots) -> Dispatched:
        """Group this rank's rows in send order and start their all-to-alls; `run_experts` computes them."""
        share = None
        if self.tensor_group is not None:
            x, slots, share = self._tensor_share(x, slots)
        local = dispatch_in_order(self.local, x, slots, self.send_position(x.device))
        rows, ep, blocks, rank = local.rows, self.ep, self.chunks, self.rank
        per_block = self.num_local // blocks
        # the group sizes (block, this rank then the others, expert) -> (block, rank, expert within the block)
        by_slot = rows.group_sizes.view(blocks, ep, per_block)
        send_sizes = torch.cat([by_slot[:, 1 : rank + 1], by_slot[:, :1], by_slot[:, rank + 1 :]], dim=1)
        if rows.capacity is not None:  # static: every group holds `capacity` rows
            recv_sizes = send_sizes
            send_rows = recv_rows = [[per_block * rows.capacity] * ep] * blocks
        else:
            recv_sizes = exchange_counts(send_sizes.transpose(0, 1), self.group).transpose(0, 1)
            send_rows, recv_rows = torch.stack([send_sizes.sum(-1), recv_sizes.sum(-1)]).tolist()  # host sync
        own = [send_rows[c][self.rank] for c in range(blocks)]
        send = [[0 if r == self.rank else n for r, n in enumerate(row)] for row in send_rows]
        recv = [[0 if r == self.rank else n for r, n in enumerate(row)] for row in recv_rows]
        chunk_start = [sum(sum(row) for row in send_rows[:c]) for c in range(blocks)]
        w = rows.row_weights()
        ex = _Exchange(
            local, self.group, self.rank, rows.x.detach(), w.detach(), own, send, recv, chunk_start,
            send_sizes[:, self.rank], recv_sizes, share,
        )  # fmt: skip
        anchor = [x.new_empty(0, requires_grad=True)] if torch.is_grad_enabled() else []
        ex.token = _Start.apply(ex, rows.x, w, *anchor)
        return Dispatched(rows, *self._tensor_load(local.tokens_per_expert, local.dropped), ex)

    @torch.compiler.disable
    def run_experts(self, experts: Experts, dispatched: Dispatched) -> Tensor:
        """The experts' output rows in send order: this rank's own rows first (they do not travel), then each block's
        rows from the other ranks as they arrive, each block's output sent back as soon as it is done."""
        ex: _Exchange = dispatched.state
        blocks = self.chunks
        weights = list(zip(experts.w_in.chunk(blocks), experts.w_out.chunk(blocks))) if blocks > 1 else None
        ex.y = ex.x.new_empty(ex.x.shape)
        pieces, ys = [], []

        def compute(piece: _Piece) -> Tensor:
            x, w = _Take.apply(ex, piece, ex.token)
            y = experts.ffn(x, piece.group_sizes, w, experts=weights[piece.chunk] if weights else None)
            pieces.append(piece)
            ys.append(y)
            return y

        for c in range(blocks):
            if ex.own[c] or (c == 0 and not any(ex.own) and not any(map(sum, ex.recv))):  # idle: still join backward
                y = compute(ex.own_piece(c))
                ex.y[ex.chunk_start[c] : ex.chunk_start[c] + ex.own[c]] = y.detach()
        for c in range(blocks):
            done = [_Arrived.apply(ex, c, compute(piece)) for piece in ex.pieces(c)]
            ys[len(ys) - len(done) :] = done
            out = _rows([y.detach() for y in done], ex.x)
            ex.exchange(("y", c), [(ex.y[ex.remote(c)], out)], ex.recv[c], ex.send[c])
        return _Gather.apply(ex, pieces, *ys)

    @torch.compiler.disable
    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        """The local combine of the returned rows (and the tensor-parallel sum)."""
        ex: _Exchange = dispatched.state
        return self._tensor_sum(self.local.combine(y, ex.local), ex.share)


class AllGatherDispatcher(_ExpertGroupDispatcher):
    """Every rank's tokens go to every rank of the expert group (one all-gather of the rows, one of the routing):
    each rank runs its experts over the slots routed to them, the other ranks' slots being padding to its dropless
    dispatcher, and the partial outputs go back summed (a reduce-scatter). Each token travels once per rank rather
    than once per slot (top-8 of 64 experts on 2 ranks: a quarter of the all-to-all's bytes), the shapes are static
    (no split sizes, no host sync, no graph break under torch.compile), at the price of a slot buffer ep times
    the local one. Dropless only; every rank of the expert group dispatches equally many tokens (a training
    micro-batch; tensor-parallel shares are padded to ceil(n / tp))."""

    def __init__(self, local: Dispatcher, group, tensor_group=None) -> None:
        if not isinstance(local, DroplessDispatcher):
            raise ValueError(
                f"parallel.ep_dispatcher='all_gather' runs the dropless dispatcher, got {type(local).__name__}: "
                "use 'all_to_all' for a capacity"
            )
        super().__init__(local, group, tensor_group)
        self.local = DroplessDispatcher(self.num_local)  # over this rank's experts only

    def dispatch(self, x: Tensor, slots: Slots) -> Dispatched:
        k, e, share = slots.top_k, self.num_experts, None
        if k is None:
            raise ValueError("the all-gather dispatcher needs token-major (top-k) slots")
        expert = slots.expert_idx if slots.valid is None else torch.where(slots.valid, slots.expert_idx, e)
        if self.tensor_group is not None:
            x, slots, share = self._tensor_share(x, replace(slots, expert_idx=expert, valid=None))
            pad = -(-share[2] // dist.get_world_size(self.tensor_group)) - x.shape[0]  # equal shares: one gather
            x, expert = F.pad(x, (0, 0, 0, pad)), F.pad(slots.expert_idx, (0, pad * k), value=e)
            slots = replace(slots, weights=F.pad(slots.weights, (0, pad * k)))
        tokens_per_expert = bincount(expert, e + 1)[:e]
        # one gather for the routing: the weights and the expert ids (exact in fp32: e < 2^24), padding as e
        routing = torch.cat([slots.weights.view(-1, k), expert.view(-1, k).to(slots.weights.dtype)], dim=1)
        rows = all_gather_rows(x.to(compute_dtype(x)), self.group)
        weights, ids = all_gather_rows(routing, self.group).split(k, dim=1)
        local_idx = ids.long().flatten() - self.rank * self.num_local
        mine = (local_idx >= 0) & (local_idx < self.num_local)
        n = rows.shape[0]
        gathered = Slots(
            torch.arange(n, device=x.device).repeat_interleave(k),
            torch.where(mine, local_idx, 0),
            weights.flatten(),
            mine,
            k,
        )
        local = self.local.dispatch(rows, gathered)
        state = (local, share, x.dtype)
        return Dispatched(local.rows, *self._tensor_load(tokens_per_expert, local.dropped), state)

    def run_experts(self, experts: Experts, dispatched: Dispatched) -> Tensor:
        return experts(dispatched.rows)

    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        """Every rank's partial sums of the gathered tokens, reduced onto the tokens' own ranks."""
        local, share, dtype = dispatched.state
        out = reduce_scatter_rows(self.local.combine(y, local), self.group).to(dtype)
        if share is not None:  # drop the padding of this rank's share
            out = out[: share[1] - share[0]]
        return self._tensor_sum(out, share)


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


def auto_dispatcher(local: Dispatcher, ep: int) -> str:
    """What `ep_dispatcher="auto"` picks: the all-gather for a dropless layer up to ALL_GATHER_MAX_EP ranks, else
    the all-to-all (the all-gather's bytes and slot buffer grow with ep; a capacity needs the all-to-all)."""
    return "all_gather" if isinstance(local, DroplessDispatcher) and ep <= ALL_GATHER_MAX_EP else "all_to_all"


def apply_expert_parallel(
    model: nn.Module, groups: ParallelGroups, chunks: int | None = None, dispatcher: str | None = None
) -> list[ExpertParallelExperts]:
    """Shard the routed experts of every MoE layer of `model` over the expert-parallel group and give the layer an
    expert-parallel dispatcher (in place): `dispatcher` (default: the config's `ep_dispatcher`) "all_to_all", its
    transfers in `chunks` blocks (default: the config's `ep_chunks`), "all_gather", or "auto" (`auto_dispatcher`);
    returns the new expert modules. No-op at ep=1."""
    ep = groups.config.ep
    if ep == 1:
        return []
    name = dispatcher or groups.config.ep_dispatcher
    check_ep_dispatcher(name)
    replaced = []
    for module in list(model.modules()):
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            if (auto_dispatcher(module.dispatcher, ep) if name == "auto" else name) == "all_gather":
                ep_dispatcher = AllGatherDispatcher(module.dispatcher, groups.expert, groups.tensor)
            else:
                ep_dispatcher = AllToAllDispatcher(
                    module.dispatcher, groups.expert, groups.tensor, chunks or groups.config.ep_chunks
                )
            module.experts = ExpertParallelExperts(module.experts, groups)
            module.dispatcher = ep_dispatcher
            replaced.append(module.experts)
    if not replaced:
        raise ValueError(f"ep={groups.config.ep} but the model has no MoE layer to shard")
    return replaced
