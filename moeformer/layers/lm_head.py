"""The language-model head and its next-token cross-entropy, in three forms side by side: the plain reference (all
fp32 logits at once), the chunked form for any projection (each chunk's logits recomputed in backward), and the fused
form for a linear head (each chunk's gradients computed in the forward pass, so backward neither recomputes the
logits nor runs a log-softmax backward: one GEMM and one pass over the logits fewer per chunk). The distillation
loss (cross-entropy and KL to a teacher's logits) has the plain reference and the fused chunked form."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moeformer.layers.quant import QuantLinear

IGNORE_INDEX = -100


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the fp32 logits hidden @ weight.T against targets (-100 ignored)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight).float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _chunk_ce_sum(h: Tensor, t: Tensor, project: nn.Module) -> Tensor:
    return F.cross_entropy(project(h).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, targets: Tensor, project: nn.Module, chunk_size: int) -> Tensor:
    """Mean cross-entropy computed `chunk_size` tokens at a time, for any `project` from hidden states to logits
    (a parallel head, or identity for logits). Each chunk's fp32 logits are recomputed in backward (activation
    checkpointing), so only one chunk of them exists at any moment."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    count = (flat_t != IGNORE_INDEX).sum()
    total = flat_h.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_h.shape[0], chunk_size):
        h, t = flat_h[start : start + chunk_size], flat_t[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h, t, project, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, t, project)
    return total / count.clamp(min=1)


def _chunk_loss_and_grad(
    logits: Tensor, t: Tensor, scale: Tensor, split: VocabSplit | None = None
) -> tuple[Tensor, Tensor]:
    """The chunk's summed cross-entropy and scale * (softmax - onehot) per valid row (zero rows for ignored
    targets) in the logits' dtype. In place on one fp32 copy of the logits (eager keeps a single fp32 buffer) and
    elementwise only, so torch.compile fuses it into a reduction and one pass. With a `split`, `logits` are this
    rank's columns of the vocabulary and the row maximum, sum of exponentials and target logit are combined over
    the ranks."""
    lf = logits.float()
    valid = t != IGNORE_INDEX
    if split is None:
        safe = torch.where(valid, t, 0).unsqueeze(-1)
        lse = torch.logsumexp(lf, dim=-1, keepdim=True)
        loss = torch.where(valid, (lse - lf.gather(-1, safe)).squeeze(-1), 0.0).sum()
    else:
        local = t - split.start
        mine = valid & (local >= 0) & (local < lf.shape[-1])
        safe = torch.where(mine, local, -1).unsqueeze(-1)  # -1 matches no column below
        peak = split.all_max(lf.detach().amax(dim=-1, keepdim=True))
        sums = torch.cat(
            [
                (lf - peak).exp().sum(dim=-1, keepdim=True),
                torch.where(mine.unsqueeze(-1), lf.gather(-1, safe.clamp(min=0)) - peak, 0.0),
            ],
            dim=-1,
        )
        sum_exp, target = split.all_sum(sums).unbind(-1)
        lse = peak + sum_exp.log().unsqueeze(-1)
        loss = torch.where(valid, sum_exp.log() - target, 0.0).sum()
    is_target = torch.arange(lf.shape[-1], device=lf.device) == safe
    grad = lf.sub_(lse).exp_().add_(is_target, alpha=-1)
    return loss, grad.mul_(torch.where(valid, scale, 0.0).unsqueeze(-1)).to(logits.dtype)


