"""Resumable checkpoints: DeepSpeed engine state plus per-rank trainer state, made visible atomically.

Layout of `<out_dir>/checkpoints/`:
    step_00000100/            DeepSpeed's files (model, optimizer / ZeRO shards, lr scheduler)
        trainer_state_rank0.pt   step, data position, RNG states of python / numpy / torch, counters
        COMPLETE                 written last by rank 0: the step and the size and CRC-32 of every file in it
    latest                    the newest complete tag (replaced atomically; DeepSpeed's loaders read it too)
A directory without COMPLETE is an interrupted save and is never resumed from. Loading reads only files inside the
checkpoint directory and unpickles them with an allow-list (`moeformer.safe_files`): a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeformer.errors import CheckpointError, naming_file, write_error
from moeformer.safe_files import confined, load_pickle

COMPLETE_FILE = "COMPLETE"
MARKER_FORMAT = 1
LATEST_FILE = "latest"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) as tensors and plain values (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
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
    """Saves and finds checkpoints of one run under `root`; every rank calls `save` and `load` together."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> Path:
        """Save the engine and this rank's trainer state as `step_<step>`, then mark it complete and latest."""
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0:
            if path.exists():  # a leftover of an interrupted save of the same step
                shutil.rmtree(path)
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()
        try:
            with checkpoint_files(engine, path):
                engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
                save_parallel_extras(engine, self.root, tag)
            state_file = path / f"trainer_state_rank{self.rank}.pt"
            tmp = state_file.with_suffix(".tmp")
            with naming_file(tmp), open(tmp, "wb") as f:
                torch.save({"step": step, **trainer_state, "rng": rng_state()}, f)
            os.replace(tmp, state_file)
        except (OSError, RuntimeError) as e:  # a full disk, a read-only or vanished directory, a quota
            raise write_error(path, e) from e
        _barrier()
        if self.rank == 0:
            files = {str(p.relative_to(path)): {"size": p.stat().st_size, "crc32": file_crc32(p)}
                     for p in sorted(path.rglob("*")) if p.is_file()}
            write_atomic(path / COMPLETE_FILE, json.dumps({"format": MARKER_FORMAT, "step": step, "files": files},
                                                             indent=1))
            write_atomic(self.root / LATEST_FILE, tag)
            self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest `keep_last`, and interrupted saves older than the newest."""
        complete = self.complete_checkpoints()
        keep = set(complete[-self.keep_last :])
        newest = complete[-1] if complete else None
        for path in self._step_dirs():
            if path in keep:
                continue
            if path in complete or (newest is not None and _step_of(path) < _step_of(newest)):
                shutil.rmtree(path, ignore_errors=True)

    # ---- finding ---------------------------------------------------------------------------------------------
    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)]
        return sorted(dirs, key=_step_of)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories with a COMPLETE marker, oldest first."""
        return [p for p in self._step_dirs() if (p / COMPLETE_FILE).is_file()]

    def latest(self) -> Path | None:
        """The checkpoint named by `latest` when it is complete, else the newest complete one, else None."""
        marker = self.root / LATEST_FILE
        if marker.is_file():
            tag = marker.read_text().strip()
            path = self.root / tag
            if re.fullmatch(f"{TAG_PREFIX}[0-9]+", tag) and (path / COMPLETE_FILE).is_file():  # never elsewhere
                return path
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None (fresh start), "auto" (latest of this run, if any) or a directory."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        return path

    # ---- loading ---------------------------------------------------------------------------------------------
    def load(self, engine, path: Path) -> dict[str, Any]:
        """Load the engine state and return this rank's trainer state (RNG states already restored)."""
        verify(path)
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
            raise CheckpointError(f"{path}: trainer state is for step {state['step']}, engine state for "
                                  f"step {client_state.get('step')}")
        set_rng_state(state["rng"])
        return state


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
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

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
        raise CheckpointError(f"checkpoint {path}: its {COMPLETE_FILE} marker is not of format {MARKER_FORMAT} "
                              "(written by another version of moeformer?)")
    files = info.get("files")
    if not isinstance(files, dict) or not all(isinstance(s, dict) and {"size", "crc32"} <= s.keys()
                                              for s in files.values()):
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
    try:
        return int(path.name[len(TAG_PREFIX) :])
    except ValueError:
        return -1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_parallel_extras(engine, root: Path, tag: str) -> None:
    """For a model parallelised by `moeformer.parallel.parallelize`: the per-expert files DeepSpeed cannot write for
    our expert modules (needed to resume with ep > 1) and the shard layout (for offline consolidation)."""
    groups = getattr(engine.module, "parallel_groups", None)
    if groups is None:
        return
    from moeformer.parallel import save_expert_checkpoint, save_layout

    if groups.config.ep > 1:
        save_expert_checkpoint(engine, root, tag)
    if groups.config.pp == 1:  # pipeline checkpoints are per layer: no offline consolidation
        save_layout(engine.module, root / tag)
