"""GPU fast path: the linear-attention forms on fla-core's Triton chunk kernels.

fla works in (B, T, H, D) with natural-log decays (`g` (B, T, H) per token or `g_gamma` (H,) per head), scale applied
to q, fp32 states (N, H, K, V), and packed rows as one flattened row plus `cu_seqlens` with one state per document.
Decayed attention runs on `chunk_simple_gla`, normalising through the core's ones value column so every path shares
one definition; the delta rule runs on `chunk_delta_rule` (fp16/bf16 only). fla's own chunk size (64) is used.
A fixed per-head decay (H,) goes in as `g_gamma`, which fla does not differentiate (RetNet's decay is a constant).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moeformer.layers.linear_attention.packing import segment_ids, varlen_layout


@functools.cache
def fla_available() -> bool:
    """True when fla-core's chunk kernels import (needs triton and a CUDA build)."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def fla_gated_backward_ok() -> bool:
    """fla refuses the backward of per-token decays (GLA's g) on Hopper GPUs with Triton in [3.4, 3.7.1) (fla #640)."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    return not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, extra: int) -> None:
    if not fla_available():
        raise RuntimeError("the fla path needs the `fla-core` package (pip install moeformer[fla]) with triton")
    if not q.is_cuda:
        raise RuntimeError("the fla path needs CUDA tensors")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"fla path wants q, k (B, T, H, Dk) and v (B, T, H, Dv), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    state_shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[-1] + extra)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")


def _run_packed(
    kernel: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    per_token: dict[str, torch.Tensor | None],
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    document_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call an fla chunk kernel; packed rows become one flattened row whose documents each get a state."""
    batch, seq_len, heads = q.shape[:3]
    if initial_state is not None:
        initial_state = initial_state.float()
    segments = segment_ids(document_ids, cu_seqlens, batch, seq_len)
    if segments is None:
        o, final = kernel(
            q, k, v, **per_token, **options, initial_state=initial_state, output_final_state=output_final_state
        )
        return o, final
    flat_cu_seqlens, first, last = varlen_layout(segments)
    if initial_state is not None:  # a row's state continues its first document; the others start from zero
        n_docs = flat_cu_seqlens.numel() - 1
        initial_state = initial_state.new_zeros(n_docs, *initial_state.shape[1:]).index_copy(0, first, initial_state)
    flatten = lambda x: None if x is None else x.reshape(1, batch * seq_len, *x.shape[2:])
    o, final = kernel(
        flatten(q),
        flatten(k),
        flatten(v),
        **{name: flatten(x) for name, x in per_token.items()},
        **options,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=flat_cu_seqlens,
    )
    return o.view(batch, seq_len, heads, -1), None if final is None else final[last]


def fla_chunk_bthd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `decayed_linear_attn_chunked` but q, k (B, T, H, Dk), v (B, T, H, Dv), g (B, T, H) or (H,)."""
    _check(q, k, v, initial_state, int(normalize))
    from fla.ops.simple_gla import chunk_simple_gla

    heads = q.shape[2]
    g_gamma = None
    if g is not None and g.shape == (heads,):
        g, g_gamma = None, g.float()
    elif g is not None and g.shape == q.shape[:3]:
        g = g.float()
    elif g is not None:
        raise ValueError(f"g must be (B, T, H) = {tuple(q.shape[:3])} or (H,) = ({heads},), got {tuple(g.shape)}")
    if normalize:
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    o, final = _run_packed(
        chunk_simple_gla,
        q,
        k,
        v,
        {"g": g},
        initial_state,
        output_final_state,
        document_ids,
        cu_seqlens,
        g_gamma=g_gamma,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
    )
    if normalize:  # the fp32 denominator promotes the division to fp32 without an fp32 copy of the numerator
        o = (o[..., :-1] / (o[..., -1:].float() + eps)).to(q.dtype)
    return o, final if output_final_state else None


def fla_delta_rule_bthd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `delta_rule_chunked` but q, k (B, T, H, Dk), v (B, T, H, Dv), beta (B, T, H); fp16/bf16."""
    _check(q, k, v, initial_state, 0)
    from fla.ops.delta_rule import chunk_delta_rule

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fla's delta-rule kernel supports fp16/bf16 only, got {q.dtype}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be (B, T, H) = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    o, final = _run_packed(
        chunk_delta_rule,
        q,
        k,
        v,
        {"beta": beta},
        initial_state,
        output_final_state,
        document_ids,
        cu_seqlens,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
    )
    return o, final if output_final_state else None
