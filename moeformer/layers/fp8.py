"""FP8 training applied to a built model, from outside (as torchtitan converts its models): `enable_fp8(model)`.

- Dense linears, the attention projections and the dense and shared-expert MLPs (FP8_LINEARS, by module name), become
  torchao's Float8Linear (`torchao.float8`, the optional extra `moeformer[fp8]`) with its tensorwise recipe: one
  dynamic scale per tensor, e4m3 inputs and weights, e5m2 output gradients. Tensorwise because it measured 1.36x a
  bf16 linear on an H200 (16384 x 4096 x 4096, compiled), where rowwise scaling gave 1.02x.
- Routed experts run their grouped GEMMs through `fp8_grouped_mm` (moe/fp8_gemm.py: rowwise e4m3 on
  torch._scaled_grouped_mm); dispatch, the routing-weighted SwiGLU and combine are unchanged. `fp8_wgrad=False`
  keeps their weight gradients in bf16 (torchao's "rowwise_with_gw_hp" choice): less quantisation work per step.
- The router, norms, embeddings, LM head and the attention core stay in bf16, as does any linear or expert whose
  widths are not multiples of 16 (what the FP8 GEMMs need).

Apply it before torch.compile and before the model is handed to DeepSpeed (after expert parallelism, whose expert
modules it converts too). The state dict keeps its names and bf16 weights: checkpoints do not change."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from moeformer.errors import ConfigError

from .moe.experts import Experts
from .moe.fp8_gemm import ALIGN, fp8_grouped_mm_available

# the linears that train in FP8, by the last part of their module name (attention, MLA, dense and shared MLPs)
FP8_LINEARS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj",
    "kv_b_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada, Hopper and newer
REQUIREMENT = "FP8 training needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer)"


@dataclass
class Fp8Conversion:
    """What `enable_fp8` converted: module names of the FP8 linears and experts, and of those left in bf16 (why)."""

    linears: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self, shown: int = 3) -> str:
        """One line: how many linears and expert modules train in FP8, and the first `shown` left in bf16."""
        line = f"fp8: {len(self.linears)} linears and {len(self.experts)} expert modules in FP8"
        if not self.skipped:
            return line
        left = "; ".join(f"{name} ({why})" for name, why in list(self.skipped.items())[:shown])
        more = f" and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"{line}; left in bf16: {left}{more}"


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why FP8 training cannot run on `device` (None when it can): REQUIREMENT, and what the device is instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{REQUIREMENT}; this process runs on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return f"{REQUIREMENT}; {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return None


def fp8_linear_filter(module: nn.Module, name: str) -> bool:
    """Whether linear `name` trains in FP8: a plain nn.Linear (not the LM head) among FP8_LINEARS whose in and out
    widths are multiples of 16."""
    return (
        type(module) is nn.Linear
        and name.rsplit(".", 1)[-1] in FP8_LINEARS
        and module.in_features % ALIGN == 0
        and module.out_features % ALIGN == 0
    )


def _experts_blocker(experts: Experts, device: torch.device, emulate: bool) -> str | None:
    """Why these experts cannot run their grouped GEMMs in FP8 (None when they can)."""
    if experts.quantized:
        return "quantized experts"
    if experts.dim % ALIGN or experts.ffn_dim % ALIGN:
        return f"dim {experts.dim} and ffn_dim {experts.ffn_dim} must be multiples of {ALIGN}"
    if experts.backend == "loop":
        return "backend 'loop' has no grouped GEMM"
    if not emulate and not fp8_grouped_mm_available(device):
        return "torch._scaled_grouped_mm needs compute capability 9.0 or 10.x"
    return None


def enable_fp8(model: nn.Module, emulate: bool = False, fp8_wgrad: bool = True) -> Fp8Conversion:
    """Convert `model` in place for FP8 training (module docstring) and say what was converted. `emulate`: on any
    device (CPU tests), torchao's emulated float8 matmuls for the linears, and the experts' grouped GEMM through its
    reference wherever torch._scaled_grouped_mm does not run. `fp8_wgrad`: the experts' weight gradients in FP8
    (else bf16). Raises ConfigError on a device without FP8 unless
    emulating, ImportError without torchao."""
    device = next(model.parameters()).device
    problem = None if emulate else fp8_unsupported(device)
    if problem is not None:
        raise ConfigError(problem)
    config_class, convert = _torchao_float8()
    config = dataclasses.replace(config_class.from_recipe_name("tensorwise"), emulate=emulate)
    done = Fp8Conversion()
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            blocker = _experts_blocker(module, device, emulate)
            if blocker is None:
                module.fp8, module.fp8_wgrad = True, fp8_wgrad
                done.experts.append(name)
            else:
                done.skipped[name] = blocker
        elif type(module) is nn.Linear and name.rsplit(".", 1)[-1] in FP8_LINEARS:
            if fp8_linear_filter(module, name):
                done.linears.append(name)
            else:
                done.skipped[name] = f"widths {module.in_features} -> {module.out_features} not multiples of {ALIGN}"
    convert(model, config=config, module_filter_fn=fp8_linear_filter)
    return done


def _torchao_float8():
    """torchao's Float8LinearConfig and convert_to_float8_training, imported on first use (its Python path only: the
    failed loads of its C++ extensions it may log do not concern it)."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError(f"FP8 training needs torchao: pip install 'moeformer[fp8]' ({e})") from e
    finally:
        logger.setLevel(level)
    return Float8LinearConfig, convert_to_float8_training
