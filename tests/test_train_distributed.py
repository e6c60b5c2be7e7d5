"""End-to-end training on CPU with gloo: ZeRO 0-3 on 2 ranks, 2-rank vs 1-rank parity, exact resume after SIGKILL,
non-finite losses and corrupt checkpoints.

Process start-up dominates, so each launch runs several trainings in turn: this file doubles as the worker
(`python tests/test_train_distributed.py <scenario> <workdir>`, under torchrun for 2 ranks). A session fixture
launches the 2-rank "main" scenario and the 1-rank "single" scenario side by side.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeformer.parallel.groups import free_port
from tests.numerics import BF16_RTOL, FP32_RTOL, assert_adamw_weights_agree, assert_curves_agree, trained_loss_bound
from tests.workers import REPO, worker_env

TINY_MODEL = {
    "model.dim": 64,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.ffn_dim": 128,
    "model.vocab_size": 258,
    "model.moe.num_experts": 4,
    "model.moe.top_k": 2,
    "model.moe.ffn_dim": 64,
}
SEQ, MICRO = 32, 2
ZERO_STAGES = {0: "none", 1: "full", 2: "every_k", 3: "moe"}  # stage -> activation checkpointing used with it
PARITY_STEPS, RESUME_STEPS, CHECKPOINT_EVERY = 6, 12, 4
BETAS = (0.9, 0.95)  # OptimConfig's defaults
EXTENDED = {"checkpoint.resume": "auto", "checkpoint.resume_allow": ["train.steps"]}  # a cut run resumed for longer


def run_config(work: Path, name: str, **overrides):
    from moeformer.training.config import load_config

    base = {
        "out_dir": str(work / name),
        "data.dir": str(work / "data"),
        "data.seq_len": SEQ,
        "data.micro_batch_size": MICRO,
        "train.dtype": "fp32",
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.progress_bar": False,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "checkpoint.export": "none",
        **TINY_MODEL,
    }
    return load_config(None, {**base, **overrides})


def train(config, slow_after: int | None = None) -> dict:
    """Train in this process; `slow_after` sleeps after each later step (so a test can kill the run mid-way)."""
    from moeformer.training.trainer import Trainer

    trainer = Trainer(config)
    if slow_after is not None:
        step = trainer.train_step

        def slow_step(batches):
            record = step(batches)
            if trainer.step >= slow_after:
                time.sleep(0.5)
            return record

        trainer.train_step = slow_step
    summary = trainer.train()
    return {
        "losses": summary["losses"],
        "val_loss": summary["val_loss"],
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
    }


def scenario_main(work: Path) -> dict:
    """2 ranks: ZeRO 0-3 on one fixed batch, ZeRO-2 parity run, the uninterrupted reference of the resume test, the
    expert- and pipeline-parallel runs."""
    from torch._dynamo.utils import counters

    out = {"zero": {}}
    for stage, ckpt in ZERO_STAGES.items():
        config = run_config(
            work,
            f"zero{stage}",
            **{
                "data.dir": str(work / "fixed"),
                "data.shuffle": False,
                "train.steps": 6,
                "train.zero_stage": stage,
                "train.activation_checkpointing": ckpt,
                "optim.schedule": "constant",
                "checkpoint.export": "native",
            },
        )
        out["zero"][stage] = train(config)
    out["bf16"] = train(
        run_config(
            work,
            "bf16",
            **{
                "data.dir": str(work / "fixed"),
                "data.shuffle": False,
                "train.steps": 6,
                "train.zero_stage": 2,
                "train.dtype": "bf16",
                "train.grad_accum": 2,
                "optim.schedule": "constant",
            },
        )
    )
    # before the expert and pipeline runs, whose DeepSpeed groups outlive their engines
    out["overflow"] = {f"zero{stage}_{dtype}": overflow_run(work, stage, dtype) for stage, dtype in OVERFLOW_RUNS}
    out["parity"] = train(run_config(work, "parity2", **{"train.steps": PARITY_STEPS, "train.zero_stage": 2}))
    out["reference"] = train(run_config(work, "reference", **resume_overrides()))
    ep = {"parallel.ep": 2, "train.zero_stage": 2, "checkpoint.every": 3, "optim.schedule": "constant"}
    out["ep_full"] = train(run_config(work, "ep_full", **ep, **{"train.steps": 6}))
    train(run_config(work, "ep_cut", **ep, **{"train.steps": 3}))
    out["ep_resumed"] = train(run_config(work, "ep_cut", **ep, **{"train.steps": 6, **EXTENDED}))
    pp = {**pipeline_overrides(), "parallel.pp": 2, "train.activation_checkpointing": "full"}
    out["pp_full"] = train(run_config(work, "pp_full", **pp))
    train(run_config(work, "pp_cut", **{**pp, "train.steps": 3}))
    out["pp_resumed"] = train(run_config(work, "pp_cut", **pp, **EXTENDED))
    counters.clear()
    compiled = {
        "train.compile": True,
        "train.activation_checkpointing": "none",
        "checkpoint.enabled": False,
        "checkpoint.every": 0,
    }
    out["pp_compiled"] = train(run_config(work, "pp_compiled", **{**pp, **compiled}))
    out["pp_compiled"]["graphs"] = counters["stats"]["unique_graphs"]
    return out


OVERFLOW_RUNS = ((0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16"))


def overflow_run(work: Path, stage: int, dtype: str) -> dict:
    """2 steps with a checkpoint after each; the backward of step 1 overflows (inf gradients, finite loss). Whether
    step 1 left weights and optimizer state exactly as they were, what was logged and saved, and the error when the
    last rank's weights turn NaN before another save."""
    import torch.distributed as dist

    from moeformer.training.metrics import read_metrics
    from moeformer.training.run_checkpoints import verify
    from moeformer.training.trainer import Trainer

    class Overflow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    name = f"overflow_zero{stage}_{dtype}"
    trainer = Trainer(
        run_config(
            work, name, **{"train.steps": 2, "train.zero_stage": stage, "train.dtype": dtype, "checkpoint.every": 1}
        )
    )
    forward, step, states = trainer.forward, trainer.train_step, []
    trainer.forward = lambda batch: (lambda o, ce, loss: (o, ce, Overflow.apply(loss) if trainer.step == 0 else loss))(
        *forward(batch)
    )
    trainer.train_step = lambda batches: (states.append(training_state(trainer)), step(batches))[1]
    summary = trainer.train()
    states.append(training_state(trainer))
    with torch.no_grad():
        if dist.get_rank() == dist.get_world_size() - 1:
            p = next(trainer.engine.module.parameters())
            getattr(p, "ds_tensor", p).view(-1)[0] = float("nan")
    try:
        trainer.save_checkpoint()
        refused = None
    except Exception as e:
        refused = f"{type(e).__name__}: {e}"
    dist.barrier()
    checkpoints = sorted((work / name / "checkpoints").glob("step_*"))
    return {
        "unchanged": same_state(states[0], states[1]),
        "moved": not same_state(states[1], states[2]),
        "records": [r for r in read_metrics(work / name) if r["split"] == "train"] if dist.get_rank() == 0 else [],
        "total": summary["nonfinite_total"],
        "losses": summary["losses"],
        "refused": refused,
        "checkpoints": {p.name: verify(p)["step"] for p in checkpoints},
        "latest": (work / name / "checkpoints" / "latest").read_text(),
    }


