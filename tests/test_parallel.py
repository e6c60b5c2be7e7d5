"""Parallel layouts against the single-process model on CPU with gloo and real processes: expert parallelism
(ep=2, all-to-all), tensor parallelism (tp=2) and ep=2 x dp=2 on 4 ranks; losses, gathered gradients, a few
DeepSpeed-engine steps, and resharding back to one process.

Start-up dominates, so one launch runs every check of a layout and this file doubles as the worker
(`torchrun --nproc_per_node N tests/test_parallel.py <scenario> <out.json>`). "The single-process run" is the
unsharded model on the same micro-batches with gradient accumulation, i.e. what data parallelism computes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moeformer.parallel.groups import free_port
from tests.numerics import BF16_RTOL, FP32_RTOL, GRAD_RTOL, assert_curves_agree
from tests.workers import REPO, worker_env

STEPS, LR = 3, 3e-3
BATCH, SEQ = 4, 16
DEVICE = torch.device("cpu")  # the worker moves to its GPU under NCCL (tests/test_parallel_gpu.py)


# ---------------------------------------------------------------------------------------------------- worker


def tiny_config(**overrides):
    from moeformer.layers.moe import MoEConfig
    from moeformer.models.config import ModelConfig

    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        ffn_dim=32,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        backend="loop",
        num_shared_experts=1,
        shared_ffn_dim=32,
    )
    base = {
        "name": "tiny-moe-shrunk",
        "vocab_size": 64,
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 64,
        "max_seq_len": 64,
        "moe": moe,
        "moe_layers": [1],
        "attn_backend": "eager",
    }
    return ModelConfig(**{**base, **overrides})


def fixed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    targets = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    targets[0, :3] = -100
    return ids.to(DEVICE), targets.to(DEVICE)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def model_loss(model, inputs, targets) -> torch.Tensor:
    """The model's loss on `inputs`: input_ids, or (input_ids, position_ids, document_ids) for packed documents."""
    ids, pos, doc = (inputs, None, None) if torch.is_tensor(inputs) else inputs
    return model(ids, targets=targets, position_ids=pos, document_ids=doc).loss


