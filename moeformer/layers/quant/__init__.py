"""Weight-only int8/int4 quantization: formats (reference quantize/dequantize), quantized weights as buffers,
QuantLinear, and Triton matmuls that dequantise in registers."""

from .formats import GROUP_SIZES, MODES, QUANT_BITS, check_format, dequantize, quantize_int4, quantize_int8
from .linear import QuantLinear, quant_linear, quant_matmul_reference
from .weight import QuantizedWeight

__all__ = [
    "GROUP_SIZES",
    "MODES",
    "QUANT_BITS",
    "QuantLinear",
    "QuantizedWeight",
    "check_format",
    "dequantize",
    "quant_linear",
    "quant_matmul_reference",
    "quantize_int4",
    "quantize_int8",
]
