"""The model zoo: named configs stored as `configs/models/<name>.yaml`."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def zoo_dirs() -> list[Path]:
    """Where zoo YAMLs are searched: $MOEFORMER_ZOO, the source checkout, then the installed copy."""
    dirs = []
    if os.environ.get("MOEFORMER_ZOO"):
        dirs.append(Path(os.environ["MOEFORMER_ZOO"]))
    dirs.append(Path(__file__).resolve().parents[2] / "configs" / "models")
    dirs.append(Path(sys.prefix) / "share" / "moeformer" / "configs" / "models")
    return [d for d in dirs if d.is_dir()]


def list_models() -> list[str]:
    """Names of all zoo models."""
    return sorted({p.stem for d in zoo_dirs() for p in d.glob("*.yaml")})


def zoo_path(name: str) -> Path:
    """Path of the zoo YAML for `name`; a KeyError listing the known names if there is none."""
    for d in zoo_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(list_models()) or '(none found)'}")