def scenario_overflow_gpu(work: Path) -> dict:
    """1 GPU: the overflow skip with CUDA kernels (fused AdamW without a DeepSpeed wrapper, bf16 ZeRO wrappers)."""
    return {
        f"zero{stage}_{dtype}": overflow_run(work, stage, dtype)
        for stage, dtype in ((0, "fp32"), (2, "bf16"), (3, "bf16"))
    }


def cuda_graph_runs(work: Path, name: str, **layout) -> dict:
    """One bf16 run (compiled blocks, ZeRO-1, two micro-batches per step, an evaluation mid-way) in `layout` with
    and without CUDA graphs (train.compile_mode=reduce-overhead); how many compiled graphs inductor ran without them."""
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_trees import get_manager

    from moeformer.training.metrics import read_metrics

    out = {}
    for mode in ("default", "reduce-overhead"):  # the default first: no CUDA-graph tree exists before the second
        counters.clear()
        overrides = {"train.dtype": "bf16", "train.compile": True, "train.compile_mode": mode, "train.zero_stage": 1}
        run = {"train.grad_accum": 2, "train.steps": 8, "train.eval_every": 4}
        out[mode] = train(run_config(work, f"{name}_{mode}", **overrides, **run, **layout))
        records = [r for r in read_metrics(work / f"{name}_{mode}") if r["split"] == "train"]
        manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        out[mode].update(
            grad_norms=[r["grad_norm"] for r in records],
            skipped=[r["skipped"] for r in records],
            cudagraph_skips=counters["inductor"]["cudagraph_skips"],
            cudagraph_functions=0 if manager is None else len(manager.ids_to_funcs),
        )
    return out


def scenario_cuda_graphs(work: Path) -> dict:
    """1 GPU."""
    return cuda_graph_runs(work, "graphs")


def scenario_cuda_graphs_tp2(work: Path) -> dict:
    """2 GPUs, tensor parallel: the blocks' all-reduces are captured in the graphs."""
    return cuda_graph_runs(work, "graphs_tp2", **{"parallel.tp": 2})


def scenario_cuda_graphs_ep2(work: Path) -> dict:
    """2 GPUs, expert parallel: the token dispatcher's collectives run between and inside the graphs."""
    return cuda_graph_runs(work, "graphs_ep2", **{"parallel.ep": 2})


def training_state(trainer) -> list:
    """Copies of this rank's weights (ZeRO-3: its partitions), the optimizer's (master) weights and its state."""
    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in trainer.engine.module.parameters()]
    optimizer = trainer.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [
        (key, value.clone() if torch.is_tensor(value) else value)
        for p in params
        for key, value in sorted(optimizer.state.get(p, {}).items())
    ]
    return weights + [p.detach().clone() for p in params] + state


