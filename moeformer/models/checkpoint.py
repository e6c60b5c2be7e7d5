"""Load and save checkpoints: Hugging Face (config.json + safetensors) and native (config.yaml + safetensors).

Loading builds the model on the meta device, then reads one tensor at a time from disk straight into freshly
allocated memory in the target dtype, so peak memory stays near one copy of the weights. Tensors are read with
plain file reads rather than safetensors' memory map: pages touched through a map stay counted in the process
until the map closes, which would double the peak for a single-file checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeformer.models.config import ModelConfig
from moeformer.models.hf import family_for_config, get_family
from moeformer.models.hf.common import TensorMap, copy, fill_from_hf, source_shapes, to_hf

HF_CONFIG, NATIVE_CONFIG = "config.json", "config.yaml"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
FORMATS = ("hf", "native")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# ---- reading -------------------------------------------------------------------------------


class SafetensorsFile:
    """The header of one .safetensors file, and reads of single tensors from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise ValueError(f"{path} is truncated: its header needs {8 + header_len} bytes, file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} has a corrupt safetensors header: {e}") from e
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + header_len
        needed = self.data_start + max((e["data_offsets"][1] for e in header.values()), default=0)
        if needed > size:
            raise ValueError(f"{path} is truncated: its tensors need {needed} bytes, file has {size}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` in its stored dtype, into `out` (contiguous CPU, same dtype and shape) when given."""
        entry = self.entries[name]
        if out is None:
            out = torch.empty(self.shape(name), dtype=self.dtype(name))
        begin, end = entry["data_offsets"]
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - begin:
            raise ValueError(f"{self.path}: tensor {name!r} holds {end - begin} bytes, expected {buffer.nbytes}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(buffer)) != buffer.nbytes:
                raise ValueError(f"{self.path} is truncated inside tensor {name!r}")
        return out


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 weight from FP8 `weight` (rows, cols) and one inverse scale per (block[0] x block[1]) tile (DeepSeek-V3)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class Checkpoint:
    """Every tensor of a checkpoint directory, from `model.safetensors` or the shards of its index.

    A tensor `W` stored with a companion `W_scale_inv` is block-quantized FP8 and is read dequantized (fp32);
    `block` is the tile shape (HF `quantization_config.weight_block_size`).
    """

    def __init__(self, directory: Path, block: tuple[int, int] | None = None) -> None:
        self.block = block
        index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path} is not a valid safetensors index: {e}") from e
            files = {}
            for file in sorted(set(weight_map.values())):
                if not (directory / file).is_file():
                    raise FileNotFoundError(f"shard {file} listed in {index_path} does not exist")
                files[file] = SafetensorsFile(directory / file)
            self.where = {}
            for name, file in weight_map.items():
                if name not in files[file].entries:
                    raise ValueError(f"{index_path} puts tensor {name!r} in {file}, which does not contain it")
                self.where[name] = files[file]
        elif single.is_file():
            file = SafetensorsFile(single)
            self.where = {name: file for name in file.entries}
        else:
            raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors "
                                    f"checkpoints are supported)")

    @property
    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `read` returns."""
        return torch.float32 if self.is_quantized(name) else self.where[name].dtype(name)

    def is_quantized(self, name: str) -> bool:
        return f"{name}_scale_inv" in self.where

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_quantized(name):
            return self.where[name].read(name, out)
        if self.block is None:
            raise ValueError(f"tensor {name!r} has a block scale but config.json has no "
                             "quantization_config.weight_block_size")
        scale = f"{name}_scale_inv"
        weight = dequantize_blocks(self.where[name].read(name), self.where[scale].read(scale), self.block)
        return weight if out is None else out.copy_(weight)

    def default_dtype(self) -> torch.dtype:
        """What `dtype=None` loads as: the dtype of the first 16/32/64-bit floating-point tensor (by name), or
        bfloat16 for an all-FP8 checkpoint."""
        for name in sorted(self.where):
            dtype = self.where[name].dtype(name)
            if dtype.is_floating_point and dtype.itemsize >= 2:
                return dtype
        return torch.bfloat16


def _native_maps(config: ModelConfig) -> list[TensorMap]:
    """Identity maps over our own state_dict keys (the tied LM head is stored once)."""
    from moeformer.models.model import CausalLM

    with torch.device("meta"):
        keys = list(CausalLM(config).state_dict())
    return [copy(k, k) for k in keys if not (config.tie_embeddings and k == "lm_head.weight")]


def _read_config(directory: Path) -> tuple[ModelConfig, list[TensorMap], Callable[[str], bool]]:
    """The model config, its tensor maps and the predicate of checkpoint tensors to skip."""
    hf_path, native_path = directory / HF_CONFIG, directory / NATIVE_CONFIG
    if hf_path.is_file():
        try:
            hf = json.loads(hf_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{hf_path} is not valid JSON: {e}") from e
        family = get_family(hf.get("model_type"))
        config = family.config_from_hf(hf)
        tied = config.tie_embeddings
        skip = lambda n: family.ignore(n, config) or (tied and n == "lm_head.weight")  # noqa: E731
        return config, family.tensor_maps(config), skip
    if native_path.is_file():
        config = ModelConfig.from_yaml(native_path)
        return config, _native_maps(config), lambda n: False
    raise FileNotFoundError(f"{directory} has neither {HF_CONFIG} (Hugging Face) nor {NATIVE_CONFIG} (moeformer)")


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _plan(maps: list[TensorMap], ckpt: Checkpoint, ignore: Callable[[str], bool]):
    """Pick the stored layout of each of our tensors; a ValueError lists missing and unexpected names."""
    available = ckpt.names
    plan, missing = [], []
    for m in maps:
        layout = next((lay for lay in m.layouts if all(n in available for n in lay.names)), None)
        if layout is None:
            closest = max(m.layouts, key=lambda lay: sum(n in available for n in lay.names) / len(lay.names))
            missing += [n for n in closest.names if n not in available]
        else:
            plan.append((m, layout))
    used = {n for _, layout in plan for n in layout.names}
    used |= {f"{n}_scale_inv" for n in used}  # FP8 block scales travel with their weights
    unexpected = sorted(n for n in available - used if not ignore(n))
    if missing or unexpected:
        parts = [f"{len(missing)} missing tensor(s): {_listing(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}"] if unexpected else []
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))
    return plan


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None):
    """Load a `CausalLM` from a Hugging Face or native checkpoint directory.

    dtype: parameter dtype (default: the checkpoint's; bfloat16 for FP8 block-quantized DeepSeek-V3 weights, which
    are dequantized); buffers keep theirs. device: where the weights go (default CPU). Returns the model in eval mode.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    from moeformer.models.model import CausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config, maps, ignore = _read_config(directory)
    block = ((config.extra.get("hf_config") or {}).get("quantization_config") or {}).get("weight_block_size")
    ckpt = Checkpoint(directory, tuple(block) if block else None)
    plan = _plan(maps, ckpt, ignore)
    with torch.device("meta"):
        model = CausalLM(config)
    targets = model.state_dict()
    expected = {k for k in targets if not (config.tie_embeddings and k == "lm_head.weight")}
    planned = {m.ours for m, _ in plan}
    if planned != expected:
        raise RuntimeError(f"key map and model disagree: model-only {sorted(expected - planned)}, "
                           f"map-only {sorted(planned - expected)}")
    mismatches = []
    for m, layout in plan:
        want = source_shapes(layout, tuple(targets[m.ours].shape))
        for name, shape in zip(layout.names, want):
            if ckpt.shape(name) != shape:
                mismatches.append(f"{name}: checkpoint {ckpt.shape(name)} vs model {shape} (for {m.ours})")
    if mismatches:
        raise ValueError(f"{len(mismatches)} tensor shape mismatch(es): {_listing(mismatches)}")

    dtype = dtype or ckpt.default_dtype()
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = {}
    for m, layout in plan:
        target = targets[m.ours]
        out = torch.empty(target.shape, dtype=dtype if m.ours in params else target.dtype)
        if layout.kind == "copy" and ckpt.dtype(layout.names[0]) == out.dtype:
            ckpt.read(layout.names[0], out=out)  # straight into place, no temporary
        else:
            fill_from_hf(out, layout, lambda j, names=layout.names: ckpt.read(names[j]))
        state[m.ours] = out.to(device) if device is not None else out
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    for module in model.modules():  # non-persistent buffers are still on meta: allocate, then recompute
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    model.reset_buffers()
    return model.eval()