def packed(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids with two documents per row (split at position 7): (ids, position_ids, document_ids)."""
    steps = torch.arange(ids.shape[1], device=ids.device)
    doc = (steps >= 7).long().expand_as(ids)
    return ids, torch.where(steps >= 7, steps - 7, steps).expand_as(ids), doc


def reference_step(model, micro_batches) -> torch.Tensor:
    """Mean loss over micro-batches, gradients accumulated (the single-process equivalent of data parallelism)."""
    losses = [model_loss(model, inputs, t) for inputs, t in micro_batches]
    total = torch.stack(losses).mean()
    total.backward()
    return torch.stack([loss.detach() for loss in losses])


def gathered_grads(model) -> dict[str, torch.Tensor]:
    from moeformer.parallel.reshard import gather_shard

    out = {}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = gather_shard(grad, p.shard) if hasattr(p, "shard") else grad
    return out


def make_engine(model, stage: int, mpu_kwargs: dict, micro: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "all"}
    )
    optimizer = torch.optim.AdamW(param_groups, lr=LR, weight_decay=0.0)
    dp = torch.distributed.get_world_size() if not mpu_kwargs else mpu_kwargs["mpu"].get_data_parallel_world_size()
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * dp,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **mpu_kwargs)
    return engine


def checkpoint_round_trip(engine, build, stage: int, path: Path, ids, targets) -> tuple[float, float, float]:
    """Save `engine` (plus the expert files and layout), load into a freshly built differently-initialised engine:
    the largest difference of the gathered weights, that of the next step's loss, and that of the weights
    consolidated offline from the checkpoint files."""
    import torch.distributed as dist

    from moeformer.parallel import consolidate_checkpoint, full_state_dict, save_expert_checkpoint, save_layout

    engine.save_checkpoint(str(path), tag="t")
    save_expert_checkpoint(engine, str(path), tag="t")
    save_layout(engine.module, path)
    dist.barrier()
    offline = consolidate_checkpoint(path, "t")
    torch.manual_seed(99)
    model, groups = build()
    other = make_engine(model, stage, groups.initialize_kwargs, ids.shape[0])
    other.load_checkpoint(str(path), tag="t")
    want, got = full_state_dict(engine.module), full_state_dict(other.module)
    err = max(max_err(want[name], got[name]) for name in want)
    if offline.keys() != want.keys():
        raise AssertionError(f"consolidated keys differ: {sorted(offline.keys() ^ want.keys())[:5]}")
    consolidate_err = max(max_err(want[name], offline[name].to(want[name].device)) for name in want)
    losses = []
    for e in (engine, other):
        loss = e(ids, targets=targets).loss
        e.backward(loss)
        e.step()
        losses.append(e(ids, targets=targets).loss.item())
    return err, abs(losses[0] - losses[1]), consolidate_err


def reference_curve(ref, micro_batches, steps: int) -> list[float]:
    model = copy.deepcopy(ref)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        curve.append(reference_step(model, micro_batches).mean().item())
        opt.step()
    return curve


def engine_curve(engine, ids, targets, group, steps: int) -> list[float]:
    curve = []
    for _ in range(steps):
        loss = engine(ids, targets=targets).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean, group=group)
        curve.append(mean.item() / torch.distributed.get_world_size(group))
    return curve


def check_layout(pc, cfg, results: dict, key: str, work: Path, stages=(0, 2), checkpointing: str = "none") -> None:
    """Loss, engine-reduced gradients (with activation checkpointing `checkpointing` applied first, as the trainer
    does), loss curves under ZeRO `stages`, a DeepSpeed checkpoint round trip and resharding of `cfg` in layout
    `pc`."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from moeformer.models.model import build_model
    from moeformer.parallel import full_state_dict, load_full_state_dict, parallelize, save_consolidated
    from moeformer.training.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    ref = build_model(cfg, device=DEVICE)
    initial = copy.deepcopy(ref.state_dict())

    def fresh():
        model = build_model(cfg, device=DEVICE)
        model.load_state_dict(initial)
        return model

    ids, targets = fixed_batch(cfg.vocab_size)
    probe = copy.deepcopy(ref)
    apply_activation_checkpointing(probe, checkpointing)
    model, groups = parallelize(probe, pc)
    kwargs = groups.initialize_kwargs
    dp, dp_rank = groups.config.dp, dist.get_rank(groups.data)
    micro = BATCH // dp
    rows = slice(dp_rank * micro, (dp_rank + 1) * micro)
    micro_batches = [(ids[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro]) for i in range(dp)]

    ref_losses = reference_step(ref, micro_batches)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}

    engine = make_engine(model, 0, kwargs, micro)
    loss = engine(ids[rows], targets=targets[rows]).loss
    engine.backward(loss)  # reduces gradients over the data / expert-data groups
    grads = gathered_grads(model)
    grad_err = max(max_err(grads[name], ref_grads[name]) for name in ref_grads)
    results[key] = {
        "loss_err": max_err(loss.detach(), ref_losses[dp_rank]),
        "grad_err": grad_err,
        "expert_module": type(model.layers[1].mlp.experts).__name__,
        "ep_dispatcher": type(model.layers[1].mlp.dispatcher).__name__,
        "sharded": sorted(name for name, p in model.named_parameters() if hasattr(p, "shard")),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "loss_scale": ref_losses.abs().max().item(),
    }

    ref_curve = reference_curve(fresh(), micro_batches, STEPS)
    for stage in stages:
        model, stage_groups = parallelize(fresh(), pc)
        engine = make_engine(model, stage, stage_groups.initialize_kwargs, micro)
        curve = engine_curve(engine, ids[rows], targets[rows], groups.data, STEPS)
        results[key][f"curve_err_zero{stage}"] = max(abs(a - b) for a, b in zip(curve, ref_curve))
        results[key][f"curve_zero{stage}"] = curve
    results[key]["ref_curve"] = ref_curve
    rebuild = lambda: parallelize(build_model(cfg, device=DEVICE), pc)
    (results[key]["checkpoint_err"], results[key]["checkpoint_loss_err"], results[key]["consolidate_err"]) = (
        checkpoint_round_trip(engine, rebuild, stages[-1], work / key, ids[rows], targets[rows])
    )

    # reshard the trained parallel model back to one process (and into the same layout again)
    model.eval()
    with torch.no_grad():
        logits = model(ids[rows]).logits
        full = full_state_dict(model)
        single = build_model(cfg, device=DEVICE)
        save_consolidated(model, work / f"{key}.safetensors")
        dist.barrier()
        single.load_state_dict(load_file(work / f"{key}.safetensors", device=str(DEVICE)))
        single.eval()
        again, _ = parallelize(build_model(cfg, device=DEVICE), pc)
        load_full_state_dict(again, full)
        again.eval()
        results[key]["logit_scale"] = logits.abs().max().item()
        results[key]["reshard_to_single_err"] = max_err(single(ids[rows]).logits, logits)
        results[key]["reshard_from_single_err"] = max_err(again(ids[rows]).logits, logits)
        prompt, sampler = ids[rows][:, :5], lambda: torch.Generator(DEVICE).manual_seed(7)
        results[key]["generate_equal"] = bool(
            torch.equal(model.generate(prompt, 6, generator=sampler()), single.generate(prompt, 6, generator=sampler()))
        )
        results[key]["trained_moved"] = max_err(single(ids[rows]).logits, fresh()(ids[rows]).logits)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it steps with (the pipeline engine clears them afterwards)."""

    def step(self, closure=None):
        self.seen = {p: p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None}
        return super().step(closure)


def check_pipeline(
    cfg,
    results: dict,
    key: str,
    partition_method: str | None = None,
    checkpoint_interval: int = 0,
    packed_documents: bool = False,
    tp: int = 1,
    ep: int = 1,
) -> None:
    """pp=2 (x tp, x the rest of the world as dp) on DeepSpeed's PipelineEngine, 2 micro-batches per replica and
    step: first-step gradients, loss curve, and the stages' weights gathered into one CausalLM. partition_method
    None goes through `parallelize`."""
    import deepspeed
    import torch.distributed as dist

    from moeformer.models.model import build_model
    from moeformer.parallel import ParallelConfig, parallelize
    from moeformer.parallel.pipeline import PIPELINE_CONFIG, pipeline_full_state_dict, to_pipeline
    from moeformer.parallel.reshard import gather_shard

    torch.manual_seed(0)
    ref = build_model(cfg, device=DEVICE)
    initial = copy.deepcopy(ref.state_dict())
    ids, targets = fixed_batch(cfg.vocab_size)
    dp, gas = dist.get_world_size() // (2 * tp), 2
    micro = BATCH // (dp * gas)
    micro_batches = [(ids[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro]) for i in range(dp * gas)]
    if packed_documents:
        micro_batches = [(packed(i), t) for i, t in micro_batches]
    reference_step(ref, micro_batches)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    ref.load_state_dict(initial)
    ref_curve = reference_curve(ref, micro_batches, STEPS)

    ref.load_state_dict(initial)
    model = copy.deepcopy(ref)
    if partition_method is None:
        pipe, _ = parallelize(model, ParallelConfig(pp=2, tp=tp, ep=ep))
    else:
        pipe = to_pipeline(
            model, 2, partition_method=partition_method, activation_checkpoint_interval=checkpoint_interval
        )
    dp_rank = pipe.mpu().get_data_parallel_rank()
    mine = micro_batches[dp_rank * gas : (dp_rank + 1) * gas]
    optimizer = RecordingAdamW(pipe.parameters(), lr=LR, weight_decay=0.0)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": BATCH,
        "steps_per_print": 2**31 - 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "pipeline": PIPELINE_CONFIG,
    }
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=config)
    curve, grad_err, compared = [], 0.0, 0
    for step in range(STEPS):
        curve.append(engine.train_batch(data_iter=iter(mine)).item())
        if step == 0:
            local = set(pipe.parameters())
            for name, p in model.named_parameters():
                if p in local:
                    grad = gather_shard(optimizer.seen[p], p.shard) if hasattr(p, "shard") else optimizer.seen[p]
                    grad_err = max(grad_err, max_err(grad, ref_grads[name]))
                    compared += 1
    err, count = torch.tensor(grad_err, device=DEVICE), torch.tensor(compared, device=DEVICE)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    dist.all_reduce(count)
    single = build_model(cfg, device=DEVICE)
    single.load_state_dict(pipeline_full_state_dict(pipe))
    with torch.no_grad():
        # eval_batch averages over the data-parallel replicas too
        single_loss = torch.stack([model_loss(single, i, t) for i, t in micro_batches]).mean().item()
    pipe_loss = engine.eval_batch(data_iter=iter(mine)).item()
    results[key] = {
        "grad_err": err.item(),
        "grads_compared": count.item(),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "num_params": len(list(model.parameters())),
        "curve": curve,
        "ref_curve": ref_curve,
        "reshard_loss_err": abs(single_loss - pipe_loss),
        "loss_scale": abs(single_loss),
        "trained_moved": abs(single_loss - ref_curve[0]),
    }


def run_dispatcher(dispatcher, experts, x: torch.Tensor, slots, dy: torch.Tensor) -> tuple:
    """One forward and backward of `experts` behind `dispatcher`: (out, tokens_per_expert, dropped), the gradients
    of (x, the routing weights, w_in, w_out), and the host syncs it made."""
    from moeformer.training.metrics import HostSyncs

    xi, wi = x.clone().requires_grad_(), slots.weights.clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    with HostSyncs() as counter:
        dispatched = dispatcher.dispatch(xi, replace(slots, weights=wi))
        out = dispatcher.combine(dispatcher.run_experts(experts, dispatched), dispatched)
        (out.float() * dy).sum().backward()
    grads = (xi.grad, wi.grad, experts.w_in.grad, experts.w_out.grad)
    return (out, dispatched.tokens_per_expert, dispatched.dropped), grads, counter.count


def check_expert_layer(results: dict, ep: int = 2) -> None:
    """The all-to-all dispatcher (and, dropless, the all-gather one) with this rank's experts against the local
    dispatcher with all of them, on fresh random routings: fp32 / bf16, padding slots, a capacity, a skewed routing
    where one rank sends nothing to the other, one where a rank's experts receive nothing, and the Triton kernels (on
    CPU: the interpreter) on every rank. Expert gradients are compared with the sum over ranks of the plain layer's
    gradients (each rank's tokens reach every rank's experts). Also counts the host syncs of one forward and
    backward of each. With ep > 2 the rows of one block come from several ranks (results["expert_layer_ep<ep>"])."""
    import torch.distributed as dist

    from moeformer.layers import triton_dispatch
    from moeformer.layers.moe import CapacityDispatcher, DroplessDispatcher, Experts, Slots
    from moeformer.parallel import ExpertParallelExperts, ParallelConfig, init_parallel_groups
    from moeformer.parallel.expert import AllGatherDispatcher, AllToAllDispatcher

    groups = init_parallel_groups(ParallelConfig(ep=ep))
    rank = dist.get_rank(groups.expert)
    cases = {
        # n, experts, k, dtype, capacity, skewed, blocks the all-to-alls are split in
        "fp32": (24, 4, 2, torch.float32, None, False, 1),
        "fp32_chunked": (24, 4, 2, torch.float32, None, False, 2),
        "fp32_capacity": (24, 4, 2, torch.float32, 5, False, 2),
        "fp32_skewed": (9, 8, 2, torch.float32, None, True, 4),
        "fp32_idle": (6, 4, 2, torch.float32, None, "all", 2),
        "bf16": (40, 4, 2, torch.bfloat16, None, False, 1),
        "fp32_kernels": (13, 4, 2, torch.float32, None, False, 2),
        "bf16_kernels": (16, 8, 3, torch.bfloat16, None, False, 4),
    }
    errs = {}
    for seed, (case, (n, num_experts, k, dtype, capacity, skewed, chunks)) in enumerate(cases.items()):
        triton_dispatch.interpret_on_cpu = "kernels" in case and triton_dispatch.INTERPRETER
        torch.manual_seed(seed)  # same expert weights on every rank
        plain = Experts(num_experts, 16, 8, "swiglu", "grouped" if DEVICE.type == "cpu" else "auto").to(DEVICE, dtype)
        parallel = ExpertParallelExperts(copy.deepcopy(plain), groups)
        local = (
            DroplessDispatcher(num_experts)
            if capacity is None
            else CapacityDispatcher(num_experts, k, (capacity - 0.5) * num_experts / (n * k))
        )  # ceil(...) = capacity
        dispatchers = {"": AllToAllDispatcher(local, groups.expert, chunks=chunks)}
        if capacity is None:
            dispatchers["_all_gather"] = AllGatherDispatcher(local, groups.expert)
        g = torch.Generator().manual_seed(100 * seed + rank)  # different tokens per rank
        x = torch.randn(n, 16, generator=g).to(DEVICE, dtype)
        # skewed: rank 0 keeps to its own experts; "all": both ranks do, rank 1's experts receive no row at all
        high = num_experts // 2 if skewed == "all" or (skewed and rank == 0) else num_experts
        expert_idx = torch.rand(n, high, generator=g).argsort(dim=-1)[:, :k].flatten().to(DEVICE)
        token_idx = torch.arange(n, device=DEVICE).repeat_interleave(k)
        weights = torch.rand(n * k, generator=g).to(DEVICE)
        valid = torch.rand(n * k, generator=g).to(DEVICE) > 0.2
        dy = torch.randn(n, 16, generator=g).to(DEVICE)
        slots = Slots(token_idx, expert_idx, weights, valid, k)
        want, want_grads, want_syncs = run_dispatcher(local, plain, x, slots, dy)
        expert_grads = []
        for full in want_grads[2:]:
            full = full.float().clone()
            dist.all_reduce(full, group=groups.expert)
            expert_grads.append(full.chunk(ep)[rank])
        for suffix, dispatcher in dispatchers.items():
            got, got_grads, got_syncs = run_dispatcher(dispatcher, parallel, x, slots, dy)
            err = {
                "out": max_err(want[0], got[0]),
                "x_grad": max_err(want_grads[0], got_grads[0]),
                "weight_grad": max_err(want_grads[1], got_grads[1]),
                "expert_grad": max(max_err(a, b) for a, b in zip(expert_grads, got_grads[2:])),
                "out_scale": want[0].abs().max().item(),
                "x_grad_scale": want_grads[0].abs().max().item(),
                "weight_grad_scale": want_grads[1].abs().max().item(),
                "expert_grad_scale": max(g.abs().max().item() for g in expert_grads),
                "dropped": int(got[2]),
                "host_syncs": [want_syncs, got_syncs] if DEVICE.type == "cpu" else None,
                "counts_equal": all(torch.equal(a, b) for a, b in zip(want[1:], got[1:])),
                "scale": x.abs().max().item(),
            }
            # every rank's errors relative to its own scales (the rest of the record is rank 0's)
            names = ("out", "x_grad", "weight_grad", "expert_grad")
            worst = torch.tensor(
                [err[n] / max(err[f"{n}_scale"], 1e-30) for n in names], dtype=torch.float64, device=DEVICE
            )
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=groups.expert)
            err["worst_rank_ratio"] = dict(zip(names, worst.tolist()))
            errs[case + suffix] = err
    triton_dispatch.interpret_on_cpu = False
    results["expert_layer" if ep == 2 else f"expert_layer_ep{ep}"] = errs


def check_expert_parallel_moe_layer(results: dict) -> None:
    """A whole MoE layer with a shared expert (its computation overlaps the all-to-all) under ep=2, the transfers in
    one or more blocks, against the same layer on one process, each rank with its own tokens, the Triton kernels on
    every rank (on CPU the interpreter): output, load, and the gradients of the input, the router, the shared
    expert and the experts. On GPUs also at sizes where the transfers run beside real GEMMs."""
    import torch.distributed as dist

    from moeformer.layers import triton_dispatch
    from moeformer.layers.moe import MoE, MoEConfig
    from moeformer.parallel import ParallelConfig, apply_expert_parallel, init_parallel_groups

    groups = init_parallel_groups(ParallelConfig(ep=2))
    rank = dist.get_rank(groups.expert)
    triton_dispatch.interpret_on_cpu = triton_dispatch.INTERPRETER
    backend = "grouped" if DEVICE.type == "cpu" else "auto"
    errs = {}
    gather, to_all = {"dispatcher": "all_gather"}, {"dispatcher": "all_to_all"}
    # name, dtype, local dispatcher, (dim, experts, tokens per sequence), expert-parallel dispatcher (the capacity
    # case: "auto", which picks the all-to-all)
    cases = [
        ("fp32", torch.float32, {}, (16, 4, 9), {"chunks": 2, **to_all}),
        ("bf16", torch.bfloat16, {}, (16, 4, 9), {"chunks": 1, **to_all}),
        ("fp32_capacity", torch.float32, {"dispatcher": "capacity", "capacity_factor": 0.6}, (16, 4, 9), {}),
        ("fp32_all_gather", torch.float32, {}, (16, 4, 9), gather),
        ("bf16_all_gather", torch.bfloat16, {}, (16, 4, 9), gather),
    ]
    if DEVICE.type == "cuda":  # sizes where the transfers overlap real GEMMs (a missing wait shows)
        cases += [
            ("fp32_large", torch.float32, {}, (256, 16, 2048), {"chunks": 4, **to_all}),
            ("bf16_large", torch.bfloat16, {}, (256, 16, 2048), {"chunks": 2, **to_all}),
            ("bf16_large_all_gather", torch.bfloat16, {}, (256, 16, 2048), gather),
        ]
    for seed, (case, dtype, dispatch, (dim, num_experts, tokens), ep) in enumerate(cases):
        torch.manual_seed(seed)
        config = MoEConfig(
            num_experts=num_experts,
            top_k=2,
            ffn_dim=dim,
            num_shared_experts=1,
            shared_ffn_dim=dim,
            backend=backend,
            **dispatch,
        )
        single = MoE(dim, config).to(DEVICE, dtype)
        sharded = copy.deepcopy(single)
        apply_expert_parallel(sharded, groups, **ep)
        g = torch.Generator().manual_seed(10 * seed + rank)
        x = torch.randn(2, tokens, dim, generator=g).to(DEVICE, dtype)
        dy = torch.randn(2, tokens, dim, generator=g).to(DEVICE)
        outs, grads = [], []
        for layer in (single, sharded):
            xi = x.clone().requires_grad_()
            out, stats = layer(xi)
            ((out.float() * dy).sum() + stats.aux_loss).backward()
            outs.append((out, stats.tokens_per_expert, stats.dropped_tokens))
            grads.append({"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}})
        for name in ("experts.w_in", "experts.w_out"):
            full = grads[0][name].float().clone()
            dist.all_reduce(full, group=groups.expert)
            grads[0][name] = full.chunk(2)[rank]
        errs[case] = {
            "out": max_err(outs[0][0], outs[1][0]),
            "out_scale": outs[0][0].abs().max().item(),
            "counts_equal": all(torch.equal(a, b) for a, b in zip(outs[0][1:], outs[1][1:])),
            "dropped": int(outs[1][2]),
            "grads": {n: [max_err(grads[0][n], grads[1][n]), grads[0][n].abs().max().item()] for n in grads[0]},
        }
    triton_dispatch.interpret_on_cpu = False
    results["expert_parallel_moe_layer"] = errs


def check_all_gather_compiles(results: dict) -> None:
    """The MoE layer under ep=2 with the all-gather dispatcher traces into one graph (no split sizes, no host
    sync, the collectives custom ops) and the compiled layer gives the eager one's output and input gradient (bf16:
    CPU's grouped GEMM traces in bf16 only)."""
    import torch._dynamo

    from moeformer.layers.moe import MoE, MoEConfig
    from moeformer.parallel import ParallelConfig, apply_expert_parallel, init_parallel_groups

    groups = init_parallel_groups(ParallelConfig(ep=2))
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=16, backend="grouped")).to(DEVICE, torch.bfloat16)
    apply_expert_parallel(layer, groups, dispatcher="all_gather")
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    x = torch.randn(2, 8, 16, generator=g).to(DEVICE, torch.bfloat16)
    breaks = torch._dynamo.explain(layer)(x).graph_break_count
    outs = []
    for module in (layer, torch.compile(layer, fullgraph=True)):
        xi = x.clone().requires_grad_()
        out, _ = module(xi)
        out.float().square().sum().backward()
        outs.append((out, xi.grad))
    results["all_gather_compiled"] = {
        "graph_breaks": breaks,
        "out": max_err(outs[0][0], outs[1][0]),
        "x_grad": max_err(outs[0][1], outs[1][1]),
        "scale": outs[0][0].abs().max().item(),
        "x_grad_scale": outs[0][1].abs().max().item(),
    }


