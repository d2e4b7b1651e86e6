"""Fake-quant grids that are the export formats (GGUF blocks, ONNX MatMulNBits), STE, packing."""
from tailor.quant.fake import fake_quant
from tailor.quant.formats import FORMATS, allowed_bits

__all__ = ["fake_quant", "FORMATS", "allowed_bits"]
