"""The environment of the processes tests launch (torchrun ranks, scripts, workers): the repository first on the
import path, then the caller's own entries (where dependencies such as deepspeed may live)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]


def worker_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository prepended to PYTHONPATH and `extra` variables set."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


class HostSyncs(TorchDispatchMode):
    """Counts, inside the block, what makes the host wait for the device: reading values (`.item()`, `bool()`:
    aten._local_scalar_dense; `Tensor.tolist`, which does not dispatch, patched) and ops whose output size depends
    on the values (nonzero, masked_select, unique, repeat_interleave without output_size). On CUDA
    torch.cuda.set_sync_debug_mode tells the same; this works on CPU too."""

    SIZE_FROM_VALUES = {"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_consecutive",
                        "aten::unique_dim"}

    def __enter__(self):
        self.count = 0
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.count += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::_local_scalar_dense" or name in self.SIZE_FROM_VALUES or (
                func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.count += 1
        return func(*args, **kwargs)
