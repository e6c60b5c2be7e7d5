"""Where the Triton kernels serve a call: CUDA tensors (when triton imports). CPU tensors go to the PyTorch
references, unless the Triton interpreter is on (TRITON_INTERPRET=1 before triton is imported) and
`interpret_on_cpu` is set, as the tests do to run the kernels without a GPU."""

from __future__ import annotations

import os
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpret_on_cpu = False


def runs_triton(x: Tensor) -> bool:
    """Whether a Triton kernel (rather than the reference) should compute on x's device."""
    return x.is_cuda or (interpret_on_cpu and INTERPRETER and x.device.type == "cpu")


def launchers(kernels: ModuleType | None, x: Tensor) -> ModuleType | SimpleNamespace | None:
    """A Triton kernel module's launchers for x when they serve its device (`runs_triton`) and triton imported
    (`kernels` not None), else None (use the references). While torch.compile traces they are the module's `OPS`,
    the launchers as custom ops (single opaque calls in the graph); in eager the plain launchers, which skip the
    custom-op dispatch (about as much host time as the launch itself)."""
    if kernels is None or not runs_triton(x):
        return None
    return kernels.OPS if torch.compiler.is_compiling() else kernels
