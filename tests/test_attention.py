"""Softmax attention: the mask rule against a brute-force loop, every backend against eager, KV-cache decoding."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from moeformer.layers.attention import BACKENDS, Attention, AttentionMask, KVCache, attend, backends
from moeformer.layers.attention.backends import resolve_backend
from moeformer.layers.rope import RotaryEmbedding

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU_BACKENDS = ["sdpa", "flex", "auto"]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def left_padding(batch: int, k_len: int, pads: list[int], device: str = "cpu") -> torch.Tensor:
    """(batch, k_len) bool, True = real token, with pads[b] padding tokens on the left of row b."""
    return torch.arange(k_len, device=device)[None, :] >= torch.tensor(pads, device=device)[:, None]


def make_mask(
    kind: str, batch: int, k_len: int, q_offset: int, device: str = "cpu"
) -> tuple[AttentionMask, int | None]:
    """A mask of the named kind plus the sliding window to use with it."""
    pads = [0, 3, k_len - 1][:batch]  # the last row is all padding but its final token
    docs = torch.stack([torch.arange(k_len, device=device) // max(1, k_len // (b + 2)) for b in range(batch)])
    return {
        "causal": (AttentionMask(q_offset), None),
        "padding": (AttentionMask(q_offset, key_padding=left_padding(batch, k_len, pads, device)), None),
        "window": (AttentionMask(q_offset), 3),
        "documents": (AttentionMask(q_offset, document_ids=docs), None),
        "everything": (AttentionMask(q_offset, left_padding(batch, k_len, pads, device), docs), 4),
    }[kind]


MASK_KINDS = ["causal", "padding", "window", "documents", "everything"]


def rule_by_loops(mask: AttentionMask, batch: int, q_len: int, k_len: int, window: int | None) -> torch.Tensor:
    """The documented rule, one (b, t, j) at a time."""
    out = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    for b, t, j in itertools.product(range(batch), range(q_len), range(k_len)):
        i = mask.q_offset + t
        ok = j <= i and (window is None or i - j < window)
        ok = ok and (mask.key_padding is None or bool(mask.key_padding[b, j]))
        ok = ok and (mask.document_ids is None or bool(mask.document_ids[b, j] == mask.document_ids[b, i]))
        out[b, 0, t, j] = ok or j == i
    return out


def qkv(batch, heads, q_len, k_len, head_dim=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_q, n_kv = heads
    shapes = [(batch, n_q, q_len, head_dim), (batch, n_kv, k_len, head_dim), (batch, n_kv, k_len, head_dim)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


# ---- the rule ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("q_len,k_len,q_offset", [(9, 9, 0), (3, 9, 6), (1, 9, 8), (4, 11, 5)])
def test_dense_mask_follows_the_rule(kind, q_len, k_len, q_offset):
    mask, window = make_mask(kind, 3, k_len, q_offset)
    dense = mask.dense(q_len, k_len, window, torch.device("cpu"))
    expected = rule_by_loops(mask, 3, q_len, k_len, window)
    assert torch.equal(dense.expand_as(expected), expected)
    assert dense.any(-1).all(), "every query must see at least itself"


def _listed_blocks(num: torch.Tensor, idx: torch.Tensor, n_k: int) -> torch.Tensor:
    """(B, 1, nq) counts + (B, 1, nq, nk) indices -> (B, nq, nk) bool of the listed key blocks."""
    first = torch.arange(n_k)[None, None, None] < num[..., None]
    return torch.zeros(*idx.shape, dtype=torch.bool).scatter_(-1, idx.long(), first)[:, 0]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("q_len,k_len,q_offset", [(50, 50, 0), (20, 53, 33), (37, 40, 3), (1, 40, 39)])
def test_block_mask_summaries_are_exact_where_it_matters(kind, q_len, k_len, q_offset):
    """Every block holding an allowed pair is listed (so nothing is lost), and a block marked full has every pair
    allowed (so skipping the mask there is right)."""
    block, batch = 16, 3
    mask, window = make_mask(kind, batch, k_len, q_offset)
    bm = mask.block_mask(q_len, k_len, window, torch.device("cpu"), block=block)
    n_q, n_k = -(-q_len // block), -(-k_len // block)
    rule = F.pad(
        rule_by_loops(mask, batch, q_len, k_len, window)[:, 0].int(),
        (0, n_k * block - k_len, 0, n_q * block - q_len),
        value=-1,
    ).view(batch, n_q, block, n_k, block)
    any_allowed = (rule == 1).any(4).any(2)
    all_allowed = (rule == 1).all(4).all(2)
    partial = _listed_blocks(bm.kv_num_blocks, bm.kv_indices, n_k)
    full = _listed_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, n_k)
    assert not (partial & full).any()
    assert ((partial | full) | ~any_allowed).all()
    assert (~full | all_allowed).all()


@pytest.mark.parametrize("kind", ["documents", "everything"])
def test_flex_over_several_blocks_matches_eager(kind):
    mask, window = make_mask(kind, 2, 300, 0)
    q, k, v = qkv(2, HEADS["gqa"], 300, 300)
    ref = attend(q, k, v, mask, window=window, scale=0.3, backend="eager")
    out = attend(q, k, v, mask, window=window, scale=0.3, backend="flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_eager_matches_per_query_softmax():
    """Eager against attention written one query at a time over its visible keys, in float64."""
    mask, window = make_mask("everything", 3, 10, 4)
    q, k, v = qkv(3, HEADS["gqa"], 6, 10)
    out = attend(q, k, v, mask, window=window, scale=0.3, backend="eager")
    visible = rule_by_loops(mask, 3, 6, 10, window)
    for b, h, t in itertools.product(range(3), range(4), range(6)):
        keys = visible[b, 0, t].nonzero().flatten()
        kv_head = h // 2
        weights = ((k[b, kv_head, keys].double() @ q[b, h, t].double()) * 0.3).softmax(0)
        torch.testing.assert_close(out[b, h, t].double(), weights @ v[b, kv_head, keys].double(), atol=1e-6, rtol=0)


# ---- backends against eager ----------------------------------------------------------------------------------------
SHAPES = [(12, 12, 0), (5, 12, 7), (1, 12, 11), (3, 12, 4), (1, 12, 5)]  # (q_len, k_len, q_offset); the
# last two leave future keys after the queries (a static cache handed over whole)
AGREEMENT_CASES = [
    (backend, heads, kind, *shape)
    for backend, heads, kind, shape in itertools.product(CPU_BACKENDS, HEADS, MASK_KINDS, SHAPES)
    if backend != "flex" or heads == "gqa" or shape == SHAPES[1]  # flex on CPU is slow: fewer combinations
]


@pytest.mark.parametrize("backend,heads,kind,q_len,k_len,q_offset", AGREEMENT_CASES)
def test_backends_match_eager_fp32(backend, heads, kind, q_len, k_len, q_offset):
    mask, window = make_mask(kind, 3, k_len, q_offset)
    q, k, v = qkv(3, HEADS[heads], q_len, k_len)
    ref = attend(q, k, v, mask, window=window, scale=8**-0.5, backend="eager")
    out = attend(q, k, v, mask, window=window, scale=8**-0.5, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kind", ["causal", "everything"])
def test_backends_match_eager_bf16(backend, kind):
    mask, window = make_mask(kind, 3, 16, 0)
    q, k, v = qkv(3, HEADS["gqa"], 16, 16, head_dim=16)
    ref = attend(q, k, v, mask, window=window, scale=0.25, backend="eager")
    out = attend(*(t.bfloat16() for t in (q, k, v)), mask, window=window, scale=0.25, backend=backend)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 3e-2


def test_padded_queries_stay_finite():
    """A query at a padded position still sees itself, so no backend produces NaN from an empty softmax row."""
    mask, _ = make_mask("padding", 3, 8, 0)
    q, k, v = qkv(3, HEADS["mha"], 8, 8)
    for backend in ("eager", "sdpa", "flex"):
        assert torch.isfinite(attend(q, k, v, mask, window=None, scale=0.5, backend=backend)).all(), backend


def test_sdpa_skips_the_mask_when_plain_causal(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(2, HEADS["gqa"], 6, 6)
    attend(q, k, v, AttentionMask(), window=None, scale=1.0, backend="sdpa")
    attend(q, k, v, AttentionMask(), window=6, scale=1.0, backend="sdpa")  # a window this wide never binds
    assert calls == [(None, True), (None, True)]
    calls.clear()
    attend(q[:, :, :1], k, v, AttentionMask(q_offset=5), window=None, scale=1.0, backend="sdpa")  # decode step
    assert calls == [(None, False)]
    calls.clear()
    attend(q, k, v, AttentionMask(key_padding=left_padding(2, 6, [0, 2])), window=None, scale=1.0, backend="sdpa")
    attend(q[:, :, :2], k, v, AttentionMask(q_offset=4), window=None, scale=1.0, backend="sdpa")  # chunked prefill
    assert [m.shape for m, _ in calls] == [(2, 1, 6, 6), (1, 1, 2, 6)] and not any(c for _, c in calls)


def test_dense_mask_is_shared_between_layers():
    mask = AttentionMask(key_padding=left_padding(2, 5, [0, 1]))
    first = mask.dense(5, 5, None, torch.device("cpu"))
    assert mask.dense(5, 5, None, torch.device("cpu")) is first
    assert mask.dense(5, 5, 2, torch.device("cpu")) is not first


def record_sdpa_masks(monkeypatch) -> list[torch.Tensor]:
    """Patch F.scaled_dot_product_attention to record the attn_mask of every call."""
    masks, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return masks


BLOCK_SHAPES = [(12, 12, 0), (7, 12, 5), (5, 12, 4)]  # (q_len, k_len, q_offset): a prefill, a prefill after cached
# keys, one that leaves future keys after the queries (a static cache handed over whole)


@pytest.mark.parametrize("budget,rows", [(1, 1), (36, 3), (60, 5)])  # 5 queries per block does not divide 12 or 7
@pytest.mark.parametrize("kind", ["padding", "window", "documents", "everything"])
@pytest.mark.parametrize("q_len,k_len,q_offset", BLOCK_SHAPES)
def test_sdpa_query_blocks_match_eager(monkeypatch, budget, rows, kind, q_len, k_len, q_offset):
    """With the mask budget shrunk, sdpa runs blocks of `rows` queries over their visible keys only, and its output
    and gradients still equal eager's."""
    monkeypatch.setattr(backends, "MASK_BLOCK_ELEMENTS", budget)
    mask, window = make_mask(kind, 3, k_len, q_offset)
    leaves = [t.requires_grad_() for t in qkv(3, HEADS["gqa"], q_len, k_len)]
    grad_out = torch.randn(3, 4, q_len, 8, generator=torch.Generator().manual_seed(1))
    ref = attend(*leaves, mask, window=window, scale=8**-0.5, backend="eager")
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    mask = make_mask(kind, 3, k_len, q_offset)[0]  # a fresh one: eager memoised its dense mask on the first
    masks = record_sdpa_masks(monkeypatch)
    out = attend(*leaves, mask, window=window, scale=8**-0.5, backend="sdpa")
    assert (out - ref).abs().max() <= 1e-5
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), ref_grads):
        assert (got - want).abs().max() <= 1e-5
    starts = range(0, q_len, rows)
    assert [m.shape[2] for m in masks] == [min(rows, q_len - s) for s in starts]
    for m, s in zip(masks, starts):
        last_key = q_offset + s + m.shape[2]  # keys after the block's last query are cut off
        assert m.shape[3] == (last_key if window is None else min(last_key, window + m.shape[2] - 1))
    kept = [t for t in mask._memo.values() if isinstance(t, torch.Tensor)]  # only a lone block is shared by layers
    assert len(kept) == (1 if len(masks) == 1 else 0)
    assert all(t.shape[-2] * t.shape[-1] <= max(budget, k_len) for t in kept)


