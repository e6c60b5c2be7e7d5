"""Activation checkpointing applied to a built `CausalLM` (or one pipeline stage of it) from outside: whole blocks,
every k-th block, or only the attention / MoE sublayers. Recomputation goes through DeepSpeed's non-reentrant
checkpoint, which keeps gradients flowing into non-tensor outputs such as the MoE aux loss inside `MoEStats`.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

from moeformer.models.model import Block
from moeformer.training.config import ACTIVATION_CHECKPOINTING


def transformer_blocks(model: nn.Module) -> list[tuple[int, Block]]:
    """(layer index, block) of every transformer block in `model`: a `CausalLM`, or the part of it that one
    pipeline stage holds (its blocks keep their `layers.<index>` names there)."""
    return [
        (int(name.rsplit(".", 1)[1]), module) for name, module in model.named_modules() if isinstance(module, Block)
    ]


def checkpointed_modules(model: nn.Module, mode: str, every_k: int = 2) -> list[nn.Module]:
    """The modules whose forward is recomputed in backward under `mode`."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; expected one of {ACTIVATION_CHECKPOINTING}")
    if every_k < 1:
        raise ValueError(f"every_k must be >= 1, got {every_k}")
    indexed = transformer_blocks(model)
    blocks = [block for _, block in indexed]
    if mode == "none":
        return []
    if mode == "full":
        return blocks
    if mode == "every_k":
        return [block for index, block in indexed if index % every_k == 0]
    if mode == "attention":
        return [block.attn for block in blocks]
    return [block.mlp for block in blocks if block.is_moe]


def apply_activation_checkpointing(model: nn.Module, mode: str, every_k: int = 2) -> list[nn.Module]:
    """Make the selected modules recompute their forward in backward; returns them. State-dict keys are unchanged
    (the instance's `forward` is wrapped, no wrapper module is inserted)."""
    modules = checkpointed_modules(model, mode, every_k)
    for module in modules:
        if "forward" in vars(module):
            raise RuntimeError(f"{type(module).__name__}.forward is already wrapped (checkpointing applied twice?)")
        module.forward = functools.partial(_checkpointed_forward, non_reentrant_checkpoint, module.forward)
    return modules


def _checkpointed_forward(checkpoint, forward, *args, **kwargs):
    if kwargs:
        forward = functools.partial(forward, **kwargs)
    return checkpoint(forward, *args)
