"""Weight-only int8/int4 quantization of a model, in place: every nn.Linear (attention, dense MLPs, shared experts,
the LM head unless tied to the embeddings) becomes a QuantLinear and the routed experts' 3-D weights become
QuantizedWeights. Routers, norms, embeddings and the few layers in HIGH_PRECISION stay as they are. The model's
config records the format (`config.quantization`), from which `build_quantized` rebuilds the empty structure that a
checkpoint loader fills tensor by tensor (`quantized_weights` maps full-precision tensor names to their targets)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moeformer.layers.lm_head import LMHead, QuantLMHead
from moeformer.layers.moe import Experts
from moeformer.layers.quant import QuantizedWeight, QuantLinear, check_format

# nn.Linear layers kept in full precision, by attribute name: the shared-expert gate and linear attention's decay
# and beta projections are tiny (no bandwidth to save) and feed sigmoids and decays that amplify errors; MLA's
# kv_b_proj is absorbed into the queries and outputs at decode time.
HIGH_PRECISION = ("shared_expert_gate", "decay_proj", "beta_proj", "kv_b_proj")
LINEAR_TYPES = (nn.Linear, LMHead)  # exactly these: a subclass may compute something else


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear and Experts to quantize, in model order."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantizedWeight)):
            raise ValueError(f"{name} is already quantized; quantize a full-precision model")
        if type(module).__module__.startswith("moeformer.parallel"):
            raise ValueError(f"{name} is a {type(module).__name__}: quantize the model before applying parallelism")
        if isinstance(module, Experts):
            targets.append((name, module))
        elif type(module) in LINEAR_TYPES:
            if name.rsplit(".", 1)[-1] not in HIGH_PRECISION and id(module.weight) not in embedded:
                targets.append((name, module))
        elif isinstance(module, nn.Linear):
            raise ValueError(f"{name}: cannot quantize a {type(module).__name__} (a subclass of nn.Linear)")
    return targets


def _check_widths(targets: list[tuple[str, nn.Module]], mode: str, group_size: int) -> None:
    """int4 groups run along each weight's input width: name the first layer whose width they do not divide."""
    if mode != "int4":
        return
    for name, module in targets:
        widths = (
            {"w_in": module.dim, "w_out": module.ffn_dim}
            if isinstance(module, Experts)
            else {"weight": module.in_features}
        )
        for weight, width in widths.items():
            if width % group_size:
                raise ValueError(
                    f"int4 group_size={group_size} does not divide the input width {width} of "
                    f"{name}.{weight}; use a group size that does (one of 32, 64, 128)"
                )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _convert(model: nn.Module, mode: str, group_size: int, empty: bool) -> nn.Module:
    check_format(mode, group_size)
    if getattr(getattr(model, "config", None), "quantization", None) and not empty:
        raise ValueError(f"the model is already quantized ({model.config.quantization}); quantize it only once")
    targets = _targets(model)
    _check_widths(targets, mode, group_size)
    for name, module in targets:
        quantized = QuantLMHead if isinstance(module, LMHead) else QuantLinear  # the head keeps its loss call
        if isinstance(module, Experts):
            module.quantize_(mode, group_size, empty=empty)
        elif empty:
            w = module.weight
            _replace(
                model,
                name,
                quantized(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    mode,
                    group_size,
                    w.dtype,
                    w.device,
                ),
            )
        else:
            _replace(model, name, quantized.from_linear(module, mode, group_size))
    model.requires_grad_(False)
    if hasattr(model, "config"):
        model.config = dataclasses.replace(model.config, quantization={"mode": mode, "group_size": group_size})
    return model


@torch.no_grad()
def quantize(model: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """Quantize `model` in place to int8 (per output channel) or int4 (groups of `group_size` inputs) and return
    it. Scales are stored in each weight's dtype, so cast the model to its inference dtype first. The model becomes
    inference-only: every remaining parameter is frozen (requires_grad=False)."""
    return _convert(model, mode, group_size, empty=False)


def build_quantized(model: nn.Module, mode: str | None = None, group_size: int | None = None) -> nn.Module:
    """Replace the layers `quantize` would quantize by empty quantized ones (shapes only, on each weight's device,
    meta included), in place, for a loader to fill with `QuantizedWeight.quantize_` or `load_state_dict`. The
    format defaults to the model's `config.quantization` record."""
    record = getattr(getattr(model, "config", None), "quantization", None) or {}
    mode = mode or record.get("mode")
    if mode is None:
        raise ValueError("no quantization format: pass mode= or set config.quantization")
    return _convert(model, mode, group_size or record.get("group_size", 128), empty=True)


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{full-precision state-dict key: the QuantizedWeight that stands for it}, e.g. "layers.0.attn.q_proj.weight"
    and "layers.1.mlp.experts.w_in": a loader quantizes each such tensor straight into its target."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedWeight)}
