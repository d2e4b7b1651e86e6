"""Pack K-quant / IQ4_NL codes into ggml's block bytes (ggml-common.h, little-endian).

`pack(w, name)` is `pack_codes(gguf_kquants.codes(w, name))`: uint8 [rows, cols // block * block bytes].
llama.cpp's (and gguf-py's) dequantization of these bytes is `gguf_kquants.from_codes` bit for bit.

Layouts, per super-block of 256 (L = element code made unsigned: q, q + 4 (Q3_K), q + 32 (Q6_K)):
  Q2_K   scales[16] (sc | m << 4) | qs[64] | d f16 | dmin f16
  Q3_K   hmask[32] | qs[64] | scales[12] | d f16
  Q4_K   d f16 | dmin f16 | scales[12] | qs[128]
  Q5_K   d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
  Q6_K   ql[128] | qh[64] | scales[16] int8 | d f16
  IQ4_NL d f16 | qs[16], qs[j] = L[j] | L[j + 16] << 4 (blocks of 32)
2-bit planes (Q2_K qs, Q3_K qs low bits, Q6_K qh): for each half of 128 elements, byte l (0..31) holds
elements l, l+32, l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7. Q3_K hmask: bit k of byte l is the high bit of
element 32k + l. Q4_K/Q5_K nibbles: for each 64 elements, byte l (0..31) holds element l low and l+32
high; Q5_K qh: bits 2c and 2c+1 of byte l are bit 4 of elements 64c + l and 64c + 32 + l. Q6_K ql: for
each half, bytes 0..31 hold elements l | l+64 << 4 and bytes 32..63 elements l+32 | l+96 << 4.
6-bit scales (Q4_K/Q5_K, get_scale_min_k4): j < 4: scales[j] = sc_j, scales[j+4] = m_j; j >= 4:
scales[j+4] = sc_j & 15 | (m_j & 15) << 4, and the top 2 bits of sc_j / m_j go to bits 6-7 of
scales[j-4] / scales[j]. Q3_K (6-bit, stored sc + 32): low nibbles of j < 8 in scales[j] bits 0-3, of
j >= 8 in scales[j-8] bits 4-7; top 2 bits of j in scales[8 + j % 4] at bits 2 * (j // 4).
"""
from __future__ import annotations

import numpy as np
import torch

from tailor.quant.gguf_kquants import KCodes, codes, ktype

U8 = torch.uint8


def _f16(x: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 1) float16 -> (rows, nb, 2) little-endian bytes."""
    return x.contiguous().view(U8)


def _planes(L: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, nb, 256) codes < 2**bits -> bytes packing 8 // bits groups of 32 per byte:
    (rows, nb, 256 * bits // 8); for each chunk of 32 * (8 // bits) elements, byte l holds
    element l of each group of 32, the first group in the lowest bits."""
    rows, nb, n = L.shape
    per = 8 // bits
    g = L.reshape(rows, nb, n // (32 * per), per, 32).to(torch.int32)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(1, 1, 1, per, 1)
    return (g << shifts).sum(-2).reshape(rows, nb, n * bits // 8).to(U8)


def _scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and mins (rows, nb, 8) -> 12 bytes."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    lo = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                    (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], dim=-1)
    return lo.to(U8)


def _scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K: 16 signed six-bit scales (rows, nb, 16) -> 12 bytes."""
    l = sc.to(torch.int32) + 32
    low = (l[..., :8] & 15) | ((l[..., 8:] & 15) << 4)
    high = (l >> 4).reshape(*l.shape[:-1], 4, 4)  # [j // 4, j % 4]
    shifts = (torch.arange(4, dtype=torch.int32) * 2).reshape(4, 1)
    return torch.cat([low, (high << shifts).sum(-2)], dim=-1).to(U8)


def pack_codes(c: KCodes) -> np.ndarray:
    """ggml bytes of stored fields `c`: uint8 [rows, nb * block bytes]."""
    t = ktype(c.type)
    rows, nb, n = c.q.shape
    L = c.q.to(torch.int32) - t.qmin  # unsigned code as stored
    if t.name == "IQ4_NL":
        parts = [_f16(c.d), (L[..., :16] | (L[..., 16:] << 4)).to(U8)]
    elif t.name == "Q2_K":
        parts = [(c.sc.to(torch.int32) | (c.m.to(torch.int32) << 4)).to(U8), _planes(L, 2), _f16(c.d), _f16(c.dmin)]
    elif t.name == "Q3_K":
        parts = [_planes(L >> 2, 1), _planes(L & 3, 2), _scales_q3(c.sc), _f16(c.d)]
    elif t.name == "Q4_K":
        parts = [_f16(c.d), _f16(c.dmin), _scales_k4(c.sc, c.m), _planes(L, 4)]
    elif t.name == "Q5_K":
        parts = [_f16(c.d), _f16(c.dmin), _scales_k4(c.sc, c.m), _planes(L >> 4, 1), _planes(L & 15, 4)]
    else:  # Q6_K
        low = (L & 15).reshape(rows, nb, 2, 2, 64)  # [half, l // 64 within half, ...]: l, l+64 -> nibbles
        ql = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(rows, nb, 128)
        parts = [ql.to(U8), _planes(L >> 4, 2), c.sc.to(torch.int8).view(U8), _f16(c.d)]
    out = torch.cat([p.reshape(rows, nb, -1) for p in parts], dim=-1)
    assert out.shape[-1] == t.block_bytes, (t.name, out.shape)
    return out.reshape(rows, nb * t.block_bytes).numpy()


def pack(w: torch.Tensor, name) -> np.ndarray:
    """GGUF bytes of `w` ([rows, cols]) as type `name` (a K-quant or IQ4_NL)."""
    return pack_codes(codes(w.detach().cpu(), name))