def check_all_gather_tensor_shares(results: dict) -> None:
    """ep=2 and tp=2 on the same two ranks with the all-gather dispatcher and an odd number of tokens: the tensor
    ranks' shares (5 and 4 of 9 tokens) are padded to equal size for the gather; output, input and expert gradients
    equal the single layer's (both ranks hold the same tokens)."""
    import torch.distributed as dist

    from moeformer.layers.moe import MoE, MoEConfig
    from moeformer.parallel import ParallelConfig, apply_expert_parallel, init_parallel_groups

    groups = init_parallel_groups(ParallelConfig(ep=2, tp=2))
    torch.manual_seed(3)
    single = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=8)).to(DEVICE)
    sharded = copy.deepcopy(single)
    apply_expert_parallel(sharded, groups, dispatcher="all_gather")
    x = torch.randn(1, 9, 16).to(DEVICE)  # the same tokens on both ranks
    got = []
    for layer in (single, sharded):
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.square().sum().backward()
        got.append((out, xi.grad, layer.experts.w_in.grad))
    rank = dist.get_rank(groups.expert)
    results["all_gather_tensor_shares"] = {
        "out": max_err(got[0][0], got[1][0]),
        "x_grad": max_err(got[0][1], got[1][1]),
        "expert_grad": max_err(got[0][2].chunk(2)[rank], got[1][2]),
        "scales": [got[0][0].abs().max().item(), got[0][1].abs().max().item(), got[0][2].abs().max().item()],
    }


