"""Pipeline parallelism: a built `CausalLM` as a `deepspeed.pipe.PipelineModule` trained with
`engine.train_batch`. Layers: embedding -> one layer per block -> final norm (the embedding and the LM head share
one `TiedLayerSpec` when the embeddings are tied); the loss function calls the LM head with the targets, so the last
stage computes the chunked cross-entropy without full logits. Between stages the activations are `(hidden, aux,
load)`, then `position_ids, document_ids` for packed documents: `aux` (shape (1,)) accumulates the blocks' MoE aux
losses so they reach the loss on the last stage and receive their gradient through the pipeline; `load` (int64,
one row per MoE block: its slots per expert, then its dropped slots) carries the expert loads to the last stage,
whose loss function sums them over the step's micro-batches for the trainer's telemetry (no `load` in a dense model).

Tensor and expert parallelism compose (apply them to the model first; the grid's groups match). Limits: no padding
mask; DeepSpeed's pipeline engine allows ZeRO 0-1 only.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint
from torch import Tensor, nn
from torch._functorch import config as functorch_config

from moeformer.layers.attention import AttentionMask
from moeformer.models.model import CausalLM
from moeformer.parallel.reshard import full_state_dict

PARTITION_METHODS = ("parameters", "uniform", "blocks")
# the "pipeline" section of the DeepSpeed config: with tp > 1 DeepSpeed would split the first activation over the
# tensor ranks and then allows no other activation (here `aux`) to carry a gradient
PIPELINE_CONFIG = {"pipe_partitioned": False, "grad_partitioned": False}


# The layer wrappers name their children like `CausalLM` does, so their state dicts use the model's keys.


def load_shape(config) -> tuple[int, int] | None:
    """The shape of the `load` activation of a model of `config`: (MoE blocks, experts + 1); None without MoE."""
    blocks = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    return (blocks, config.moe.num_experts + 1) if blocks else None


class EmbeddingPipe(nn.Module):
    """First layer: input_ids, or (input_ids, position_ids, document_ids) for packed documents -> (hidden, aux = 0,
    load = 0, *the packing tensors). With tied embeddings it also holds the LM head (see `tied_head`)."""

    def __init__(self, tok_embeddings: nn.Module, load: tuple[int, int] | None, lm_head: nn.Module | None = None):
        super().__init__()
        self.tok_embeddings, self.lm_head, self.load = tok_embeddings, lm_head, load

    def forward(self, inputs: Tensor | tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        input_ids, *packing = (inputs,) if torch.is_tensor(inputs) else inputs
        x = self.tok_embeddings(input_ids)
        aux = x.new_zeros(1, dtype=torch.float32).requires_grad_()  # a float activation must get a gradient
        load = () if self.load is None else (torch.zeros(self.load, dtype=torch.long, device=x.device),)
        return x, aux, *load, *packing


def tied_head(embedding: EmbeddingPipe, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The last stage's copy of the tied embedding, which holds the LM head that `PipelineLoss` calls."""
    return inputs


class BlockPipe(nn.Module):
    """One transformer block on (hidden, aux, load): rotary tables for default positions, causal mask; a MoE block
    adds its aux loss to `aux` and its expert load to its row `load_row` of `load`."""

    def __init__(self, block: nn.Module, rope: nn.Module, index: int, load_row: int | None, carries_load: bool):
        super().__init__()
        self.layers, self.rope, self.index = nn.ModuleDict({str(index): block}), rope, str(index)
        self.load_row, self.carries_load = load_row, carries_load

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, aux, *rest = inputs
        load, packing = (rest[:1], rest[1:]) if self.carries_load else ((), rest)
        batch, seq, _ = x.shape
        positions, documents = packing if packing else (torch.arange(seq, device=x.device).expand(batch, seq), None)
        x, stats = self.layers[self.index](x, self.rope(positions), AttentionMask(document_ids=documents))
        if stats is not None:
            aux = aux + stats.aux_loss
            counts = torch.cat([stats.tokens_per_expert, stats.dropped_tokens.reshape(1)])
            load = (load[0].select_scatter(load[0][self.load_row] + counts, 0, self.load_row),)
        return x, aux, *load, *packing


