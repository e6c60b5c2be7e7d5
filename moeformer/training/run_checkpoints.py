"""Resumable checkpoints: DeepSpeed engine state plus per-rank trainer state, made visible atomically.

Layout of `<out_dir>/checkpoints/`:
    step_00000100/            DeepSpeed's files (model, optimizer / ZeRO shards, lr scheduler)
        trainer_state_rank0.pt   step, data position, RNG states of python / numpy / torch, counters
        run.json                 what the run was (its configuration, its data), to compare with on resume
        COMPLETE                 written last by rank 0: the step and the size and CRC-32 of every file in it
    latest                    the newest complete tag (replaced atomically; DeepSpeed's loaders read it too)

A save goes to a hidden `.staging-step_...` directory: its files are fsynced, then COMPLETE is written, and only then
is it renamed into place; an earlier save of the same step is deleted only once the new one is in place (exchanged
atomically on Linux, else moved aside to `.replaced-...` first); deleted directories go through `.trash-...`. A
checkpoint is never written from NaN/inf weights or optimizer state, and pruning never deletes the checkpoint just
saved nor anything newer. `resolve("auto")` resumes from the newest checkpoint that verifies, warning about each
newer one it skips. Loading reads only files inside the checkpoint directory and unpickles them with an allow-list
(`moeformer.safe_files`): a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from moeformer.errors import CheckpointError, NonFiniteStateError, naming_file, write_error
from moeformer.models.checkpoint import exchange_dirs
from moeformer.parallel import ParallelGroups, save_expert_checkpoint, save_layout
from moeformer.safe_files import confined, fsync_dir, load_pickle, write_atomic

COMPLETE_FILE = "COMPLETE"
MARKER_FORMAT = 1
LATEST_FILE = "latest"
RUN_INFO_FILE = "run.json"
TAG_PREFIX = "step_"
STAGING_PREFIX = ".staging-"  # a save in progress (hidden: never taken for a checkpoint)
REPLACED_PREFIX = ".replaced-"  # an earlier save of a step, until its replacement is in place
TRASH_PREFIX = ".trash-"  # a directory being deleted


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory, deepest first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) as tensors and plain values (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints of one run under `root`; every rank calls `resolve`, `save` and `load` together
    (rank 0 alone verifies, renames and deletes, and tells the others)."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._verified: set[Path] = set()

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(
        self,
        engine,
        step: int,
        trainer_state: dict[str, Any],
        run_info: dict[str, Any] | None = None,
        groups: ParallelGroups | None = None,
    ) -> Path:
        """Save the engine, this rank's trainer state and `run_info` (rank 0's, as run.json) as `step_<step>`, mark
        it complete and latest, then prune. `groups`: those `moeformer.parallel.parallelize` returned for the model,
        if any (expert files and the shard layout are saved beside). Raises NonFiniteStateError, writing nothing,
        when the weights or optimizer state of any rank hold NaN/inf."""
        tag = tag_for(step)
        path, staging = self.root / tag, self.root / f"{STAGING_PREFIX}{tag}"
        bad = nonfinite_tensors(engine)
        if _any_rank(bool(bad)):
            latest = self.latest()
            where = f" (rank {self.rank}: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else ""
            raise NonFiniteStateError(
                f"not saving checkpoint {tag}: the weights or optimizer state hold NaN/inf"
                f"{where}; the newest good checkpoint stays {latest.name if latest else 'none'}"
            )
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():  # a leftover of an interrupted save of the same step
                shutil.rmtree(staging)
        _barrier()
        try:
            with checkpoint_files(engine, staging):
                engine.save_checkpoint(str(self.root), tag=staging.name, client_state={"step": step}, save_latest=False)
                if groups is not None:
                    save_parallel_extras(engine, groups, self.root, staging.name)
            state_file = staging / f"trainer_state_rank{self.rank}.pt"
            with naming_file(state_file), open(state_file, "wb") as f:
                torch.save({"step": step, **trainer_state, "rng": rng_state()}, f)
            if self.rank == 0 and run_info is not None:
                with naming_file(staging / RUN_INFO_FILE):
                    (staging / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=1))
        except (OSError, RuntimeError) as e:  # a full disk, a read-only or vanished directory, a quota
            raise write_error(staging, e) from e
        _barrier()
        if int(os.environ.get("LOCAL_RANK", self.rank)) == 0:  # one rank per node: the files written on that node
            fsync_tree(staging)
        _barrier()
        if self.rank == 0:
            files = {
                str(p.relative_to(staging)): {"size": p.stat().st_size, "crc32": file_crc32(p)}
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            write_atomic(
                staging / COMPLETE_FILE, json.dumps({"format": MARKER_FORMAT, "step": step, "files": files}, indent=1)
            )
            publish(staging, path)
            write_atomic(self.root / LATEST_FILE, tag)
            self._prune(path)
        _barrier()
        self._verified.add(path)
        return path

    def _prune(self, saved: Path) -> None:
        """Delete the complete checkpoints older than `saved` but the newest `keep_last - 1` of them, interrupted
        saves older than it and leftover staging / trash directories. `saved` and anything newer stay."""
        older = [p for p in self._step_dirs() if _step_of(p) < _step_of(saved)]
        complete = [p for p in older if (p / COMPLETE_FILE).is_file()]
        keep = set(complete[len(complete) - self.keep_last + 1 :])
        leftovers = [
            p for p in self.root.iterdir() if p.name.startswith((STAGING_PREFIX, REPLACED_PREFIX, TRASH_PREFIX))
        ]
        for path in [p for p in older if p not in keep] + leftovers:
            remove_dir(path)

    def recover(self) -> None:
        """Finish what a kill in the middle of `publish` left: a complete staging directory whose checkpoint is
        missing is moved into place, else the replaced checkpoint is moved back."""
        if self.rank == 0 and self.root.is_dir():
            for prefix in (STAGING_PREFIX, REPLACED_PREFIX):
                for p in sorted(self.root.glob(f"{prefix}{TAG_PREFIX}*")):
                    target = self.root / p.name[len(prefix) :]
                    if not target.exists() and (p / COMPLETE_FILE).is_file():
                        os.rename(p, target)
                        fsync_dir(self.root)
        _barrier()

    # ---- finding ---------------------------------------------------------------------------------------------
    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _step_of(p) >= 0]
        return sorted(dirs, key=_step_of)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories with a COMPLETE marker, oldest first."""
        return [p for p in self._step_dirs() if (p / COMPLETE_FILE).is_file()]

    def latest(self) -> Path | None:
        """The checkpoint named by `latest` when it is complete, else the newest complete one, else None."""
        candidates = self._candidates()
        return candidates[0] if candidates else None

    def _candidates(self) -> list[Path]:
        """Complete checkpoints in the order `resume auto` tries them: the one named by `latest`, then newest first."""
        ordered = self.complete_checkpoints()[::-1]
        marker = self.root / LATEST_FILE
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if path in ordered:  # a step directory of this run, never elsewhere
                ordered.remove(path)
                ordered.insert(0, path)
        return ordered

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from, verified: None (a fresh start), "auto" (the first of this run's complete
        checkpoints that verifies, newest first, with a warning for each one skipped; None when there is none) or a
        checkpoint directory. Recovers an interrupted save first; "auto" also finishes an interrupted pruning."""
        self.recover()
        if resume is None:
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint directory {path} does not exist")
            self._verify(path)
            return path
        chosen, skipped = None, []
        if self.rank == 0:
            for path in self._candidates():
                try:
                    verify(path)
                except CheckpointError as e:
                    warnings.warn(f"resume auto skips a checkpoint that does not verify: {e}", stacklevel=2)
                    skipped.append(str(e))
                    continue
                chosen = path.name
                break
            if chosen is not None:  # finish the pruning a kill may have cut short
                self._prune(self.root / chosen)
        chosen, skipped = _from_rank0((chosen, skipped))
        if chosen is None and skipped:
            raise CheckpointError(f"no checkpoint in {self.root} verifies: " + "; ".join(skipped))
        if chosen is None:
            return None
        path = self.root / chosen
        self._verified.add(path)
        return path

    def run_info(self, path: Path) -> dict[str, Any] | None:
        """The run.json a checkpoint was saved with (None for a checkpoint that has none)."""
        file = path / RUN_INFO_FILE
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint {path}: unreadable {RUN_INFO_FILE}: {e}") from e

    def _verify(self, path: Path) -> None:
        """`verify(path)` on rank 0, its verdict on every rank."""
        error = None
        if self.rank == 0:
            try:
                verify(path)
            except CheckpointError as e:
                error = str(e)
        error = _from_rank0(error)
        if error is not None:
            raise CheckpointError(error)
        self._verified.add(path)

    # ---- loading ---------------------------------------------------------------------------------------------
    def load(self, engine, path: Path) -> dict[str, Any]:
        """Load the engine state and return this rank's trainer state (RNG states already restored)."""
        if path not in self._verified:
            self._verify(path)
        try:
            with checkpoint_files(engine, path):
                load_path, client_state = engine.load_checkpoint(
                    str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        except CheckpointError:
            raise
        except Exception as e:  # DeepSpeed raises whatever torch.load or its own asserts raise on bad files
            raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {path} (files missing?)")
        state_file = path / f"trainer_state_rank{self.rank}.pt"
        if not state_file.is_file():  # a different world size: the data position is global, rank 0 holds it too
            state_file = path / "trainer_state_rank0.pt"
        state = load_pickle(confined(path, state_file.name))
        if not isinstance(state, dict) or not {"step", "rng"} <= state.keys():
            raise CheckpointError(f"{state_file} is not a trainer state (no step and RNG states)")
        if state["step"] != client_state.get("step"):
            raise CheckpointError(
                f"{path}: trainer state is for step {state['step']}, engine state for step {client_state.get('step')}"
            )
        set_rng_state(state["rng"])
        return state


def publish(staging: Path, path: Path) -> None:
    """Rename the complete checkpoint `staging` to `path`. An existing `path` (an earlier save of the same step) is
    deleted only once the new one is in place: exchanged with it atomically where the system can (Linux), else moved
    aside first, `CheckpointManager.recover` finishing the job after a kill between the two renames."""
    if path.exists() and exchange_dirs(staging, path):
        fsync_dir(path.parent)
        remove_dir(staging)  # now the earlier save
        return
    replaced = path.with_name(f"{REPLACED_PREFIX}{path.name}")
    if path.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(path, replaced)
    os.rename(staging, path)
    fsync_dir(path.parent)
    if replaced.exists():
        remove_dir(replaced)


def remove_dir(path: Path) -> None:
    """Delete directory `path`: renamed into the trash first, so a kill half-way never leaves a checkpoint with
    files missing."""
    trash = path if path.name.startswith(TRASH_PREFIX) else path.with_name(f"{TRASH_PREFIX}{path.name}")
    if trash != path:
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(path, trash)
        fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def nonfinite_tensors(engine) -> list[str]:
    """Names of this rank's weights (ZeRO-3: its partitions) and optimizer tensors (master weights, moments) that
    hold NaN or inf."""
    bad = [name for name, p in engine.module.named_parameters() if not _finite(getattr(p, "ds_tensor", p))]
    optimizer = getattr(engine, "basic_optimizer", None)  # the optimizer DeepSpeed wraps (ZeRO: over flat partitions)
    for i, group in enumerate(optimizer.param_groups if optimizer is not None else []):
        for j, p in enumerate(group["params"]):
            tensors = {"weights": p, **optimizer.state.get(p, {})}
            bad += [f"optimizer group {i} tensor {j} {key}" for key, t in tensors.items() if not _finite(t)]
    return bad


def _finite(t: Any) -> bool:
    return not (torch.is_tensor(t) and t.is_floating_point()) or bool(torch.isfinite(t).all())


class ConfinedCheckpointEngine:
    """A DeepSpeed checkpoint engine whose loads read only files inside checkpoint directory `root`, through the
    allow-listed unpickler, and whose failed saves name their file; everything else is the wrapped engine's."""

    def __init__(self, inner, root: Path) -> None:
        self.inner, self.root = inner, root

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None) -> Any:
        return load_pickle(confined(self.root, os.path.relpath(path, self.root)), map_location)

    def save(self, state_dict: dict, path: str) -> None:
        with naming_file(path):
            if type(self.inner) is not TorchCheckpointEngine:
                return self.inner.save(state_dict, path)
            with open(path, "wb") as f:  # through a Python file a failed write keeps its errno (ENOSPC, EDQUOT)
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.inner.zipfile_serialization)