def check_unsupported(results: dict) -> None:
    """The error each unsupported combination raises, before the model is touched."""
    from moeformer.models.model import build_model
    from moeformer.parallel import ParallelConfig, parallelize

    cases = {
        "qk_norm_full": (ParallelConfig(tp=2), tiny_config(qk_norm="full")),
        "pp_ep_on_two_ranks": (ParallelConfig(pp=2, ep=2), tiny_config()),
    }
    results["unsupported"] = {}
    for case, (pc, cfg) in cases.items():
        model = build_model(cfg, device=DEVICE)
        before = copy.deepcopy(model.state_dict())
        try:
            parallelize(model, pc)
            message = None
        except (NotImplementedError, ValueError) as e:
            message = str(e)
        unchanged = model.state_dict().keys() == before.keys() and all(
            v.shape == before[k].shape for k, v in model.state_dict().items()
        )
        results["unsupported"][case] = {"message": message, "unchanged": unchanged}


def check_parallel_cross_entropy(results: dict) -> None:
    """The vocab-parallel LM head's fused, chunked cross-entropy (no logits gathered) and its gradients against
    F.cross_entropy of the full logits; its logits (gathered) against the full projection."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from moeformer.parallel.tensor import VocabParallelLMHead

    group = dist.new_group(list(range(dist.get_world_size())))
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    errs = {}
    for dtype, n, vocab, chunk in (
        (torch.float32, 7, 8, 4096),
        (torch.float32, 33, 64, 5),
        (torch.bfloat16, 20, 32, 8),
    ):
        g = torch.Generator().manual_seed(n)
        hidden = torch.randn(n, 16, generator=g).to(DEVICE, dtype).requires_grad_()
        weight = (torch.randn(vocab, 16, generator=g) / 2).to(DEVICE, dtype).requires_grad_()
        targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
        targets[::5] = -100
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)
        want.backward()
        head = VocabParallelLMHead(torch.nn.Linear(16, vocab, bias=False, device=DEVICE, dtype=dtype), group)
        head.weight.data.copy_(weight.detach().chunk(size)[rank])
        h = hidden.detach().clone().requires_grad_()
        got = head(h, targets, chunk)
        got.backward()
        logits = head(hidden.detach())
        errs[f"{dtype}_{n}x{vocab}_chunk{chunk}"] = {
            "loss": max_err(got, want),
            "loss_scale": want.abs().item(),
            "grad": max(max_err(h.grad, hidden.grad), max_err(head.weight.grad, weight.grad.chunk(size)[rank])),
            "grad_scale": max(hidden.grad.abs().max().item(), weight.grad.abs().max().item()),
            "logits": max_err(logits, F.linear(hidden.detach(), weight.detach())),
            "logits_scale": F.linear(hidden.detach(), weight.detach()).abs().max().item(),
        }
    results["parallel_ce"] = errs


def run_scenario(name: str, out: Path) -> None:
    import logging

    import torch.distributed as dist

    from moeformer.parallel import ParallelConfig, init_distributed, shutdown_distributed

    global DEVICE
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity
    init_distributed()
    results: dict = {}
    if name == "two_ranks":
        check_layout(ParallelConfig(ep=2), tiny_config(), results, "ep2", out.parent, checkpointing="full")
        to_all = ParallelConfig(ep=2, ep_dispatcher="all_to_all")  # "ep2": "auto", the all-gather at ep=2
        check_layout(to_all, tiny_config(), results, "ep2_all_to_all", out.parent)
        check_layout(ParallelConfig(tp=2), tiny_config(), results, "tp2", out.parent, stages=(0,))
        mqa_tied = tiny_config(n_kv_heads=1, tie_embeddings=True, attn_bias=True, mlp_bias=True)  # biases too
        check_layout(
            ParallelConfig(tp=2), mqa_tied, results, "tp2_mqa_tied", out.parent, stages=(0,), checkpointing="full"
        )
        check_layout(
            ParallelConfig(tp=2, expert_tp=True), tiny_config(), results, "tp2_expert_tp", out.parent, stages=(0,)
        )
        check_layout(ParallelConfig(ep=2, tp=2), tiny_config(), results, "ep2_tp2_same_ranks", out.parent, stages=(0,))
        check_layout(replace(to_all, tp=2), tiny_config(), results, "ep2_tp2_all_to_all", out.parent, stages=(0,))
        check_parallel_cross_entropy(results)
        check_expert_layer(results)
        check_expert_parallel_moe_layer(results)
        check_all_gather_compiles(results)
        check_all_gather_tensor_shares(results)
        check_unsupported(results)
        check_pipeline(tiny_config(), results, "pp2")
        check_pipeline(
            tiny_config(tie_embeddings=True, n_layers=4, moe_layers=[1, 2]),
            results,
            "pp2_tied",
            "blocks",
            checkpoint_interval=1,
            packed_documents=True,
        )
    elif name == "four_ranks":
        check_layout(ParallelConfig(ep=2), tiny_config(), results, "ep2_dp2", out.parent)
        to_all = ParallelConfig(ep=2, ep_dispatcher="all_to_all")
        check_layout(to_all, tiny_config(), results, "ep2_dp2_all_to_all", out.parent, stages=(2,))
        check_layout(ParallelConfig(tp=2), tiny_config(), results, "tp2_dp2", out.parent, stages=(0, 2))
        check_pipeline(tiny_config(), results, "pp2_dp2")
        check_pipeline(tiny_config(tie_embeddings=True), results, "pp2_tp2_tied", tp=2)
        check_pipeline(tiny_config(), results, "pp2_ep2", ep=2)
        check_layout(ParallelConfig(ep=2, tp=2), tiny_config(), results, "ep2_tp2", out.parent)
        check_expert_layer(results, ep=4)
    else:
        raise ValueError(f"unknown scenario {name!r}")
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    shutdown_distributed()


# ---------------------------------------------------------------------------------------------------- tests


def launch(scenario: str, nproc: int, out: Path, gpus: bool = False) -> dict:
    """Run `scenario` on `nproc` ranks: gloo on CPU, or NCCL with one GPU per rank."""
    env = worker_env(OMP_NUM_THREADS="1")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        __file__,
        scenario,
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"{scenario} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch("two_ranks", 2, tmp_path_factory.mktemp("parallel") / "two_ranks.json")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch("four_ranks", 4, tmp_path_factory.mktemp("parallel") / "four_ranks.json")


def assert_layout(result: dict, stages=(0, 2)) -> None:
    """fp32 bounds relative to the compared quantities' sizes (tests/numerics.py); copies exact."""
    assert result["loss_err"] <= FP32_RTOL * result["loss_scale"], result
    assert result["grad_err"] <= GRAD_RTOL * result["grad_scale"], result
    assert result["grad_scale"] > 1e-3, "gradients too small for the comparison to mean anything"
    for stage in stages:
        assert_curves_agree(result[f"curve_zero{stage}"], result["ref_curve"])
    assert result["ref_curve"][-1] < result["ref_curve"][0], "training did not lower the loss"
    assert result["checkpoint_err"] == 0.0, result  # loading copies the saved weights exactly
    assert result["checkpoint_loss_err"] <= FP32_RTOL * result["loss_scale"], result
    assert result["consolidate_err"] == 0.0, result  # offline consolidation copies the saved tensors exactly
    assert result["reshard_to_single_err"] <= FP32_RTOL * result["logit_scale"], result
    assert result["reshard_from_single_err"] <= FP32_RTOL * result["logit_scale"], result
    assert result["trained_moved"] > 1e-3, "the resharded logits must come from the trained weights"
    assert result["generate_equal"], "sampling with the parallel model (KV cache, seeded) must match one process"


