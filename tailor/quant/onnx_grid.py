"""ONNX com.microsoft::MatMulNBits, block 32 along the input dimension: asymmetric uint with a
zero point, float32 scales, packed uint8 zero points; 16 -> float16 weights. Norms float32.

`quantize` is the one place the grid is defined: `dequantized` (the fake quantizer used in training)
and `tailor.quant.onnx_pack` (what export writes) both start from its integers, so onnxruntime's
`(q - zero_point) * scale` reproduces the trained values (up to the float32 rounding of that product).
"""
from __future__ import annotations

import math

import torch

BITS = (2, 4, 8, 16)
BLOCK = 32


def matrix_bytes(bits: int, rows: int, cols: int) -> int:
    """B (uint8, bits/8 per weight) + float32 scale per block + zero points packed per row."""
    if bits == 16:
        return 2 * rows * cols
    n_blocks = cols // BLOCK
    return rows * (n_blocks * BLOCK * bits // 8 + 4 * n_blocks + math.ceil(n_blocks * bits / 8))


def embedding_bytes(bits: int, vocab: int, hidden: int) -> int:
    """The tied table is one initializer: Gather/GatherBlockQuantized and the LM head's
    MatMul/MatMulNBits read the same tensors, so it costs exactly one [vocab, hidden] matrix."""
    return matrix_bytes(bits, vocab, hidden)


def vector_bytes(n: int) -> int:
    return 4 * n


def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integers of `w` ([rows, cols], blocks of 32 along cols) on the `bits`-bit grid.

    Returns (q [rows, n_blocks, 32], scale [rows, n_blocks, 1], zero_point [rows, n_blocks, 1]),
    q and zero_point integer-valued float32 in 0..2^bits-1, so that value = (q - zero_point) * scale."""
    # Any width 1..8 is a well-defined grid (the fake quantizer may explore it); only BITS export.
    if not 1 <= bits <= 8:
        raise ValueError(f"onnx grid: {bits}-bit blocks do not exist (1..8 bits; 16 is plain float16)")
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"onnx grid: {cols} columns are not whole {BLOCK}-element blocks")
    qmax = 2**bits - 1
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    mn = b.amin(-1, keepdim=True).clamp(max=0)  # range widened to include 0, as ORT's quantizer does
    mx = b.amax(-1, keepdim=True).clamp(min=0)
    s = (mx - mn) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero block: any scale gives exact zeros
    zp = torch.round(-mn / s).clamp(0, qmax)
    q = (torch.round(b / s) + zp).clamp(0, qmax)
    return q, s, zp


def dequantized(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Values of `w` after a round trip through the exported type (float32 result)."""
    if bits == 16:
        return w.float().to(torch.float16).to(torch.float32)
    q, s, zp = quantize(w, bits)
    return ((q - zp) * s).reshape(w.shape)
