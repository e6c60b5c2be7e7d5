"""Without CUDA, Triton kernels run on CPU through the Triton interpreter (set before triton is first imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
