"""Fault injection: a 2-rank CPU training run (gloo, real DeepSpeed) is SIGKILLed at 20 seeded random points of
training, evaluation, checkpointing (inside DeepSpeed's save, before the COMPLETE marker, before publishing, before
`latest`, while pruning) and export, and resumed with `resume: auto` after each kill; once, the newest checkpoint is
also corrupted before a resume. Every step the killed and resumed run logs must reproduce the uninterrupted run's
loss, lr and gradient norm exactly, and the run must end with the same checkpoints and exported weights.

Start-up dominates (importing torch and DeepSpeed, torchrun), so one worker process
(`python tests/test_train_faults.py <workdir>`) imports everything once and forks the two ranks of each run segment.
A rank that reaches its kill point SIGKILLs itself; the worker then SIGKILLs the other rank, as torchrun would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from moeformer.parallel.groups import free_port
from tests.workers import worker_env

SEED, KILLS = 14, 20
STEPS, EVERY, EVAL_EVERY = 12, 3, 5
SEGMENT_TIMEOUT = 120  # seconds; a segment takes ~3 s


def fault_overrides() -> dict:
    return {
        "train.steps": STEPS,
        "train.zero_stage": 1,
        "checkpoint.every": EVERY,
        "checkpoint.keep_last": 2,
        "train.eval_every": EVAL_EVERY,
        "optim.schedule": "cosine",
        "checkpoint.export": "native",
    }


# ---------------------------------------------------------------------------------------------------- the ranks


class KillPoints:
    """Names each point a rank passes (`step:4`, `file:6`, `marker:6`, ...), appends it to a log, and SIGKILLs the
    process at the first point at or after `kill_at` in the uninterrupted run's order (`order`)."""

    def __init__(self, log: Path, order: list[str], kill_at: int | None) -> None:
        self.log, self.order, self.kill_at = log, {name: i for i, name in enumerate(order)}, kill_at
        self.saving = None  # the step of the checkpoint being saved
        self.files = 0

    def hit(self, name: str) -> None:
        with open(self.log, "a") as f:
            f.write(name + "\n")
        index = self.order.get(name)
        if self.kill_at is not None and index is not None and index >= self.kill_at:
            with open(self.log, "a") as f:
                f.write("killed\n")
            os.kill(os.getpid(), signal.SIGKILL)


def instrument(points: KillPoints) -> None:
    """Wrap the library's functions so that each passes its kill point (in this process only: a forked rank)."""
    import torch

    from moeformer.models import checkpoint as model_checkpoint
    from moeformer.training import run_checkpoints as checkpointing
    from moeformer.training import trainer as trainer_module
    from moeformer.training.run_checkpoints import CheckpointManager
    from moeformer.training.trainer import Trainer

    def before(owner, attr, name_of):  # (a point the library lacks is left out: the test checks the points seen)
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def wrapped(*args, **kwargs):
            points.hit(name_of(*args))
            return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)

    def after(owner, attr, name_of):
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            points.hit(name_of(*args))
            return out

        setattr(owner, attr, wrapped)

    save = CheckpointManager.save

    def saving(self, engine, step, *args, **kwargs):
        points.saving, points.files = step, 0
        points.hit(f"save:{step}")
        after(engine, "save_checkpoint", lambda *a: f"shards:{step}")  # DeepSpeed's files are written
        try:
            return save(self, engine, step, *args, **kwargs)
        finally:
            del engine.save_checkpoint
            points.saving = None

    torch_save = torch.save

    def writing(*args, **kwargs):  # the first file of a checkpoint is written, the others are not yet
        out = torch_save(*args, **kwargs)
        if points.saving is not None:
            points.files += 1
            if points.files == 1:
                points.hit(f"file:{points.saving}")
        return out

    CheckpointManager.save = saving
    torch.save = writing
    before(CheckpointManager, "_prune", lambda self, *a: f"prune:{points.saving}")
    before(checkpointing, "remove_dir", lambda path: f"remove:{path.name}")
    before(checkpointing, "publish", lambda staging, path: f"publish:{points.saving}")
    before(
        checkpointing,
        "write_atomic",
        lambda path, text: f"latest:{points.saving}" if path.name == "latest" else f"marker:{points.saving}",
    )
    after(Trainer, "train_step", lambda self, batches: f"step:{self.step + 1}")
    before(Trainer, "evaluate", lambda self: f"eval:{self.step}")
    before(trainer_module, "export_model", lambda *a: "export")
    after(model_checkpoint, "save_pretrained", lambda *a: "exported")


