"""Fake quantization on the export formats' own grids, with straight-through gradients.

Blocks of 32 run along the input dimension (the last axis of an [out, in] weight), as in GGUF and
MatMulNBits, so a row slice or a 32-aligned column slice of a fake-quantized matrix equals the fake
quantization of the slice: elastic slicing and quantization commute.
"""
from __future__ import annotations

import torch

from tailor.quant import gguf_grid
from tailor.quant.formats import grid


def fake_quant(w: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """Quantize-dequantize `w` ([out, in]) on format `fmt`'s grid, straight-through gradient.

    At 16 bits the weight passes unchanged (the supernet's max config must equal the dense model)."""
    if bits >= 16:
        return w
    wq = grid(fmt).dequantized(w.detach(), bits).to(w.dtype)
    return wq + (w - w.detach())  # exactly wq forward (w + (wq - w) is an ulp off), identity gradient


def runtime_weight(w: torch.Tensor, bits: int, fmt: str):
    """What `runtime_linear` needs of a weight, precomputed once (block codes for GGUF)."""
    if fmt == "gguf" and bits < 16:
        return gguf_grid.codes(w, bits)
    return grid(fmt).dequantized(w, bits)


def runtime_linear(x: torch.Tensor, w, bits: int, fmt: str) -> torch.Tensor:
    """x @ w.T as the device runtime computes it (inference only). llama.cpp's CPU kernels also round
    the activations (Q8_0/Q8_1 blocks, float16); onnxruntime's MatMulNBits computes in float32."""
    if fmt == "gguf":
        return gguf_grid.runtime_linear(x, w, bits)
    return torch.nn.functional.linear(x, w)