def same_state(a: list, b: list) -> bool:
    def same(x, y):
        if isinstance(x, tuple):
            return x[0] == y[0] and same(x[1], y[1])
        return torch.equal(x, y) if torch.is_tensor(x) else x == y

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def scenario_pipeline_experts(work: Path) -> dict:
    """4 ranks: pp=2 x ep=2 (each stage's two ranks split its experts), a full run and one cut and resumed."""
    pp_ep = {**pipeline_overrides(), "parallel.pp": 2, "parallel.ep": 2}
    out = {"full": train(run_config(work, "pp_ep_full", **pp_ep))}
    train(run_config(work, "pp_ep_cut", **{**pp_ep, "train.steps": 3}))
    out["resumed"] = train(run_config(work, "pp_ep_cut", **pp_ep, **EXTENDED))
    return out


def pipeline_overrides() -> dict:
    """pp=2 on 2 ranks (dp 1) vs one process: the same global batch and data order."""
    return {
        "train.steps": 6,
        "train.zero_stage": 1,
        "train.grad_accum": 2,
        "checkpoint.every": 3,
        "train.eval_every": 3,
        "checkpoint.export": "native",
        "optim.schedule": "constant",
    }


def resume_overrides() -> dict:
    return {
        "train.steps": RESUME_STEPS,
        "train.zero_stage": 1,
        "checkpoint.every": CHECKPOINT_EVERY,
        "checkpoint.keep_last": 2,
        "optim.schedule": "cosine",
        "train.eval_every": 5,
    }


def scenario_killed(work: Path) -> dict:
    return train(run_config(work, "killed", **resume_overrides()), slow_after=CHECKPOINT_EVERY)


