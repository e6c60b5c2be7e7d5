"""Triton kernels of the fused expert path (fused_experts.py): per expert, a tile of its token slots times its
weights, read in place from the 3-D expert tensors (full precision (E, K, N), or quantized codes (E, N, K)).

- up:   h[s] = weight[s] * act(x[token[s]] @ W_in[e_s])   (SwiGLU: gate and up columns from the same x loads)
- down: y[p, s] = h[s] @ W_out[e_s] over the p-th range of F (a K split, summed by the caller with the k slots)

Each program finds its expert's slots itself, so nothing is sorted or permuted in memory:
- BY_SLOT (fewer slots than experts, e.g. batch 1): program c takes slot c's expert if c is that expert's first
  slot (at batch 1, top-k experts are distinct: every program works, none reads an expert twice).
- BY_EXPERT: program c takes expert c (and exits at once when no slot chose it).
  Both find the expert's slots by a compare + running count over all slots, SCAN_CHUNK at a time.
- SORTED (many slots, e.g. prefill): the caller passes the slots sorted by expert and the per-expert counts;
  program c takes the c-th BM-row tile of the concatenated expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moeformer.layers.quant.triton_kernels import GEMV_ROWS, k_split, scale_strides, weight_product
from moeformer.layers.triton_dispatch import INTERPRETER

ROW_MODES = ("by_slot", "by_expert", "sorted")  # the kernels' ROWS constant is the index
BY_SLOT, BY_EXPERT, SORTED = (tl.constexpr(i) for i in range(3))
SCAN_CHUNK = 128  # slots compared per step of the scan: a (BM, SCAN_CHUNK) selection at most
MAX_SORTED_EXPERTS = 1024  # the SORTED mode holds the per-expert counts in one block


@triton.jit
def _slot_count(expert_idx, e, stop, SC: tl.constexpr):
    """How many of the slots [0, stop) chose expert e."""
    count = 0
    for s0 in range(0, stop, SC):
        j = s0 + tl.arange(0, SC)
        idx = tl.load(expert_idx + j, mask=j < stop, other=-1)
        count += tl.sum((idx == e).to(tl.int32), axis=0)
    return count


@triton.jit
def _program_rows(
    expert_idx, counts, c, S, E, ROWS: tl.constexpr, BM: tl.constexpr, SC: tl.constexpr, E_POW2: tl.constexpr
):
    """(expert, first row, end row, first sorted position of the expert) of program c's work: rows
    [first, end) of the expert's slots (empty when it has nothing to do)."""
    if ROWS == SORTED:
        ids = tl.arange(0, E_POW2)
        count = tl.load(counts + ids, mask=ids < E, other=0).to(tl.int32)
        tiles = (count + BM - 1) // BM
        ends = tl.cumsum(tiles, axis=0)
        e = tl.sum((ends <= c).to(tl.int32), axis=0)  # E past the last tile
        mine = ids == e
        first = (c - tl.sum(tl.where(mine, ends - tiles, 0), axis=0)) * BM
        end = tl.minimum(tl.sum(tl.where(mine, count, 0), axis=0), first + BM)
        base = tl.sum(tl.where(ids < e, count, 0), axis=0)
        return e, first, end, base
    if ROWS == BY_SLOT:
        e = tl.load(expert_idx + c)
        leader = _slot_count(expert_idx, e, c, SC) == 0
        end = tl.where(leader, _slot_count(expert_idx, e, S, SC), 0)
    else:
        e = c
        end = _slot_count(expert_idx, e, S, SC)
    return e, 0, end, 0


@triton.jit
def _tile_slots(expert_idx, order, e, first, end, base, S, ROWS: tl.constexpr, BM: tl.constexpr, SC: tl.constexpr):
    """Slot indices of the expert's rows first .. first + BM - 1 and their mask (rows < end)."""
    r = first + tl.arange(0, BM)
    row_mask = r < end
    if ROWS == SORTED:
        slots = tl.load(order + base + r, mask=row_mask, other=0)
    else:  # the slot whose running count of expert-e matches is row r
        slots = tl.zeros([BM], dtype=tl.int32)
        seen = 0
        for s0 in range(0, S, SC):
            j = s0 + tl.arange(0, SC)
            match = (tl.load(expert_idx + j, mask=j < S, other=-1) == e).to(tl.int32)
            rank = seen + tl.cumsum(match, axis=0) - 1
            hit = (match[None, :] == 1) & (rank[None, :] == r[:, None])
            slots += tl.sum(tl.where(hit, j[None, :], 0), axis=1)
            seen += tl.sum(match, axis=0)
    return slots.to(tl.int64), row_mask


