"""ONNX com.microsoft::MatMulNBits, block 32 along the input dimension: asymmetric uint with a
zero point, float32 scales, packed uint8 zero points; 16 -> float16 weights. Norms float32."""
from __future__ import annotations

import math

import torch

BITS = (2, 4, 8, 16)
BLOCK = 32


def matrix_bytes(bits: int, rows: int, cols: int) -> int:
    if bits == 16:
        return 2 * rows * cols
    n_blocks = cols // BLOCK
    return rows * (n_blocks * BLOCK * bits // 8 + 4 * n_blocks + math.ceil(n_blocks * bits / 8))


def embedding_bytes(bits: int, vocab: int, hidden: int) -> int:
    return matrix_bytes(bits, vocab, hidden)


def vector_bytes(n: int) -> int:
    return 4 * n


def dequantized(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 16:
        return w.float().to(torch.float16).to(torch.float32)
    qmax = 2**bits - 1
    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    mn = b.amin(-1, keepdim=True).clamp(max=0)  # range widened to include 0, as ORT's quantizer does
    mx = b.amax(-1, keepdim=True).clamp(min=0)
    s = (mx - mn) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.round(-mn / s).clamp(0, qmax)
    q = (torch.round(b / s) + zp).clamp(0, qmax)
    return ((q - zp) * s).reshape(rows, cols)