class VocabSplit:
    """The vocabulary split over ranks: this rank's weight rows are the classes [start, start + its rows), and
    `all_max` / `all_sum` combine per-row values over the ranks (a parallelism transform supplies them)."""

    def __init__(self, start: int, all_max: Callable[[Tensor], Tensor], all_sum: Callable[[Tensor], Tensor]) -> None:
        self.start, self.all_max, self.all_sum = start, all_max, all_sum


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T; the forward also computes both gradients chunk by chunk (grad of
    the weight accumulated in fp32) and the backward only scales them by the incoming gradient. With a vocabulary
    split the hidden gradient is this rank's part (the caller sums it over the ranks)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        grad_hidden: bool,
        grad_weight: bool,
        split: VocabSplit | None,
    ) -> Tensor:
        scale = 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).float()
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            loss, d_logits = _chunk_loss_and_grad(h @ weight.t(), t, scale, split)
            total = total + loss
            if d_hidden is not None:
                d_hidden[start : start + chunk_size] = d_logits @ weight
            if d_weight is not None:
                d_weight += d_logits.t() @ h
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        g_hidden = d_hidden * grad.to(d_hidden.dtype) if d_hidden is not None else None
        g_weight = (d_weight * grad).to(ctx.weight_dtype) if d_weight is not None else None
        return g_hidden, g_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096, split: VocabSplit | None = None
) -> Tensor:
    """Mean next-token cross-entropy of the logits hidden @ weight.T (fp32 softmax), -100 ignored, computed
    `chunk_size` tokens at a time: one chunk of logits exists at any moment and none is kept for backward. With a
    `split`, `weight` holds this rank's rows of the vocabulary (tensor parallelism): no rank forms all the logits."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the tokens")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    needs = (hidden.requires_grad, weight.requires_grad) if torch.is_grad_enabled() else (False, False)
    if not any(needs) and split is None:
        return chunked_cross_entropy(flat_h, flat_t, lambda h: h @ weight.t(), chunk_size)
    return _LinearCrossEntropy.apply(flat_h, weight, flat_t, chunk_size, *needs, split)


def distill_loss_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, mean KL(teacher || student) at `temperature`) from all fp32 logits at once, over the
    tokens whose target is not -100."""
    zs = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight).float()
    zt = F.linear(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight).float()
    flat_t = targets.reshape(-1)
    valid = flat_t != IGNORE_INDEX
    ce = F.cross_entropy(zs, flat_t, ignore_index=IGNORE_INDEX)
    kl = F.kl_div(
        (zs / temperature).log_softmax(-1), (zt / temperature).log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    return ce, torch.where(valid, kl, 0.0).sum() / valid.sum().clamp(min=1)


def _chunk_kl_and_grad(
    zs: Tensor, zt: Tensor, valid: Tensor, temperature: float, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """The chunk's summed KL(softmax(zt/T) || softmax(zs/T)) over valid rows and its gradient with respect to the
    student logits zs, scale * (softmax(zs/T) - softmax(zt/T)) / T per valid row, in zs's dtype."""
    log_q = (zs.float() / temperature).log_softmax(-1)
    log_p = (zt.float() / temperature).log_softmax(-1)
    p = log_p.exp()
    kl = torch.where(valid, (p * (log_p - log_q)).sum(-1), 0.0).sum()
    grad = log_q.exp_().sub_(p).mul_(torch.where(valid, scale / temperature, 0.0).unsqueeze(-1))
    return kl, grad.to(zs.dtype)


class _LinearDistill(torch.autograd.Function):
    """(mean cross-entropy, mean KL) of the student logits hidden @ weight.T against the targets and the teacher's
    logits; like _LinearCrossEntropy, the forward computes the gradients of both chunk by chunk (one chunk of student
    and teacher logits at a time) and the backward only combines them with the incoming gradients."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        grad_hidden: bool,
        grad_weight: bool,
    ) -> tuple[Tensor, Tensor]:
        valid = targets != IGNORE_INDEX
        scale = 1.0 / valid.sum().clamp(min=1).float()
        grads = {}
        for name in ("ce", "kl"):
            grads[name] = (
                torch.empty_like(hidden) if grad_hidden else None,
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None,
            )
        totals = {name: hidden.new_zeros((), dtype=torch.float32) for name in grads}
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, t = hidden[rows], targets[rows]
            zs = h @ weight.t()
            kl, d_kl = _chunk_kl_and_grad(
                zs, teacher_hidden[rows] @ teacher_weight.t(), valid[rows], temperature, scale
            )
            ce, d_ce = _chunk_loss_and_grad(zs, t, scale)  # last: it overwrites fp32 logits in place
            for name, loss, d_logits in (("ce", ce, d_ce), ("kl", kl, d_kl)):
                totals[name] = totals[name] + loss
                d_hidden, d_weight = grads[name]
                if d_hidden is not None:
                    d_hidden[rows] = d_logits @ weight
                if d_weight is not None:
                    d_weight += d_logits.t() @ h
        ctx.save_for_backward(*grads["ce"], *grads["kl"])
        ctx.weight_dtype = weight.dtype
        return totals["ce"] * scale, totals["kl"] * scale

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_kl: Tensor):
        dh_ce, dw_ce, dh_kl, dw_kl = ctx.saved_tensors
        g_hidden = g_weight = None
        if dh_ce is not None:
            g_hidden = dh_ce * grad_ce.to(dh_ce.dtype) + dh_kl * grad_kl.to(dh_kl.dtype)
        if dw_ce is not None:
            g_weight = (dw_ce * grad_ce + dw_kl * grad_kl).to(ctx.weight_dtype)
        return g_hidden, g_weight, None, None, None, None, None, None, None


def linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """(mean next-token cross-entropy, mean KL(teacher || student)) of the student logits student_hidden @
    student_weight.T, the teacher's from teacher_hidden @ teacher_weight.T, both softened by `temperature` for the
    KL (the cross-entropy is at temperature 1); the means run over the tokens whose target is not -100. Computed
    `chunk_size` tokens at a time: one chunk of each model's logits exists at any moment, none is kept for backward,
    and the teacher gets no gradient. Distillation usually minimises (1 - a) * ce + a * T^2 * kl (Hinton et al.:
    T^2 keeps the KL's gradient scale independent of T)."""
    if student_hidden.shape[:-1] != targets.shape or teacher_hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)}, teacher hidden "
            f"{tuple(teacher_hidden.shape)} and targets {tuple(targets.shape)} disagree on the tokens"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_weight.shape[0]} vs {teacher_weight.shape[0]} logits"
        )
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size and temperature must be positive, got {chunk_size}, {temperature}")
    flat_h, flat_t = student_hidden.reshape(-1, student_hidden.shape[-1]), targets.reshape(-1)
    flat_th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    needs = (student_hidden.requires_grad, student_weight.requires_grad) if torch.is_grad_enabled() else (False, False)
    return _LinearDistill.apply(
        flat_h, student_weight, flat_th, teacher_weight.detach(), flat_t, float(temperature), chunk_size, *needs
    )


class LMHead(nn.Linear):
    """The output projection to vocabulary logits (no bias). Called with targets it returns the mean cross-entropy
    through `linear_cross_entropy` instead, inside the module call so that hooks on it (ZeRO-3 parameter
    gathering) see the weight in use."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, x: Tensor, targets: Tensor | None = None, chunk_size: int = 4096) -> Tensor:
        """Logits of `x`; or, given `targets` (already shifted, -100 ignored), their mean cross-entropy. Every LM
        head (the vocab-parallel one, a pipeline's last stage) answers this call."""
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, chunk_size)


class QuantLMHead(QuantLinear):
    """An int8/int4 LM head (inference, see `moeformer.quantize`) answering `LMHead`'s call: logits, or with targets
    the mean cross-entropy of its logits, `chunk_size` tokens at a time."""

    def forward(self, x: Tensor, targets: Tensor | None = None, chunk_size: int = 4096) -> Tensor:
        if targets is None:
            return super().forward(x)
        return chunked_cross_entropy(x, targets, super().forward, chunk_size)