def run_rank(work: Path, name: str, resume: bool, points: KillPoints) -> None:
    """One rank of one run segment (in a forked process)."""
    from moeformer.parallel import shutdown_distributed
    from tests.test_train_distributed import run_config, train

    instrument(points)
    overrides = {**fault_overrides(), **({"checkpoint.resume": "auto"} if resume else {})}
    train(run_config(work, name, **overrides))
    if os.environ["RANK"] == "0":
        (work / "modules.txt").write_text("\n".join(sorted(sys.modules)))
    shutdown_distributed()


def run_segment(
    work: Path, name: str, resume: bool, order: list[str], kill_at: int | None, kill_ranks: list[int], log: Path
) -> dict:
    """Fork the two ranks of a segment; when one dies, kill the other. Returns how each rank ended."""

    port = free_port()
    ranks = {}
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
                )
                sys.stderr = sys.stdout = open(log.with_suffix(f".rank{rank}.out"), "w", buffering=1)
                points = KillPoints(
                    log.with_suffix(f".rank{rank}.points"), order, kill_at if rank in kill_ranks else None
                )
                run_rank(work, name, resume, points)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        ranks[pid] = rank
    ended, deadline = {}, time.time() + SEGMENT_TIMEOUT
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.time() > deadline:
                for other in ranks:
                    os.kill(other, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)
            continue
        rank = ranks.pop(pid)
        ended[rank] = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        if ended[rank] != "exit 0":
            for other in ranks:
                os.kill(other, signal.SIGKILL)
    return ended


def kill_plan(order: list[str], rank1_points: set[str], rng: random.Random) -> list[tuple[int, list[int]]]:
    """KILLS distinct points of the uninterrupted run, in order, each with the ranks that die there (rank 0 alone
    writes markers, publishes and prunes)."""
    return [
        (i, rng.choice([[0], [1], [0, 1]] if order[i] in rank1_points else [[0], [0, 1]]))
        for i in sorted(rng.sample(range(len(order)), KILLS))
    ]


def corrupt_newest(work: Path, name: str) -> str | None:
    """Flip a byte in the model file of the checkpoint a resume would pick, when another complete one exists."""
    from moeformer.training.run_checkpoints import CheckpointManager

    manager = CheckpointManager(work / name / "checkpoints")
    newest = manager.latest()
    if newest is None or len(manager.complete_checkpoints()) < 2:
        return None
    target = newest / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return newest.name


def scenario(work: Path) -> dict:
    """The uninterrupted run, then the killed-and-resumed chain, then a re-run of the finished run."""
    logs = work / "logs"
    logs.mkdir()
    started = time.time()
    assert run_segment(work, "reference", False, [], None, [], logs / "reference") == {0: "exit 0", 1: "exit 0"}
    order = (logs / "reference.rank0.points").read_text().split()
    preload((work / "modules.txt").read_text().split())
    plan = kill_plan(order, set((logs / "reference.rank1.points").read_text().split()), random.Random(SEED))
    segments = []
    corrupted = None
    for n, (kill_at, ranks) in enumerate(plan + [(None, [])]):
        if corrupted is None and n >= KILLS // 2:
            corrupted = corrupt_newest(work, "faulted")
        log = logs / f"segment{n:02d}"
        ended = run_segment(work, "faulted", n > 0, order, kill_at, ranks, log)
        segments.append(
            {
                "kill_at": order[kill_at] if kill_at is not None else None,
                "ranks": ranks,
                "ended": ended,
                "killed_at": [_killed_at(log, rank) for rank in ranks],
            }
        )
    final = work / "faulted" / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE"
    before = final.stat().st_mtime_ns
    rerun = run_segment(work, "faulted", True, order, order.index("export"), [0, 1], logs / "rerun")
    return {
        "order": order,
        "segments": segments,
        "corrupted": corrupted,
        "seconds": time.time() - started,
        "rerun": {
            "ended": rerun,
            "killed_at": _killed_at(logs / "rerun", 0),
            "final_checkpoint_rewritten": final.stat().st_mtime_ns != before,
        },
    }


