"""The LM head's cross-entropy forms (fused linear, chunked with recompute) against the plain fp32 reference."""

from __future__ import annotations

import pytest
import torch

from moeformer.layers.lm_head import (
    IGNORE_INDEX,
    LMHead,
    VocabSplit,
    chunked_cross_entropy,
    cross_entropy_reference,
    linear_cross_entropy,
)


def problem(batch: int, seq: int, dim: int, vocab: int, dtype=torch.float32, device="cpu", ignored: int = 3):
    """Random hidden states, head weight and targets with `ignored` targets set to -100."""
    h = torch.randn(batch, seq, dim, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, dim, dtype=dtype, device=device) / dim**0.5).requires_grad_(True)
    t = torch.randint(0, vocab, (batch, seq), device=device)
    t.view(-1)[torch.randperm(t.numel(), device=device)[:ignored]] = IGNORE_INDEX
    return h, w, t


def loss_and_grads(fn, h, w, t, scale: float = 1.0):
    loss = fn(h, w, t)
    return (loss, *torch.autograd.grad(loss * scale, (h, w)))


@pytest.mark.parametrize(
    "batch,seq,dim,vocab,chunk", [(2, 9, 16, 50, 4), (1, 33, 24, 97, 64), (3, 11, 8, 13, 1), (2, 16, 32, 300, 7)]
)
def test_fused_matches_reference_fp32(batch, seq, dim, vocab, chunk):
    torch.manual_seed(batch * seq + chunk)
    h, w, t = problem(batch, seq, dim, vocab)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=chunk), h, w, t, scale=2.5)
    want = loss_and_grads(cross_entropy_reference, h, w, t, scale=2.5)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start", [0, 40])
def test_vocab_split_form_matches_reference_on_one_rank(start):
    """The split-vocabulary form (tensor parallelism) with one rank holding classes [start, start + V): its max / sum
    reductions are the identity, so it must equal the reference (two ranks: tests/test_parallel.py)."""
    torch.manual_seed(start)
    h, w, t = problem(2, 13, 16, 50)
    one_rank = VocabSplit(start, lambda x: x, lambda x: x)
    shifted = torch.where(t == IGNORE_INDEX, t, t + start)
    got = loss_and_grads(lambda h, w, _: linear_cross_entropy(h, w, shifted, chunk_size=5, split=one_rank), h, w, t)
    want = loss_and_grads(cross_entropy_reference, h, w, t)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_matches_reference_bf16():
    torch.manual_seed(0)
    h, w, t = problem(2, 40, 64, 512, dtype=torch.bfloat16)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=24), h, w, t)
    h32, w32 = (x.detach().float().requires_grad_(True) for x in (h, w))
    want = loss_and_grads(cross_entropy_reference, h32, w32, t)
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-3)
    for g, r in zip(got[1:], want[1:], strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r).abs().max() <= 0.02 * r.abs().max()


def test_chunked_with_any_projection_matches_reference():
    torch.manual_seed(1)
    h, w, t = problem(3, 11, 16, 50)
    got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, t, lambda x: x @ w.t(), 7), h, w, t)
    want = loss_and_grads(cross_entropy_reference, h, w, t)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_only_the_needed_gradients_and_no_grad_loss():
    torch.manual_seed(2)
    h, w, t = problem(2, 10, 8, 20)
    want = cross_entropy_reference(h, w, t)
    frozen = w.detach()
    loss = linear_cross_entropy(h, frozen, t, chunk_size=3)
    (g,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(g, torch.autograd.grad(cross_entropy_reference(h, frozen, t), h)[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_size=3), want)


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    h, w, t = problem(1, 5, 4, 7, ignored=5)
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, t)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_lm_head_returns_logits_or_the_fused_loss_and_rejects_bad_shapes():
    torch.manual_seed(3)
    head = LMHead(16, 40)
    h, _, t = problem(2, 6, 16, 40)
    torch.testing.assert_close(head(h), h @ head.weight.t())
    torch.testing.assert_close(head(h, t, chunk_size=5), cross_entropy_reference(h, head.weight, t))
    with pytest.raises(ValueError, match="disagree on the tokens"):
        head(h, t[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        head(h, t, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_matches_reference_on_gpu_bf16(compiled):
    torch.manual_seed(4)
    h, w, t = problem(2, 1000, 256, 32000, dtype=torch.bfloat16, device="cuda", ignored=50)
    fn = torch.compile(linear_cross_entropy) if compiled else linear_cross_entropy
    got = loss_and_grads(lambda *a: fn(*a, chunk_size=768), h, w, t)
    h32, w32 = (x.detach().float().requires_grad_(True) for x in (h, w))
    want = loss_and_grads(cross_entropy_reference, h32, w32, t)
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-3)
    for g, r in zip(got[1:], want[1:], strict=True):
        assert (g.float() - r).abs().max() <= 0.02 * r.abs().max()