def test_parallel_config_resolves_data_parallel_size():
    from moeformer.parallel import ParallelConfig

    assert ParallelConfig(ep=2).resolve(8) == ParallelConfig(dp=8, ep=2)
    assert ParallelConfig(tp=2, pp=2).resolve(8).dp == 2
    assert ParallelConfig(ep=2).resolve(8).expert_data_parallel_size == 4
    assert ParallelConfig(ep=2, tp=2).resolve(8).expert_data_parallel_size == 4


@pytest.mark.parametrize(
    "config, world, message",
    [
        ({"tp": 3}, 4, "world size 4 is not divisible by tp=3"),
        ({"tp": 2, "pp": 2}, 6, "world size 6 is not divisible by tp=2 \\* pp=2"),
        ({"ep": 3, "tp": 2}, 4, "ep=3 does not divide dp \\* tp = 4"),
        ({"dp": 3, "tp": 2}, 4, "dp=3 \\* tp=2 \\* pp=1 = 6 != world size 4"),
        ({"ep": 0}, 4, "parallel.ep must be >= 1"),
        ({"ep": 2, "ep_chunks": 0}, 4, "parallel.ep_chunks must be >= 1"),
        ({"ep": 2, "ep_dispatcher": "ring"}, 4, "parallel.ep_dispatcher must be one of \\('auto', 'all_to_all'"),
        ({"expert_tp": True}, 4, "expert_tp needs tp > 1 and ep = 1"),
    ],
)
def test_parallel_config_rejects_sizes_that_do_not_fit_the_world(config, world, message):
    from moeformer.parallel import ParallelConfig

    with pytest.raises(ValueError, match=message):
        ParallelConfig(**config).resolve(world)


