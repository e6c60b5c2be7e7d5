"""The training loop: a zoo model on the DeepSpeed engine, fed by rank-sharded packed batches of the corpus.

    trainer = Trainer(load_config("configs/train/tiny-moe-cpu.yaml"))
    summary = trainer.train()

Order of construction: distributed init -> model (same seed on every rank) -> parallelism
(`moeformer.parallel.parallelize`, when any of ep/tp/pp > 1) -> FP8 (train.fp8: `moeformer.layers.fp8.enable_fp8`)
-> activation checkpointing (wraps the final modules)
-> optimizer groups -> `deepspeed.initialize` -> `torch.compile` of each block and the LM head (train.compile) ->
data (sharded over the data-parallel group) -> resume.

A `Stepper` runs the steps and evaluation batches on the engine: `MicroBatchStepper` on DeepSpeed's engine, or with
parallel.pp > 1 `PipelineStepper` on its `PipelineEngine`, where a step is one `train_batch` over the grad_accum
micro-batches. Its logged loss is cross-entropy + aux losses (the expert loads reach the last stage with the
activations; the unweighted aux losses do not leave the stages), and a non-finite loss stops the run at once: the
engine applies the step inside `train_batch`, before the trainer sees the loss, so it cannot be skipped (a
non-finite gradient norm still is, as without pipelining). `export_model` writes the final weights.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from moeformer.errors import ConfigError
from moeformer.layers.fp8 import enable_fp8, fp8_unsupported
from moeformer.layers.moe import update_router_biases
from moeformer.models.config import ModelConfig
from moeformer.models.model import CausalLM, CausalLMOutput, build_model, compile_blocks
from moeformer.parallel import ParallelConfig, ParallelGroups, full_state_dict, init_distributed, parallelize
from moeformer.parallel.pipeline import PIPELINE_CONFIG, load_shape, pipeline_full_state_dict, stage_group
from moeformer.training.activation_checkpointing import apply_activation_checkpointing
from moeformer.training.config import CUDA_GRAPH_MODES, RunConfig, resume_changes, run_identity
from moeformer.training.data import ShardedBatches, TokenDataset, check_same_tokenizer, dataset_facts, load_meta
from moeformer.training.distill import DistillConfig, Distiller
from moeformer.training.init_from import load_weights
from moeformer.training.metrics import (
    MetricsLogger,
    expert_load,
    expert_load_summary,
    flops_per_token,
    peak_flops,
    peak_memory_gib,
)
from moeformer.training.optim import build_optimizer
from moeformer.training.run_checkpoints import CheckpointManager
from moeformer.training.schedule import build_scheduler
from moeformer.training.tokenizer import copy_tokenizer_files

CONFIG_HISTORY_FILE = "config_history.jsonl"  # one line per start of a run: its config and what a resume changed
OPTIM_HPARAMS = ("initial_lr", "betas", "eps", "weight_decay")  # what a checkpoint restores of each AdamW group


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or the gradient norm was NaN or infinite too many steps in a row."""


