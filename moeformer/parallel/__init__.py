"""Parallelism applied to a built model from outside: process groups through DeepSpeed, expert parallelism
(all-to-all dispatch), tensor parallelism (column/row-parallel layers, vocab-parallel embedding, LM head and
cross-entropy, optional expert tensor parallelism), pipeline parallelism (DeepSpeed PipelineModule) and resharding
between layouts.

    model, initialize_kwargs = parallelize(model, ParallelConfig(ep=2))   # then deepspeed.initialize(..., **kwargs)
    full = full_state_dict(model)                                          # single-process layout, any source layout
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
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


def parallelize(model: nn.Module, config: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Create the groups of `config` (a `ParallelConfig`, or any object with ep/tp/pp attributes such as the
    training config's section) and transform `model` in place. Returns the model and the extra keyword arguments
    for `deepspeed.initialize` (`mpu` when tp > 1). With pp > 1 the returned model is a `PipelineModule` (train it
    with `engine.train_batch`; it carries its own grid)."""
    pc = ParallelConfig(dp=getattr(config, "dp", None), ep=config.ep, tp=config.tp, pp=config.pp,
                        expert_tp=getattr(config, "expert_tp", False))
    if pc.pp > 1:
        return _pipeline(model, pc), {}
    groups = init_parallel_groups(pc)
    groups.config.validate_model(model.config)
    apply_expert_parallel(model, groups)
    apply_tensor_parallel(model, groups)
    model.parallel_groups = groups
    return model, ({"mpu": groups.mpu} if groups.mpu is not None else {})


def _pipeline(model: nn.Module, pc: ParallelConfig) -> nn.Module:
    """The PipelineModule of `model` (tensor-parallel first when tp > 1) over pp stages x tp x dp; its grid is the
    engine's mpu."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    init_distributed()
    pc.resolve(dist.get_world_size()).validate_model(model.config)
    groups = init_parallel_groups(pc)
    apply_expert_parallel(model, groups)
    apply_tensor_parallel(model, groups)
    cfg = groups.config
    pipe = to_pipeline(model, cfg.pp, topology=PipeModelDataParallelTopology(num_pp=cfg.pp, num_mp=cfg.tp, num_dp=cfg.dp))
    pipe.parallel_groups = groups
    return pipe


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
