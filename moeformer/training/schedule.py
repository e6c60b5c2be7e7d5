"""Learning-rate schedules as multipliers of the peak lr: linear warmup, then cosine, stable-then-decay (WSD) or
constant."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from moeformer.training.config import SCHEDULES, OptimConfig


def lr_multiplier(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly to 1 over `warmup_steps` (step 0 already gets 1 / warmup_steps). After it, "cosine"
    follows a half cosine down to `min_lr_ratio` at the last step; "wsd" stays at 1 and decays linearly to
    `min_lr_ratio` over the last `decay_fraction` of all steps; "constant" stays at 1.
    """
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; expected one of {SCHEDULES}")
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = config.min_lr_ratio
    last = max(total_steps - 1, 1)
    if config.schedule == "cosine":
        progress = min((step - warmup) / max(last - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "wsd":
        decay_start = max(warmup, total_steps - round(config.decay_fraction * total_steps))
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
        return 1.0 + (floor - 1.0) * progress
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig) -> LambdaLR:
    """A LambdaLR over `optimizer`'s groups (their lr is the peak lr); its state_dict is just the step count."""
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))
