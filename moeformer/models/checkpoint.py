"""Load and save checkpoints: Hugging Face (config.json + safetensors) and native (config.yaml + safetensors).

Loading builds the model on the meta device, then reads one tensor at a time from disk straight into freshly
allocated memory in the target dtype, so peak memory stays near one copy of the weights. Tensors are read with
plain file reads rather than safetensors' memory map: pages touched through a map stay counted in the process
until the map closes, which would double the peak for a single-file checkpoint.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from moeformer.errors import CheckpointError, CheckpointNotFoundError, ConfigError, write_error
from moeformer.layers.quant import QuantizedWeight, check_format
from moeformer.models.config import ModelConfig
from moeformer.models.hf import Family, family_for_config, get_family
from moeformer.models.hf.common import TensorMap, copy, fill_from_hf, source_shapes, to_hf
from moeformer.models.quantize import build_quantized, quantized_weights
from moeformer.safe_files import confined

HF_CONFIG, NATIVE_CONFIG = "config.json", "config.yaml"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
FORMATS = ("hf", "native")
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}  # --dtype values of the command-line scripts

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---- reading -------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


class SafetensorsFile:
    """The header of one .safetensors file, validated as the format requires (every tensor's dtype, shape and byte
    range agree; the ranges tile the data exactly), and reads of single tensors from it. Any problem with the file
    is a CheckpointError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > MAX_HEADER_BYTES:
                    raise CheckpointError(
                        f"{path} is not a safetensors file: its header would be {header_len} "
                        f"bytes (the format allows {MAX_HEADER_BYTES})"
                    )
                if 8 + header_len > size:
                    raise CheckpointError(
                        f"{path} is truncated: its header needs {8 + header_len} bytes, file has {size}"
                    )
                text = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            header = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, not an object"
            )
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
        self.entries: dict[str, dict] = {name: self._entry(name, entry) for name, entry in header.items()}
        self.data_start = 8 + header_len
        end = 0
        for name, entry in sorted(self.entries.items(), key=lambda item: item[1]["data_offsets"]):
            begin = entry["data_offsets"][0]
            if begin != end:
                problem = "overlaps the tensor before it" if begin < end else f"leaves bytes {end}-{begin} unused"
                raise CheckpointError(f"{path}: tensor {name!r} (data_offsets {entry['data_offsets']}) {problem}")
            end = entry["data_offsets"][1]
        if self.data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: its tensors need {self.data_start + end} bytes, file has {size}"
            )
        if self.data_start + end < size:
            raise CheckpointError(f"{path} has {size - self.data_start - end} bytes after its last tensor")

    def _entry(self, name: str, entry: Any) -> dict:
        """One header entry, checked: a dtype string, a shape of non-negative ints, and data offsets [begin, end]
        spanning exactly the bytes of that shape and dtype (dtypes we cannot read are refused only if used)."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where} needs dtype, shape and data_offsets, got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where} has dtype {dtype!r:.50}, not a string")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r:.100}, not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where} has data_offsets {offsets!r:.100}, not [begin, end] with 0 <= begin <= end")
        if dtype in DTYPES and math.prod(shape) * DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{where} of shape {shape} and dtype {dtype} needs "
                f"{math.prod(shape) * DTYPES[dtype].itemsize} bytes, its data_offsets span "
                f"{offsets[1] - offsets[0]}"
            )
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unsupported dtype {code!r:.50}; supported: {', '.join(DTYPES)}"
            )
        return DTYPES[code]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` in its stored dtype, into `out` (contiguous CPU, same dtype and shape) when given."""
        entry = self.entries[name]
        if out is None:
            out = torch.empty(self.shape(name), dtype=self.dtype(name))
        begin, end = entry["data_offsets"]
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {end - begin} bytes, expected {buffer.nbytes}")
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(memoryview(buffer)) != buffer.nbytes:
                    raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}")
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from e
        return out


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 weight from FP8 `weight` (rows, cols) and one inverse scale per (block[0] x block[1]) tile (DeepSeek-V3)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class Checkpoint:
    """Every tensor of a checkpoint directory, from `model.safetensors` or the shards of its index.

    A tensor `W` stored with a companion `W_scale_inv` is block-quantized FP8 and is read dequantized (fp32);
    `block` is the tile shape (HF `quantization_config.weight_block_size`). Files are read only inside `directory`
    (or `roots`, see `hub_blobs`).
    """

    def __init__(self, directory: Path, block: tuple[int, int] | None = None, roots: tuple[Path, ...] = ()) -> None:
        self.block = block
        index_path, single = (confined(directory, name, roots) for name in (INDEX_FILE, SINGLE_FILE))
        if index_path.is_file():
            weight_map = _weight_map(index_path)
            files: dict[Path, SafetensorsFile] = {}
            self.where = {}
            for name, file in weight_map.items():
                path = confined(directory, file, roots)  # a name such as ../x or /x is refused, not followed
                if path not in files:
                    try:
                        found = path.is_file()  # a regular file: opening a FIFO or a device could block
                    except OSError as e:
                        raise CheckpointError(
                            f"cannot read shard {file!r:.100} listed in {index_path}: {e.strerror}"
                        ) from e
                    if not found:
                        raise CheckpointNotFoundError(f"shard {file} listed in {index_path} does not exist")
                    files[path] = SafetensorsFile(path)
                if name not in files[path].entries:
                    raise CheckpointError(f"{index_path} puts tensor {name!r} in {file}, which does not contain it")
                self.where[name] = files[path]
        elif single.is_file():
            file = SafetensorsFile(single)
            self.where = {name: file for name in file.entries}
        else:
            raise CheckpointNotFoundError(
                f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are supported)"
            )

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
            raise CheckpointError(
                f"tensor {name!r} has a block scale but config.json has no quantization_config.weight_block_size"
            )
        scale = f"{name}_scale_inv"
        (rows, cols), (b0, b1) = self.shape(name), self.block
        if self.shape(scale) != (-(-rows // b0), -(-cols // b1)):
            raise CheckpointError(
                f"{scale} has shape {self.shape(scale)}, but {name} {(rows, cols)} in tiles of "
                f"{self.block} needs {(-(-rows // b0), -(-cols // b1))}"
            )
        weight = dequantize_blocks(self.where[name].read(name), self.where[scale].read(scale), self.block)
        return weight if out is None else out.copy_(weight)

    def default_dtype(self) -> torch.dtype:
        """What `dtype=None` loads as: the dtype of the first 16/32/64-bit floating-point tensor (by name), or
        bfloat16 for an all-FP8 checkpoint."""
        for name in sorted(self.where):
            dtype = DTYPES.get(self.where[name].entries[name]["dtype"])
            if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
                return dtype
        return torch.bfloat16


def _weight_map(index_path: Path) -> dict[str, str]:
    """The tensor name -> shard file name map of a safetensors index."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index: {type(e).__name__}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {index_path}: {e.strerror or e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
    return weight_map


def hub_blobs(directory: Path) -> tuple[Path, ...]:
    """Where else the files of `directory` may live: a Hugging Face hub cache snapshot (<repo>/snapshots/<rev>)
    holds symlinks into <repo>/blobs, written by the hub client, not named by the checkpoint."""
    real = directory.resolve()
    return (real.parent.parent / "blobs",) if real.parent.name == "snapshots" else ()


def _native_maps(config: ModelConfig, keys: list[str]) -> list[TensorMap]:
    """Identity maps over our own state_dict `keys` (the tied LM head is stored once)."""
    return [copy(k, k) for k in keys if not (config.tie_embeddings and k == "lm_head.weight")]


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (Hugging Face config.json or native config.yaml), weights unread."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {directory} does not exist")
    return _config_and_family(directory, hub_blobs(directory))[0]


def _config_and_family(directory: Path, roots: tuple[Path, ...] = ()) -> tuple[ModelConfig, Family | None]:
    """The model config of a checkpoint directory and its Hugging Face family (None: a native checkpoint)."""
    hf_path, native_path = (confined(directory, name, roots) for name in (HF_CONFIG, NATIVE_CONFIG))
    if hf_path.is_file():
        try:
            hf = json.loads(hf_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{hf_path} is not valid JSON: {e}") from e
        family = get_family(hf.get("model_type"))
        return family.config_from_hf(hf), family
    if native_path.is_file():
        try:
            return ModelConfig.from_yaml(native_path), None
        except yaml.YAMLError as e:
            raise CheckpointError(f"{native_path} is not valid YAML: {e}") from e
        except ConfigError as e:  # its message names the file
            raise CheckpointError(str(e)) from e
    raise CheckpointNotFoundError(f"{directory} has neither {HF_CONFIG} (Hugging Face) nor {NATIVE_CONFIG} (moeformer)")


def _read_config(
    model_class: type[nn.Module], directory: Path, roots: tuple[Path, ...] = ()
) -> tuple[ModelConfig, list[TensorMap], Callable[[str], bool]]:
    """The model config, its tensor maps and the predicate of checkpoint tensors to skip."""
    config, family = _config_and_family(directory, roots)
    if family is not None:
        tied = config.tie_embeddings
        skip = lambda n: family.ignore(n, config) or (tied and n == "lm_head.weight")  # noqa: E731
        return config, family.tensor_maps(config), skip
    with torch.device("meta"):
        keys = list(model_class(config).state_dict())
    return config, _native_maps(config, keys), lambda n: False


def _kind(dtype: torch.dtype) -> str:
    return "floating-point" if dtype.is_floating_point else "boolean" if dtype == torch.bool else "integer"


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _plan(maps: list[TensorMap], ckpt: Checkpoint, ignore: Callable[[str], bool]):
    """Pick the stored layout of each of our tensors; a CheckpointError lists missing and unexpected names."""
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
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    return plan


def load_pretrained(
    model_class: type[nn.Module],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    group_size: int = 128,
):
    """Load a `model_class` (a `CausalLM`, built from the checkpoint's config) from a Hugging Face or native
    checkpoint directory; `CausalLM.from_pretrained` and `moeformer.from_pretrained` call it.

    dtype: parameter dtype (default: the checkpoint's; bfloat16 for FP8 block-quantized DeepSeek-V3 weights, which
    are dequantized), also of quantization scales; other buffers keep theirs. device: where the weights go (default
    CPU). quantize: "int8" or "int4" (groups of `group_size`) quantizes while loading, one tensor at a time on
    `device`, so peak memory stays near the quantized model plus one full-precision tensor (one layer's expert
    stack); a native checkpoint saved quantized loads as it was saved. Returns the model in eval mode.
    Safe on untrusted checkpoints: only data is read, only from files inside `path` (names and symlinks leading out
    are refused), and any problem with the checkpoint raises a CheckpointError naming it.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    if quantize is not None:
        check_format(quantize, group_size)
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {directory} does not exist")
    roots = hub_blobs(directory)
    config, maps, ignore = _read_config(model_class, directory, roots)
    block = ((config.extra.get("hf_config") or {}).get("quantization_config") or {}).get("weight_block_size")
    ckpt = Checkpoint(directory, tuple(block) if block else None, roots)
    plan = _plan(maps, ckpt, ignore)
    saved = config.quantization
    if quantize is not None and saved is not None and saved != {"mode": quantize, "group_size": group_size}:
        raise CheckpointError(
            f"{directory} holds a model quantized as {saved}; it cannot be re-quantized to "
            f"{quantize} (load it as saved, or quantize its full-precision checkpoint)"
        )
    with torch.device("meta"):
        model = model_class(config)
    if quantize is not None and saved is None:  # empty quantized layers, filled from full-precision tensors below
        build_quantized(model, quantize, group_size)
    quantized = quantized_weights(model) if saved is None else {}
    targets = {**model.state_dict(), **{key: torch.empty(q.shape, device="meta") for key, q in quantized.items()}}
    expected = {
        k
        for k in targets
        if not (config.tie_embeddings and k == "lm_head.weight") and not k.startswith(tuple(f"{q}." for q in quantized))
    }
    planned = {m.ours for m, _ in plan}
    if planned != expected:
        raise RuntimeError(
            f"key map and model disagree: model-only {sorted(expected - planned)}, "
            f"map-only {sorted(planned - expected)}"
        )
    # tensors loaded in `dtype`: parameters, quantization scales, and the full-precision weights quantized on load
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)} | set(quantized)
    params |= {
        name
        for name, buf in model.named_buffers()
        if name.endswith((".scale", ".offset"))
        and isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedWeight)
    }
    mismatches, kinds = [], []
    for m, layout in plan:
        want = source_shapes(layout, tuple(targets[m.ours].shape))
        kind = _kind(torch.float32 if m.ours in params else targets[m.ours].dtype)
        for name, shape in zip(layout.names, want):
            if ckpt.shape(name) != shape:
                mismatches.append(f"{name}: checkpoint {ckpt.shape(name)} vs model {shape} (for {m.ours})")
            if _kind(ckpt.dtype(name)) != kind:  # an integer tensor would be cast into a float parameter silently
                kinds.append(f"{name}: {_kind(ckpt.dtype(name))} {ckpt.dtype(name)} for {kind} {m.ours}")
    if mismatches:
        raise CheckpointError(f"{len(mismatches)} tensor shape mismatch(es): {_listing(mismatches)}")
    if kinds:
        raise CheckpointError(f"{len(kinds)} tensor(s) of the wrong kind: {_listing(kinds)}")

    dtype = dtype or ckpt.default_dtype()
    state = {}
    for m, layout in plan:
        target = targets[m.ours]
        out = torch.empty(target.shape, dtype=dtype if m.ours in params else target.dtype)
        if layout.kind == "copy" and ckpt.dtype(layout.names[0]) == out.dtype:
            ckpt.read(layout.names[0], out=out)  # straight into place, no temporary
        else:
            fill_from_hf(out, layout, lambda j, names=layout.names: ckpt.read(names[j]))
        out = out.to(device) if device is not None else out
        if m.ours in quantized:  # quantized on `device`, then the full-precision copy is dropped
            weight = quantized[m.ours].to(dtype).quantize_(out)
            state.update((f"{m.ours}.{name}", buf) for name, buf in weight.named_buffers())
        else:
            state[m.ours] = out
        del out
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

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


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


