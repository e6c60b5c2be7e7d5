"""Knowledge distillation in the trainer (`train.distill`): the loss becomes

    (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student)

on the next-token logits, both softened by the temperature T for the KL (T^2, after Hinton et al., keeps the KL's
gradients at the same scale for every T), plus the student's MoE aux losses. The teacher is a checkpoint directory
(native or Hugging Face) loaded once per rank, replicated (not sharded by ZeRO), frozen and in eval mode, in bf16 on
GPU and fp32 on CPU; it runs under no_grad on the student's batch (same positions and document ids, so packed
documents stay apart) to produce its final hidden states, and `linear_distill_loss` computes both losses chunk by
chunk from the two models' hidden states and LM-head weights. Targets of -100 (an instruction loss mask) are left
out of both."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeformer.errors import ConfigError
from moeformer.layers.lm_head import linear_distill_loss
from moeformer.models.config import ModelConfig, check_value
from moeformer.models.model import CausalLM, CausalLMOutput, from_pretrained
from moeformer.training.data import check_same_tokenizer


@dataclass
class DistillConfig:
    """`train.distill`: the teacher checkpoint and the loss mix. alpha 0.5 weighs the data and the teacher equally;
    temperature 1 matches the teacher's distribution as it is, the one the student is evaluated on."""

    teacher: str
    alpha: float = 0.5
    temperature: float = 1.0

    @classmethod
    def from_dict(cls, d: Any) -> DistillConfig:
        """From the `train.distill` mapping; unknown keys, a missing teacher and values out of range are
        ConfigErrors naming the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"train.distill must be a mapping with teacher, alpha, temperature; got {d!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown config key 'train.distill.{unknown[0]}'; valid keys: {', '.join(names)}")
        if d.get("teacher") is None:
            raise ConfigError("train.distill needs `teacher`: the checkpoint directory of the teacher model")
        hints = {"teacher": str, "alpha": float, "temperature": float}
        config = cls(**{k: check_value(f"train.distill.{k}", v, hints[k]) for k, v in d.items()})
        if not 0.0 <= config.alpha <= 1.0:
            raise ConfigError(f"train.distill.alpha must be in [0, 1], got {config.alpha}")
        if config.temperature <= 0:
            raise ConfigError(f"train.distill.temperature must be positive, got {config.temperature}")
        return config


@dataclass
class DistillOutput(CausalLMOutput):
    """A student forward under distillation: `ce_loss` against the data, `distill_kl` (at the temperature, before
    the T^2 factor) against the teacher, `loss` their mix plus the aux losses."""

    distill_kl: Tensor | None = None


@contextmanager
def capture_final_hidden(model: CausalLM):
    """Collects the final normed hidden states (the LM head's input) of each forward of `model` in a list."""
    captured: list[Tensor] = []
    handle = model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


def load_teacher(path: str | Path, student: ModelConfig, data_dir: str | Path, device: torch.device) -> CausalLM:
    """The frozen teacher in eval mode (bf16 on CUDA, fp32 on CPU), checked against the student's vocabulary and the
    data's tokenizer."""
    check_same_tokenizer(path, data_dir, "teacher")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = from_pretrained(path, dtype=dtype, device=device)
    if teacher.config.vocab_size != student.vocab_size:
        raise ValueError(
            f"the teacher {path} has vocab_size {teacher.config.vocab_size}, the student "
            f"{student.vocab_size}: distillation compares their logits token by token, set "
            f"--model.vocab_size={teacher.config.vocab_size}"
        )
    return teacher.requires_grad_(False).eval()


class Distiller:
    """Runs the teacher beside the student and mixes the losses; `forward` stands in for the trainer's forward."""

    def __init__(
        self,
        config: DistillConfig,
        student: ModelConfig,
        data_dir: str | Path,
        device: torch.device,
        loss_chunk_size: int,
    ) -> None:
        self.config, self.chunk_size = config, loss_chunk_size
        self.teacher = load_teacher(config.teacher, student, data_dir, device)

    @torch.no_grad()
    def teacher_hidden(self, input_ids: Tensor, **kwargs: Tensor | None) -> Tensor:
        with capture_final_hidden(self.teacher) as captured:
            self.teacher(input_ids, return_logits=False, stats=False, **kwargs)
        return captured[-1]

    def forward(self, engine: nn.Module, student: CausalLM, batch: dict[str, Tensor], packed: bool) -> DistillOutput:
        """The student forward on a training batch (input_ids, shifted targets, and with `packed` documents their
        position and document ids) through `engine`, whose module is `student`, without its own cross-entropy: the
        distillation loss computes it from the same logits as the KL."""
        kwargs = {k: batch[k] if packed else None for k in ("position_ids", "document_ids")}
        teacher_hidden = self.teacher_hidden(batch["input_ids"], **kwargs)
        with capture_final_hidden(student) as captured:
            out = engine(batch["input_ids"], return_logits=False, **kwargs)
        a, t = self.config.alpha, self.config.temperature
        ce, kl = linear_distill_loss(
            captured[-1],
            student.lm_head.weight,
            teacher_hidden,
            self.teacher.lm_head.weight,
            batch["targets"],
            t,
            self.chunk_size,
        )
        loss = (1 - a) * ce + a * t * t * kl
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return DistillOutput(
            logits=None, loss=loss, ce_loss=ce, aux_loss=out.aux_loss, moe_stats=out.moe_stats, distill_kl=kl
        )
