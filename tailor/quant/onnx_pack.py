"""Pack a weight into com.microsoft::MatMulNBits tensors (and unpack them again, for tests).

Layout (onnxruntime contrib-op spec): for W [N=out, K=in] quantized in blocks of 32 along K,
- B: uint8 [N, K/32, 32*bits/8], each block's values packed low-order bits first;
- scales: float32 [N, K/32] (the same type as the activations);
- zero_points: uint8 [N, ceil((K/32)*bits/8)], packed the same way along the blocks of a row.
GatherBlockQuantized (bits 2/4/8 on uint8 data, gather_axis 0, quantize_axis 1) reads the very same
bytes viewed as [N, K*bits/8] with the same scales and zero points, which lets the tied embedding and
LM head share one table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tailor.quant import onnx_grid

PACK_BITS = (2, 4, 8)  # what MatMulNBits runs on CPU; 3 and 5 are refused at session creation


@dataclass(frozen=True)
class Packed:
    bits: int
    n: int  # rows (output features)
    k: int  # columns (input features)
    b: np.ndarray  # uint8 [n, n_blocks, blob]
    scales: np.ndarray  # float32 [n, n_blocks]
    zero_points: np.ndarray  # uint8 [n, ceil(n_blocks * bits / 8)]

    @property
    def nbytes(self) -> int:
        return self.b.nbytes + self.scales.nbytes + self.zero_points.nbytes


def _pack_bits(v: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers 0..2^bits-1 along the last axis, low-order bits first; the axis is zero-padded
    to whole bytes (only zero points ever need it)."""
    per = 8 // bits
    pad = (-v.shape[-1]) % per
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), v.dtype)], axis=-1)
    v = v.astype(np.uint8).reshape(v.shape[:-1] + (v.shape[-1] // per, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= v[..., i] << np.uint8(bits * i)
    return out


def _unpack_bits(p: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    mask = np.uint8(2**bits - 1)
    v = np.stack([(p >> np.uint8(bits * i)) & mask for i in range(per)], axis=-1)
    return v.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :count]


def pack(w: torch.Tensor, bits: int) -> Packed:
    """MatMulNBits tensors whose dequantization is `onnx_grid.dequantized(w, bits)`."""
    if bits not in PACK_BITS:
        raise ValueError(f"MatMulNBits packing: {bits} bits not supported (onnxruntime CPU runs {PACK_BITS})")
    n, k = w.shape
    q, s, zp = onnx_grid.quantize(w.detach().cpu(), bits)
    n_blocks = k // onnx_grid.BLOCK
    b = _pack_bits(q.to(torch.uint8).numpy(), bits)  # [n, n_blocks, 32*bits/8]
    zpp = _pack_bits(zp.reshape(n, n_blocks).to(torch.uint8).numpy(), bits)
    assert zpp.shape == (n, math.ceil(n_blocks * bits / 8))
    return Packed(bits, n, k, np.ascontiguousarray(b), s.reshape(n, n_blocks).numpy().astype(np.float32), zpp)


def unpack(p: Packed) -> torch.Tensor:
    """The float32 matrix [n, k] a MatMulNBits consumer sees: (q - zero_point) * scale."""
    n_blocks = p.k // onnx_grid.BLOCK
    q = _unpack_bits(p.b, p.bits, onnx_grid.BLOCK).astype(np.float32)  # [n, n_blocks, 32]
    zp = _unpack_bits(p.zero_points, p.bits, n_blocks).astype(np.float32)[..., None]
    return torch.from_numpy((q - zp) * p.scales[..., None]).reshape(p.n, p.k)
