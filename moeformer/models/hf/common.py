"""Pieces shared by the Hugging Face key maps: how one of our tensors is built from HF tensors, config helpers,
and the Llama-style attention / MLP / MoE name tables most families reuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moeformer.models.config import ModelConfig

# Layout kinds: how the HF tensors of one layout become one of our tensors (and back on export).
#   copy               one tensor, same shape
#   rope_rows          one tensor; rows are `groups x [nope | rope]` with the rope rows interleaved in HF
#   experts_in         E gate matrices (F, dim) then E up matrices (F, dim)  ->  w_in (E, dim, 2F) = [gate | up]
#   experts_in_fused   gate_up (E, 2F, dim)                                   ->  w_in (E, dim, 2F)
#   experts_out        E down matrices (dim, F)                               ->  w_out (E, F, dim)
#   experts_out_fused  down (E, dim, F)                                       ->  w_out (E, F, dim)
KINDS = ("copy", "rope_rows", "experts_in", "experts_in_fused", "experts_out", "experts_out_fused")


@dataclass(frozen=True)
class Layout:
    """One way a checkpoint may store a tensor of ours: the HF names and how they combine."""

    names: tuple[str, ...]
    kind: str = "copy"
    rope: tuple[int, int, int] | None = None  # rope_rows: (groups, nope rows per group, rope rows per group)


@dataclass(frozen=True)
class TensorMap:
    """Our state_dict key and the HF layouts it can be read from; the first layout is the one we export."""

    ours: str
    layouts: tuple[Layout, ...]

    @property
    def export(self) -> Layout:
        return self.layouts[0]


def copy(ours: str, *hf: str) -> TensorMap:
    """A 1:1 map; extra `hf` names are alternative spellings accepted on load."""
    return TensorMap(ours, tuple(Layout((name,)) for name in hf))


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: config translation both ways and the tensor map of a config."""

    model_types: tuple[str, ...]
    architecture: str  # HF class written to config.json "architectures"
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    tensor_maps: Callable[[ModelConfig], list[TensorMap]]
    ignore: Callable[[str, ModelConfig], bool] = field(default=lambda name, config: False)  # checkpoint extras


# ---- tensor conversion ---------------------------------------------------------------------