# ---- saving --------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '500MB', '5GB', '2GiB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(maps: list[TensorMap], sizes: dict[str, int], limit: int) -> list[list[TensorMap]]:
    """Consecutive groups of maps of at most `limit` bytes (a single larger tensor gets a shard of its own)."""
    shards, current, used = [], [], 0
    for m in maps:
        if current and used + sizes[m.ours] > limit:
            shards.append(current)
            current, used = [], 0
        current.append(m)
        used += sizes[m.ours]
    return shards + [current] if current else shards


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` to `target`; an existing checkpoint there is removed only afterwards."""
    if not target.exists():
        os.rename(tmp, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, backup / target.name)
    os.rename(tmp, target)
    shutil.rmtree(backup)


def save_pretrained(model, path: str | os.PathLike, format: str = "hf", max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` to directory `path` atomically: everything goes to a temporary sibling directory that
    replaces `path` only once complete. format "hf": config.json + safetensors in the HF family's names;
    "native": config.yaml + safetensors of our state_dict. `dtype` casts floating-point parameters."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    limit = parse_size(max_shard_size)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not any((target / f).exists() for f in (HF_CONFIG, NATIVE_CONFIG)):
        raise ValueError(f"{target} is a non-empty directory that is not a checkpoint; refusing to replace it")
    config: ModelConfig = model.config
    if format == "hf":
        family = family_for_config(config)
        hf_config, maps = family.config_to_hf(config), family.tensor_maps(config)
    else:
        hf_config, maps = None, _native_maps(config)
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def stored_dtype(key: str) -> torch.dtype:  # floating-point parameters are cast to `dtype`
        cast = dtype is not None and key in params and state[key].is_floating_point()
        return dtype if cast else state[key].dtype

    sizes = {m.ours: state[m.ours].numel() * stored_dtype(m.ours).itemsize for m in maps}
    shards = _shards(maps, sizes, limit)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for m in shard:
                tensor = state[m.ours].detach().to(device="cpu", dtype=stored_dtype(m.ours))
                tensors.update(zip(m.export.names, to_hf(tensor, m.export)))
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if hf_config is not None:
            saved = stored_dtype(next(k for k in state if k in params))
            hf_config["dtype"] = hf_config["torch_dtype"] = str(saved).removeprefix("torch.")
            (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
        else:
            config.save(tmp / NATIVE_CONFIG)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
