"""Triton kernel of one-query (decode) attention over a paged KV cache: each program takes one sequence and one KV
head, walks that sequence's real keys only (so the work follows the tokens held, not the longest sequence of the
batch) in tiles of TILE keys, each tile's slots looked up in the block table, with an online softmax in fp32, for
the query heads sharing the KV head. When sequences x KV heads are too few programs to keep the GPU's memory busy
(small batches, long contexts), each sequence's keys are split over several programs whose partial softmax sums
are then merged (flash-decoding). Imported only where triton is installed; the reference is the gather path of
`moeformer.layers.attention.paged` (each sequence's keys copied into a view, eager attention).
scripts/bench_paged.py measures it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 16  # keys per loop step (at least one cache block); measured on an H200: 16 keys on 2 warps fastest
NUM_WARPS = 2
TARGET_PROGRAMS = 4096  # split the keys until sequences x KV heads x splits reach this many programs ...
MAX_SPLITS = 16  # ... in at most this many parts


@triton.jit
def _paged_decode_kernel(
    q,
    k,
    v,
    tables,
    lengths,
    out,
    partial,
    scale,
    window,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DK: tl.constexpr,
    DK_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
    USE_DOT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, GROUP_PAD)
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    head_ok = heads < GROUP
    query = tl.load(
        q + b * stride_qb + (h * GROUP + heads)[:, None] * stride_qh + dk[None, :],
        mask=head_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    ).to(tl.float32)
    n = tl.load(lengths + b)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(n - window, 0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DV_PAD], tl.float32)
    tokens = tl.arange(0, TILE)
    begin = first // TILE * TILE
    per_split = tl.cdiv(tl.cdiv(n - begin, TILE), SPLITS) * TILE  # keys of each split (split 0 is never empty)
    begin += tl.program_id(2) * per_split
    for start in range(begin, tl.minimum(n, begin + per_split), TILE):
        pos = start + tokens
        real = (pos < n) & (pos >= first)
        block = tl.load(tables + b * stride_tb + pos // BLOCK, mask=real, other=0).to(tl.int64)
        slots = block * BLOCK + pos % BLOCK
        keys = tl.load(
            k + slots[:, None] * stride_ks + h * stride_kh + dk[None, :],
            mask=real[:, None] & (dk[None, :] < DK),
            other=0.0,
        ).to(tl.float32)
        if USE_DOT:
            scores = tl.dot(query, tl.trans(keys), input_precision="ieee")
        else:
            scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2)
        scores = tl.where(real[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        values = tl.load(
            v + slots[:, None] * stride_vs + h * stride_vh + dv[None, :],
            mask=real[:, None] & (dv[None, :] < DV),
            other=0.0,
        ).to(tl.float32)
        if USE_DOT:
            update = tl.dot(p, values, input_precision="ieee")
        else:
            update = tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        acc = acc * alpha[:, None] + update
        total = total * alpha + tl.sum(p, axis=1)
        m = m_new
    if SPLITS == 1:
        tl.store(
            out + b * stride_ob + (h * GROUP + heads)[:, None] * stride_oh + dv[None, :],
            (acc / total[:, None]).to(out.dtype.element_ty),
            mask=head_ok[:, None] & (dv[None, :] < DV),
        )
    else:  # partial (B, Hq, SPLITS, DV_PAD + 2) fp32: this split's unnormalised sum, its max and its softmax total
        row = partial + (((b * tl.num_programs(1) + h) * GROUP + heads) * SPLITS + tl.program_id(2)) * (DV_PAD + 2)
        tl.store(row[:, None] + dv[None, :], acc, mask=head_ok[:, None])
        tl.store(row + DV_PAD, m, mask=head_ok)
        tl.store(row + DV_PAD + 1, total, mask=head_ok)


def num_splits(batch: int, kv_heads: int) -> int:
    """Parts each sequence's keys are split in: until batch x kv_heads x parts reach TARGET_PROGRAMS."""
    return max(1, min(MAX_SPLITS, TARGET_PROGRAMS // (batch * kv_heads)))


def launch(
    q: Tensor, k: Tensor, v: Tensor, tables: Tensor, lengths: Tensor, block_size: int, scale: float, window: int
) -> Tensor:
    """q (B, Hq, Dk) one query per sequence; k (slots, Hkv, Dk), v (slots, Hkv, Dv) the pools (slot = block *
    block_size + offset; last dims contiguous); tables (B, W) block ids; lengths (B,) keys per sequence (>= 1);
    window: keys a query may see (0: all) -> (B, Hq, Dv)."""
    batch, q_heads, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[2]
    group = q_heads // kv_heads
    out = torch.empty(batch, q_heads, dv, dtype=q.dtype, device=q.device)
    group_pad = max(triton.next_power_of_2(group), 2)  # no size-1 tiles
    tile = max(TILE, block_size)
    use_dot = group_pad >= 16 and min(dk, dv) >= 16  # tl.dot needs 16 x 16 tiles
    splits = num_splits(batch, kv_heads)
    dv_pad = triton.next_power_of_2(dv)
    partial = out  # never written with one split
    if splits > 1:
        partial = torch.empty(batch, q_heads, splits, dv_pad + 2, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q,
        k,
        v,
        tables,
        lengths,
        out,
        partial,
        scale,
        window,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        DK=dk,
        DK_PAD=triton.next_power_of_2(dk),
        DV=dv,
        DV_PAD=dv_pad,
        BLOCK=block_size,
        TILE=tile,
        SPLITS=splits,
        USE_DOT=use_dot,
        HAS_WINDOW=window > 0,
        num_warps=NUM_WARPS,
    )
    if splits > 1:  # merge the splits' softmax sums (an empty split has max -inf: weight 0)
        acc, m, total = partial[..., :dv], partial[..., dv_pad], partial[..., dv_pad + 1]
        weight = torch.exp(m - m.amax(dim=2, keepdim=True))
        out.copy_((acc * weight[..., None]).sum(2) / (total * weight).sum(2)[..., None])
    return out


paged_decode_op = torch.library.custom_op("moeformer::paged_decode", launch, mutates_args=())


@paged_decode_op.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, tables: Tensor, lengths: Tensor, block_size: int, scale: float, window: int
) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