# ---- backend selection and errors ----------------------------------------------------------------------------------
def test_auto_uses_sdpa_on_cpu():
    q, _, _ = qkv(1, HEADS["mha"], 4, 4, dtype=torch.bfloat16)
    assert resolve_backend("auto", q, AttentionMask(), 4) == "sdpa"


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    q, k, v = qkv(1, HEADS["mha"], 4, 4)
    with pytest.raises(RuntimeError, match="flash-attn"):
        attend(q, k, v, AttentionMask(), window=None, scale=1.0, backend="flash_attn")


def test_bad_arguments_raise():
    q, k, v = qkv(2, HEADS["gqa"], 4, 4)
    with pytest.raises(ValueError, match="eager"):
        attend(q, k, v, AttentionMask(), window=None, scale=1.0, backend="xformers")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attend(
            q,
            k[:, :1].expand(2, 3, 4, 8),
            v[:, :1].expand(2, 3, 4, 8),
            AttentionMask(),
            window=None,
            scale=1.0,
            backend="eager",
        )
    with pytest.raises(ValueError, match="only 4 keys"):
        attend(q, k, v, AttentionMask(q_offset=2), window=None, scale=1.0, backend="eager")
    with pytest.raises(ValueError, match="key_padding must have shape"):
        attend(
            q,
            k,
            v,
            AttentionMask(key_padding=torch.ones(2, 5, dtype=torch.bool)),
            window=None,
            scale=1.0,
            backend="sdpa",
        )
    with pytest.raises(TypeError, match="bool"):
        attend(q, k, v, AttentionMask(key_padding=torch.ones(2, 4)), window=None, scale=1.0, backend="sdpa")
    with pytest.raises(ValueError, match="window"):
        attend(q, k, v, AttentionMask(), window=0, scale=1.0, backend="eager")
    with pytest.raises(ValueError, match="dtype"):
        attend(q, k.double(), v.double(), AttentionMask(), window=None, scale=1.0, backend="sdpa")
    with pytest.raises(ValueError, match="backend"):
        Attention(16, 4, 2, 4, backend="fast")
    with pytest.raises(ValueError, match="qk_norm"):
        Attention(16, 4, 2, 4, qk_norm="layer")
    with pytest.raises(ValueError, match="divisible"):
        Attention(16, 4, 3, 4)