def scenario_resumed(work: Path) -> dict:
    """The killed run resumed to its end, then run again (a finished run resumed: its final checkpoint stays)."""
    out = train(run_config(work, "killed", **resume_overrides(), **{"checkpoint.resume": "auto"}))
    final = work / "killed" / "checkpoints" / f"step_{RESUME_STEPS:08d}"
    before = sorted((p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in final.iterdir())
    out["rerun"] = train(run_config(work, "killed", **resume_overrides(), **{"checkpoint.resume": "auto"}))
    out["rerun"]["final_checkpoint_untouched"] = before == sorted(
        (p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in final.iterdir()
    )
    return out


def scenario_single(work: Path) -> dict:
    """1 rank: the parity run with the same global batch (grad_accum 2), non-finite handling, corrupt checkpoints."""
    from moeformer.errors import ConfigError
    from moeformer.training.run_checkpoints import CheckpointError
    from moeformer.training.trainer import NonFiniteLossError, Trainer

    out = {
        "parity": train(
            run_config(work, "parity1", **{"train.steps": PARITY_STEPS, "train.zero_stage": 2, "train.grad_accum": 2})
        ),
        "pp_reference": train(run_config(work, "pp_reference", **pipeline_overrides())),
        # pp=2 x ep=2 on 4 ranks has 2 data-parallel replicas: twice the micro-batches per step and per evaluation
        "pp_ep_reference": train(
            run_config(
                work, "pp_ep_reference", **{**pipeline_overrides(), "train.grad_accum": 4, "train.eval_batches": 2}
            )
        ),
    }

    # non-finite losses: steps 2-3 are poisoned and skipped (weights untouched), then training continues
    trainer = Trainer(run_config(work, "nonfinite", **{"train.steps": 5, "train.max_nonfinite": 3}))
    forward = trainer.forward

    def poisoned(batch):
        o, ce, loss = forward(batch)
        return o, ce, loss * float("nan") if trainer.step + 1 in (2, 3) else loss

    trainer.forward = poisoned
    before = {}
    step = trainer.train_step

    def watched(batches):
        before[trainer.step + 1] = [p.detach().clone() for p in trainer.engine.module.parameters()]
        return step(batches)

    trainer.train_step = watched
    summary = trainer.train()
    unchanged = all(torch.equal(a, b) for a, b in zip(before[2], before[4]))
    out["nonfinite"] = {"losses": summary["losses"], "total": summary["nonfinite_total"], "unchanged": unchanged}

    # grad_accum 2 and only the second micro-batch of step 2 poisoned (+NaN: its masked backward gives finite zero
    # gradients, so DeepSpeed sees nothing wrong): the whole step is skipped (weights and AdamW moments untouched,
    # the finite micro-batch's gradients discarded) and the lr schedule keeps its pace
    trainer = Trainer(
        run_config(
            work, "nonfinite_accum", **{"train.steps": PARITY_STEPS, "train.zero_stage": 2, "train.grad_accum": 2}
        )
    )
    forward_calls, forward3 = itertools.count(1), trainer.forward
    trainer.forward = lambda batch: (
        lambda o, ce, loss: (o, ce, loss + float("nan") if next(forward_calls) == 4 else loss)
    )(*forward3(batch))
    snapshots = {}
    step3 = trainer.train_step

    def snapshot(batches):
        snapshots[trainer.step + 1] = (
            [p.detach().clone() for p in trainer.engine.module.parameters()],
            copy.deepcopy(trainer.optimizer.state_dict()["state"]),
        )
        return step3(batches)

    trainer.train_step = snapshot
    summary = trainer.train()
    (params2, moments2), (params3, moments3) = snapshots[2], snapshots[3]
    out["nonfinite_accum"] = {
        "losses": summary["losses"],
        "total": summary["nonfinite_total"],
        "params_unchanged": all(torch.equal(a, b) for a, b in zip(params2, params3)),
        "moments_unchanged": moments2.keys() == moments3.keys()
        and all(torch.equal(moments2[i][k], moments3[i][k]) for i in moments2 for k in moments2[i]),
        "moments_compared": sum(len(m) for m in moments2.values()),
        "lrs": [
            r["lr"]
            for r in map(json.loads, (work / "nonfinite_accum" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ],
        "reference_lrs": [
            r["lr"]
            for r in map(json.loads, (work / "parity1" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ],
    }

    trainer = Trainer(run_config(work, "nonfinite_stop", **{"train.steps": 5, "train.max_nonfinite": 2}))
    forward2 = trainer.forward
    trainer.forward = lambda batch: (lambda o, ce, loss: (o, ce, loss * float("inf")))(*forward2(batch))
    try:
        trainer.train()
        out["nonfinite_stop"] = None
    except NonFiniteLossError as e:
        out["nonfinite_stop"] = str(e)

    # a fresh start in a run directory that holds checkpoints is refused (it would mix two runs)
    try:
        Trainer(run_config(work, "parity1", **{"train.steps": PARITY_STEPS}))
        out["existing"] = None
    except FileExistsError as e:
        out["existing"] = str(e)

    # CUDA graphs asked for on this CPU: one clear error before any data is read
    try:
        Trainer(run_config(work, "graphs", **{"train.compile": True, "train.compile_mode": "reduce-overhead"}))
        out["cuda_graphs_on_cpu"] = None
    except ConfigError as e:
        out["cuda_graphs_on_cpu"] = str(e)

    # a checkpoint whose bytes changed after saving is refused with a clear error
    saved = work / "parity1" / "checkpoints" / f"step_{PARITY_STEPS:08d}"
    corrupt = work / "corrupt" / "step_00000006"
    shutil.copytree(saved, corrupt)
    target = corrupt / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    try:
        Trainer(
            run_config(
                work,
                "parity1b",
                **{
                    "train.steps": PARITY_STEPS,
                    "train.zero_stage": 2,
                    "train.grad_accum": 2,
                    "checkpoint.resume": str(corrupt),
                },
            )
        )
        out["corrupt"] = None
    except CheckpointError as e:
        out["corrupt"] = str(e)
    out["changed_config"] = changed_config_resumes(work)
    return out


def changed_config_resumes(work: Path) -> dict:
    """Resumes of a copy of the finished 6-step parity run (1 rank) with a changed configuration: refused unless the
    changes are named; a named lr change (and two more steps) takes effect."""
    from moeformer.training.metrics import read_metrics
    from moeformer.training.schedule import lr_multiplier
    from moeformer.training.trainer import Trainer

    shutil.copytree(work / "parity1", work / "changed")
    parity = {"train.steps": PARITY_STEPS, "train.zero_stage": 2, "train.grad_accum": 2, "checkpoint.resume": "auto"}
    out = {}
    for case, overrides in {
        "refused": {"data.seq_len": 2 * SEQ, "data.micro_batch_size": 1, "train.seed": 1},
        "dataset": {"data.dir": str(work / "fixed")},
        "unknown": {"checkpoint.resume_allow": ["optim.lrr"]},
    }.items():
        try:
            Trainer(run_config(work, "changed", **{**parity, **overrides}))
            out[case] = None
        except Exception as e:
            out[case] = f"{type(e).__name__}: {e}"
    lr = 1e-3
    allowed = {
        **parity,
        "optim.lr": lr,
        "train.steps": PARITY_STEPS + 2,
        "train.eval_every": 3,  # (free to change)
        "checkpoint.resume_allow": ["optim.lr", "train.steps"],
    }
    try:
        trainer = Trainer(run_config(work, "changed", **allowed))
    except Exception as e:
        return {**out, "allowed": f"{type(e).__name__}: {e}"}
    out["group_lrs"] = [group["lr"] for group in trainer.optimizer.param_groups]
    out["summary_steps"] = sorted(trainer.train()["losses"])
    config = run_config(work, "changed", **allowed)
    out["expected_lrs"] = [
        lr * lr_multiplier(step - 1, PARITY_STEPS + 2, config.optim) for step in (PARITY_STEPS + 1, PARITY_STEPS + 2)
    ]
    records = read_metrics(work / "changed")
    out["logged_lrs"] = [r["lr"] for r in records if r["split"] == "train" and r["step"] > PARITY_STEPS]
    out["resume_records"] = [r for r in records if r["split"] == "resume"]
    out["history"] = [json.loads(line) for line in (work / "changed" / "config_history.jsonl").read_text().splitlines()]
    return out


# ---------------------------------------------------------------------------------------------------- launching


def _env() -> dict:
    return worker_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def launch(scenario: str, work: Path, nproc: int) -> subprocess.Popen:
    log = open(work / f"{scenario}.log", "w")
    if nproc == 1:
        cmd = [sys.executable, __file__, scenario, str(work)]
    else:
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
            str(work),
        ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants (torchrun may start its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, scenario: str, work: Path, timeout: float = 240) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise
    log = (work / f"{scenario}.log").read_text()
    assert proc.returncode == 0, f"{scenario} failed:\n{log[-6000:]}"
    return json.loads((work / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A small stdlib corpus, plus a copy whose train split is exactly one global batch of 2 ranks."""
    from moeformer.training.data import prepare_corpus

    work = tmp_path_factory.mktemp("train")
    prepare_corpus(work / "data", max_files=60, val_fraction=0.2)
    shutil.copytree(work / "data", work / "fixed")
    tokens = (work / "fixed" / "train.bin").read_bytes()
    (work / "fixed" / "train.bin").write_bytes(tokens[: (2 * MICRO * SEQ + 1) * 2])  # uint16 tokens
    return work


@pytest.fixture(scope="module")
def results(work) -> dict:
    """Runs every scenario: main (2 ranks) beside single (1 rank), then the killed and resumed 2-rank runs."""
    main, single = launch("main", work, 2), launch("single", work, 1)
    killed = launch("killed", work, 2)
    marker = work / "killed" / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, (
        "the run to kill ended before its first checkpoint:\n" + (work / "killed.log").read_text()[-4000:]
    )
    kill_tree(killed.pid)
    killed.wait()
    out = {"main": finish(main, "main", work), "single": finish(single, "single", work)}
    out["resumed"] = finish(launch("resumed", work, 2), "resumed", work)
    out["pipeline_experts"] = finish(launch("pipeline_experts", work, 4), "pipeline_experts", work)
    out["killed_returncode"] = killed.returncode
    return out


def _curve(run: dict) -> list[float]:
    return [loss for _, loss in sorted((int(k), v) for k, v in run["losses"].items())]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", sorted(ZERO_STAGES))
def test_zero_stage_trains_on_fixed_batch(results, work, stage):
    losses = _curve(results["main"]["zero"][str(stage)])
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5
    assert_curves_agree(losses, _curve(results["main"]["zero"]["0"]))  # same batch and init: only summation order
    assert (work / f"zero{stage}" / "model" / "model.safetensors").is_file()  # exported (ZeRO-3: gathered)


@pytest.mark.distributed
def test_bf16_with_grad_accumulation_trains(results):
    losses = _curve(results["main"]["bf16"])
    fp32 = _curve(results["main"]["zero"]["2"])
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert abs(losses[0] - fp32[0]) <= BF16_RTOL * fp32[0]  # same batch and init: bf16 rounding only


@pytest.mark.distributed
def test_exported_zero3_model_matches_zero0(results, work):  # results: the runs that write the exports
    """ZeRO-3's export (its partitions gathered) holds the weights it trained: the exported model's val loss is the
    run's own, and its weights are ZeRO-0's within what AdamW makes of summation-order noise (tests/numerics.py)."""
    from moeformer.models.model import from_pretrained

    for stage in ("0", "3"):
        want = results["main"]["zero"][stage]["val_loss"]
        assert abs(exported_val_loss(work, f"zero{stage}") - want) <= FP32_RTOL * want, stage
    zero3, zero0 = (from_pretrained(work / name / "model").state_dict() for name in ("zero3", "zero0"))
    assert_adamw_weights_agree(zero3, zero0, logged_lrs(work / "zero0"), BETAS)


def exported_val_loss(work: Path, name: str) -> float:
    """The evaluation of the run `name` (the first val batch of each of 2 ranks) redone with its exported model."""
    from moeformer.models.model import from_pretrained
    from moeformer.training.data import ShardedBatches, TokenDataset

    model = from_pretrained(work / name / "model").eval()
    val = TokenDataset.from_dir(work / "fixed", "val", SEQ)
    losses = []
    for rank in range(2):
        batch = next(iter(ShardedBatches(val, MICRO, rank, 2, shuffle=False, loop=False)))
        with torch.no_grad():
            out = model(
                batch["input_ids"],
                targets=batch["targets"],
                position_ids=batch["position_ids"],
                document_ids=batch["document_ids"],
                return_logits=False,
            )
        losses.append(out.ce_loss.item())
    return sum(losses) / len(losses)


def logged_lrs(run: Path) -> list[float]:
    from moeformer.training.metrics import read_metrics

    return [r["lr"] for r in read_metrics(run) if r["split"] == "train"]


@pytest.mark.distributed
def test_generate_script_generates_from_export(results, work):  # results: the runs that write the exports
    sys.path.insert(0, str(REPO / "scripts"))
    import generate

    texts = generate.main(
        [
            "--model",
            str(work / "zero0" / "model"),
            "--prompt",
            "import ",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "20",
        ]
    )
    assert len(texts) == 2 and all(t.startswith("import ") and len(t) > len("import ") for t in texts)


@pytest.mark.distributed
def test_zero2_two_ranks_match_one_rank_with_same_global_batch(results):
    two, one = _curve(results["main"]["parity"]), _curve(results["single"]["parity"])
    assert len(two) == len(one) == PARITY_STEPS
    assert_curves_agree(two, one)
    assert two[-1] < two[0]


@pytest.mark.distributed
def test_resume_after_sigkill_reproduces_uninterrupted_losses_exactly(results, work):
    assert results["killed_returncode"] != 0
    resumed, reference = results["resumed"], results["main"]["reference"]
    start = int(Path(resumed["resumed_from"]).name.split("_")[1])
    assert start >= CHECKPOINT_EVERY and start < RESUME_STEPS
    expected = {k: v for k, v in reference["losses"].items() if int(k) > start}
    assert resumed["losses"] == expected and len(expected) == RESUME_STEPS - start
    assert resumed["val_loss"] == reference["val_loss"]
    kept = sorted(p.name for p in (work / "killed" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{RESUME_STEPS - CHECKPOINT_EVERY:08d}", f"step_{RESUME_STEPS:08d}"]  # keep_last 2
    records = [json.loads(line) for line in (work / "killed" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    for key in (
        "loss",
        "ce_loss",
        "aux_loss",
        "load_balance",
        "z_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "peak_mem_gib",
        "expert_load",
        "dropped_frac",
    ):
        assert key in train_records[-1], key
    assert len(train_records[-1]["expert_load"]) == 2 and abs(sum(train_records[-1]["expert_load"][0]) - 1) < 1e-9
    assert any(r["split"] == "val" for r in records)


@pytest.mark.distributed
def test_expert_parallel_run_resumes_exactly(results):
    """ep=2: the expert shards are saved beside DeepSpeed's checkpoint, so a resumed run continues exactly."""
    full, resumed = results["main"]["ep_full"], results["main"]["ep_resumed"]
    assert resumed["resumed_from"] is not None and resumed["resumed_from"].endswith("step_00000003")
    assert {k: v for k, v in full["losses"].items() if int(k) > 3} == resumed["losses"]


def train_records(run_dir: Path) -> list[dict]:
    from moeformer.training.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


LOAD_KEYS = ("expert_load", "expert_tokens_max", "expert_tokens_mean", "experts_without_tokens", "dropped_tokens")


def assert_logs_the_load_of_one_process(work: Path, names: tuple[str, str], blocks: int) -> None:
    """Every step of the parallel run logs the expert load of the whole step (all slots, none dropped: tiny-moe is
    dropless), and at step 1 (the same weights and data) the first `blocks` MoE blocks' counts equal the
    single-process run's exactly (later blocks may route a token differently after rounding-level differences)."""
    parallel, single = (train_records(work / name) for name in names)
    slots = single[0]["tokens"] * TINY_MODEL["model.moe.top_k"]
    experts, layers = TINY_MODEL["model.moe.num_experts"], TINY_MODEL["model.n_layers"]
    assert len(parallel) == len(single)
    for record in parallel:
        assert record["expert_tokens_mean"] == [slots / experts] * layers and record["dropped_tokens"] == [0] * layers
    for key in LOAD_KEYS:
        assert parallel[0][key][:blocks] == single[0][key][:blocks], key


@pytest.mark.distributed
def test_expert_parallel_load_counts_are_global(results, work):
    """ep=2: each rank routes its own tokens over all experts; the logged counts are those of the whole step."""
    records = train_records(work / "ep_full")
    slots = 2 * MICRO * SEQ * TINY_MODEL["model.moe.top_k"]  # 2 ranks' tokens, top-2
    experts, layers = TINY_MODEL["model.moe.num_experts"], TINY_MODEL["model.n_layers"]
    assert len(records) == 6
    for r in records:
        assert r["expert_tokens_mean"] == [slots / experts] * layers and r["dropped_tokens"] == [0] * layers
        assert all(isinstance(v, int) and slots / experts <= v <= slots for v in r["expert_tokens_max"])


def assert_tracks_one_process(work: Path, full: dict, reference: dict, resumed: dict, names: tuple[str, str]) -> None:
    """Losses, val loss and exported weights (run directories `names`: parallel, single) of a parallel run equal the
    single-process run's; the run cut at its step-3 checkpoint resumed bit for bit."""
    from safetensors.torch import load_file

    assert sorted(full["losses"]) == sorted(reference["losses"]) and len(full["losses"]) == 6
    assert_curves_agree(_curve(full), _curve(reference))
    assert abs(full["val_loss"] - reference["val_loss"]) <= trained_loss_bound(_curve(reference))
    exported, expected = (load_file(work / name / "model" / "model.safetensors") for name in names)
    assert_adamw_weights_agree(exported, expected, logged_lrs(work / names[1]), BETAS)
    assert resumed["resumed_from"].endswith("step_00000003")
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) > 3}
    assert resumed["val_loss"] == full["val_loss"]


@pytest.mark.distributed
def test_pipeline_training_matches_one_process_and_resumes_exactly(results, work):
    """The trainer on DeepSpeed's pipeline engine (pp=2, full activation checkpointing, ZeRO-1)."""
    assert_tracks_one_process(
        work,
        results["main"]["pp_full"],
        results["single"]["pp_reference"],
        results["main"]["pp_resumed"],
        ("pp_full", "pp_reference"),
    )
    assert_logs_the_load_of_one_process(work, ("pp_full", "pp_reference"), TINY_MODEL["model.n_layers"])


@pytest.mark.distributed
def test_compiled_pipeline_trains_as_one_process(results):
    """train.compile=true with pp=2 (no activation checkpointing: every block compiled): each stage compiles its
    part (two graphs or more: a block, the last stage's LM head) and the losses follow the single-process run's."""
    run = results["main"]["pp_compiled"]
    assert run["graphs"] >= 2
    assert_curves_agree(_curve(run), _curve(results["single"]["pp_reference"]))


@pytest.mark.distributed
def test_pipeline_with_expert_parallelism_matches_one_process_and_resumes_exactly(results, work):
    """pp=2 x ep=2 on 4 ranks: the experts' shards are saved beside the pipeline's layer files and found again."""
    run = results["pipeline_experts"]
    assert_tracks_one_process(
        work, run["full"], results["single"]["pp_ep_reference"], run["resumed"], ("pp_ep_full", "pp_ep_reference")
    )
    assert_logs_the_load_of_one_process(work, ("pp_ep_full", "pp_ep_reference"), 1)


def test_nonfinite_loss_skips_then_stops(results):
    nonfinite = results["single"]["nonfinite"]
    assert nonfinite["total"] == 2 and nonfinite["unchanged"]
    assert sorted(int(k) for k in nonfinite["losses"]) == [1, 4, 5]
    assert "NaN/inf in 2 steps in a row" in results["single"]["nonfinite_stop"]


@pytest.mark.distributed
def test_nonfinite_micro_batch_skips_the_whole_accumulated_step(results):
    got, reference = results["single"]["nonfinite_accum"], results["single"]["parity"]
    assert got["total"] == 1 and sorted(int(k) for k in got["losses"]) == [1, 3, 4, 5, 6]
    assert got["losses"]["1"] == reference["losses"]["1"]  # same run up to the poisoned micro-batch
    assert got["params_unchanged"] and got["moments_unchanged"] and got["moments_compared"] > 0
    assert got["lrs"] == got["reference_lrs"] and len(got["lrs"]) == PARITY_STEPS


@pytest.mark.distributed
def test_fresh_start_over_existing_checkpoints_is_refused(results):
    assert "already holds checkpoints; pass --resume auto" in results["single"]["existing"]


@pytest.mark.gpu
@pytest.mark.parametrize("scenario, gpus", [("cuda_graphs", 1), ("cuda_graphs_tp2", 2), ("cuda_graphs_ep2", 2)])
def test_cuda_graph_compile_mode_trains_as_the_default_mode_on_gpu(work, scenario, gpus):
    """train.compile_mode=reduce-overhead replays every compiled graph (blocks, LM head, their backward, the
    evaluation's) as CUDA graphs and trains as the default mode does: the same kernels, so step 1 (same weights,
    same batches) agrees to bf16 rounding, and the 8 steps' losses to a few units of it (the GPU's attention
    backward sums in no fixed order). A replay on stale inputs (the previous micro-batch's) would be far off. The
    processes then exit: a graph that captured a collective, left alive, makes leaving the process group hang."""
    if torch.cuda.device_count() < gpus:
        pytest.skip("needs a CUDA GPU" if gpus == 1 else f"needs {gpus} CUDA GPUs")
    got = finish(launch(scenario, work, gpus), scenario, work, timeout=600)
    plain, graphs = got["default"], got["reduce-overhead"]
    assert plain["cudagraph_functions"] == 0 and graphs["cudagraph_functions"] > 0, got
    assert graphs["cudagraph_skips"] == 0, got  # nothing fell back to launching kernel by kernel
    assert not any(plain["skipped"] + graphs["skipped"]), got
    steps = sorted(plain["losses"], key=int)
    assert sorted(graphs["losses"], key=int) == steps and len(steps) == 8, got
    assert graphs["losses"]["1"] == pytest.approx(plain["losses"]["1"], rel=BF16_RTOL)
    assert graphs["grad_norms"][0] == pytest.approx(plain["grad_norms"][0], rel=BF16_RTOL)
    for step in steps:
        assert graphs["losses"][step] == pytest.approx(plain["losses"][step], rel=4 * BF16_RTOL), (step, got)
    assert graphs["val_loss"] == pytest.approx(plain["val_loss"], rel=4 * BF16_RTOL), got


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_cuda_graph_compile_mode_is_refused_without_a_gpu(results):
    assert results["single"]["cuda_graphs_on_cpu"] == (
        "train.compile_mode=reduce-overhead replays CUDA graphs, which need a GPU (this run is on cpu); use "
        "train.compile_mode=default or max-autotune-no-cudagraphs"
    )


@pytest.mark.distributed
@pytest.mark.parametrize("run", [f"zero{stage}_{dtype}" for stage, dtype in OVERFLOW_RUNS])
def test_nonfinite_gradients_with_a_finite_loss_skip_the_step(results, run):
    """An overflow in backward under every ZeRO stage and dtype: the step is skipped (weights and optimizer state
    exactly as before), logged as skipped and counted; training goes on; checkpoints hold finite weights only."""
    got = results["main"]["overflow"][run]
    assert got["unchanged"] and got["moved"]
    first, second = got["records"]
    assert first["skipped"] and first["nonfinite"] == "gradients" and "grad_norm" not in first and "loss" not in first
    assert not second["skipped"] and math.isfinite(second["loss"]) and math.isfinite(second["grad_norm"])
    assert got["total"] == 1 and list(got["losses"]) == ["2"]
    assert got["checkpoints"] == {"step_00000001": 1, "step_00000002": 2}  # both verify
    # rank 1's weights turn NaN: no rank saves, the last good checkpoint stays the newest
    assert got["refused"].startswith(
        "NonFiniteStateError: not saving checkpoint step_00000002: the weights or "
        "optimizer state hold NaN/inf; the newest good checkpoint stays step_00000002"
    )
    assert got["latest"] == "step_00000002"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nonfinite_gradients_with_a_finite_loss_skip_the_step_on_gpu(work):
    for run, got in finish(launch("overflow_gpu", work, 1), "overflow_gpu", work).items():
        first = got["records"][0]
        assert got["unchanged"] and got["moved"] and got["total"] == 1, run
        assert first["skipped"] and first["nonfinite"] == "gradients" and "grad_norm" not in first, run
        assert "NonFiniteStateError: not saving checkpoint step_00000002" in got["refused"], run
        assert got["checkpoints"] == {"step_00000001": 1, "step_00000002": 2} and got["latest"] == "step_00000002"


@pytest.mark.distributed
def test_rerunning_a_finished_run_leaves_its_final_checkpoint_untouched(results):
    rerun, resumed = results["resumed"]["rerun"], results["resumed"]
    assert rerun["resumed_from"].endswith(f"step_{RESUME_STEPS:08d}") and rerun["losses"] == {}
    assert rerun["final_checkpoint_untouched"] and rerun["val_loss"] == resumed["val_loss"]


@pytest.mark.distributed
def test_resume_with_a_changed_configuration_is_refused_unless_named(results):
    got = results["single"]["changed_config"]
    assert got["refused"].startswith(
        "ResumeConfigError: the checkpoint was written by a run with a different "
        "configuration (data.micro_batch_size: 2 -> 1; data.seq_len: 32 -> 64; "
        "train.seed: 0 -> 1); resume with the original values, or name the changes as "
        "intended with --resume-allow data.micro_batch_size,data.seq_len,train.seed"
    )
    assert "data.dir: " in got["dataset"] and "data.train_tokens: " in got["dataset"]
    assert got["unknown"] == "ResumeConfigError: checkpoint.resume_allow names unknown keys: optim.lrr"
    # the named changes take effect: the new peak lr on its schedule over the new length, in the optimizer too
    assert got["summary_steps"] == [PARITY_STEPS + 1, PARITY_STEPS + 2]
    assert got["logged_lrs"] == pytest.approx(got["expected_lrs"], rel=1e-12)
    assert got["group_lrs"] == pytest.approx([got["expected_lrs"][0]] * len(got["group_lrs"]), rel=1e-12)
    changes = {"optim.lr": [3e-3, 1e-3], "train.steps": [PARITY_STEPS, PARITY_STEPS + 2]}
    assert [h["changes"] for h in got["history"]] == [{}, changes]  # every start of the run, and what it changed
    assert got["history"][1]["config"]["optim"]["lr"] == 1e-3 and got["history"][1]["step"] == PARITY_STEPS
    assert [(r["step"], r["changes"]) for r in got["resume_records"]] == [(PARITY_STEPS, changes)]


@pytest.mark.distributed
def test_corrupt_checkpoint_is_refused(results):
    assert "is corrupt" in results["single"]["corrupt"] and "mp_rank_00_model_states.pt" in results["single"]["corrupt"]


@pytest.mark.distributed
def test_allow_listed_unpickler_reads_every_file_deepspeed_wrote(results, work):  # results: the runs that save
    """The types DeepSpeed pickles for ZeRO 0-3, bf16, expert, pipeline and pipeline x expert parallelism are all on
    the allow-list that resuming unpickles with (anything else is refused)."""
    from moeformer.safe_files import load_pickle

    files = sorted(work.glob("*/checkpoints/step_*/*.pt"))
    assert {"zero0", "zero1", "zero2", "zero3", "bf16", "ep_cut", "pp_cut", "pp_ep_cut"} <= {f.parts[-4] for f in files}
    for file in files:
        assert isinstance(load_pickle(file, map_location="cpu"), dict), file


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    result = globals()[f"scenario_{scenario}"](workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        (workdir / f"{scenario}.json").write_text(json.dumps(result))
    from moeformer.parallel import shutdown_distributed

    shutdown_distributed()