@pytest.mark.parametrize(
    "config, model, message",
    [
        ({"ep": 3}, {}, "ep=3 does not divide num_experts=4"),
        ({"ep": 2}, {"moe": None, "moe_layers": None}, "ep=2 needs a MoE model"),
        ({"tp": 8}, {}, "tp=8 does not divide n_heads=4"),
        ({"tp": 3}, {"n_heads": 6, "n_kv_heads": 2, "head_dim": 8}, "tp=3 and n_kv_heads=2: one must divide the other"),
        ({"tp": 2}, {"vocab_size": 63}, "tp=2 does not divide vocab_size=63"),
        ({"pp": 3}, {}, "pp=3 does not divide n_layers=2"),
    ],
)
def test_parallel_config_names_the_model_size_that_does_not_divide(config, model, message):
    from moeformer.parallel import ParallelConfig

    with pytest.raises(ValueError, match=message):
        ParallelConfig(**config).validate_model(tiny_config(**model))


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["ep2", "ep2_all_to_all"])
def test_expert_parallel_matches_single_process(two_ranks, key):
    assert two_ranks[key]["expert_module"] == "ExpertParallelExperts"
    assert two_ranks[key]["ep_dispatcher"] == ("AllToAllDispatcher" if "all_to_all" in key else "AllGatherDispatcher")
    assert_layout(two_ranks[key])