# ---- KV cache ------------------------------------------------------------------------------------------------------
def test_kv_cache_appends_and_overflows():
    cache = KVCache(2, 3, max_len=5, head_dim=4, dtype=torch.float32, device="cpu")
    k1, v1 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    k_all, v_all = cache.update(k1, v1)
    assert cache.length == 3 and torch.equal(k_all, k1) and torch.equal(v_all, v1)
    k2, v2 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(k2, v2)
    assert cache.length == 5
    assert torch.equal(k_all, torch.cat([k1, k2], 2)) and torch.equal(v_all, torch.cat([v1, v2], 2))
    with pytest.raises(ValueError, match="overflow"):
        cache.update(k2[:, :, :1], v2[:, :, :1])
    with pytest.raises(ValueError, match="shape"):
        KVCache(2, 3, 5, 4, torch.float32, "cpu").update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    cache.reset()
    assert cache.length == 0


def test_kv_cache_writes_at_a_device_position():
    """With `at` (a 0-d tensor) the cache writes there in place and returns the whole buffers; `length` is the
    position owner's business and stays put."""
    cache = KVCache(2, 3, max_len=6, head_dim=4, dtype=torch.float32, device="cpu")
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(k, v, at=torch.tensor(3))
    assert k_all is cache.k and v_all is cache.v and cache.length == 0
    assert torch.equal(cache.k[:, :, 3:5], k) and torch.equal(cache.v[:, :, 3:5], v)
    assert not cache.k[:, :, :3].any() and not cache.k[:, :, 5:].any()


