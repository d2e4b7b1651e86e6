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

from tailor.quant.f16 import F16_MAX, PrecisionError, to_f16
from tailor.quant import gguf_kpack
from tailor.quant.gguf_grid import BLOCK, BLOCK_BYTES, Codes, codes
from tailor.quant.gguf_kquants import codes as kcodes
from tailor.quant.gguf_kquants import ktype

_TYPES = {16: GGMLQuantizationType.F16, 8: GGMLQuantizationType.Q8_0,
          5: GGMLQuantizationType.Q5_1, 4: GGMLQuantizationType.Q4_0}


def ggml_type(bits: int | str) -> GGMLQuantizationType:
    """The ggml type of a choice: a bit-width (above) or a named K-quant / IQ4_NL type."""
    if isinstance(bits, str):
        return ktype(bits).qtype
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


def _checked_codes(w: torch.Tensor, bits: int, name: str) -> Codes:
    """gguf_grid.codes, refusing non-finite weights and scales/minima that overflow their float16 field."""
    bad = (~torch.isfinite(w)).nonzero()
    if len(bad):
        at = [int(i) for i in bad[0]]
        raise PrecisionError(f"{name}: weight at {at} is {float(w[tuple(at)])}; it cannot be quantized")
    c = codes(w, bits)
    for field, what in ((c.d, "block scale"), (c.m, "block minimum")):
        if field is None:
            continue
        over = (~torch.isfinite(field)).nonzero()
        if len(over):
            r, blk = int(over[0][0]), int(over[0][1])
            amax = float(w[r, blk * BLOCK:(blk + 1) * BLOCK].abs().max())
            raise PrecisionError(f"{name}: {what} of block {blk} in row {r} overflows float16 (weights up to "
                                 f"{amax:.6g} at {bits} bits; float16 holds +-{F16_MAX:.0f}); it cannot be stored")
    return c


def _checked_kcodes(w: torch.Tensor, t: str, name: str):
    """gguf_kquants.codes, refusing non-finite weights and super-block scales beyond float16."""
    bad = (~torch.isfinite(w)).nonzero()
    if len(bad):
        at = [int(i) for i in bad[0]]
        raise PrecisionError(f"{name}: weight at {at} is {float(w[tuple(at)])}; it cannot be quantized")
    c = kcodes(w, t)
    for field in (c.d, c.dmin):
        if field is not None and not bool(torch.isfinite(field).all()):
            raise PrecisionError(f"{name}: a {t} super-block scale overflows float16 (weights up to "
                                 f"{float(w.abs().max()):.6g}); it cannot be stored")
    return c


def pack(w: torch.Tensor, bits: int | str, name: str = "weight") -> np.ndarray:
    """GGUF bytes of `w` at `bits`: uint8 [rows, cols // 32 * block bytes] (F16: [rows, 2 * cols]);
    a named type (K-quants, IQ4_NL): `gguf_kpack.pack_codes` of `gguf_kquants.codes`, [rows, cols //
    block * block bytes], the very codes the fake quantizer dequantized.

    A value the file cannot hold (a 16-bit weight or a block scale/minimum beyond float16, a non-finite
    weight) raises tailor.quant.f16.PrecisionError naming `name`: llama.cpp would load inf and compute NaN."""
    ggml_type(bits)
    if w.dim() != 2:
        raise ValueError(f"pack expects a [rows, cols] matrix, got shape {tuple(w.shape)}")
    w = w.detach().cpu()
    rows, cols = w.shape
    if isinstance(bits, str):
        return gguf_kpack.pack_codes(_checked_kcodes(w, bits, name))
    if bits == 16:
        return to_f16(w.float(), name).view(torch.uint8).reshape(rows, 2 * cols).numpy()
    c = _checked_codes(w, bits, name)
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