@contextmanager
def checkpoint_files(engine, root: Path) -> Iterator[None]:
    """Route `engine`'s checkpoint file reads and writes through a `ConfinedCheckpointEngine` for checkpoint `root`."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = ConfinedCheckpointEngine(inner, root)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    """CRC-32 of a file's bytes (torch.load does not notice flipped bytes inside tensor data)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def verify(path: Path) -> dict[str, Any]:
    """Check that `path` is a complete checkpoint whose files all have the size and CRC-32 recorded at save time."""
    for root, dirs, names in os.walk(path):  # no symlink may lead out of the checkpoint
        for name in dirs + names:
            confined(path, Path(root, name).relative_to(path))
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {COMPLETE_FILE} marker (interrupted save?)")
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMPLETE_FILE} marker: {e}") from e
    if not isinstance(info, dict) or info.get("format") != MARKER_FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: its {COMPLETE_FILE} marker is not of format {MARKER_FORMAT} "
            "(written by another version of moeformer?)"
        )
    files = info.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(s, dict) and {"size", "crc32"} <= s.keys() for s in files.values()
    ):
        raise CheckpointError(f"checkpoint {path}: its {COMPLETE_FILE} marker has no valid file list")
    for name, saved in files.items():
        file = confined(path, name)
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if file.stat().st_size != saved["size"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, {saved['size']} were saved"
            )
        if file_crc32(file) != saved["crc32"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: the contents of {name} changed since it was saved")
    return info


def _step_of(path: Path) -> int:
    """The step of a checkpoint directory name (`step_<digits>`), -1 for any other name."""
    digits = path.name[len(TAG_PREFIX) :]
    return int(digits) if path.name.startswith(TAG_PREFIX) and digits.isdigit() else -1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_parallel_extras(engine, groups: ParallelGroups, root: Path, tag: str) -> None:
    """For a model parallelised by `moeformer.parallel.parallelize` into `groups`: the per-expert files DeepSpeed
    cannot write for our expert modules (needed to resume with ep > 1) and the shard layout (for offline
    consolidation)."""
    if groups.config.ep > 1:
        save_expert_checkpoint(engine, root, tag)
    if groups.config.pp == 1:  # pipeline checkpoints are per layer: no offline consolidation
        save_layout(engine.module, root / tag)