@pytest.mark.distributed
def test_tensor_parallel_matches_single_process(two_ranks):
    sharded = two_ranks["tp2"]["sharded"]
    for name in (
        "tok_embeddings.weight",
        "lm_head.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.o_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "layers.1.mlp.shared_expert.up_proj.weight",
    ):
        assert name in sharded, name
    assert "layers.1.mlp.experts.w_in" not in sharded  # routed experts stay whole without expert_tp
    assert_layout(two_ranks["tp2"], stages=(0,))


@pytest.mark.distributed
def test_expert_tensor_parallel_matches_single_process(two_ranks):
    assert two_ranks["tp2_expert_tp"]["expert_module"] == "TensorParallelExperts"
    assert {"layers.1.mlp.experts.w_in", "layers.1.mlp.experts.w_out"} <= set(two_ranks["tp2_expert_tp"]["sharded"])
    assert_layout(two_ranks["tp2_expert_tp"], stages=(0,))


@pytest.mark.distributed
def test_tensor_parallel_replicated_kv_heads_and_tied_embeddings(two_ranks):
    assert "layers.0.attn.k_proj.weight" not in two_ranks["tp2_mqa_tied"]["sharded"]  # one kv head, two ranks
    assert_layout(two_ranks["tp2_mqa_tied"], stages=(0,))


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["pp2", "pp2_tied"])
def test_pipeline_matches_single_process(two_ranks, key):
    assert_pipeline(two_ranks[key])


def assert_pipeline(result: dict) -> None:
    assert result["grads_compared"] >= result["num_params"], result  # every parameter lives on some stage
    assert result["grad_err"] <= GRAD_RTOL * result["grad_scale"], result
    assert_curves_agree(result["curve"], result["ref_curve"])
    assert result["ref_curve"][-1] < result["ref_curve"][0], "training did not lower the loss"
    assert result["reshard_loss_err"] <= FP32_RTOL * result["loss_scale"], result
    assert result["trained_moved"] > 1e-3, result


