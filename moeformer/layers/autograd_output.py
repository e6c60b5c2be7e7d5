"""What an autograd.Function's forward may return under torch.compile on every supported torch."""

from __future__ import annotations

import torch
from torch import Tensor


def cast_output(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`, and t itself when it already is: torch 2.11's dynamo traces the backward of an autograd.Function
    whose forward returns a no-op cast (`.to()` of the same dtype, returning self) with a zero output gradient, so
    every gradient behind it is 0 (torch 2.13 does not)."""
    return t if t.dtype == dtype else t.to(dtype)