class NonFiniteGuard:
    """Counts skipped steps (a non-finite loss or gradient norm); raises once `max_in_row` come back to back."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def update(self, finite: bool, step: int) -> None:
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"stopping at step {step}: the loss or the gradient norm was NaN/inf in {self.in_row} steps in a row "
                f"(train.max_nonfinite={self.max_in_row}); lower optim.lr, raise optim.warmup_steps or check the data"
            )


# ---------------------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Same seed on every rank, so every replica builds identical initial weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_config(config: RunConfig, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `config`; keys of `deepspeed.config` (a file) win, except that its batch sizes must
    agree with the training config's."""
    t = config.train
    built: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.data.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": config.data.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": config.optim.grad_clip,
        "bf16": {"enabled": t.dtype == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer under ZeRO
        "steps_per_print": 2**31 - 1,  # the trainer logs
    }
    if t.zero_stage >= 2:
        built["zero_optimization"].update(
            contiguous_gradients=True, reduce_scatter=True, overlap_comm=torch.cuda.is_available()
        )
    if t.zero_stage == 3:
        built["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if config.parallel.pp > 1:
        built["pipeline"] = dict(PIPELINE_CONFIG)
    if config.deepspeed.config is None:
        return built
    path = Path(config.deepspeed.config)
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed.config {path} does not exist")
    merged = _merge(built, json.loads(path.read_text()))
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if merged[key] != built[key]:
            raise ValueError(
                f"{path} sets {key}={merged[key]} but the training config implies {built[key]} "
                "(data.micro_batch_size, train.grad_accum, data-parallel size); remove it from the JSON"
            )
    return merged


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_parallelism(model: CausalLM, config: RunConfig) -> tuple[nn.Module, ParallelGroups | None]:
    """Hand the built model to `moeformer.parallel.parallelize` when any of ep/tp/pp > 1: the model to train and
    its groups (None otherwise). The groups' `mpu` (get_data_parallel_rank/world_size, get_model_parallel_*) also
    decides how the data is sharded."""
    if config.parallel == ParallelConfig():
        return model, None
    return parallelize(model, config.parallel)


def compile_engine(engine: Any, checkpointed: list[nn.Module], backend: str, mode: str = "default") -> None:
    """torch.compile the engine's model block by block (`compile_blocks`; the exported state dict keeps its names),
    in inductor's `mode` (reduce-overhead: each block's forward and backward replayed as CUDA graphs, for steps
    whose host cannot launch kernels as fast as the GPU runs them). The activation-checkpointed modules stay eager:
    DeepSpeed's checkpoint replays the tensors an eager forward saved, in order, and a compiled forward saves
    others (backward fails)."""
    for module in checkpointed:
        module.forward = torch.compiler.disable(module.forward)
    compile_blocks(engine.module, skip=checkpointed, backend=backend, mode=mode)
    if mode in CUDA_GRAPH_MODES:  # autograd would keep a backward graph's output as .grad, and the next replay
        for param in engine.module.parameters():  # (the next micro-batch's) overwrite it: accumulate a copy
            if param.requires_grad:
                param.register_hook(torch.clone)


def data_parallel_rank_and_size(mpu=None) -> tuple[int, int]:
    """This rank's place in the data-parallel group: from the parallel layout's `mpu` when there is one."""
    if mpu is not None:
        return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------------------------------------------- steppers


class Stepper(Protocol):
    """How one optimizer step and one evaluation batch run on the engine; `router_group`: the ranks whose expert
    loads are summed for router bias updates (None: all)."""

    router_group: dist.ProcessGroup | None

    def step(
        self, batches: Iterator[dict[str, torch.Tensor]], sums: dict[str, torch.Tensor], step: int
    ) -> tuple[int, float | None]:
        """Forward, backward and optimizer step over grad_accum micro-batches of `batches`, adding the metrics of
        the finite micro-batches to `sums`; returns their count and the gradient norm where DeepSpeed keeps none."""

    def cross_entropy(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean next-token cross-entropy of one batch (no gradients)."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The single-process state dict of the trained model on rank 0 (None elsewhere when not collective)."""


class MicroBatchStepper:
    """DeepSpeed's engine, one forward / backward / engine step per micro-batch. A non-finite loss on any rank in
    any micro-batch skips the whole step: its loss is masked out of the backward, and the optimizer update at the
    accumulation boundary is suppressed."""

    router_group = None

    def __init__(self, engine, optimizer, forward: Callable, config: RunConfig, device: torch.device) -> None:
        self.engine, self.optimizer, self.forward, self.device = engine, optimizer, forward, device
        self.grad_accum, self.sharded = config.train.grad_accum, config.parallel != ParallelConfig()
        self.cuda_graphs = config.train.cuda_graphs

    def _forward(self, batch):
        if self.cuda_graphs:  # a new iteration of the graphs: the previous micro-batch's outputs are spent
            torch.compiler.cudagraph_mark_step_begin()
        return self.forward(batch)

    def step(self, batches, sums, step):
        finite_micro_batches, grad_norm = 0, None
        for micro in range(self.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            out, ce, loss = self._forward(batch)
            finite = _all_finite(loss)  # the same answer on every rank
            self.optimizer.skip |= not finite
            self.engine.backward(loss if finite else torch.where(torch.isfinite(loss), loss, 0.0) * 0.0)
            last = micro == self.grad_accum - 1
            if last and self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled():
                grad_norm = _grad_norm(self.engine.module)  # DeepSpeed keeps no norm for plain fp32 without ZeRO
            self.engine.step()
            if finite:
                finite_micro_batches += 1
                _accumulate(sums, out, ce, loss)
        self.optimizer.skip = False
        return finite_micro_batches, grad_norm

    def cross_entropy(self, batch):
        return self._forward({k: v.to(self.device) for k, v in batch.items()})[1]

    def full_state_dict(self):
        if self.engine.zero_optimization_partition_weights():
            return self.engine._zero3_consolidated_16bit_state_dict()
        if self.sharded:  # expert / tensor shards: gather the single-process layout (collective)
            return full_state_dict(self.engine.module)
        return self.engine.module.state_dict() if dist.get_rank() == 0 else None


class PipelineStepper:
    """DeepSpeed's `PipelineEngine`: a step is one `train_batch` over the grad_accum micro-batches. Its loss is
    cross-entropy + aux losses (the unweighted aux losses do not leave the stages; the expert loads do, with the
    activations), and a non-finite loss stops the run: the engine applies the step inside `train_batch`, before the
    trainer sees the loss."""

    def __init__(self, engine, config: RunConfig, device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.grad_accum, self.pp = config.train.grad_accum, config.parallel.pp
        self.packed = config.data.packed_documents
        self.router_group = stage_group(engine.module)
        self.load_shape = load_shape(engine.module.config)

    def step(self, batches, sums, step):
        micro_batches = [self._batch(next(batches)) for _ in range(self.grad_accum)]
        loss = self.engine.train_batch(data_iter=iter(micro_batches)).detach().double()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"step {step}: the loss is NaN/inf; with pipeline parallelism (parallel.pp={self.pp}) DeepSpeed "
                "applies the step inside train_batch, so it cannot be skipped: resume from the last checkpoint with "
                "a lower optim.lr or more optim.warmup_steps"
            )
        sums["loss"] = loss * self.grad_accum  # the same mean loss on every rank
        if self.load_shape is not None:  # the last stage's counts; the other stages add zeros in the step's sum
            load = self.engine.module.loss_fn.take_load()
            load = (
                torch.zeros(self.load_shape, dtype=torch.float64, device=self.device) if load is None else load.double()
            )
            sums["tokens_per_expert"], sums["dropped_tokens"] = load[:, :-1], load[:, -1]
        return self.grad_accum, None

    def cross_entropy(self, batch):
        """The last stage's cross-entropy, broadcast to the other stages."""
        loss_fn = self.engine.module.loss_fn
        loss_fn.with_aux = False
        try:
            return self.engine.eval_batch(data_iter=iter([self._batch(batch)]), num_micro_batches=1)
        finally:
            loss_fn.with_aux = True

    def full_state_dict(self):
        return pipeline_full_state_dict(self.engine.module)

    def _batch(self, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """A batch in the pipeline's format: (input_ids or (input_ids, position_ids, document_ids), targets)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        inputs = batch["input_ids"]
        if self.packed:
            inputs = (inputs, batch["position_ids"], batch["document_ids"])
        return inputs, batch["targets"]


def export_model(engine, stepper: Stepper, config: RunConfig, model_config: ModelConfig) -> Path | None:
    """Write the final weights (ZeRO-3 partitions, pipeline stages or expert/tensor shards gathered) with the
    tokenizer files to `<out_dir>/model` in `checkpoint.export`'s format (collective)."""
    fmt = config.checkpoint.export
    if fmt == "none":
        return None
    state = stepper.full_state_dict()
    path = Path(config.out_dir) / "model"
    if dist.get_rank() == 0:
        model = build_model(model_config, device="cpu")
        model.load_state_dict({k: v.float().cpu() for k, v in state.items()})
        model.save_pretrained(path, format=fmt, dtype=next(iter(state.values())).dtype)
        copy_tokenizer_files(config.data.dir, path)
    dist.barrier()
    return path


# ---------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds everything from a `RunConfig` and runs `train()`; every rank constructs one."""

    def __init__(self, config: RunConfig) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_distributed()
        self.config = config
        self.rank = dist.get_rank()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if config.train.fp8 and (problem := fp8_unsupported(self.device)):
            raise ConfigError(f"train.fp8=true: {problem}; set train.fp8=false")
        if config.train.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(
                f"train.compile_mode={config.train.compile_mode} replays CUDA graphs, which need a GPU (this run is "
                f"on {self.device.type}); use train.compile_mode=default or max-autotune-no-cudagraphs"
            )
        self.out_dir = Path(config.out_dir)
        self.model_config = config.model_config()
        meta = load_meta(config.data.dir)
        if meta["vocab_size"] > self.model_config.vocab_size:
            raise ValueError(
                f"the data's tokenizer has {meta['vocab_size']} ids but model.vocab_size is "
                f"{self.model_config.vocab_size}; set --model.vocab_size={meta['vocab_size']} or more"
            )
        if config.init_from is not None:
            check_same_tokenizer(config.init_from, config.data.dir, "model.init_from checkpoint")
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", config.checkpoint.keep_last)
        resume_from = self.checkpoints.resolve(config.checkpoint.resume)  # before the slow set-up: fail early
        if resume_from is None and self.checkpoints.complete_checkpoints():
            raise FileExistsError(
                f"{self.out_dir} already holds checkpoints; pass --resume auto to continue that "
                "run or choose another out_dir"
            )
        self.identity = run_identity(config, dataset_facts(config.data.dir), dist.get_world_size())
        self.config_changes: dict[str, list] = {}
        if resume_from is not None:
            saved = self.checkpoints.run_info(resume_from)
            if saved is None:
                self._print(f"warning: {resume_from} records no run configuration; changes cannot be checked")
            else:
                self.config_changes = resume_changes(saved["identity"], self.identity, config.checkpoint.resume_allow)

        seed_everything(config.train.seed)
        model = build_model(self.model_config, device=self.device)
        if config.init_from is not None and resume_from is None:
            load_weights(model, config.init_from)
        model, self.parallel_groups = apply_parallelism(model, config)
        if config.train.fp8:
            self._print(enable_fp8(model, fp8_wgrad=config.train.fp8_wgrad).summary())
        checkpointed = apply_activation_checkpointing(
            model, config.train.activation_checkpointing, config.train.activation_checkpointing_every
        )
        mpu = self.parallel_groups.mpu if self.parallel_groups is not None else None
        self.dp_rank, self.dp_size = data_parallel_rank_and_size(mpu)
        ds_config = deepspeed_config(config, self.dp_size)
        self.optimizer = build_optimizer(model, config.optim)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            lr_scheduler=partial(build_scheduler, total_steps=config.train.steps, config=config.optim),
            config=ds_config,
            **(self.parallel_groups.initialize_kwargs if self.parallel_groups is not None else {}),
        )
        # no DeepSpeed wrapper (ZeRO-0 without bf16) checks the gradient norm before stepping: the optimizer does
        self.optimizer.check_gradients = self.engine.optimizer is self.optimizer
        if config.train.compile:
            compile_engine(self.engine, checkpointed, config.train.compile_backend, config.train.compile_mode)
        if config.parallel.pp > 1:
            self.stepper: Stepper = PipelineStepper(self.engine, config, self.device)
        else:
            self.stepper = MicroBatchStepper(
                self.engine, self.optimizer, lambda batch: self.forward(batch), config, self.device
            )

        d = config.data
        self.train_batches = ShardedBatches(
            TokenDataset.from_dir(d.dir, "train", d.seq_len),
            d.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            seed=config.train.seed,
            shuffle=d.shuffle,
        )
        self.train_batches.seek(d.start_batch)  # a resume replaces the position with its checkpoint's
        self.val_set = TokenDataset.from_dir(d.dir, "val", d.seq_len)
        self.tokens_per_step = d.micro_batch_size * d.seq_len * config.train.grad_accum * self.dp_size
        self.distiller = None
        if config.train.distill is not None:
            self.distiller = Distiller(
                DistillConfig.from_dict(config.train.distill),
                self.model_config,
                d.dir,
                self.device,
                self.model_config.loss_chunk_size,
            )
        self.flops_per_token = flops_per_token(self.model_config, d.seq_len)
        self.peak_flops = peak_flops(config.train.peak_tflops)

        self.step = 0
        self.tokens_seen = 0
        self.guard = NonFiniteGuard(config.train.max_nonfinite)
        if resume_from is None and config.checkpoint.resume == "auto":
            self._print(f"no complete checkpoint in {self.checkpoints.root}: starting from step 0")
        if resume_from is not None:
            self._print(
                f"resuming from {resume_from}"
                + "".join(f"\n  {key}: {old!r} -> {new!r}" for key, (old, new) in self.config_changes.items())
            )
            hparams = [{k: g[k] for k in OPTIM_HPARAMS} for g in self.optimizer.param_groups]
            state = self.checkpoints.load(self.engine, resume_from)
            self._restore_optim_hparams(hparams)
            self.step, self.tokens_seen = state["step"], state["tokens"]
            self.train_batches.load_state_dict(state["data"])
            self.guard.in_row, self.guard.total = state["nonfinite_in_row"], state["nonfinite_total"]
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.out_dir / "config.yaml")
            if resume_from is None:
                for name in ("metrics.jsonl", CONFIG_HISTORY_FILE):
                    (self.out_dir / name).unlink(missing_ok=True)
            with open(self.out_dir / CONFIG_HISTORY_FILE, "a") as f:  # every start of the run, and what it changed
                f.write(
                    json.dumps(
                        {
                            "step": self.step,
                            "resumed_from": str(resume_from) if resume_from else None,
                            "changes": self.config_changes,
                            "config": config.to_dict(),
                        }
                    )
                    + "\n"
                )
        self.logger = MetricsLogger(self.out_dir, enabled=self.rank == 0)
        if resume_from is not None:
            self.logger.log(
                {"step": self.step, "split": "resume", "checkpoint": str(resume_from), "changes": self.config_changes}
            )
        self.resumed_from = resume_from

    def _restore_optim_hparams(self, hparams: list[dict[str, Any]]) -> None:
        """Give the optimizer groups this run's `hparams` again after a checkpoint restored those it was saved with,
        and set the current lr from them: an allowed change of optim.lr, betas, eps or weight decay takes effect."""
        groups = self.optimizer.param_groups
        for group, fresh in zip(groups, hparams, strict=True):
            group.update(fresh)
        self.scheduler.base_lrs = [group["initial_lr"] for group in groups]
        with warnings.catch_warnings():  # torch warns about a schedule step before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.last_epoch -= 1
            self.scheduler.step()  # the current step's lr from the new base lrs

    def _print(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    # ---- one step ----------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[CausalLMOutput, torch.Tensor, torch.Tensor]:
        """Model output, next-token cross-entropy against the batch's (already shifted) targets, and the loss to
        minimise (cross-entropy + weighted MoE aux losses; with train.distill, its mix of cross-entropy and KL to the
        teacher instead of the cross-entropy alone)."""
        packed = self.config.data.packed_documents
        if self.distiller is not None:  # cross-entropy and KL to the teacher, mixed (moeformer.training.distill)
            out = self.distiller.forward(self.engine, self.engine.module, batch, packed)
            return out, out.ce_loss, out.loss
        out = self.engine(
            batch["input_ids"],
            targets=batch["targets"],
            position_ids=batch["position_ids"] if packed else None,
            document_ids=batch["document_ids"] if packed else None,
            return_logits=False,
        )
        return out, out.ce_loss, out.loss

    def train_step(self, batches) -> dict[str, Any]:
        """Forward/backward over `grad_accum` micro-batches and one optimizer step; returns the step's metrics.

        A non-finite loss on any rank in any micro-batch skips the whole step: its loss is masked out of the
        backward, and the optimizer update at the accumulation boundary is suppressed (weights and AdamW moments are
        untouched; DeepSpeed discards the step's gradients). So does a non-finite gradient norm with a finite loss
        (an overflow in backward), under every ZeRO stage and dtype. Skipped steps are logged as such (`skipped`,
        `nonfinite`: "loss" or "gradients") and counted. The lr schedule advances once per step, skipped or not."""
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        gas = self.config.train.grad_accum
        sums: dict[str, torch.Tensor] = {}
        schedule_step, skipped_before = self.scheduler.last_epoch, self.engine.skipped_steps
        finite_micro_batches, grad_norm = self.stepper.step(batches, sums, self.step + 1)
        if self.scheduler.last_epoch == schedule_step:  # DeepSpeed holds the schedule when its optimizer saw NaN/inf
            self.scheduler.step()
        # a non-finite gradient norm: DeepSpeed's wrappers (ZeRO, bf16) or SkippableAdamW skipped the update
        gradients_skipped = self.engine.skipped_steps != skipped_before
        finite_step = finite_micro_batches == gas and not gradients_skipped
        if not finite_step:
            sums.clear()  # a skipped step reports no loss (its finite micro-batches taught the model nothing)
        self.guard.update(finite_step, self.step + 1)
        if finite_step:
            update_router_biases(self.engine.module, self.stepper.router_group)
        self.tokens_seen += self.tokens_per_step
        record = self._step_record(sums, finite_micro_batches, time.perf_counter() - start)
        record.update(lr=lr, skipped=not finite_step, nonfinite_total=self.guard.total)
        if not finite_step:
            record["nonfinite"] = "loss" if finite_micro_batches < gas else "gradients"
        norm = grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()
        if norm is not None and finite_step:
            record["grad_norm"] = float(norm)
        return record

    def _step_record(self, sums: dict[str, torch.Tensor], micro_batches: int, seconds: float) -> dict[str, Any]:
        """Averages of the step's sums over its finite micro-batches and all ranks, throughput and memory."""
        names = sorted(sums)
        packed = torch.cat(
            [sums[n].reshape(-1) for n in names] + [torch.ones(1, dtype=torch.float64, device=self.device)]
        )
        dist.all_reduce(packed)  # one collective for every metric of the step
        values = dict(zip(names, packed[:-1].cpu().split([sums[n].numel() for n in names])))
        record: dict[str, Any] = {"step": self.step + 1, "split": "train"}
        replicas = micro_batches * packed[-1].item()
        for name in names:
            if name not in ("tokens_per_expert", "dropped_tokens"):
                record[name] = values[name].item() / replicas
        if "tokens_per_expert" in values:  # summed over all ranks; the ranks of a tensor group count the same tokens
            copies = self.config.parallel.tp
            counts = values["tokens_per_expert"].reshape(sums["tokens_per_expert"].shape) / copies
            record["expert_load"] = expert_load(counts).tolist()
            record["dropped_frac"] = values["dropped_tokens"].sum().item() / copies / max(counts.sum().item(), 1.0)
            record.update(expert_load_summary(counts, values["dropped_tokens"] / copies))
        record["tokens_per_s"] = self.tokens_per_step / seconds
        record["tokens"] = self.tokens_seen
        if self.peak_flops is not None:
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak_flops * dist.get_world_size())
        record["peak_mem_gib"] = peak_memory_gib()
        return record

    # ---- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the first `eval_batches` global batches of the val split (all ranks)."""
        self.engine.eval()
        batches = ShardedBatches(
            self.val_set, self.config.data.micro_batch_size, self.dp_rank, self.dp_size, shuffle=False, loop=False
        )
        total = torch.zeros(2, dtype=torch.float64)
        for _, batch in zip(range(self.config.train.eval_batches), batches):
            ce = self.stepper.cross_entropy(batch)
            total += torch.tensor([ce.item(), 1.0], dtype=torch.float64)
        self.engine.train()
        total = total.to(self.device)
        dist.all_reduce(total)
        val_loss = (total[0] / total[1]).item()
        self.logger.log({"step": self.step, "split": "val", "loss": val_loss, "ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    # ---- checkpoints and export ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {
            "data": self.train_batches.state_dict(),
            "tokens": self.tokens_seen,
            "nonfinite_in_row": self.guard.in_row,
            "nonfinite_total": self.guard.total,
        }
        return self.checkpoints.save(
            self.engine, self.step, state, run_info={"identity": self.identity}, groups=self.parallel_groups
        )

    # ---- the loop --------------------------------------------------------------------------------------------
    def _report_cuda_graph_skips(self) -> None:
        """After the first step of a CUDA-graph compile mode: say when inductor ran compiled graphs without them (an
        op it cannot capture, a host sync), rather than leave the user to believe every block is replayed."""
        from torch._dynamo.utils import counters

        if skipped := counters["inductor"]["cudagraph_skips"]:
            self._print(
                f"train.compile_mode={self.config.train.compile_mode}: {skipped} compiled graph(s) run without CUDA "
                "graphs (TORCH_LOGS=cudagraphs says why)"
            )

    def train(self) -> dict[str, Any]:
        """Run until `train.steps`, evaluating, logging and checkpointing on schedule; returns a summary."""
        t, ck = self.config.train, self.config.checkpoint
        batches = iter(self.train_batches)
        losses: dict[int, float] = {}
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=self.rank != 0 or not t.progress_bar,
            dynamic_ncols=True,
            desc="train",
        )
        self.engine.train()
        val_loss = None
        saved_at = self.step if self.resumed_from is not None else None  # a finished run resumed: nothing to re-save
        try:
            while self.step < t.steps:
                record = self.train_step(batches)
                self.step += 1
                if t.cuda_graphs and self.step == 1:
                    self._report_cuda_graph_skips()
                if "loss" in record:
                    losses[self.step] = record["loss"]
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.logger.log(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record.get('loss', float('nan')):.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    val_loss = self.evaluate()
                if ck.every and self.step % ck.every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
            val_loss = self.evaluate()
            if ck.enabled and saved_at != self.step:
                self.save_checkpoint()
            exported = export_model(self.engine, self.stepper, self.config, self.model_config)
        finally:
            bar.close()
            self.logger.close()
        return {
            "step": self.step,
            "losses": losses,
            "val_loss": val_loss,
            "exported": exported,
            "nonfinite_total": self.guard.total,
        }


def _accumulate(sums: dict[str, torch.Tensor], out: CausalLMOutput, ce: torch.Tensor, loss: torch.Tensor) -> None:
    """Add one micro-batch's metrics (detached, fp64, on device: no host sync) to `sums`."""
    values = {"loss": loss, "ce_loss": ce}
    if getattr(out, "distill_kl", None) is not None:
        values["distill_kl"] = out.distill_kl
    if out.moe_stats:
        stats = out.moe_stats
        values["aux_loss"] = out.aux_loss
        for name in stats[0].losses:  # unweighted, averaged over MoE layers
            values[name] = torch.stack([s.losses[name] for s in stats]).mean()
        values["tokens_per_expert"] = torch.stack([s.tokens_per_expert for s in stats])
        values["dropped_tokens"] = torch.stack([s.dropped_tokens for s in stats])
    for name, value in values.items():
        value = value.detach().double()
        sums[name] = sums[name] + value if name in sums else value


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def _all_finite(value: torch.Tensor) -> bool:
    flag = torch.isfinite(value.detach()).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
