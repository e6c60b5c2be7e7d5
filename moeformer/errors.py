"""The library's own error types, how a failed write is reported (which file, and why), and how command-line
entry points report any error: one line, no traceback."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, unsafe to read, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or one of the files it lists does not exist."""


class NonFiniteStateError(CheckpointError):
    """Weights or optimizer state hold NaN/inf: a checkpoint of them is never written."""


class ConfigError(ValueError, TypeError):
    """A configuration value has the wrong type (TypeError) or is out of range (ValueError)."""


class ResumeConfigError(ConfigError):
    """A resume would continue a run with a configuration its checkpoint was not written with, and the changes were
    not named as intended."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def write_error(path: str | os.PathLike, error: BaseException) -> OSError:
    """An OSError for a failed write of `path` whose message names the file and the cause: the errno of the OSError
    behind `error` (ENOSPC, EROFS, EDQUOT...; torch's writer reports it as "unexpected pos" raised while handling
    it, safetensors' as "(os error N)"), else what the file system shows now (missing directory, read-only, full),
    else the error's own first line."""
    os_error = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno), None)
    path = Path(os_error.filename if os_error is not None and os_error.filename else path)
    rust = re.search(r"\(os error (\d+)\)", str(error))
    code = os_error.errno if os_error is not None else int(rust.group(1)) if rust else _probe(path)
    if code is None:
        return OSError(f"cannot write {path}: {(str(error).strip().splitlines() or [type(error).__name__])[0]}")
    return OSError(code, f"cannot write {path}: {os.strerror(code)}")


@contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the OSErrors behind an exception raised inside that name no file (a failed write() does not)."""
    try:
        yield
    except BaseException as e:
        for error in _chain(e):
            if isinstance(error, OSError) and error.filename is None:
                error.filename = os.fspath(path)
        raise


def _probe(path: Path) -> int | None:
    """The errno a write of `path` (a file, or a directory being filled) would most plausibly fail with, judging
    from the file system alone."""
    directory = path if path.is_dir() else path.parent
    if not directory.is_dir():
        return errno.ENOENT
    stats = os.statvfs(directory)
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_bavail == 0:
        return errno.ENOSPC
    if not os.access(directory, os.W_OK):
        return errno.EACCES
    return None


def describe(error: BaseException) -> str:
    """`error` as one line: its message (a KeyError's unquoted, an OSError's with its file name), prefixed with its
    type unless that is one of the usual ones for bad input or a failed file operation."""
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error)
    text = (text.strip().splitlines() or [""])[0]
    if isinstance(error, (ValueError, TypeError, KeyError, OSError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def reported_errors(debug: bool = False) -> Iterator[None]:
    """For a command-line entry point: an exception becomes one line on stderr, `error: ...`, and exit status 1; the
    traceback only with `debug` or MOEFORMER_DEBUG=1. Under torchrun each failing rank names itself and exits at
    once (no rank is left waiting in a collective: torchrun stops the others)."""
    try:
        yield
    except Exception as e:
        if debug or os.environ.get("MOEFORMER_DEBUG", "0") not in ("", "0"):
            raise
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
        print(f"error{f' (rank {rank})' if world > 1 else ''}: {describe(e)}", file=sys.stderr, flush=True)
        if world > 1:
            sys.stdout.flush()
            os._exit(1)
        sys.exit(1)