class NormPipe(nn.Module):
    """Final norm. It also holds the untied LM head, which `PipelineLoss` calls on the normed hidden states."""

    def __init__(self, norm: nn.Module, carries_load: bool, lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.norm, self.lm_head, self.carries_load = norm, lm_head, carries_load

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, aux, *rest = inputs
        return self.norm(x), aux, *(rest[:1] if self.carries_load else ())


class PipelineLoss:
    """The last stage's loss: the LM head's cross-entropy of the final hidden states (the head's own call, chunked:
    no full logits), plus the MoE aux losses carried from every stage; it sums the carried expert loads of the
    training micro-batches until `take_load`. Set `with_aux = False` to get the cross-entropy alone (evaluation: no
    load counted). `head` is set on the last stage once its layers exist."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size, self.with_aux, self.head = chunk_size, True, None
        self.load: Tensor | None = None

    def __call__(self, outputs: tuple[Tensor, ...], targets: Tensor) -> Tensor:
        x, aux, *load = outputs
        ce = self.head(x, targets, self.chunk_size)
        if not self.with_aux:
            return ce
        if load:
            self.load = load[0].detach() if self.load is None else self.load + load[0].detach()
        return ce + aux.sum()

    def take_load(self) -> Tensor | None:
        """The expert loads summed since the last call (`load_shape`; None before any training micro-batch)."""
        load, self.load = self.load, None
        return load


def to_pipeline(
    model: CausalLM,
    num_stages: int,
    partition_method: str = "parameters",
    topology=None,
    activation_checkpoint_interval: int = 0,
):
    """A `PipelineModule` over `num_stages` stages built from `model`'s own modules (weights are kept). Batches for
    `engine.train_batch` are `(input_ids, targets)` or `((input_ids, position_ids, document_ids), targets)`, with
    targets already shifted (-100 ignored). Put `PIPELINE_CONFIG` in the DeepSpeed config's "pipeline" section.

    partition_method: "parameters" balances parameter counts, "uniform" the number of layers, "blocks" the number
    of transformer blocks. activation_checkpoint_interval: recompute every that many blocks in backward (0: off),
    DeepSpeed's pipeline checkpointing (blocks only: the embedding's outputs must keep their gradient)."""
    if partition_method not in PARTITION_METHODS:
        raise ValueError(f"unknown partition_method {partition_method!r}; expected one of {PARTITION_METHODS}")
    if num_stages > model.config.n_layers:
        raise ValueError(f"num_stages={num_stages} exceeds n_layers={model.config.n_layers}")
    load = load_shape(model.config)
    moe_blocks = [i for i, block in enumerate(model.layers) if block.is_moe]
    blocks = [
        BlockPipe(block, model.rope, i, moe_blocks.index(i) if i in moe_blocks else None, load is not None)
        for i, block in enumerate(model.layers)
    ]
    if model.config.tie_embeddings:
        tied = functools.partial(
            TiedLayerSpec,
            "embed",
            EmbeddingPipe,
            model.tok_embeddings,
            load,
            model.lm_head,
            tied_weight_attr="tok_embeddings.weight",
        )
        layers = [tied(), *blocks, NormPipe(model.norm, load is not None), tied(forward_fn=tied_head)]
    else:
        layers = [
            EmbeddingPipe(model.tok_embeddings, load),
            *blocks,
            NormPipe(model.norm, load is not None, model.lm_head),
        ]
    # the engine backpropagates each stage output with retain_graph=True, which a compiled graph (e.g. FlexAttention's
    # kernel) refuses when it donates saved buffers; the flag is read at compile and at backward time: process-wide
    functorch_config.donated_buffer = False
    method = "type:BlockPipe" if partition_method == "blocks" else partition_method
    kwargs = {"topology": topology} if topology is not None else {"num_stages": num_stages}
    pipe = PipelineModule(
        layers,
        loss_fn=PipelineLoss(model.config.loss_chunk_size),
        partition_method=method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        activation_checkpoint_func=non_reentrant_checkpoint,  # the engine backwards x and aux apart
        checkpointable_layers=[BlockPipe.__name__],
        **kwargs,
    )
    pipe.config = model.config
    if pipe.stage_id == pipe.num_stages - 1:
        pipe.loss_fn.head = _last_stage_head(pipe)
    return pipe


def _last_stage_head(pipe) -> nn.Module:
    """The LM head among the last stage's layers: the untied one in `NormPipe`, or the tied embedding's."""
    if "embed" in pipe.tied_modules:
        return pipe.tied_modules["embed"].lm_head
    return next(m.lm_head for m in pipe.children() if isinstance(m, NormPipe))


def pipeline_full_state_dict(pipe) -> dict[str, Tensor]:
    """The `CausalLM` state dict gathered from every stage, tensor shards joined (collective over the pipeline and
    tensor groups; all ranks get it)."""
    local: dict[str, Tensor] = {}
    for module in list(pipe.children()) + list(pipe.tied_modules.values()):
        if isinstance(module, (EmbeddingPipe, BlockPipe, NormPipe)):
            local.update({k: v.cpu() for k, v in full_state_dict(module).items()})
    parts: list = [None] * dist.get_world_size(pipe.mpu().get_pipe_parallel_group())
    dist.all_gather_object(parts, local, group=pipe.mpu().get_pipe_parallel_group())
    return {k: v for part in parts for k, v in part.items()}


def stage_group(pipe) -> dist.ProcessGroup:
    """The ranks that hold this rank's pipeline stage (its data- and tensor-parallel peers); collective: every rank
    creates every stage's group."""
    topology, mine = pipe.topology(), None
    for stage in range(topology.get_dim("pipe")):
        group = dist.new_group(topology.filter_match(pipe=stage))
        if stage == pipe.stage_id:
            mine = group
    return mine