BUFFER_CASES = [  # (heads, q_len, window): decode steps (GQA/MQA fold their query heads) and a two-token step
    ("gqa", 1, None),
    ("mqa", 1, 3),
    ("mha", 1, None),
    ("gqa", 2, None),
    ("mha", 2, 3),
]


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "flash_attn"])
@pytest.mark.parametrize("heads,q_len,window", BUFFER_CASES)
def test_buffer_offset_equals_prefix_offset(backend, heads, q_len, window):
    """Queries at a device offset into a whole static buffer (unwritten slots and padding hidden by key_padding)
    equal the same queries over the written prefix with a host offset (eager reference); fp32 within 1e-5. flex
    and flash_attn run sdpa over a buffer."""
    offset, buffer = 7, 12
    q, k, v = qkv(3, HEADS[heads], q_len, buffer)
    padding = left_padding(3, buffer, [0, 2, 5])
    written = padding & (torch.arange(buffer) < offset + q_len)
    ref = attend(
        q,
        k[:, :, : offset + q_len],
        v[:, :, : offset + q_len],
        AttentionMask(offset, key_padding=padding[:, : offset + q_len]),
        window=window,
        scale=0.3,
        backend="eager",
    )
    mask = AttentionMask(torch.tensor(offset), key_padding=written)
    assert resolve_backend(backend, q, mask, buffer) == ("eager" if backend == "eager" else "sdpa")
    out = attend(q, k, v, mask, window=window, scale=0.3, backend=backend)
    assert (out - ref).abs().max() <= 1e-5


