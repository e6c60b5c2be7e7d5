"""Where the Triton kernels serve a call: CUDA tensors (when triton imports). CPU tensors go to the PyTorch
references, unless the Triton interpreter is on (TRITON_INTERPRET=1 before triton is imported) and
`interpret_on_cpu` is set, as the tests do to run the kernels without a GPU."""

from __future__ import annotations

import os

from torch import Tensor

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpret_on_cpu = False


def runs_triton(x: Tensor) -> bool:
    """Whether a Triton kernel (rather than the reference) should compute on x's device."""
    return x.is_cuda or (interpret_on_cpu and INTERPRETER and x.device.type == "cpu")
