"""Parallelism applied to a built model from outside: process groups through DeepSpeed, expert parallelism
(all-to-all dispatch), tensor parallelism (column/row-parallel layers, vocab-parallel embedding, LM head and
cross-entropy, optional expert tensor parallelism), pipeline parallelism (DeepSpeed PipelineModule) and resharding
between layouts.

    model, groups = parallelize(model, ParallelConfig(ep=2))   # deepspeed.initialize(..., **groups.initialize_kwargs)
    full = full_state_dict(model)                              # single-process layout, any source layout
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from moeformer.parallel.config import ParallelConfig
from moeformer.parallel.expert import ExpertParallelExperts, apply_expert_parallel, save_expert_checkpoint
from moeformer.parallel.groups import ParallelGroups, init_distributed, init_parallel_groups, shutdown_distributed
from moeformer.parallel.pipeline import pipeline_full_state_dict, to_pipeline
from moeformer.parallel.reshard import (
    Shard,
    consolidate_checkpoint,
    full_state_dict,
    load_full_state_dict,
    save_consolidated,
    save_layout,
)
from moeformer.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelExperts,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    apply_tensor_parallel,
)


def parallelize(model: nn.Module, config: ParallelConfig) -> tuple[nn.Module, ParallelGroups]:
    """Create the groups of `config` and transform `model` in place. Returns the model and its groups; pass
    `groups.initialize_kwargs` (the grid as `mpu` when tp > 1) to `deepspeed.initialize`. With pp > 1 the returned
    model is a `PipelineModule` (train it with `engine.train_batch`; it carries its own grid)."""
    if config.pp > 1:
        return _pipeline(model, config)
    groups = init_parallel_groups(config)
    groups.config.validate_model(model.config)
    apply_expert_parallel(model, groups)
    apply_tensor_parallel(model, groups)
    return model, groups


def _pipeline(model: nn.Module, config: ParallelConfig) -> tuple[nn.Module, ParallelGroups]:
    """The PipelineModule of `model` (tensor-parallel first when tp > 1) over pp stages x tp x dp; its grid is the
    engine's mpu."""
    init_distributed()
    config.resolve(dist.get_world_size()).validate_model(model.config)
    groups = init_parallel_groups(config)
    apply_expert_parallel(model, groups)
    apply_tensor_parallel(model, groups)
    cfg = groups.config
    topology = PipeModelDataParallelTopology(num_pp=cfg.pp, num_mp=cfg.tp, num_dp=cfg.dp)
    pipe = to_pipeline(model, cfg.pp, topology=topology)
    return pipe, groups


__all__ = [
    "ColumnParallelLinear",
    "ExpertParallelExperts",
    "ParallelConfig",
    "ParallelGroups",
    "RowParallelLinear",
    "Shard",
    "TensorParallelExperts",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "apply_expert_parallel",
    "apply_tensor_parallel",
    "consolidate_checkpoint",
    "full_state_dict",
    "init_distributed",
    "init_parallel_groups",
    "load_full_state_dict",
    "parallelize",
    "pipeline_full_state_dict",
    "save_consolidated",
    "save_expert_checkpoint",
    "save_layout",
    "shutdown_distributed",
    "to_pipeline",
]
