"""Layout-independent weights: every parallel transform keeps state-dict keys unchanged and marks each sharded
parameter with a `Shard`, so a parallel model can be gathered to the full (single-process) state dict and a full
state dict can be sliced into any layout. Saved with ep=2 or tp=2, resumed with ep=1, tp=2 or consolidated to one
safetensors file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from safetensors.torch import save_file
from torch import Tensor, nn

from moeformer.errors import CheckpointError, CheckpointNotFoundError
from moeformer.safe_files import confined, load_pickle


@dataclass(frozen=True)
class Shard:
    """A parameter holding slice `index` of `num_shards` equal slices (rank r of `group` holds slice r) of the full
    tensor along `dim`. With `blocks` > 1 the full tensor is `blocks` concatenated blocks along `dim` (a SwiGLU
    expert's [gate | up]) and the parameter holds slice `index` of each block, concatenated."""

    dim: int
    num_shards: int
    index: int
    group: object
    blocks: int = 1


def shard_of(full: Tensor, dim: int, num_shards: int, index: int, blocks: int = 1) -> Tensor:
    """Slice `index` of `num_shards` equal slices of `full` along `dim` (of each of its `blocks`), as a copy;
    ValueError if the slices would be unequal."""
    if full.shape[dim] % (num_shards * blocks):
        raise ValueError(
            f"cannot split size {full.shape[dim]} of dim {dim} into {num_shards} equal shards"
            + (f" of each of {blocks} blocks" if blocks > 1 else "")
        )
    return torch.cat([block.chunk(num_shards, dim=dim)[index] for block in full.chunk(blocks, dim=dim)], dim=dim)


def sharded_parameter(full: Tensor, dim: int, group, blocks: int = 1) -> nn.Parameter:
    """This rank's slice of `full` as a new parameter marked with its `Shard`."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    param = nn.Parameter(shard_of(full.detach(), dim, size, rank, blocks), requires_grad=full.requires_grad)
    param.shard = Shard(dim, size, rank, group, blocks)
    return param


def gather_shard(local: Tensor, shard: Shard) -> Tensor:
    """The full tensor from every rank's slice (collective over `shard.group`)."""
    parts = [torch.empty_like(local) for _ in range(shard.num_shards)]
    dist.all_gather(parts, local.detach().contiguous(), group=shard.group)
    return join_shards(parts, shard.dim, shard.blocks)


def join_shards(parts: list[Tensor], dim: int, blocks: int = 1) -> Tensor:
    """Inverse of `shard_of` over all indices: the full tensor from its slices in order."""
    per_part = [part.chunk(blocks, dim=dim) for part in parts]
    return torch.cat([torch.cat([chunks[b] for chunks in per_part], dim=dim) for b in range(blocks)], dim=dim)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict the single-process model would have (collective: call on every rank; all get it)."""
    shards = {name: p.shard for name, p in model.named_parameters(remove_duplicate=False) if hasattr(p, "shard")}
    out = {}
    for name, value in model.state_dict().items():
        out[name] = gather_shard(value, shards[name]) if name in shards else value.detach().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy a full (single-process layout) state dict into a parallel model, each rank taking its slices."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, target in own.items():
        value = state_dict[name]
        shard = getattr(params.get(name), "shard", None)
        if shard is not None:
            value = shard_of(value, shard.dim, shard.num_shards, shard.index, shard.blocks)
        if value.shape != target.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit the parameter {tuple(target.shape)}")
        target.copy_(value)


def save_consolidated(model: nn.Module, path: str | Path) -> None:
    """Gather the full weights and write them as one safetensors file from global rank 0 (collective)."""
    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({name: value.contiguous().clone() for name, value in state.items()}, str(path))  # unshare tied


LAYOUT_FILE = "moeformer_layout.json"


def save_layout(model: nn.Module, directory: str | Path) -> None:
    """Write how `model`'s parameters are sharded (`LAYOUT_FILE`) next to a DeepSpeed checkpoint of it, from global
    rank 0, so `consolidate_checkpoint` can rebuild the full weights offline. Tensor shards live in the
    mp_rank_<tp rank> model files, expert shards (the parameters carrying DeepSpeed's expert tag) in the per-expert
    files."""
    layout = {
        name: {
            "dim": p.shard.dim,
            "num_shards": p.shard.num_shards,
            "blocks": p.shard.blocks,
            "kind": "expert" if is_moe_param(p) else "tensor",
        }
        for name, p in model.named_parameters(remove_duplicate=False)
        if hasattr(p, "shard")
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / LAYOUT_FILE).write_text(json.dumps(layout, indent=1, sort_keys=True))


def consolidate_checkpoint(directory: str | Path, tag: str) -> dict[str, Tensor]:
    """The full (single-process layout) weights of a DeepSpeed checkpoint `<directory>/<tag>` saved with any
    expert / tensor layout (ZeRO 0-2; `save_layout` and, for ep > 1, `save_expert_checkpoint` written beside it).
    Runs in one process; load the result with `load_state_dict` or `load_full_state_dict` into another layout.
    Reads only files inside `<directory>/<tag>`, unpickled with the allow-list of `moeformer.safe_files`."""
    directory = Path(directory)
    checkpoint = confined(directory, tag)
    layout_path = confined(directory, LAYOUT_FILE)
    if not layout_path.is_file():
        raise CheckpointNotFoundError(
            f"{layout_path} is missing: call moeformer.parallel.save_layout(model, {directory})"
        )
    try:
        layout = json.loads(layout_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{layout_path} is not valid JSON: {e}") from e
    files = sorted(confined(checkpoint, f.name) for f in checkpoint.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointNotFoundError(f"no mp_rank_*_model_states.pt in {checkpoint}")
    modules = [load_pickle(f, map_location="cpu")["module"] for f in files]
    experts: dict[str, Tensor] = {}
    for f in checkpoint.glob("layer_*_expert_*_model_states.pt"):  # tensor ranks hold copies: any will do
        experts.update(load_pickle(confined(checkpoint, f.name), map_location="cpu"))
    full = dict(modules[0])
    for name, spec in layout.items():
        if spec["kind"] == "expert":
            ids = sorted(int(k.rsplit(".", 1)[1]) for k in experts if k.rsplit(".", 1)[0] == name)
            if not ids:
                raise KeyError(f"no expert files hold {name}: was save_expert_checkpoint called after saving?")
            full[name] = torch.stack([experts[f"{name}.{g}"] for g in ids])
        else:
            if len(modules) != spec["num_shards"]:
                raise ValueError(f"{name} has {spec['num_shards']} tensor shards but {len(modules)} model files exist")
            full[name] = join_shards([m[name] for m in modules], spec["dim"], spec["blocks"])
    return full
