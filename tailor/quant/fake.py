"""Fake quantization on the export formats' own grids, with straight-through gradients.

Blocks of 32 run along the input dimension (the last axis of an [out, in] weight), as in GGUF and
MatMulNBits, so a row slice or a 32-aligned column slice of a fake-quantized matrix equals the fake
quantization of the slice: elastic slicing and quantization commute.
"""
from __future__ import annotations

import torch

from tailor.quant.formats import grid


def fake_quant(w: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """Quantize-dequantize `w` ([out, in]) on format `fmt`'s grid, straight-through gradient.

    At 16 bits the weight passes unchanged (the supernet's max config must equal the dense model)."""
    if bits >= 16:
        return w
    wq = grid(fmt).dequantized(w.detach(), bits).to(w.dtype)
    return w + (wq - w).detach()