# ---- the layer -----------------------------------------------------------------------------------------------------
def positions_for(padding: torch.Tensor) -> torch.Tensor:
    """Left-padded rows count positions from their first real token."""
    return (padding.long().cumsum(-1) - 1).clamp(min=0)


def layer_and_inputs(heads, qk_norm, window, dtype=torch.float32, device="cpu", seq=10, dim=32):
    torch.manual_seed(0)
    n_q, n_kv = HEADS[heads]
    layer = Attention(dim, n_q, n_kv, 8, bias=True, qk_norm=qk_norm, sliding_window=window).to(device, dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, seq, dim, device=device, dtype=dtype)
    padding = left_padding(2, seq, [0, 3], device)
    return layer, x, padding, RotaryEmbedding(6, max_seq_len=64)  # partial rotary: 6 of 8 dims


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("heads,qk_norm,window", [("mha", None, None), ("gqa", "head", 4), ("mqa", "full", None)])
def test_cached_decoding_equals_full_forward(backend, heads, qk_norm, window):
    layer, x, padding, rope = layer_and_inputs(heads, qk_norm, window)
    positions = positions_for(padding)
    layer.requires_grad_(backend != "flex")  # FlexAttention has no backward on CPU
    full = layer(x, rope(positions), AttentionMask(key_padding=padding), backend=backend)
    ref = layer(x, rope(positions), AttentionMask(key_padding=padding), backend="eager")
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
    cache = layer.init_cache(2, 12, torch.float32, "cpu")
    chunks, start, outs = [4, 3, 1, 1, 1], 0, []  # prefill, a chunk (Tq != Tk), then single tokens
    for n in chunks:
        end = start + n
        mask = AttentionMask(q_offset=start, key_padding=padding[:, :end])
        outs.append(layer(x[:, start:end], rope(positions[:, start:end]), mask, cache=cache, backend=backend))
        start = end
    assert cache.length == 10
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5


