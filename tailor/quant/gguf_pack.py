"""Pack float weights into GGUF block bytes, from the same codes as the fake quantizer.

`pack(w, bits)` returns the raw bytes of ggml type `ggml_type(bits)` for `w` ([rows, cols], blocks of 32
along cols) as a uint8 array [rows, bytes per row]. The fields come from `gguf_grid.codes`, so llama.cpp's
dequantization of these bytes equals `gguf_grid.dequantized(w, bits)` bit for bit.

Block layouts (ggml-common.h, little-endian):
  Q8_0: d f16 | qs int8[32]
  Q4_0: d f16 | qs uint8[16], qs[j] = (q[j] + 8) | (q[j+16] + 8) << 4
  Q5_1: d f16 | m f16 | qh uint32 (bit j = bit 4 of q[j]) | qs uint8[16], qs[j] = q[j] | q[j+16] << 4 (low nibbles)
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tailor.quant.gguf_grid import BLOCK, BLOCK_BYTES, codes

_TYPES = {16: GGMLQuantizationType.F16, 8: GGMLQuantizationType.Q8_0,
          5: GGMLQuantizationType.Q5_1, 4: GGMLQuantizationType.Q4_0}


def ggml_type(bits: int) -> GGMLQuantizationType:
    if bits not in _TYPES:
        raise ValueError(f"GGUF export has no type for {bits} bits (allowed {sorted(_TYPES)})")
    return _TYPES[bits]


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 1) float16 -> (rows, nb, 2) uint8, little-endian as on every host llama.cpp runs on."""
    return x.contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 32) codes -> (rows, nb, 16) bytes: low nibble from q[j], high nibble from q[j+16]."""
    low = (q[..., :16] & 0x0F).to(torch.uint8)
    high = (q[..., 16:] & 0x0F).to(torch.uint8)
    return low | (high << 4)


def pack(w: torch.Tensor, bits: int) -> np.ndarray:
    """GGUF bytes of `w` at `bits`: uint8 [rows, cols // 32 * block bytes] (F16: [rows, 2 * cols])."""
    ggml_type(bits)
    if w.dim() != 2:
        raise ValueError(f"pack expects a [rows, cols] matrix, got shape {tuple(w.shape)}")
    w = w.detach().cpu()
    rows, cols = w.shape
    if bits == 16:
        return w.float().to(torch.float16).view(torch.uint8).reshape(rows, 2 * cols).numpy()
    c = codes(w, bits)
    nb = cols // BLOCK
    if bits == 8:
        qs = c.q.to(torch.int8).view(torch.uint8)
        parts = [_f16_bytes(c.d), qs]
    elif bits == 4:
        parts = [_f16_bytes(c.d), _nibbles(c.q + 8)]
    else:
        parts = [_f16_bytes(c.d), _f16_bytes(c.m)]
        if bits == 5:
            # qh as 4 little-endian bytes: byte k holds bit 4 of q[8k .. 8k+7], lowest j in bit 0
            high = ((c.q >> 4) & 1).reshape(rows, nb, 4, 8)
            weights = 1 << torch.arange(8, dtype=torch.int16)
            parts.append((high * weights).sum(-1).to(torch.uint8))
        parts.append(_nibbles(c.q))
    out = torch.cat(parts, dim=-1)  # (rows, nb, block bytes)
    assert out.shape[-1] == BLOCK_BYTES[bits], out.shape
    return out.reshape(rows, nb * BLOCK_BYTES[bits]).numpy()