OUR_SHARD = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")


def _owned(directory: Path) -> set[str]:
    """Names in checkpoint `directory` that a save replaces: the configs, the index and the weight files (ours by
    name, or listed by the index). Everything else there (tokenizer, README, generation config...) is kept."""
    names = {HF_CONFIG, NATIVE_CONFIG, SINGLE_FILE, INDEX_FILE}
    if (directory / INDEX_FILE).is_file():
        try:
            names |= {f for f in _weight_map(directory / INDEX_FILE).values() if f.endswith(".safetensors")}
        except CheckpointError:
            pass  # an unreadable index lists nothing
    return names | {p.name for p in directory.iterdir() if OUR_SHARD.fullmatch(p.name)}


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into `new` every entry of checkpoint directory `old` that the save does not own."""
    owned = _owned(old)
    for entry in old.iterdir():
        if entry.name in owned:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap directories `a` and `b` in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`. An existing `target` is exchanged with `tmp` atomically, so the path
    always holds a complete checkpoint; the old one is deleted afterwards (anything that appeared in it meanwhile,
    and that the save does not own, is moved over first). Without an atomic exchange (not Linux), the old
    directory is renamed away just before the new one is renamed in."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if exchange_dirs(tmp, target):
        old = trash = tmp
    else:
        trash = _sibling_dir(target, "old")
        old = trash / target.name
        os.rename(target, old)
        os.rename(tmp, target)
    owned = _owned(old)
    for entry in old.iterdir():
        if entry.name not in owned and not os.path.lexists(target / entry.name):
            os.rename(entry, target / entry.name)
    shutil.rmtree(trash)


def _sibling_dir(target: Path, kind: str) -> Path:
    """A new empty directory beside `target` (same file system: renames between them are atomic), made with the
    default permissions (tempfile.mkdtemp's 0700 would be kept by the checkpoint)."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def save_pretrained(
    model,
    path: str | os.PathLike,
    format: str = "hf",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` to directory `path` atomically: everything goes to a temporary sibling directory that
    replaces `path` only once complete. format "hf": config.json + safetensors in the HF family's names;
    "native": config.yaml + safetensors of our state_dict. `dtype` casts floating-point parameters.

    Saving over a checkpoint replaces only its own files (configs, index, weights): other files there (tokenizer,
    README, generation config) are kept. A failed write raises an OSError naming the file and the cause."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    limit = parse_size(max_shard_size)
    target = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not any((target / f).exists() for f in (HF_CONFIG, NATIVE_CONFIG)):
        raise ValueError(f"{target} is a non-empty directory that is not a checkpoint; refusing to replace it")
    config: ModelConfig = model.config
    if format == "hf" and config.quantization:
        raise ValueError(
            f"a quantized model ({config.quantization}) has no Hugging Face format; save it with "
            "format='native', or export the full-precision model before quantizing"
        )
    if format == "hf":
        family = family_for_config(config)
        hf_config, maps = family.config_to_hf(config), family.tensor_maps(config)
    else:
        hf_config, maps = None, _native_maps(config, list(model.state_dict()))
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def stored_dtype(key: str) -> torch.dtype:  # floating-point parameters are cast to `dtype`
        cast = dtype is not None and key in params and state[key].is_floating_point()
        return dtype if cast else state[key].dtype

    sizes = {m.ours: state[m.ours].numel() * stored_dtype(m.ours).itemsize for m in maps}
    shards = _shards(maps, sizes, limit)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_dir(target, "tmp")
    try:
        if target.is_dir():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        file = tmp
        try:
            weight_map = {}
            for k, shard in enumerate(shards):
                name = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                file, tensors = tmp / name, {}
                for m in shard:
                    tensor = state[m.ours].detach().to(device="cpu", dtype=stored_dtype(m.ours))
                    tensors.update(zip(m.export.names, to_hf(tensor, m.export)))
                save_file(tensors, file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, name))
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                file = tmp / INDEX_FILE
                file.write_text(json.dumps(index, indent=2))
            if hf_config is not None:
                saved = stored_dtype(next(k for k in state if k in params))
                hf_config["dtype"] = hf_config["torch_dtype"] = str(saved).removeprefix("torch.")
                file = tmp / HF_CONFIG
                file.write_text(json.dumps(hf_config, indent=2))
            else:
                file = tmp / NATIVE_CONFIG
                config.save(file)
        except (OSError, SafetensorError) as e:  # a full disk, a quota, a vanished directory
            raise write_error(target / file.relative_to(tmp), e) from e
        if target.is_dir():
            _carry_over(target, tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
