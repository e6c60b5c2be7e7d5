"""Reading files that may come from anyone: every name a checkpoint lists must stay inside its directory, and pickled
DeepSpeed state is unpickled with an allow-list, so loading can neither read elsewhere nor run code. Writing small
files atomically and durably (`write_atomic`)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moeformer.errors import CheckpointError, CheckpointNotFoundError


def confined(directory: Path, name: str | os.PathLike, roots: Iterable[Path] = ()) -> Path:
    """The real path of file `name` of checkpoint `directory`. CheckpointError unless `name` is relative and the
    path, once every symlink is resolved, lies inside the directory (or inside one of `roots`)."""
    if not isinstance(name, (str, os.PathLike)) or not str(name) or "\0" in str(name):
        raise CheckpointError(f"{directory}: {name!r:.100} is not a file name")
    if os.path.isabs(name):
        raise CheckpointError(
            f"{directory}: {name} is an absolute path, outside the checkpoint directory; refusing to read it"
        )
    try:
        path = (directory / name).resolve()
        allowed = [directory.resolve(), *(root.resolve() for root in roots)]
    except (OSError, RuntimeError) as e:  # symlink loops, names too long
        raise CheckpointError(f"{directory}: cannot resolve {name!r}: {e}") from e
    if not any(path.is_relative_to(root) for root in allowed):
        raise CheckpointError(
            f"{directory / name} resolves to {path}, outside the checkpoint directory; refusing to read it"
        )
    return path


def copy_confined(src: Path, dst: Path, names: Iterable[str], roots: Iterable[Path] = ()) -> list[str]:
    """Copy the files `names` of directory `src` that exist into `dst`, each only if it resolves inside `src` (or
    `roots`): a name or symlink leading elsewhere is skipped, never read. Returns the names copied."""
    copied = []
    for name in names:
        try:
            path = confined(Path(src), name, roots)
        except CheckpointError:
            continue
        if path.is_file():
            shutil.copyfile(path, Path(dst) / name)
            copied.append(name)
    return copied


def pickle_allow_list() -> list[type]:
    """The classes besides tensors and plain containers that DeepSpeed writes into the checkpoints of our training
    configurations (ZeRO 0-3, fp32 and bf16, expert, tensor and pipeline parallelism): its static loss scaler, the
    ZeRO stage enum and the address of a parameter's fragment in the flat optimizer partitions."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_pickle(path: str | os.PathLike, map_location: Any = None) -> Any:
    """torch.load of a pickled checkpoint file that rebuilds only tensors, plain containers and `pickle_allow_list`:
    a file that names anything else (a function to call, another class to build) is refused before any of it runs.
    Every failure is a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(pickle_allow_list()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist") from e
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {refused.group(1)}, which is not" if refused else "it holds something that is not"
        raise CheckpointError(
            f"refusing to unpickle {path}: {what} a type training checkpoints contain (unpickling it could run code)"
        ) from e
    except Exception as e:  # a corrupt archive: torch raises RuntimeError, EOFError, ValueError...
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(e).__name__}: {first}") from e


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (permissions as for any new file: umask applies), fsync it,
    rename it over `path` and fsync the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (created, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
