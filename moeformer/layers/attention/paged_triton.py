"""Triton kernel of one-query (decode) attention over a paged KV cache: each program takes one sequence and one KV
head, walks that sequence's block table over its real blocks only (so the work follows the tokens held, not the
longest sequence of the batch) with an online softmax in fp32, for the query heads sharing the KV head. Imported
only where triton is installed; the reference is `moeformer.layers.attention.paged.paged_attention_reference`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _paged_decode_kernel(
    q,
    k,
    v,
    tables,
    lengths,
    out,
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
    tokens = tl.arange(0, BLOCK)
    for start in range(first // BLOCK * BLOCK, n, BLOCK):
        block = tl.load(tables + b * stride_tb + start // BLOCK).to(tl.int64)
        slots = block * BLOCK + tokens
        pos = start + tokens
        real = (pos < n) & (pos >= first)
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
    result = acc / total[:, None]
    tl.store(
        out + b * stride_ob + (h * GROUP + heads)[:, None] * stride_oh + dv[None, :],
        result.to(out.dtype.element_ty),
        mask=head_ok[:, None] & (dv[None, :] < DV),
    )


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
    use_dot = group_pad >= 16 and block_size >= 16 and min(dk, dv) >= 16  # tl.dot needs 16 x 16 tiles
    _paged_decode_kernel[(batch, kv_heads)](
        q,
        k,
        v,
        tables,
        lengths,
        out,
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
        DV_PAD=triton.next_power_of_2(dv),
        BLOCK=block_size,
        USE_DOT=use_dot,
        HAS_WINDOW=window > 0,
    )
    return out


paged_decode_op = torch.library.custom_op("moeformer::paged_decode", launch, mutates_args=())


@paged_decode_op.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, tables: Tensor, lengths: Tensor, block_size: int, scale: float, window: int
) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
