"""Attention over a paged KV cache read in place: the keys and values of every sequence live in shared pools
(slots, Hkv, D), slot = block * block_size + offset, and a block table per sequence lists its blocks. One-query
(decode) steps run the Triton kernel (`paged_triton`), whose work follows each sequence's real length; every other
case, and the reference, gathers each sequence's keys into the right-aligned (B, Hkv, L, D) view that the
forward's `AttentionMask` (q_offset, key_padding) describes and attends as usual."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeformer.layers import triton_dispatch

try:  # at import, not per call: torch.compile cannot trace a lazy import
    from moeformer.layers.attention import paged_triton as _triton
except ImportError:  # no triton (CPU installs): the reference serves everywhere
    _triton = None


@dataclass
class Pages:
    """Where a forward's keys live. block_tables (B, W) block ids, lengths (B,) keys per sequence, block_size;
    read_slots (B * L,) the pool slot of each position of the right-aligned view of `view_len` L keys per row (None:
    no view was built, only the kernel can read these pages)."""

    block_tables: torch.Tensor
    lengths: torch.Tensor
    block_size: int
    read_slots: torch.Tensor | None
    view_len: int

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        """(slots, H, D) -> the (B, H, L, D) view (the reference's copy of each sequence's keys)."""
        if self.read_slots is None:
            raise RuntimeError("these pages have no view to gather: the paged kernel must read them in place")
        rows = self.block_tables.shape[0]
        return pool[self.read_slots].view(rows, self.view_len, *pool.shape[1:]).transpose(1, 2)


KERNEL_MAX_HEAD_DIM = 256  # wider heads (MLA's 576-wide latent rows) would spill the kernel's tiles: reference
KERNEL_MAX_GROUP = 16  # query heads per KV head a program holds


def kernel_fits(group: int, head_dim: int, value_dim: int, block_size: int) -> bool:
    """Whether the kernel's tiles take `group` query heads per KV head, these head sizes and this block size."""
    return (
        block_size & (block_size - 1) == 0
        and max(head_dim, value_dim) <= KERNEL_MAX_HEAD_DIM
        and group <= KERNEL_MAX_GROUP
    )


def uses_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: Pages, backend: str) -> bool:
    """The Triton kernel serves one query per sequence on CUDA (or the interpreter in tests) where it fits;
    backend "eager" keeps the reference."""
    return (
        q.shape[2] == 1
        and backend != "eager"
        and _triton is not None
        and triton_dispatch.runs_triton(q)
        and kernel_fits(q.shape[1] // k.shape[1], q.shape[-1], v.shape[-1], pages.block_size)
    )


def paged_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: Pages, window: int | None, scale: float
) -> torch.Tensor:
    """q (B, Hq, 1, Dk) against the pools k (slots, Hkv, Dk), v (slots, Hkv, Dv) -> (B, Hq, 1, Dv): the custom op
    while torch.compile traces (one opaque call in the graph), the plain launcher in eager."""
    kernel = _triton.paged_decode_op if torch.compiler.is_compiling() else _triton.launch
    out = kernel(q[:, :, 0].contiguous(), k, v, pages.block_tables, pages.lengths, pages.block_size, scale, window or 0)
    return out[:, :, None]
