"""Softmax attention kernels behind one call, `attend`; every backend implements the `AttentionMask` rule and is
tested against the explicit fp32 `eager` reference."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from moeformer.layers.attention.mask import AttentionMask
from moeformer.layers.attention.paged import paged_decode, uses_kernel

BACKENDS = ("auto", "eager", "sdpa", "flash_attn", "flex")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
MASK_BLOCK_ELEMENTS = 2**22  # sdpa's boolean mask per batch row and query block: 4 MiB (2k x 2k in one block)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, window: int | None, scale: float
) -> torch.Tensor:
    """Reference: explicit scores and softmax in fp32 (KV heads repeated for GQA/MQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1).float() for t in (k, v))
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    allowed = mask.dense(q.shape[2], k.shape[2], window, q.device)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v).to(q.dtype)


def visible_keys(mask: AttentionMask, queries: range, k_len: int, window: int | None) -> range:
    """The keys any of `queries` may see: none after the last query (causal), none a full window before the first;
    all of a static buffer (its offset lives on the device)."""
    if mask.in_buffer:
        return range(k_len)
    first = mask.q_offset + queries.start
    return range(0 if window is None else max(0, first - window + 1), mask.q_offset + queries.stop)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, window: int | None, scale: float
) -> torch.Tensor:
    """torch SDPA; no mask tensor when the rule is plain causal with queries at the end of the keys, else blocks of
    queries over their visible keys, each block's boolean mask at most MASK_BLOCK_ELEMENTS entries per batch row (one
    query at least), so no n x n mask is ever built. A single query under GQA/MQA (decoding) folds the query heads
    of each KV head into rows of one block, which share its visibility: no kernel then needs GQA support (with a
    mask, CUDA has none but the math one) and keys are read once per KV head, never repeated."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads = k.shape[1]
    if q_len == 1 and q_heads != kv_heads:
        folded = q.view(batch, kv_heads, q_heads // kv_heads, q.shape[-1])
        return _sdpa_blocks(folded, k, v, mask, window, scale, 1).reshape(batch, q_heads, 1, v.shape[-1])
    return _sdpa_blocks(q, k, v, mask, window, scale, q_len)


def _sdpa_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, window: int | None, scale: float, q_len: int
) -> torch.Tensor:
    """`sdpa_attention` for `q_len` queries; q holds them as rows unless q_len == 1, when its rows are folded heads."""
    k_len = k.shape[2]
    plain = window is None and flash_expressible(mask, q_len, k_len)
    kwargs = dict(scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if plain and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    if plain and q_len == 1:  # one decode step sees every key
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    size = max(1, MASK_BLOCK_ELEMENTS // k_len)
    if size >= q_len:  # one block: its mask built once and shared by the layers, like the dense mask
        keys = visible_keys(mask, range(q_len), k_len, window)
        allowed = mask.memoised(
            ("sdpa", range(q_len), keys, window, q.device),
            functools.partial(mask.block, range(q_len), keys, window, q.device),
        )
        return F.scaled_dot_product_attention(
            q, k[:, :, keys.start : keys.stop], v[:, :, keys.start : keys.stop], attn_mask=allowed, **kwargs
        )
    outs = []  # several: each rebuilt per call, so no set of blocks adding up to n x n is kept
    for start in range(0, q_len, size):
        queries = range(start, min(start + size, q_len))
        keys = visible_keys(mask, queries, k_len, window)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, queries.start : queries.stop],
                k[:, :, keys.start : keys.stop],
                v[:, :, keys.start : keys.stop],
                attn_mask=mask.block(queries, keys, window, q.device),
                **kwargs,
            )
        )
    return torch.cat(outs, dim=2)


def _import_flash_attn() -> ModuleType | None:
    """The flash-attn package if it is installed and imports, else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn")
    except (ImportError, OSError):
        return None


# looked up once, with this module: inside a compiled model the lookup would break the graph (dynamo skips importlib)
FLASH_ATTN = _import_flash_attn()


