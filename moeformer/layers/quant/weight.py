"""`QuantizedWeight`: a weight matrix, or a stack of them (the experts), held as int8/int4 codes with scales (and
int4 offsets) in buffers, so that state_dict() holds exactly what is stored and load_state_dict restores it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .formats import CODE_DTYPES, check_format, dequantize, quantize_int4, quantize_int8


class QuantizedWeight(nn.Module):
    """Quantized stand-in for a full-precision weight of shape `shape`.

    Codes are kept as (..., N, K) = (..., out, in) matrices with the reduction dimension K contiguous. A weight
    stored (..., in, out) (the experts' w_in and w_out) is `transposed`: its codes quantize the transpose.
    Built empty (any device, meta included) from shapes alone; `quantize_` fills it from the full-precision tensor.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        mode: str,
        group_size: int = 128,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        check_format(mode, group_size)
        if len(shape) < 2:
            raise ValueError(f"a quantized weight needs at least 2 dimensions, got shape {tuple(shape)}")
        self.shape, self.mode, self.transposed = tuple(shape), mode, transposed
        self.group_size = group_size if mode == "int4" else None
        *lead, n, k = self.matrix_shape
        if mode == "int4" and k % group_size:
            raise ValueError(f"int4 needs the input width {k} to be a multiple of group_size={group_size}")
        dtype = dtype or torch.get_default_dtype()
        packed = k // 2 if mode == "int4" else k
        self.register_buffer("codes", torch.empty(*lead, n, packed, dtype=CODE_DTYPES[mode], device=device))
        if mode == "int8":
            self.register_buffer("scale", torch.empty(*lead, n, dtype=dtype, device=device))
            self.register_buffer("offset", None)
        else:
            self.register_buffer("scale", torch.empty(*lead, n, k // group_size, dtype=dtype, device=device))
            self.register_buffer("offset", torch.empty(*lead, n, k // group_size, dtype=dtype, device=device))

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """(..., N, K): the shape of the quantized matrices."""
        if not self.transposed:
            return self.shape
        return (*self.shape[:-2], self.shape[-1], self.shape[-2])

    @property
    def in_features(self) -> int:
        return self.matrix_shape[-1]

    @property
    def out_features(self) -> int:
        return self.matrix_shape[-2]

    @classmethod
    def from_tensor(
        cls,
        weight: Tensor,
        mode: str,
        group_size: int = 128,
        transposed: bool = False,
        dtype: torch.dtype | None = None,
    ) -> QuantizedWeight:
        """Quantize `weight`; scales in `dtype` (default the weight's), buffers on the weight's device."""
        module = cls(tuple(weight.shape), mode, group_size, dtype or weight.dtype, "meta", transposed)
        return module.quantize_(weight)

    @torch.no_grad()
    def quantize_(self, weight: Tensor, index: int | None = None) -> QuantizedWeight:
        """Fill the buffers from the full-precision `weight` (of `shape`; any float dtype and device), or with
        `index` only the index-th matrix of the stack from `weight` of shape `shape[1:]` (one expert: a loader need
        not assemble the whole stack). Buffers on the meta device are allocated on the weight's device; others are
        written in place, on their device. Matrices are quantized one at a time: the temporaries stay at one."""
        expected = self.shape if index is None else self.shape[1:]
        if tuple(weight.shape) != expected or (index is not None and not 0 <= index < self.shape[0]):
            where = "" if index is None else f" at index {index} of {self.shape[0]}"
            raise ValueError(
                f"cannot quantize a tensor of shape {tuple(weight.shape)}{where} into a weight of shape {self.shape}"
            )
        if not weight.is_floating_point():
            raise TypeError(f"expected a floating-point weight to quantize, got {weight.dtype}")
        device = weight.device if self.codes.is_meta else self.codes.device
        for name in ("codes", "scale", "offset"):
            buf = getattr(self, name)
            if buf is not None and buf.is_meta:
                setattr(self, name, torch.empty(buf.shape, dtype=buf.dtype, device=device))
        matrices = weight.transpose(-1, -2) if self.transposed else weight
        matrices = matrices.reshape(-1, *matrices.shape[-2:])
        first = 0 if index is None else index
        lead = len(self.matrix_shape) - 2
        outputs = [t.view(-1, *t.shape[lead:]) for t in (self.codes, self.scale, self.offset) if t is not None]
        for i, matrix in enumerate(matrices, start=first):
            matrix = matrix.to(device)
            if self.mode == "int8":
                parts = quantize_int8(matrix, self.scale.dtype)
            else:
                parts = quantize_int4(matrix, self.group_size, self.scale.dtype)
            for out, part in zip(outputs, parts, strict=True):
                out[i].copy_(part)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full-precision weight (of `shape`) that the codes stand for."""
        w = dequantize(self.codes, self.scale, self.offset, self.mode, self.group_size or 0)
        return (w.transpose(-1, -2) if self.transposed else w).to(dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"shape={self.shape}, mode={self.mode}{group}, transposed={self.transposed}"
