"""The environment of the processes tests launch (torchrun ranks, scripts, workers): the repository first on the
import path, then the caller's own entries (where dependencies such as deepspeed may live)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (they are entry points, not package modules); registered in sys.modules, through
    which dataclasses resolve a module's string annotations."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def worker_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository prepended to PYTHONPATH and `extra` variables set."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_train(flags: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """scripts/train.py with `flags` in a subprocess (one thread per rank): plain Python for one rank, torchrun
    (standalone rendezvous on a free port) for more; the caller checks the outcome."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [*(launcher if nproc > 1 else [sys.executable]), str(REPO / "scripts" / "train.py"), *flags],
        capture_output=True,
        text=True,
        env=worker_env(OMP_NUM_THREADS="1"),
        timeout=timeout,
        check=False,
    )
