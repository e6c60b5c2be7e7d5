"""`ModelConfig`: one flat, YAML-friendly description of a dense, MoE or mixed transformer."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moeformer.errors import ConfigError
from moeformer.layers.attention.layer import QK_NORMS
from moeformer.layers.linear_attention import KINDS as LINEAR_ATTENTION  # each a LinearAttention kind
from moeformer.layers.mla import MLAConfig
from moeformer.layers.mlp import ACTIVATIONS
from moeformer.layers.moe.config import MoEConfig
from moeformer.layers.norms import NORM_KINDS
from moeformer.layers.quant.formats import check_format
from moeformer.models.zoo import zoo_path

SOFTMAX_ATTENTION = "softmax"
MLA_ATTENTION = "mla"
ATTENTION_TYPES = (SOFTMAX_ATTENTION, MLA_ATTENTION, *LINEAR_ATTENTION)
RENAMED_ATTENTION_TYPES = {"linear": "vanilla"}


@dataclass
class ModelConfig:
    """Architecture of a decoder-only language model.

    MoE placement: with `moe` set, layer i is MoE when it is listed in `moe_layers`, or (when
    `moe_layers` is None) when `i >= first_k_dense` and `(i - first_k_dense) % moe_every == 0`.
    `attention_types` lists the attention kind per layer; a shorter list repeats as a pattern
    (e.g. ["retnet", "retnet", "retnet", "softmax"]). None means softmax everywhere. Linear types ("vanilla",
    "retnet", "gla", "deltanet") take their options (feature_map, normalize, chunk_size, backend, ...) from
    `linear_attention`.
    """

    name: str = "custom"
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 512  # hidden width of dense MLP layers
    activation: str = "swiglu"
    mlp_bias: bool = False
    attn_bias: bool = False  # bias on q/k/v projections
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    qk_norm: str | None = None  # None | "head" (per head, Qwen3) | "full" (over all heads, OLMoE)
    sliding_window: int | None = None
    attn_backend: str = "auto"
    attention_types: list[str] | None = None
    linear_attention: dict[str, Any] = field(default_factory=dict)  # LinearAttention options for linear layers
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"dynamic"|"yarn"|"llama3", "factor": ..., ...}
    partial_rotary_factor: float = 1.0
    tie_embeddings: bool = False
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None  # used by layers whose attention type is "mla"
    moe_layers: list[int] | None = None
    first_k_dense: int = 0
    moe_every: int = 1
    init_std: float = 0.02
    loss_chunk_size: int = 4096  # tokens per cross-entropy chunk (bounds fp32 logits memory)
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific settings kept for export
    # weight-only format of the linear and expert weights, e.g. {"mode": "int4", "group_size": 128} (see
    # moeformer.quantize); None: full precision
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for key, value in _checked(
            ModelConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "model"
        ).items():
            setattr(self, key, value)
        if isinstance(self.moe, dict):
            self.moe = _dataclass_from_dict(MoEConfig, self.moe, "model.moe")
        if isinstance(self.mla, dict):
            self.mla = _dataclass_from_dict(MLAConfig, self.mla, "model.mla")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.moe_every < 1 or self.first_k_dense < 0:
            raise ValueError("moe_every must be >= 1 and first_k_dense >= 0")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"moe_layers {bad} are outside [0, n_layers={self.n_layers})")
        if self.quantization is not None:
            self.quantization = _quantization_record(self.quantization)
        if self.attention_types is not None and len(self.attention_types) == 0:
            raise ValueError("attention_types must not be empty (use None for softmax everywhere)")
        renamed = sorted(set(self.attention_types or ()) & set(RENAMED_ATTENTION_TYPES))
        if renamed:
            raise ConfigError(f"attention type {renamed[0]!r} is now called {RENAMED_ATTENTION_TYPES[renamed[0]]!r}")
        if "mode" in self.linear_attention:
            raise ConfigError("model.linear_attention.mode is now model.linear_attention.backend")
        unknown = sorted(set(self.attention_types or ()) - set(ATTENTION_TYPES))
        if unknown:
            raise ValueError(f"unknown attention type(s) {unknown}; expected {ATTENTION_TYPES}")
        if self.attention_types is not None and MLA_ATTENTION in self.attention_types and self.mla is None:
            raise ValueError("attention type 'mla' needs the `mla` config section")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "loss_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    # ---- per-layer structure -------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_every == 0

    def attention_type(self, i: int) -> str:
        if self.attention_types is None:
            return SOFTMAX_ATTENTION
        return self.attention_types[i % len(self.attention_types)]

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that rotary embeddings rotate (even); MLA rotates its rope part."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; unknown keys raise an error naming them."""
        return _dataclass_from_dict(cls, d, "model")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write as YAML (.yaml/.yml) or JSON (anything else)."""
        path = Path(path)
        text = (
            yaml.safe_dump(self.to_dict(), sort_keys=False)
            if path.suffix in (".yaml", ".yml")
            else json.dumps(self.to_dict(), indent=2)
        )
        path.write_text(text)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Look a model up in the zoo (`configs/models/<name>.yaml`), with keyword overrides."""
        config = cls.from_yaml(zoo_path(name))
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed; `moe` may be given as a dict of MoEConfig fields to change."""
        d = self.to_dict()
        for key, value in overrides.items():
            if key not in d:
                raise ValueError(f"unknown ModelConfig field {key!r}")
            if key in ("moe", "mla") and isinstance(value, dict) and d[key] is not None:
                unknown = set(value) - set(d[key])
                if unknown:
                    raise ValueError(f"unknown {key} config field(s) {sorted(unknown)}")
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return ModelConfig.from_dict(d)


def _quantization_record(record: Any) -> dict[str, Any]:
    """The validated `quantization` record, with its group size filled in."""
    if not isinstance(record, dict) or "mode" not in record or set(record) - {"mode", "group_size"}:
        raise ValueError(f"quantization must be a mapping with 'mode' and optionally 'group_size', got {record!r}")
    record = {"mode": record["mode"], "group_size": record.get("group_size", 128)}
    check_format(record["mode"], record["group_size"])
    return record


def _dataclass_from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in getattr(cls, "renamed_keys", {}).items():
        if old in d:
            raise ValueError(f"{where}.{old} was renamed: use {where}.{new}")
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} config key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**_checked(cls, d, where))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    """`d` (fields of dataclass `cls`) with each value checked against its field's type by `check_value`."""
    hints = _field_types(cls)
    return {key: check_value(f"{where}.{key}", value, hints[key]) for key, value in d.items()}


def check_value(key: str, value: Any, hint: Any) -> Any:
    """`value` of config key `key` if it fits type `hint`, else a ConfigError naming the key. Ints and numeric
    strings ("2e-3", which YAML leaves a string) become floats where a float is expected; list items are checked."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options or Any in options:
            return None
        raise ConfigError(f"config key {key!r} must not be null")
    if any(typing.get_origin(o) is dict for o in options):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return value
    lists = [o for o in options if typing.get_origin(o) is list]
    if lists:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(lists[0])
        return [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if float in options and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}") from None
    scalar = [t for t in options if t in (int, str, bool)]
    if scalar and not any(type(value) is t for t in scalar):
        raise ConfigError(f"config key {key!r} expects {' or '.join(t.__name__ for t in scalar)}, got {value!r}")
    return value