def source_shapes(layout: Layout, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes the HF tensors of `layout` must have for our tensor of `shape`."""
    kind = layout.kind
    if kind in ("copy", "rope_rows"):
        return [shape]
    E, a, b = shape
    if kind == "experts_in":  # (E, dim, 2F)
        return [(b // 2, a)] * (2 * E)
    if kind == "experts_in_fused":
        return [(E, b, a)]
    if kind == "experts_out":  # (E, F, dim)
        return [(b, a)] * E
    if kind == "experts_out_fused":
        return [(E, b, a)]
    raise ValueError(f"unknown layout kind {kind!r}; expected one of {KINDS}")


def _rope_perm(layout: Layout, n_rows: int) -> torch.Tensor:
    """Row order taking HF's interleaved rope pairs (x0, x1), (x2, x3)... to the rotate-half layout."""
    groups, nope, rope = layout.rope
    local = torch.cat((torch.arange(nope), nope + torch.arange(0, rope, 2), nope + torch.arange(1, rope, 2)))
    perm = (torch.arange(groups)[:, None] * (nope + rope) + local).flatten()
    if perm.numel() != n_rows:
        raise ValueError(f"rope layout {layout.rope} covers {perm.numel()} rows, tensor has {n_rows}")
    return perm


def fill_from_hf(out: torch.Tensor, layout: Layout, read: Callable[[int], torch.Tensor]) -> None:
    """Write our tensor `out` from the layout's HF tensors; `read(j)` loads the j-th one (any dtype)."""
    kind = layout.kind
    if kind == "copy":
        out.copy_(read(0))
    elif kind == "rope_rows":
        out.copy_(read(0)[_rope_perm(layout, out.shape[0])])
    elif kind == "experts_in":
        E, F = out.shape[0], out.shape[2] // 2
        for e in range(E):
            out[e, :, :F].copy_(read(e).t())
            out[e, :, F:].copy_(read(E + e).t())
    elif kind == "experts_out":
        for e in range(out.shape[0]):
            out[e].copy_(read(e).t())
    elif kind in ("experts_in_fused", "experts_out_fused"):
        out.copy_(read(0).transpose(1, 2))
    else:
        raise ValueError(f"unknown layout kind {kind!r}; expected one of {KINDS}")


def to_hf(tensor: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Our tensor as the layout's HF tensors (contiguous, in `layout.names` order)."""
    kind = layout.kind
    if kind == "copy":
        return [tensor.contiguous()]
    if kind == "rope_rows":
        hf = torch.empty_like(tensor)
        hf[_rope_perm(layout, tensor.shape[0])] = tensor
        return [hf]
    if kind == "experts_in":
        F = tensor.shape[2] // 2
        return [w[:, :F].t().contiguous() for w in tensor] + [w[:, F:].t().contiguous() for w in tensor]
    if kind == "experts_out":
        return [w.t().contiguous() for w in tensor]
    if kind in ("experts_in_fused", "experts_out_fused"):
        return [tensor.transpose(1, 2).contiguous()]
    raise ValueError(f"unknown layout kind {kind!r}; expected one of {KINDS}")


# ---- configs -------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def required(hf: dict[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` present (alternative spellings across transformers versions)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise KeyError(f"config.json of model_type {hf.get('model_type')!r} lacks required key {' / '.join(keys)!r}")


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the `rope_parameters` dict (transformers >= 5) or `rope_theta`+`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {kind!r}; supported: {ROPE_TYPES}")
    if kind == "default":
        return theta, None
    scaling = {"type": kind, **{k: v for k, v in params.items() if v is not None}}
    if kind in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return theta, scaling


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Rope keys for config.json in both spellings (old `rope_theta`/`rope_scaling`, new `rope_parameters`)."""
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None) or "default"
    scaling.pop("rope_type", None)
    return {
        "rope_theta": config.rope_theta,
        "rope_scaling": None if kind == "default" else {"rope_type": kind, "type": kind, **scaling},
        "rope_parameters": {"rope_type": kind, "rope_theta": config.rope_theta, **scaling},
    }


def base_config(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields every Llama-like family shares."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    theta, scaling = rope_from_hf(hf)
    n_heads = required(hf, "num_attention_heads")
    return dict(
        name=hf.get("_name_or_path") or required(hf, "model_type"),
        vocab_size=required(hf, "vocab_size"),
        dim=required(hf, "hidden_size"),
        n_layers=required(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim"),
        ffn_dim=required(hf, "intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        extra={"hf_config": hf},
    )


# Keys of an imported config.json that are dropped on export: derived from other fields, or alternative spellings
# of the expert count that would shadow the one the family writes.
STALE_KEYS = (
    "layer_types",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "quantization_config",
)


def base_to_hf(config: ModelConfig, family: Family, **fields: Any) -> dict[str, Any]:
    """config.json for `config`: the imported HF config (if any) updated with every architectural field."""
    check_exportable(config, family.model_types[0])
    hf = {k: v for k, v in (config.extra.get("hf_config") or {}).items() if k not in STALE_KEYS}
    hf.update(
        model_type=family.model_types[0] if hf.get("model_type") not in family.model_types else hf["model_type"],
        architectures=[family.architecture],
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        **rope_to_hf(config),
    )
    hf.update(fields)
    return hf


def check_exportable(config: ModelConfig, model_type: str) -> None:
    """Reject configs whose features no HF family here can express."""
    problems = []
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (HF families here use rmsnorm)")
    if config.activation != "swiglu" or (config.moe is not None and config.moe.activation != "swiglu"):
        problems.append("activation must be swiglu")
    if config.partial_rotary_factor != 1.0:
        problems.append(f"partial_rotary_factor={config.partial_rotary_factor}")
    mla_family = model_type.startswith("deepseek")
    if config.attention_types is not None and (set(config.attention_types) != {"mla"} or not mla_family):
        problems.append(f"attention_types={config.attention_types}")
    if config.moe is not None and config.moe.router == "expert_choice":
        problems.append("expert-choice routing")
    if problems:
        raise ValueError(f"cannot export as HF {model_type!r}: " + "; ".join(problems))


# ---- Llama-style name tables ---------------------------------------------------------------


def norm_maps(config: ModelConfig) -> list[TensorMap]:
    """Embeddings, final norm, LM head (absent when tied) and the two norms of every block."""
    maps = [copy("tok_embeddings.weight", "model.embed_tokens.weight"), copy("norm.weight", "model.norm.weight")]
    if not config.tie_embeddings:
        maps.append(copy("lm_head.weight", "lm_head.weight"))
    for i in range(config.n_layers):
        maps.append(copy(f"layers.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight"))
        maps.append(copy(f"layers.{i}.mlp_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight"))
    return maps


def attention_maps(config: ModelConfig, i: int) -> list[TensorMap]:
    ours, hf = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    maps = [copy(f"{ours}.{p}.weight", f"{hf}.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if config.attn_bias:
        maps += [copy(f"{ours}.{p}.bias", f"{hf}.{p}.bias") for p in ("q_proj", "k_proj", "v_proj")]
    if config.qk_norm is not None:
        maps += [copy(f"{ours}.{p}.weight", f"{hf}.{p}.weight") for p in ("q_norm", "k_norm")]
    return maps


def mlp_maps(ours: str, hf: str, bias: bool = False) -> list[TensorMap]:
    """A SwiGLU MLP whose HF names are gate_proj / up_proj / down_proj."""
    params = ("weight", "bias") if bias else ("weight",)
    return [copy(f"{ours}.{p}.{w}", f"{hf}.{p}.{w}") for p in ("gate_proj", "up_proj", "down_proj") for w in params]


def moe_maps(
    config: ModelConfig,
    ours: str,
    hf: str,
    *,
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    fused_hf: str | None = None,
    shared: str | None = None,
) -> list[TensorMap]:
    """Router, experts (per-expert 2-D or fused 3-D HF layout), router bias, shared expert and its gate.

    `fused_hf` is the module path of the fused layout when it differs from the per-expert one (Mixtral).
    """
    moe = config.moe
    E, fused_hf = moe.num_experts, fused_hf or hf
    gate, up, down = expert_names
    per_expert = lambda name: tuple(f"{hf}.experts.{e}.{name}.weight" for e in range(E))  # noqa: E731
    maps = [
        copy(f"{ours}.router.weight", *dict.fromkeys((f"{hf}.gate.weight", f"{fused_hf}.gate.weight"))),
        TensorMap(
            f"{ours}.experts.w_in",
            (
                Layout(per_expert(gate) + per_expert(up), "experts_in"),
                Layout((f"{fused_hf}.experts.gate_up_proj",), "experts_in_fused"),
            ),
        ),
        TensorMap(
            f"{ours}.experts.w_out",
            (
                Layout(per_expert(down), "experts_out"),
                Layout((f"{fused_hf}.experts.down_proj",), "experts_out_fused"),
            ),
        ),
    ]
    if moe.router_bias:
        maps.append(copy(f"{ours}.router.expert_bias", f"{hf}.gate.e_score_correction_bias"))
    if moe.num_shared_experts:
        if shared is None:
            raise ValueError(f"this HF family has no shared experts; config has {moe.num_shared_experts}")
        maps += mlp_maps(f"{ours}.shared_expert", f"{hf}.{shared}")
    if moe.shared_expert_gate:
        maps.append(copy(f"{ours}.shared_expert_gate.weight", f"{hf}.shared_expert_gate.weight"))
    return maps


def llama_like_maps(
    config: ModelConfig,
    moe_kwargs: dict[str, Any] | None = None,
    attention: Callable[[ModelConfig, int], list[TensorMap]] = attention_maps,
) -> list[TensorMap]:
    """Every tensor of a Llama-style decoder whose MoE blocks follow `moe_maps(**moe_kwargs)`."""
    maps = norm_maps(config)
    for i in range(config.n_layers):
        maps += attention(config, i)
        ours, hf = f"layers.{i}.mlp", f"model.layers.{i}.mlp"
        if config.is_moe_layer(i):
            kwargs = dict(moe_kwargs or {})
            hf = kwargs.pop("hf", "model.layers.{i}.mlp").format(i=i)
            if "fused_hf" in kwargs:
                kwargs["fused_hf"] = kwargs["fused_hf"].format(i=i)
            maps += moe_maps(config, ours, hf, **kwargs)
        else:
            maps += mlp_maps(ours, hf, bias=config.mlp_bias)
    return maps


def moe_layers_from_hf(n_layers: int, sparse_step: int, dense_layers: list[int]) -> list[int] | None:
    """Qwen-style MoE placement ((i + 1) % step == 0, minus `mlp_only_layers`) as `moe_layers` (None: all)."""
    layers = [i for i in range(n_layers) if (i + 1) % sparse_step == 0 and i not in dense_layers]
    return None if len(layers) == n_layers else layers