def flash_expressible(mask: AttentionMask, q_len: int, k_len: int) -> bool:
    """flash-attn covers causal (bottom-right aligned) + sliding window, but not padding, documents or a static
    buffer (queries not at the end of the keys)."""
    return not mask.in_buffer and not mask.has_key_constraints and mask.q_offset + q_len == k_len


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, window: int | None, scale: float
) -> torch.Tensor:
    """flash-attn kernel (CUDA, fp16/bf16); queries are the last q_len keys, so its causal alignment matches."""
    flash = FLASH_ATTN
    if flash is None:
        raise RuntimeError(
            "attention backend 'flash_attn' needs the flash-attn package (pip install flash-attn); "
            "use backend='sdpa' or 'auto' instead"
        )
    if not q.is_cuda:
        raise RuntimeError(f"attention backend 'flash_attn' needs CUDA tensors, got device {q.device}")
    if q.dtype not in FLASH_DTYPES:
        raise ValueError(f"attention backend 'flash_attn' needs float16 or bfloat16 inputs, got {q.dtype}")
    if not flash_expressible(mask, q.shape[2], k.shape[2]):
        raise ValueError(
            "attention backend 'flash_attn' cannot express key_padding, document_ids or queries that "
            "are not the last keys; use 'sdpa', 'flex' or 'auto'"
        )
    window_size = (-1, -1) if window is None else (window - 1, 0)
    out = flash.flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=True,
        window_size=window_size,
    )
    return out.transpose(1, 2)


FLEX_MIN_HEAD_DIM = 16  # the smallest head size of the compiled (Triton) flex kernel


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # automatic dynamic shapes: a growing cache must not recompile per step


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, window: int | None, scale: float
) -> torch.Tensor:
    """FlexAttention with a block mask from the same rule; compiled on CUDA, unfused eager (reference speed) on CPU."""
    from torch.nn.attention.flex_attention import flex_attention as flex_eager

    q_len, k_len = q.shape[2], k.shape[2]
    block_mask = mask.memoised(
        ("flex", q_len, k_len, window, q.device), lambda: mask.block_mask(q_len, k_len, window, q.device)
    )
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if q.is_cuda:
        head_dim, value_dim = q.shape[-1], v.shape[-1]
        if min(head_dim, value_dim) < FLEX_MIN_HEAD_DIM:  # zero columns leave q.k and the kept outputs unchanged
            q, k = (F.pad(t, (0, max(0, FLEX_MIN_HEAD_DIM - head_dim))) for t in (q, k))
            v = F.pad(v, (0, max(0, FLEX_MIN_HEAD_DIM - value_dim)))
        flex = flex_eager if torch.compiler.is_compiling() else _compiled_flex()  # compiling: part of that graph
        return flex(q, k, v, **kwargs)[..., :value_dim]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_eager(q, k, v, **kwargs)


KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attn": flash_attention, "flex": flex_attention}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend: str, q: torch.Tensor, mask: AttentionMask, k_len: int) -> str:
    """Validate `backend`; "auto" picks flash_attn (importable, CUDA, fp16/bf16, expressible mask), else flex on CUDA
    for packed documents (block-sparse: it skips other documents' key blocks, which sdpa computes and masks) in eager
    mode, else sdpa: inside an inductor-compiled block, flex attention over a document mask gave wrong gradients
    (small-moe on an H200, torch 2.11: gradient norms 1e4-1e7 where eager and sdpa gave 2-9). Over a static buffer
    (compiled decoding) "flash_attn" and "flex" take sdpa too: flash-attn cannot read a padded buffer, flex would
    rebuild its block mask every step for one query block, and a model trained with either must still generate."""
    check_backend(backend)
    if mask.in_buffer and backend in ("flash_attn", "flex"):
        return "sdpa"
    if backend != "auto":
        return backend
    use_flash = (
        q.is_cuda
        and q.dtype in FLASH_DTYPES
        and q.shape[-1] <= FLASH_MAX_HEAD_DIM
        and flash_expressible(mask, q.shape[2], k_len)
        and FLASH_ATTN is not None
    )
    if use_flash:
        return "flash_attn"
    flex = q.is_cuda and mask.document_ids is not None and not torch.compiler.is_compiling()
    return "flex" if flex else "sdpa"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    window: int | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Masked softmax attention: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with Hq % Hkv == 0 -> (B, Hq, Tq, D); or,
    with `mask.pages`, k/v the paged pools (slots, Hkv, D), read in place by one-query steps' kernel, else gathered."""
    if mask.pages is not None and k.dim() == 3:
        if uses_kernel(q, k, v, mask.pages, backend):
            return paged_decode(q, k, v, mask.pages, window, scale)
        k, v = mask.pages.gather(k), mask.pages.gather(v)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"attend expects q (B, Hq, Tq, D) and k, v of equal shape (B, Hkv, Tk, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim, or Hq is not a multiple of Hkv"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype} (is the KV cache dtype the model's?)"
        )
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be a positive number of keys, got {window}")
    mask.check(q.shape[0], q.shape[2], k.shape[2])
    kernel = KERNELS[resolve_backend(backend, q, mask, k.shape[2])]
    if window is not None and not mask.in_buffer and window >= mask.q_offset + q.shape[2]:
        window = None  # no query is that far from the first key
    return kernel(q, k, v, mask, window, scale)
