"""The environment of the processes tests launch (torchrun ranks, scripts, workers): the repository first on the
import path, then the caller's own entries (where dependencies such as deepspeed may live)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository prepended to PYTHONPATH and `extra` variables set."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
