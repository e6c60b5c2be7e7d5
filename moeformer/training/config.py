"""Training configuration: YAML files of nested dataclasses, with dotted command-line overrides.

    python scripts/train.py --config configs/train/tiny-moe-cpu.yaml --optim.lr=1e-3 --model.dim=64

Every key is checked: an unknown key (in the file or on the command line) raises a KeyError naming it and listing
the valid keys of its section. The `model` section is a zoo name plus any `ModelConfig` field to override.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moeformer.errors import ConfigError, ResumeConfigError
from moeformer.models.checkpoint import read_model_config
from moeformer.models.config import ModelConfig, check_value
from moeformer.models.model import CausalLM
from moeformer.parallel.config import ParallelConfig
from moeformer.safe_files import write_atomic
from moeformer.training.distill import DistillConfig

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes in which inductor replays CUDA graphs
ACTIVATION_CHECKPOINTING = ("none", "full", "every_k", "attention", "moe")
EXPORT_FORMATS = ("native", "hf", "none")
RENAMED_KEYS = {"train.checkpoint_every_k": "train.activation_checkpointing_every"}  # old key -> new key


@dataclass
class DataConfig:
    """Where the prepared corpus is (scripts/prepare_data.py) and how it is cut into batches."""

    dir: str = "data/stdlib-byte"
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per rank per micro-step
    shuffle: bool = True
    packed_documents: bool = True  # attend only within documents (document_ids + restarting positions)
    # global batches of the train stream a fresh run skips (a resume continues from its checkpoint instead): e.g.
    # continue the data where the run that wrote `model.init_from` stopped (its steps x train.grad_accum)
    start_batch: int = 0


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (warmup + cosine, warmup-stable-decay, or constant after warmup)."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # matrices only; norms, biases and embeddings-free vectors get none
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of all steps spent in the final decay


@dataclass
class LoopConfig:
    """The training loop: length, precision, ZeRO stage, evaluation, logging and failure handling."""

    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    dtype: str = "bf16"
    zero_stage: int = 1
    activation_checkpointing: str = "none"  # none | full | every_k | attention | moe (recompute in backward)
    activation_checkpointing_every: int = 2  # with every_k: blocks 0, k, 2k, ... are recomputed
    compile: bool = False  # torch.compile the model's forward (not with parallel.pp > 1)
    compile_backend: str = "inductor"  # a torch.compile backend; "aot_eager" skips code generation (fast to build)
    compile_mode: str = "default"  # inductor's: reduce-overhead replays each compiled block as CUDA graphs (CUDA)
    fp8: bool = False  # linears and expert GEMMs in FP8 (moeformer.layers.fp8; GPU of compute capability >= 8.9)
    fp8_wgrad: bool = True  # with fp8: the experts' weight gradients in FP8 too (false: bf16)
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 10
    log_every: int = 1
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row (pipeline: at the first, see Trainer)
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs are detected, otherwise no MFU
    progress_bar: bool = True
    # knowledge distillation: {teacher: checkpoint dir, alpha: 0.5, temperature: 1.0} (moeformer.training.distill)
    distill: dict[str, Any] | None = None

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled blocks replay as CUDA graphs (a compile mode of CUDA_GRAPH_MODES, compiling)."""
        return self.compile and self.compile_mode in CUDA_GRAPH_MODES


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints every `every` steps (0: only at the end), keeping the newest `keep_last`; none at all
    with `enabled` false (throughput runs: a 1B model's checkpoint with its optimizer is ~14 GB; nothing resumes)."""

    enabled: bool = True
    every: int = 0
    keep_last: int = 2
    resume: str | None = None  # None, "auto" (the newest checkpoint of the run that verifies), or a checkpoint dir
    resume_allow: list[str] = field(default_factory=list)  # keys a resume may change, e.g. [optim.lr, train.steps]
    export: str = "native"  # final model: native safetensors, Hugging Face, or none


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed JSON to start from (its keys win over the ones built from this config), or None."""

    config: str | None = None


@dataclass
class RunConfig:
    """Everything a training run needs; `out_dir` receives checkpoints, logs, plots and the exported model."""

    out_dir: str = "runs/default"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "tiny-moe"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # data parallelism takes the rest of the world

    def __post_init__(self) -> None:
        _check_choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _check_choice("train.dtype", self.train.dtype, DTYPES)
        _check_choice("train.activation_checkpointing", self.train.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        _check_choice("checkpoint.export", self.checkpoint.export, EXPORT_FORMATS)
        if self.train.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.train.zero_stage}")
        if self.train.compile:
            self._check_compile()
        elif self.train.compile_mode != "default":
            raise ConfigError(f"train.compile_mode={self.train.compile_mode} needs train.compile=true")
        if self.parallel.pp > 1:
            self._check_pipeline()
        if self.train.distill is not None:
            self._check_distill()
        if self.train.fp8:
            self._check_fp8()
        for key in (
            "train.steps",
            "train.grad_accum",
            "data.seq_len",
            "data.micro_batch_size",
            "train.log_every",
            "train.max_nonfinite",
            "train.activation_checkpointing_every",
        ):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(getattr(self, section), name)}")
        if self.data.start_batch < 0:
            raise ConfigError(f"data.start_batch must be >= 0, got {self.data.start_batch}")
        if self.optim.warmup_steps < 0 or self.optim.lr <= 0:
            raise ConfigError(
                f"optim.warmup_steps must be >= 0 and optim.lr > 0, got {self.optim.warmup_steps}, {self.optim.lr}"
            )
        if not 0.0 < self.optim.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {self.optim.decay_fraction}")
        if self.checkpoint.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if self.checkpoint.every and not self.checkpoint.enabled:
            raise ConfigError(f"checkpoint.every={self.checkpoint.every} saves checkpoints; checkpoint.enabled=false")
        model = self.model_config()  # validates the model section now rather than after start-up
        if self.train.compile and self.train.compile_backend == "inductor" and model.attn_backend == "flex":
            raise ConfigError(
                "train.compile=true with model.attn_backend=flex trains on wrong gradients (flex attention over "
                "packed documents inside inductor-compiled blocks); use model.attn_backend=auto or sdpa, or "
                "train.compile_backend=aot_eager"
            )
        check_value("model.init_from", self.init_from, str | None)

    def _check_compile(self) -> None:
        """train.compile needs a registered torch.compile backend and, with pipeline parallelism, a mode without
        CUDA graphs."""
        from torch._dynamo import list_backends  # only when compiling: importing dynamo takes a second

        _check_choice("train.compile_backend", self.train.compile_backend, tuple(list_backends(exclude_tags=())))
        _check_choice("train.compile_mode", self.train.compile_mode, COMPILE_MODES)
        if self.train.compile_mode != "default" and self.train.compile_backend != "inductor":
            raise ConfigError(
                f"train.compile_mode={self.train.compile_mode} is an inductor mode; train.compile_backend="
                f"{self.train.compile_backend} takes only compile_mode=default"
            )
        if self.parallel.pp > 1 and self.train.compile_mode in CUDA_GRAPH_MODES:
            raise ConfigError(
                f"train.compile_mode={self.train.compile_mode} replays CUDA graphs, which pipeline parallelism "
                f"(parallel.pp={self.parallel.pp}) does not support: DeepSpeed's schedule interleaves the forwards and "
                "backwards of several micro-batches; use train.compile_mode=default or max-autotune-no-cudagraphs"
            )

    def _check_pipeline(self) -> None:
        """What DeepSpeed's pipeline engine and our pipeline stages support."""
        pp = self.parallel.pp
        if self.train.zero_stage > 1:
            raise ConfigError(
                f"parallel.pp={pp} needs train.zero_stage 0 or 1 (DeepSpeed's pipeline engine does not "
                f"run ZeRO-{self.train.zero_stage})"
            )

    def _check_distill(self) -> None:
        """train.distill reads the student's final hidden states and its whole LM head on every rank: not on
        pipeline stages, tensor-parallel heads or ZeRO-3 partitions."""
        DistillConfig.from_dict(self.train.distill)
        p = self.parallel
        if p.pp > 1 or p.tp > 1 or self.train.zero_stage == 3:
            raise ConfigError(
                f"train.distill is not supported with parallel.pp={p.pp}, parallel.tp={p.tp}, "
                f"train.zero_stage={self.train.zero_stage}: it needs pp=1, tp=1 and ZeRO stage 0-2"
            )

    def _check_fp8(self) -> None:
        """train.fp8 converts one bf16 model's modules in place: not pipeline stages, tensor-parallel linears or
        ZeRO-3 partitions."""
        p, t = self.parallel, self.train
        if p.pp > 1 or p.tp > 1 or t.zero_stage == 3 or t.dtype != "bf16":
            raise ConfigError(
                f"train.fp8=true is not supported with parallel.pp={p.pp}, parallel.tp={p.tp}, "
                f"train.zero_stage={t.zero_stage}, train.dtype={t.dtype}: it needs pp=1, tp=1, ZeRO stage 0-2 and "
                "bf16 (expert parallelism is supported)"
            )

    @property
    def init_from(self) -> str | None:
        """`model.init_from`: a checkpoint directory (native or Hugging Face) whose weights a new run starts from."""
        return self.model.get("init_from")

    def model_config(self) -> ModelConfig:
        """The zoo model named by `model.name` with the other `model.*` keys applied as overrides; with
        `model.init_from`, the checkpoint's own config instead (`name` is then not needed), where the overrides may
        change nothing that shapes a tensor (backends, loss coefficients, max_seq_len...): a clear error otherwise."""
        overrides = dict(self.model)
        name = overrides.pop("name", None)
        init_from = overrides.pop("init_from", None)
        valid = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise KeyError(f"unknown config key 'model.{unknown[0]}'; valid keys in model: {', '.join(sorted(valid))}")
        if init_from is None and not isinstance(name, str):
            raise KeyError("the model section needs `name`: a zoo model such as tiny-moe")
        try:
            if init_from is not None:
                return _checkpoint_config(init_from, overrides)
            return ModelConfig.from_name(name, **overrides)
        except ConfigError:
            raise
        except ValueError as e:
            raise KeyError(f"model section: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write as YAML, atomically (a kill never leaves half a config)."""
        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _checkpoint_config(path: str, overrides: dict[str, Any]) -> ModelConfig:
    """The config of checkpoint `path` with `overrides` applied, which must leave every tensor's shape as it is."""
    base = read_model_config(path)
    config = base.replace(**overrides)
    with torch.device("meta"):
        ours, theirs = CausalLM(config).state_dict(), CausalLM(base).state_dict()
    changed = sorted(
        k for k in ours.keys() | theirs.keys() if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape
    )
    if changed:
        raise ConfigError(
            f"model.init_from {path}: the model section's overrides ({', '.join(sorted(overrides))}) "
            f"change the checkpoint's tensors ({len(changed)}, e.g. {changed[0]}); with init_from the "
            "checkpoint defines the architecture: override only what keeps its shapes"
        )
    return config


# ---- resuming ---------------------------------------------------------------------------------------------------
# Keys that do not change what a run computes (where it writes, how it reports, how fast it runs): a resume may
# change them without naming them. A section name covers all of its keys.
RESUME_FREE_KEYS = (
    "out_dir",
    "checkpoint",
    "train.progress_bar",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.peak_tflops",
    "train.max_nonfinite",
    "train.compile",
    "train.compile_backend",
    "train.compile_mode",
    "train.activation_checkpointing",
    "train.activation_checkpointing_every",
    "parallel.ep_chunks",  # how the all-to-alls are pipelined, not what they compute
    "parallel.ep_dispatcher",  # how tokens reach the experts, not what they compute
    "data.start_batch",  # where a fresh run starts in the data; a resume takes its checkpoint's position
)


def run_identity(config: RunConfig, data_facts: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What a run computes, as flat dotted keys: the config, with the model section resolved to every ModelConfig
    field (`model.moe.top_k`, ...), `data_facts` under `data.` (token counts, tokenizer) and the number of processes
    (`world_size`: with the micro-batch size, it sets the global batch), less RESUME_FREE_KEYS."""
    d = config.to_dict()
    d["model"] = config.model_config().to_dict()
    d["data"].update(data_facts)
    d["world_size"] = world_size
    flat = json.loads(json.dumps(_flatten(d)))  # the form it takes in a checkpoint's run.json (tuples are lists)
    return {k: v for k, v in flat.items() if not _covered(k, RESUME_FREE_KEYS)}


def resume_changes(saved: dict[str, Any], current: dict[str, Any], allowed: list[str]) -> dict[str, list]:
    """The keys whose values differ between `saved` and `current` run identities, as {key: [saved, current]}.
    Raises ResumeConfigError listing them unless `allowed` (dotted keys or section names) covers every one."""
    unknown = [
        name
        for name in allowed
        if not _covered(name, RESUME_FREE_KEYS) and not any(_covered(key, [name]) for key in {**saved, **current})
    ]
    if unknown:
        raise ResumeConfigError(f"checkpoint.resume_allow names unknown keys: {', '.join(unknown)}")
    changes = {
        k: [saved.get(k), current.get(k)] for k in sorted({**saved, **current}) if saved.get(k) != current.get(k)
    }
    refused = [k for k in changes if not _covered(k, allowed)]
    if refused:
        listing = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ResumeConfigError(
            f"the checkpoint was written by a run with a different configuration ({listing}); resume with the "
            f"original values, or name the changes as intended with --resume-allow {','.join(refused)}"
        )
    return changes


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _covered(key: str, names: list[str] | tuple[str, ...]) -> bool:
    """Whether dotted `key` is one of `names` or inside a section among them."""
    return any(key == name or key.startswith(name + ".") for name in names)


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a `RunConfig` from nested dicts; an unknown key raises a KeyError naming its dotted path."""
    return _build(RunConfig, d, "")


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {where or '<root>'!r} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = sorted(where + key for key in d if where + key in RENAMED_KEYS)
    if renamed:
        raise ConfigError(f"config key {renamed[0]!r} is now {RENAMED_KEYS[renamed[0]]!r}")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise KeyError(
            f"unknown config key {where + unknown[0]!r}; valid keys{' in ' + where[:-1] if where else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        sub = _section_type(cls, name)
        kwargs[name] = (
            _build(sub, value, f"{where}{name}.") if sub is not None else check_value(where + name, value, hints[name])
        )
    return cls(**kwargs)


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls` when it is a nested section, else None."""
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory
    if default is dataclasses.MISSING:
        return None
    value = default()
    return type(value) if dataclasses.is_dataclass(value) else None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--optim.lr=1e-3", "--model.moe.top_k", "1"]` -> {"optim.lr": 0.001, "model.moe.top_k": 1} (YAML values)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected a --dotted.key=value override, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} has no value")
            i += 1
            value = args[i]
        out[key] = yaml.safe_load(value) if value != "" else None
        i += 1
    return out


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested dict `d` with each dotted key set; sections are created as needed (validated later)."""
    d = json.loads(json.dumps(d))
    for key, value in overrides.items():
        parts = key.split(".")
        node = d
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise KeyError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return d


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when `path` is None) and apply dotted overrides."""
    d: dict[str, Any] = {"model": RunConfig.__dataclass_fields__["model"].default_factory()}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d, dict):
            raise TypeError(f"{path}: expected a mapping of config sections, got {type(d).__name__}")
    if overrides:
        d = apply_overrides(d, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(d)
