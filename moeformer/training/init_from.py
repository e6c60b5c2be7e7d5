"""`model.init_from`: a new run starts from the weights of a checkpoint directory (native or Hugging Face) instead of
a random initialisation, e.g. to fine-tune a pruned model. The run's model section describes the architecture and
must give every tensor the checkpoint's shape; the optimizer, schedule and data start fresh (a resume still
continues from the run's own checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch

from moeformer.errors import CheckpointError
from moeformer.models.checkpoint import _listing
from moeformer.models.model import CausalLM, from_pretrained


@torch.no_grad()
def load_weights(model: CausalLM, path: str | Path) -> None:
    """Copy every tensor of checkpoint `path` into `model` (cast to its dtype, on its device); a CheckpointError
    lists the tensors whose shapes differ or that only one side has."""
    source = from_pretrained(path, dtype=torch.float32)
    if source.config.quantization:
        raise CheckpointError(
            f"model.init_from {path} holds a quantized model ({source.config.quantization}); "
            "training starts from full-precision weights"
        )
    ours, theirs = model.state_dict(), source.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(v.shape)}"
        for k, v in ours.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    problems += [f"{k} missing from the checkpoint" for k in ours if k not in theirs]
    problems += [f"{k} not in the model" for k in theirs if k not in ours]
    if problems:
        raise CheckpointError(
            f"model.init_from {path} does not fit the run's model section ({len(problems)} "
            f"tensor(s): {_listing(problems, 5)}); make the model section describe the checkpoint's "
            "architecture"
        )
    model.load_state_dict(theirs)
    model.reset_buffers()