def preload(modules: list[str]) -> None:
    """Import what a rank imported (torch._dynamo, parts of DeepSpeed: seconds), so that forked ranks start warm;
    the worker must stay single-threaded to fork safely."""
    import importlib
    import threading

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # a module that only imports inside its package's set-up
            pass
    assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1, "an import started a thread"


def _killed_at(log: Path, rank: int) -> str | None:
    """The point at which `rank` of the segment logged at `log` killed itself, if it did."""
    path = log.with_suffix(f".rank{rank}.points")
    points = path.read_text().split() if path.is_file() else []
    return points[-2] if points[-1:] == ["killed"] else None


# ---------------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> tuple[Path, dict]:
    from moeformer.training.data import prepare_corpus

    work = tmp_path_factory.mktemp("faults")
    prepare_corpus(work / "data", max_files=30, val_fraction=0.2)
    proc = subprocess.run(
        [sys.executable, __file__, str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        env=worker_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work, json.loads((work / "faults.json").read_text())


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_killed_and_resumed_run_reproduces_the_uninterrupted_run_exactly(faults):
    import torch
    from safetensors.torch import load_file

    from moeformer.training.run_checkpoints import verify

    work, got = faults
    kinds = {point.split(":")[0] for point in got["order"]}
    assert kinds == {
        "step",
        "eval",
        "save",
        "file",
        "shards",
        "marker",
        "publish",
        "latest",
        "prune",
        "remove",
        "export",
        "exported",
    }, kinds
    segments = got["segments"]
    assert len(segments) == KILLS + 1 and segments[-1]["ended"] == {"0": "exit 0", "1": "exit 0"}
    for segment in segments[:-1]:  # every planned kill happened: a rank died by SIGKILL at or after its point
        assert f"signal {signal.SIGKILL.value}" in segment["ended"].values(), segment
        assert any(segment["killed_at"]), segment
    phases = {point.split(":")[0] for s in segments for point in s["killed_at"] if point}
    assert phases & {"step", "eval"} and len(phases - {"step", "eval"}) >= 4, phases  # training and checkpointing

    reference, faulted = _records(work / "reference"), _records(work / "faulted")
    expected = {r["step"]: r for r in reference if r["split"] == "train"}
    train = [r for r in faulted if r["split"] == "train"]
    assert {r["step"] for r in train} == set(expected)  # every step was logged at least once
    for r in train:  # steps redone after a kill: logged again, identical
        assert (r["loss"], r["lr"], r["grad_norm"]) == tuple(
            expected[r["step"]][k] for k in ("loss", "lr", "grad_norm")
        ), r
    val = {r["step"]: r["loss"] for r in reference if r["split"] == "val"}
    assert all(val[r["step"]] == r["loss"] for r in faulted if r["split"] == "val")
    resumes = [r for r in faulted if r["split"] == "resume"]
    assert resumes and all(r["changes"] == {} for r in resumes)

    # the corrupted checkpoint was skipped with a warning naming it, and the run went on from the one before
    assert got["corrupted"] is not None
    logs = "".join(p.read_text() for p in (work / "logs").glob("segment*.rank0.out"))
    corrupted = work / "faulted" / "checkpoints" / got["corrupted"]
    assert f"resume auto skips a checkpoint that does not verify: checkpoint {corrupted} is corrupt" in logs

    # the same final checkpoints and model as the uninterrupted run; nothing left over
    for run in ("reference", "faulted"):
        names = sorted(p.name for p in (work / run / "checkpoints").iterdir() if not p.name.endswith(".py"))
        assert names == ["latest", f"step_{STEPS - EVERY:08d}", f"step_{STEPS:08d}"], (run, names)
        assert verify(work / run / "checkpoints" / f"step_{STEPS:08d}")["step"] == STEPS
    ours, theirs = (load_file(work / run / "model" / "model.safetensors") for run in ("faulted", "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # re-running the finished run (killed while it exports again) leaves its final checkpoint as it was
    assert got["rerun"]["killed_at"] == "export" and not got["rerun"]["final_checkpoint_rewritten"]
    assert verify(work / "faulted" / "checkpoints" / f"step_{STEPS:08d}")["step"] == STEPS


if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    (workdir / "faults.json").write_text(json.dumps(scenario(workdir)))