def assert_expert_layer(errs: dict) -> None:
    for case, err in errs.items():
        rtol = BF16_RTOL if "bf16" in case else FP32_RTOL
        assert err["counts_equal"], case
        assert (err["dropped"] > 0) == ("capacity" in case), (case, err)
        for name in ("out", "x_grad", "weight_grad", "expert_grad"):
            assert err[name] <= rtol * err[f"{name}_scale"], (case, name, err)
            assert err["worst_rank_ratio"][name] <= rtol, (case, name, err)
        # forward and backward: the local dispatchers never wait for the device; the all-to-all one once, for the
        # split sizes of the dropless layout (the capacity layout's splits are static); the all-gather one never
        static = "capacity" in case or "all_gather" in case
        assert err["host_syncs"] in (None, [0, 0 if static else 1]), (case, err)  # None: not on CPU


@pytest.mark.distributed
def test_expert_parallel_layer_matches_plain_experts(two_ranks):
    assert_expert_layer(two_ranks["expert_layer"])


@pytest.mark.distributed
def test_expert_parallel_layer_on_four_ranks(four_ranks):
    """ep=4: each block's rows come from three other ranks, in rank order around this rank's own."""
    assert_expert_layer(four_ranks["expert_layer_ep4"])


def assert_expert_parallel_moe_layer(errs: dict) -> None:
    for case, err in errs.items():
        rtol = BF16_RTOL if "bf16" in case else FP32_RTOL
        assert err["counts_equal"] and (err["dropped"] > 0) == ("capacity" in case), (case, err)
        assert err["out"] <= rtol * err["out_scale"], (case, err)
        assert len(err["grads"]) == 7, err["grads"]  # x, router, shared expert (3), experts (2)
        for name, (e, scale) in err["grads"].items():
            assert e <= rtol * scale + 1e-12, (case, name, e, scale)


@pytest.mark.distributed
def test_expert_parallel_moe_layer_matches_one_process(two_ranks):
    assert_expert_parallel_moe_layer(two_ranks["expert_parallel_moe_layer"])


@pytest.mark.distributed
def test_all_gather_dispatcher_compiles_into_one_graph(two_ranks):
    got = two_ranks["all_gather_compiled"]
    assert got["graph_breaks"] == 0, got
    assert got["out"] <= BF16_RTOL * got["scale"] and got["x_grad"] <= BF16_RTOL * got["x_grad_scale"], got


@pytest.mark.distributed
def test_all_gather_dispatcher_pads_unequal_tensor_shares(two_ranks):
    got = two_ranks["all_gather_tensor_shares"]
    out_scale, x_grad_scale, expert_grad_scale = got["scales"]
    assert got["out"] <= FP32_RTOL * out_scale, got
    assert got["x_grad"] <= GRAD_RTOL * x_grad_scale and got["expert_grad"] <= GRAD_RTOL * expert_grad_scale, got


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["ep2_tp2_same_ranks", "ep2_tp2_all_to_all"])
def test_expert_and_tensor_parallel_on_the_same_two_ranks(two_ranks, key):
    assert two_ranks[key]["expert_module"] == "ExpertParallelExperts"
    assert_layout(two_ranks[key], stages=(0,))


@pytest.mark.distributed
def test_unsupported_layouts_fail_clearly_before_changing_the_model(two_ranks):
    got = two_ranks["unsupported"]
    assert "qk_norm='full'" in got["qk_norm_full"]["message"] and got["qk_norm_full"]["unchanged"]
    assert "ep=2 does not divide dp * tp = 1 (world 2 / pp=2)" in got["pp_ep_on_two_ranks"]["message"]
    assert got["pp_ep_on_two_ranks"]["unchanged"]


@pytest.mark.distributed
def test_vocab_parallel_cross_entropy(two_ranks):
    for case, err in two_ranks["parallel_ce"].items():
        rtol = BF16_RTOL if "bfloat16" in case else FP32_RTOL
        assert err["loss"] <= rtol * err["loss_scale"] and err["grad"] <= rtol * err["grad_scale"], (case, err)
        assert err["logits"] <= rtol * err["logits_scale"], (case, err)


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["ep2_dp2", "ep2_dp2_all_to_all"])
def test_expert_parallel_times_data_parallel_on_four_ranks(four_ranks, key):
    assert_layout(four_ranks[key], stages=(0, 2) if key == "ep2_dp2" else (2,))


@pytest.mark.distributed
def test_expert_parallel_times_tensor_parallel_on_four_ranks(four_ranks):
    assert_layout(four_ranks["ep2_tp2"])  # the tensor pair splits the MoE tokens and forms one expert group


@pytest.mark.distributed
def test_tensor_parallel_times_data_parallel_on_four_ranks(four_ranks):
    assert_layout(four_ranks["tp2_dp2"])


@pytest.mark.distributed
def test_pipeline_times_data_parallel_on_four_ranks(four_ranks):
    assert_pipeline(four_ranks["pp2_dp2"])


@pytest.mark.distributed
def test_pipeline_times_tensor_parallel_with_tied_embeddings_on_four_ranks(four_ranks):
    assert_pipeline(four_ranks["pp2_tp2_tied"])


@pytest.mark.distributed
def test_pipeline_times_expert_parallel_on_four_ranks(four_ranks):
    assert_pipeline(four_ranks["pp2_ep2"])


if __name__ == "__main__":
    run_scenario(sys.argv[1], Path(sys.argv[2]))