@triton.jit
def _fused_up_kernel(
    x,
    token_idx,
    expert_idx,
    slot_weight,
    order,
    counts,
    h,
    S,
    E,
    K,
    F,
    stride_xm,
    w,
    scale,
    offset,
    stride_we,
    stride_wk,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sg,
    ROWS: tl.constexpr,
    SLOTS_PER_TOKEN: tl.constexpr,
    SWIGLU: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SC: tl.constexpr,
    E_POW2: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    e, first, end, base = _program_rows(expert_idx, counts, tl.program_id(0), S, E, ROWS, BM, SC, E_POW2)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < F
    w_e = w + e.to(tl.int64) * stride_we
    scale_e = scale + e.to(tl.int64) * stride_se
    offset_e = offset + e.to(tl.int64) * stride_se
    for row in range(first, end, BM):
        slots, row_mask = _tile_slots(expert_idx, order, e, row, end, base, S, ROWS, BM, SC)
        if SLOTS_PER_TOKEN:  # token-major slots
            tokens = slots // SLOTS_PER_TOKEN
        else:
            tokens = tl.load(token_idx + slots, mask=row_mask, other=0).to(tl.int64)
        gate, up = weight_product(
            x + tokens * stride_xm,
            row_mask,
            w_e,
            scale_e,
            offset_e,
            cols,
            col_mask,
            F * stride_wn,
            F * stride_sn,
            stride_wk,
            stride_wn,
            stride_sn,
            stride_sg,
            0,
            K,
            QUANT,
            GROUP,
            SWIGLU,
            EVEN_K,
            BM,
            BN,
            BK,
            STAGES,
            UPCAST,
        )
        if SWIGLU:
            act = gate * tl.sigmoid(gate) * up
        else:  # exact (erf) GELU
            act = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
        act = act * tl.load(slot_weight + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(
            h + slots[:, None] * F + cols[None, :],
            act.to(h.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )


@triton.jit
def _fused_down_kernel(
    h,
    expert_idx,
    order,
    counts,
    y,
    S,
    E,
    F,
    D,
    k_per_split,
    w,
    scale,
    offset,
    stride_we,
    stride_wk,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sg,
    ROWS: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SC: tl.constexpr,
    E_POW2: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    e, first, end, base = _program_rows(expert_idx, counts, tl.program_id(0), S, E, ROWS, BM, SC, E_POW2)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < D
    part = tl.program_id(2)
    k_start = part * k_per_split
    k_stop = tl.minimum(F, k_start + k_per_split)
    w_e = w + e.to(tl.int64) * stride_we
    scale_e = scale + e.to(tl.int64) * stride_se
    offset_e = offset + e.to(tl.int64) * stride_se
    for row in range(first, end, BM):
        slots, row_mask = _tile_slots(expert_idx, order, e, row, end, base, S, ROWS, BM, SC)
        acc, _ = weight_product(
            h + slots * F,
            row_mask,
            w_e,
            scale_e,
            offset_e,
            cols,
            col_mask,
            0,
            0,
            stride_wk,
            stride_wn,
            stride_sn,
            stride_sg,
            k_start,
            k_stop,
            QUANT,
            GROUP,
            False,
            EVEN_K,
            BM,
            BN,
            BK,
            STAGES,
            UPCAST,
        )
        tl.store(
            y + part.to(tl.int64) * S * D + slots[:, None] * D + cols[None, :],
            acc,
            mask=row_mask[:, None] & col_mask[None, :],
        )


@dataclass(frozen=True)
class ExpertsConfig:
    """Row mode, tiles and K split of one fused-experts call (up and down kernels)."""

    rows: str  # one of ROW_MODES
    bm: int
    bn_up: int
    bk_up: int
    bn_down: int
    bk_down: int
    split: int
    num_warps: int
    num_stages: int


def experts_config(
    tokens: int, slots: int, experts: int, dim: int, ffn: int, quant: int, group: int, sorted_rows: bool
) -> ExpertsConfig:
    """Decode (scanned rows): an expert has at most `tokens` rows, so up to GEMV_ROWS tokens one GEMV row tile holds
    them all; beyond, 16-row tensor-core tiles (an expert rarely has more rows at batch <= 64). Each step reads
    128-byte lines: full-precision weights (E, K, N) along N (column tiles of 64 bf16 or more), codes (E, N, K)
    along K (int8 steps of 128 inputs; int4 steps are at most one group). Narrow column tiles and a K split of the
    down projection keep batch 1 (k experts) filling the SMs. Prefill: 64-row tiles over the sorted slots. Measured
    and tuned with scripts/bench_quant.py --sweep."""
    step = {0: 64, 8: 128, 4: min(128, group)}[quant]  # the widest K-step (int4: inside one group)
    if sorted_rows:
        rows, bm, bn_up, bn_down, warps, stages = "sorted", 64, 64, 64, 4, 3
        bk_up = bk_down = step if quant == 4 else 64
    else:
        rows = "by_slot" if slots < experts else "by_expert"
        bm = triton.next_power_of_2(tokens) if tokens <= GEMV_ROWS else 16
        bn_up, bn_down, bk_up, bk_down, warps, stages = 64 if quant == 0 else 32, 64, step, step, 4, 4
    split = 1 if sorted_rows else k_split(ffn, bk_down, min(slots, experts) * triton.cdiv(dim, bn_down))
    return ExpertsConfig(rows, bm, bn_up, bk_up, bn_down, bk_down, split, warps, stages)


def _weight_args(w: Tensor, scale: Tensor | None, offset: Tensor | None, quant: int) -> tuple:
    """(weight, scale, offset, stride_we, stride_wk, stride_wn, stride_se, stride_sn, stride_sg) of a 3-D expert
    weight as the kernels take them (absent scales/offsets replaced by a pointer that is never read): full precision
    is stored (E, K, N), codes (E, N, K)."""
    stride_wk, stride_wn = (w.stride(1), w.stride(2)) if quant == 0 else (w.stride(2), w.stride(1))
    stride_sn, stride_sg = scale_strides(scale, quant)
    stride_se = scale.stride(0) if scale is not None else 0
    scale = scale if scale is not None else w
    offset = offset if offset is not None else scale
    return w, scale, offset, w.stride(0), stride_wk, stride_wn, stride_se, stride_sn, stride_sg


def fused_experts(
    x: Tensor,
    token_idx: Tensor | None,
    expert_idx: Tensor,
    weights: Tensor,
    w_in: Tensor,
    scale_in: Tensor | None,
    offset_in: Tensor | None,
    w_out: Tensor,
    scale_out: Tensor | None,
    offset_out: Tensor | None,
    quant: int,
    group: int,
    ffn: int,
    swiglu: bool,
    order: Tensor | None,
    counts: Tensor | None,
) -> Tensor:
    """y (split, S, D) fp32 with y.sum(0)[s] = weights[s] * expert_{expert_idx[s]}(x[token_idx[s]]); see
    fused_experts.fused_experts for the arguments: with `order` and `counts` (slots sorted by expert, slots per
    expert) the rows come sorted, else the programs scan the routing."""
    s, dim, e = expert_idx.numel(), x.shape[1], w_in.shape[0]
    cfg = experts_config(x.shape[0], s, e, dim, ffn, quant, group, order is not None)
    if cfg.rows == "sorted":
        if e > MAX_SORTED_EXPERTS:
            raise ValueError(f"the fused expert kernels take at most {MAX_SORTED_EXPERTS} experts, got {e}")
        programs = triton.cdiv(s, cfg.bm) + e
    else:
        order = counts = expert_idx  # never read
        programs = s if cfg.rows == "by_slot" else e
    h = torch.empty(s, ffn, dtype=x.dtype, device=x.device)
    y = torch.empty(cfg.split, s, dim, dtype=torch.float32, device=x.device)
    common = dict(
        ROWS=ROW_MODES.index(cfg.rows),
        QUANT=quant,
        GROUP=group,
        BM=cfg.bm,
        SC=min(SCAN_CHUNK, triton.next_power_of_2(s)),
        E_POW2=triton.next_power_of_2(e),
        STAGES=cfg.num_stages,
        UPCAST=INTERPRETER,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _fused_up_kernel[(programs, triton.cdiv(ffn, cfg.bn_up))](
        x,
        token_idx if token_idx is not None else expert_idx,
        expert_idx,
        weights,
        order,
        counts,
        h,
        s,
        e,
        dim,
        ffn,
        x.stride(0),
        *_weight_args(w_in, scale_in, offset_in, quant),
        SLOTS_PER_TOKEN=s // x.shape[0] if token_idx is None else 0,
        SWIGLU=swiglu,
        EVEN_K=dim % cfg.bk_up == 0,
        BN=cfg.bn_up,
        BK=cfg.bk_up,
        **common,
    )
    k_per_split = triton.cdiv(triton.cdiv(ffn, cfg.split), cfg.bk_down) * cfg.bk_down
    _fused_down_kernel[(programs, triton.cdiv(dim, cfg.bn_down), cfg.split)](
        h,
        expert_idx,
        order,
        counts,
        y,
        s,
        e,
        ffn,
        dim,
        k_per_split,
        *_weight_args(w_out, scale_out, offset_out, quant),
        EVEN_K=ffn % cfg.bk_down == 0 and k_per_split % cfg.bk_down == 0,
        BN=cfg.bn_down,
        BK=cfg.bk_down,
        **common,
    )
    return y
