"""Process groups for a `ParallelConfig`, created through DeepSpeed.

Rank layout (innermost first): tensor, data, pipeline, i.e. DeepSpeed's `PipeModelDataParallelTopology`; its
`PipelineParallelGrid` creates the data / tensor / pipeline groups and doubles as the `mpu` that
`deepspeed.initialize` needs. Expert groups come from `deepspeed.utils.groups` under DeepSpeed's name
`ep_size_<ep>`: `ep` consecutive ranks of a pipeline stage form an expert-parallel group (with tp > 1 it spans
tensor ranks, which split the MoE tokens between them), and ranks at the same position of different expert groups
form the expert-data-parallel group over which expert gradients are reduced.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology
from deepspeed.utils import groups as ds_groups

from moeformer.parallel.config import ParallelConfig


@dataclass
class ParallelGroups:
    """This rank's groups; a group is None where its dimension has size 1."""

    config: ParallelConfig  # resolved (dp known)
    data: dist.ProcessGroup  # replicas of the non-expert parameters (gradient all-reduce)
    tensor: dist.ProcessGroup | None
    pipe: dist.ProcessGroup | None
    expert: dist.ProcessGroup | None  # all-to-all of tokens
    expert_data: dist.ProcessGroup | None  # replicas of one expert shard (expert gradient all-reduce)
    mpu: object | None  # DeepSpeed PipelineParallelGrid when tp or pp > 1, for deepspeed.initialize(mpu=...)

    @property
    def expert_group_name(self) -> str:
        """DeepSpeed's name for the expert groups, also the `group_name` tag of expert parameters."""
        return f"ep_size_{self.config.ep}"

    @property
    def initialize_kwargs(self) -> dict[str, object]:
        """The extra keyword arguments of `deepspeed.initialize`: the grid as `mpu` with tensor parallelism (a
        pipeline module carries its own grid instead)."""
        return {"mpu": self.mpu} if self.mpu is not None and self.config.pp == 1 else {}

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.expert) if self.expert is not None else 0

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tensor) if self.tensor is not None else 0


def init_distributed() -> None:
    """Join the default process group through DeepSpeed (gloo on CPU, NCCL on GPU) unless already joined;
    without torchrun, become rank 0 of a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def shutdown_distributed() -> None:
    """Leave the process group together: a barrier, then destroy it, so no rank's communication threads are torn
    down at interpreter exit while a peer still talks to them (gloo aborts the process then). torch.compile's CUDA
    graphs are released first: one that captured a collective (tensor / expert parallel blocks) holds its NCCL
    communicator, whose destruction would wait for it forever; a caller holding graphs of its own drops them before
    (`Engine.close`)."""
    if dist.is_initialized():
        if torch.cuda.is_available():
            torch.compiler.reset()
            gc.collect()  # graphs kept alive only by reference cycles
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel_groups(config: ParallelConfig) -> ParallelGroups:
    """Create (collectively, on every rank) the groups of `config`; ValueError when it does not fit the world."""
    init_distributed()
    cfg = config.resolve(dist.get_world_size())
    mpu = tensor = pipe = None
    if cfg.tp > 1 or cfg.pp > 1:
        mpu = PipelineParallelGrid(topology=PipeModelDataParallelTopology(num_pp=cfg.pp, num_mp=cfg.tp, num_dp=cfg.dp))
        data = mpu.get_data_parallel_group()
        tensor = mpu.get_slice_parallel_group() if cfg.tp > 1 else None
        pipe = mpu.get_pipe_parallel_group() if cfg.pp > 1 else None
    else:
        data = ds_groups._get_data_parallel_group()
    expert = expert_data = None
    if cfg.ep > 1:
        name = f"ep_size_{cfg.ep}"
        _forget_other_expert_layout(name, cfg)
        # DeepSpeed's consecutive layout (also with tp > 1: its checkpoint writers assume it)
        ds_groups._create_expert_and_data_parallel(cfg.ep, pp_size=cfg.pp)
        expert = ds_groups._get_expert_parallel_group(name)
        expert_data = ds_groups._get_expert_data_parallel_group(name)
    return ParallelGroups(cfg, data, tensor, pipe, expert, expert_data, mpu)


def _forget_other_expert_layout(name: str, cfg: ParallelConfig) -> None:
    """DeepSpeed caches expert groups by name (`ep_size_<ep>`) only; drop a cached pair made for another pipeline
    depth, so a process can build a second layout with the same ep (collective: every rank drops it)."""
    cached = ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS.get(name)
    stage = dist.get_world_size() // cfg.pp
    start = dist.get_rank() // stage * stage
    if cached is not None and list(cached) != list(
        range(start + (dist.get_rank() - start) % cfg.ep, start + stage, cfg.ep)
    ):
        for table in (
            ds_groups._EXPERT_PARALLEL_GROUP,
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
        ):
            table.pop(name, None)
