"""How far two runs of the same fp32 computation may differ when only the order of their sums differs (parallel
layouts, ZeRO stages, ranks, kernels): bounds from the arithmetic, relative to the size of what is compared, so that
they hold on any x86 CPU rather than on the machine a test was written on.

- One forward or backward over the same weights: each output is a sum of at most a few hundred products, whose
  rounding differs by at most n * 2^-24 of the summed magnitudes (~1e-6 for n = 128, typically far less).
  FP32_RTOL = 1e-5 of the compared quantity's largest magnitude (gradients: GRAD_RTOL of the largest gradient,
  as a small gradient element can be the difference of large terms). BF16: a few units of bf16 rounding (2^-8).
- After optimizer steps, Adam divides each gradient by its own RMS: an element whose gradient is at rounding level
  gets an O(1) different update direction, i.e. up to one learning rate of difference (the seen ZeRO-3 vs ZeRO-0
  drift). So weights are bounded per element by what AdamW steps can do at all (2 * sum_t lr_t * B_t, with B_t
  Adam's bound on |m_hat / sqrt(v_hat)|), and in bulk (the median element) by a small fraction of one step; losses,
  which such elements hardly move (their gradient is ~0), by PROGRESS_RTOL of the loss change the steps made,
  since a wrong gradient changes the trajectory at the scale of the training itself.
"""

from __future__ import annotations

import math

FP32_RTOL = 1e-5
GRAD_RTOL = 1e-4
BF16_RTOL = 2**-6
PROGRESS_RTOL = 1e-3
BULK_LR_FRACTION = 1e-3


def trained_loss_bound(reference: list[float]) -> float:
    """How far a loss may differ after the steps whose losses were `reference`: FP32_RTOL of the loss plus
    PROGRESS_RTOL of the path the loss travelled."""
    travelled = sum(abs(b - a) for a, b in zip(reference, reference[1:]))
    return FP32_RTOL * abs(reference[0]) + PROGRESS_RTOL * travelled


def assert_curves_agree(curve: list[float], reference: list[float]) -> None:
    """Per-step losses of two runs of the same training: step 1 (the same weights) within FP32_RTOL of the loss,
    step t within `trained_loss_bound` of the reference's first t losses."""
    assert len(curve) == len(reference) > 0, (curve, reference)
    for t, (got, want) in enumerate(zip(curve, reference), start=1):
        bound = trained_loss_bound(reference[:t])
        assert abs(got - want) <= bound, f"loss at step {t}: {got} vs {want} (bound {bound:.3g})"


def adam_step_bound(t: int, beta1: float, beta2: float) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can produce at step t (1-based), whatever the gradients
    (Cauchy-Schwarz over the moments' geometric weights; 1 at step 1)."""
    ratio = beta1 * beta1 / beta2
    weights = sum(ratio**k for k in range(t))
    return (1 - beta1) / (1 - beta1**t) * math.sqrt((1 - beta2**t) / (1 - beta2) * weights)


def assert_adamw_weights_agree(a: dict, b: dict, lrs: list[float], betas: tuple[float, float]) -> None:
    """Weights (name -> tensor) after the same AdamW steps with learning rates `lrs` from the same start: every
    element within 2 * sum_t lr_t * B_t (two AdamW trajectories cannot get further apart), the median element
    within BULK_LR_FRACTION of the largest lr."""
    import torch

    assert a.keys() == b.keys() and lrs
    reach = 2 * sum(lr * adam_step_bound(t, *betas) for t, lr in enumerate(lrs, start=1))
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    assert diffs.max().item() <= reach, f"largest difference {diffs.max().item():.3g} > {reach:.3g}"
    median = diffs.median().item()
    assert median <= BULK_LR_FRACTION * max(lrs), f"median difference {median:.3g} > {BULK_LR_FRACTION} * lr"