def test_layer_matches_manual_computation():
    """Projections, per-head QK-norm, rotary on the first rotary_dim dims and GQA written out by hand."""
    layer, x, padding, rope = layer_and_inputs("gqa", "head", None)
    cos, sin = rope(positions_for(padding))
    out = layer(x, (cos, sin), AttentionMask(key_padding=padding), backend="eager")

    def heads_of(t, n):
        return t.view(2, 10, n, 8).transpose(1, 2)

    def rms(t, w):
        return w * t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    def rotate(t):
        a, b, rest = t[..., :3], t[..., 3:6], t[..., 6:]
        c, s = cos[:, None, :, :3], sin[:, None, :, :3]
        return torch.cat([a * c - b * s, b * c + a * s, rest], -1)

    q = rotate(rms(heads_of(layer.q_proj(x), 4), layer.q_norm.weight))
    k = rotate(rms(heads_of(layer.k_proj(x), 2), layer.k_norm.weight)).repeat_interleave(2, 1)
    v = heads_of(layer.v_proj(x), 2).repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    allowed = rule_by_loops(AttentionMask(key_padding=padding), 2, 10, 10, None)
    attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, layer.o_proj(attn.transpose(1, 2).reshape(2, 10, 32)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_layer_runs_under_autocast(qk_norm):
    """fp32 weights with bf16 autocast: q/k/v reach the kernel in one dtype and the result tracks fp32."""
    layer, x, padding, rope = layer_and_inputs("gqa", qk_norm, 4)
    args = (x, rope(positions_for(padding)), AttentionMask(key_padding=padding))
    ref = layer(*args, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(*args, backend="sdpa")
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() <= 5e-2


def test_qk_norm_shapes():
    assert Attention(32, 4, 2, 8, qk_norm="head").k_norm.weight.shape == (8,)
    full = Attention(32, 4, 2, 8, qk_norm="full")
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (16,)
    assert not hasattr(Attention(32, 4, 2, 8), "q_norm")
    assert Attention(32, 4, 2, 8).o_proj.bias is None and Attention(32, 4, 2, 8, bias=True).q_proj.bias is not None


def test_cache_offset_mismatch_raises():
    layer, x, padding, rope = layer_and_inputs("mha", None, None)
    cache = layer.init_cache(2, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q_offset"):
        layer(x[:, :2], rope(positions_for(padding)[:, :2]), AttentionMask(q_offset=1), cache=cache)


def gradients_by_backend(backends: list[str], device: str) -> dict[str, torch.Tensor]:
    grads = {}
    for backend in backends:
        layer, x, padding, rope = layer_and_inputs("gqa", "head", 4, device=device)
        out = layer(x, rope(positions_for(padding)), AttentionMask(key_padding=padding), backend=backend)
        out.square().sum().backward()
        grads[backend] = layer.q_proj.weight.grad
    return grads


def test_sdpa_gradients_match_eager():
    grads = gradients_by_backend(["eager", "sdpa"], "cpu")
    assert grads["eager"].abs().max() > 0
    torch.testing.assert_close(grads["sdpa"], grads["eager"], atol=1e-4, rtol=1e-4)


# ---- GPU -----------------------------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"] + (["flash_attn"] if HAS_FLASH else []))
@pytest.mark.parametrize("kind", ["causal", "window"] + ["padding", "everything"])
@pytest.mark.parametrize("q_len,q_offset", [(64, 0), (16, 48), (1, 63)])
def test_gpu_backends_match_eager(backend, kind, q_len, q_offset):
    if backend == "flash_attn" and kind in ("padding", "everything"):
        pytest.skip("flash_attn cannot express padding or documents (auto falls back to sdpa)")
    mask, window = make_mask(kind, 3, 64, q_offset, device="cuda")
    q, k, v = qkv(3, HEADS["gqa"], q_len, 64, head_dim=64, dtype=torch.bfloat16, device="cuda")
    ref = attend(q.float(), k.float(), v.float(), mask, window=window, scale=0.125, backend="eager")
    out = attend(q, k, v, mask, window=window, scale=0.125, backend=backend)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() <= 3e-2
    if backend in ("sdpa", "auto"):  # (flex in fp32 would only add compile time)
        out32 = attend(q.float(), k.float(), v.float(), mask, window=window, scale=0.125, backend=backend)
        assert (out32 - ref).abs().max() <= 1e-3  # TF32 / reduced-precision matmuls may be on


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["padding", "window", "everything"])
@pytest.mark.parametrize("q_len,q_offset", [(64, 0), (16, 48)])
def test_gpu_sdpa_query_blocks_match_eager(monkeypatch, kind, q_len, q_offset):
    """Blocks of 5 queries over key spans of unaligned widths through the CUDA kernels, forward and backward."""
    monkeypatch.setattr(backends, "MASK_BLOCK_ELEMENTS", 5 * 64)
    mask, window = make_mask(kind, 3, 64, q_offset, device="cuda")
    q, k, v = qkv(3, HEADS["gqa"], q_len, 64, head_dim=64, dtype=torch.bfloat16, device="cuda")
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = attend(*leaves, mask, window=window, scale=0.125, backend="eager")
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, mask, window=window, scale=0.125, backend="sdpa")
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() <= 3e-2
    for got, want in zip(torch.autograd.grad(out.float().square().sum(), leaves), ref_grads):
        assert (got.float() - want).abs().max() <= 5e-2 * want.abs().max()


@gpu
@needs_cuda
def test_gpu_flex_block_mask_of_a_long_packed_sequence_is_not_n_by_n():
    t = 32768  # an n x n bool mask would take 1 GiB
    torch._dynamo.reset()  # past its recompile limit (earlier tests' shapes) compiled flex runs unfused, i.e. n x n
    ids = torch.arange(t, device="cuda").div(3000, rounding_mode="floor").view(1, t)
    mask = AttentionMask(document_ids=ids)
    q = torch.randn(1, 2, t, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attend(q, q, q, mask, window=None, scale=0.125, backend="flex")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**28
    docs = [(s, min(s + 3000, t)) for s in range(0, t, 3000)][:2]  # spot-check two documents against sdpa alone
    for s, e in docs:
        alone = attend(
            q[:, :, s:e], q[:, :, s:e], q[:, :, s:e], AttentionMask(), window=None, scale=0.125, backend="sdpa"
        )
        assert (out[:, :, s:e].float() - alone.float()).abs().max() <= 2e-2


@gpu
@needs_cuda
def test_gpu_auto_picks_flash_when_available():
    q = torch.randn(1, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q, AttentionMask(), 4) == ("flash_attn" if HAS_FLASH else "sdpa")
    assert resolve_backend("auto", q.float(), AttentionMask(), 4) == "sdpa"
    padded = AttentionMask(key_padding=torch.ones(1, 4, dtype=torch.bool, device="cuda"))
    assert resolve_backend("auto", q, padded, 4) == "sdpa"
    packed = AttentionMask(document_ids=torch.tensor([[0, 0, 1, 1]], device="cuda"))
    assert resolve_backend("auto", q.float(), packed, 4) == "flex"  # block-sparse over documents


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_gpu_cached_decoding_equals_full_forward(backend):
    layer, x, padding, rope = layer_and_inputs("gqa", "head", 4, device="cuda")
    positions = positions_for(padding)
    full = layer(x, rope(positions), AttentionMask(key_padding=padding), backend="eager")
    cache = layer.init_cache(2, 10, torch.float32, "cuda")
    outs = [layer(x[:, :6], rope(positions[:, :6]), AttentionMask(0, padding[:, :6]), cache, backend)]
    for t in range(6, 10):
        outs.append(
            layer(x[:, t : t + 1], rope(positions[:, t : t + 1]), AttentionMask(t, padding[:, : t + 1]), cache, backend)
        )
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-3


def test_backend_list_is_documented():
    assert set(BACKENDS) == {"auto", "eager", "sdpa", "flash_attn", "flex"}


@gpu
@needs_cuda
def test_gpu_gradients_match_eager():
    grads = gradients_by_backend(["eager", "sdpa", "flex"], "cuda")
    for backend in ("sdpa", "flex"):
        torch.testing.assert_close(grads[backend], grads["eager"], atol=1e-3, rtol=1e-3)


@gpu
@needs_cuda
def test_gpu_flex_decoding_does_not_recompile_per_step():
    """The compiled flex kernel must stay valid as the cache grows and q_offset moves (no recompile per token)."""
    import torch._dynamo

    def step(t: int) -> None:
        q, k, v = qkv(2, HEADS["gqa"], 1, t + 1, head_dim=64, dtype=torch.bfloat16, device="cuda", seed=t)
        attend(
            q, k, v, AttentionMask(t, left_padding(2, t + 1, [0, 2], "cuda")), window=None, scale=0.125, backend="flex"
        )

    step(40), step(41)  # the second length makes the compiled shapes dynamic
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(42, 46):
            step(t)
