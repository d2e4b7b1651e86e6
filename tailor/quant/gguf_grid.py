"""GGUF block formats: 16 -> F16, 8 -> Q8_0, 5 -> Q5_1, 4 -> Q4_1; norms F32.

K-quants (2/3 bits) need 256-wide super-blocks, which SmolLM2's 576-wide rows do not divide into.
The rounding here reproduces gguf-py's reference quantizers (`gguf.quants`) bit for bit.
"""
from __future__ import annotations

import torch

BITS = (4, 5, 8, 16)
BLOCK = 32
BLOCK_BYTES = {8: 34, 5: 24, 4: 20}  # Q8_0, Q5_1, Q4_1


def matrix_bytes(bits: int, rows: int, cols: int) -> int:
    return 2 * rows * cols if bits == 16 else rows * (cols // BLOCK) * BLOCK_BYTES[bits]


def embedding_bytes(bits: int, vocab: int, hidden: int) -> int:
    return matrix_bytes(bits, vocab, hidden)


def vector_bytes(n: int) -> int:
    return 4 * n


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def dequantized(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Values of `w` ([rows, cols], blocks along cols) after a round trip through the GGUF type."""
    if bits == 16:
        return _fp16(w.float())
    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    if bits == 8:  # Q8_0: symmetric, d = amax/127, round half away from zero
        d = b.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = b * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)
        out = _fp16(d) * q
    else:  # Q4_1 / Q5_1: asymmetric, d = (max-min)/(2^b-1), m = min, q = trunc((x-m)/d + 0.5)
        qmax = 2**bits - 1
        mn, mx = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (mx - mn) / qmax
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((b - mn) * inv + 0.5).clamp(0, qmax)
        out = _fp16(d) * q + _fp16(mn)
    return out.reshape(rows, cols)
