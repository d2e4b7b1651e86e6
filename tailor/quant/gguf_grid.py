"""GGUF block formats: 16 -> F16, 8 -> Q8_0, 5 -> Q5_1, 4 -> Q4_0; norms F32; and, chosen by name, the
K-quants Q2_K ... Q6_K and IQ4_NL (`tailor.quant.gguf_kquants`, see "Named types" below).

4 bits is Q4_0, not the more accurate Q4_1 (the shipped base file's type): llama.cpp repacks Q4_0 into
interleaved blocks with its fastest CPU kernels (AVX2 on x86, dotprod / i8mm on ARM phones), and it is
10% smaller. Measured in llama.cpp on this 2-core x86 host, one thread: uniform Q4_0 decodes 115-136
tokens/s, Q4_1 83-89, Q4_K_M 87 (see README, decode). QAT with learned clipping wins back the accuracy.

K-quants need 256-wide super-blocks along the input dimension: SmolLM2's 576-wide rows do not divide
into them, its 1536-wide `ffn_down` rows do (`eligible`).
The rounding here reproduces gguf-py's reference quantizers (`gguf.quants`, themselves bit-exact with
ggml's `quantize_row_*_ref`) bit for bit, so `dequantized` is exactly what llama.cpp reads back from the
blocks that `tailor.quant.gguf_pack` writes: both go through `codes`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BITS = (4, 5, 8, 16)
BLOCK = 32
BLOCK_BYTES = {8: 34, 5: 24, 4: 18}  # Q8_0, Q5_1, Q4_0


def matrix_bytes(bits: int | str, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] matrix as llama.cpp stores it (a named type: `gguf_kquants.matrix_bytes`,
    which refuses columns that are not whole blocks of the type)."""
    if isinstance(bits, str):
        return _kq().matrix_bytes(bits, rows, cols)
    return 2 * rows * cols if bits == 16 else rows * (cols // BLOCK) * BLOCK_BYTES[bits]


def embedding_bytes(bits: int | str, vocab: int, hidden: int) -> int:
    return matrix_bytes(bits, vocab, hidden)


def vector_bytes(n: int) -> int:
    return 4 * n


class Codes(NamedTuple):
    """One block type's stored fields for a [rows, cols] weight, blocks of 32 along cols.

    d: (rows, nb, 1) float16 scale; m: (rows, nb, 1) float16 minimum (Q5_1) or None (Q8_0, Q4_0);
    q: (rows, nb, 32) int16 codes (signed for Q8_0 and Q4_0 (stored + 8), 0..31 for Q5_1)."""

    d: torch.Tensor
    m: torch.Tensor | None
    q: torch.Tensor


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero exactly as gguf-py's `np_roundf` (and C `roundf`).

    `floor(|x| + 0.5)` is wrong for |x| = 0.5 - 2^-25: the sum rounds up to 1.0 in float32."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))  # a - f and 2*(.) are exact in float32


def codes(w: torch.Tensor, bits: int) -> Codes:
    """Quantize `w` ([rows, cols], cols a multiple of 32) to GGUF block fields (not for 16 bits)."""
    if bits not in BLOCK_BYTES:
        raise ValueError(f"GGUF has no block type for {bits} bits (block types: {sorted(BLOCK_BYTES)})")
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"GGUF {bits}-bit blocks need columns in whole {BLOCK}s, got {cols}")
    b = w.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    if bits == 8:  # Q8_0: symmetric, d = amax/127, q = roundf(x/d); q is computed with the fp32 d
        d = b.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _roundf(b * inv)
        return Codes(d.to(torch.float16), None, q.to(torch.int16))
    if bits == 4:  # Q4_0: d = (the signed value of largest |x|, first if tied) / -8, q = trunc(x/d + 8.5) - 8
        imax = b.abs().argmax(-1, keepdim=True)  # first maximal index, as numpy's argmax and ggml's strict <
        d = torch.gather(b, -1, imax) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(b * inv + 8.5).clamp(0, 15) - 8
        return Codes(d.to(torch.float16), None, q.to(torch.int16))
    # Q5_1: asymmetric, d = (max-min)/(2^b-1), m = min, q = trunc((x-m)/d + 0.5) clipped
    qmax = 2**bits - 1
    mn, mx = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (mx - mn) / qmax
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((b - mn) * inv + 0.5).clamp(0, qmax)
    return Codes(d.to(torch.float16), mn.to(torch.float16), q.to(torch.int16))


def from_codes(c: Codes) -> torch.Tensor:
    """float32 [rows, cols] values of the blocks, in ggml's order of operations (d*q, then + m)."""
    rows, nb, _ = c.q.shape
    out = c.d.float() * c.q.float()
    if c.m is not None:
        out = out + c.m.float()
    return out.reshape(rows, nb * BLOCK)


def dequantized(w: torch.Tensor, bits: int | str) -> torch.Tensor:
    """Values of `w` ([rows, cols], blocks along cols) after a round trip through the GGUF type."""
    if isinstance(bits, str):
        return _kq().dequantized(w, bits)
    if bits == 16:
        return w.detach().float().to(torch.float16).float()
    return from_codes(codes(w, bits))


def _activation_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml-cpu's quantize_row_q8_0 / q8_1 on activations, 32-blocks along the last dim:
    (d fp32 (..., nb, 1), d as stored in float16, integer codes (..., nb, 32) as floats).
    The SIMD kernels round to nearest-even (_mm256_round_ps / vcvtnq), unlike the C reference."""
    *lead, n = x.shape
    b = x.float().reshape(*lead, n // BLOCK, BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return d, d.to(torch.float16).float(), torch.round(b * inv)


def runtime_linear(x: torch.Tensor, w: torch.Tensor | Codes, bits: int) -> torch.Tensor:
    """x @ w.T as llama.cpp's CPU kernels compute it for `w` ([out, in]) stored at `bits`, up to float
    summation order. Those kernels round the activations too: to float16 against F16 weights, to Q8_0
    blocks against Q8_0, and to Q8_1 blocks (with float16 block sums s = fp16(d * sum q), which meet the
    weight's block minimum) against Q5_1. llama.cpp's attention also rounds Q, K, V (float16 KV
    cache) and the probabilities to float16. Measured on SmolLM2 variants (29 layers, 20 sentences):
    weight-only fake quantization differs from llama.cpp by -0.15% (Q8_0) to +4.1% (mixed 4/5/8/16-bit)
    perplexity; with this in every matmul -1.1% / -0.7%; adding float16 attention -0.03% / +0.8%.
    `w` may be its precomputed `codes(w, bits)` (quantizing a large table every call is slow).
    A named type computes as `gguf_kquants.runtime_linear` (Q8_K / Q8_0 activations)."""
    if isinstance(bits, str):
        return _kq().runtime_linear(x, w, bits)
    if bits == 16:
        return F.linear(x.to(torch.float16).float(), dequantized(w, 16))
    c = w if isinstance(w, Codes) else codes(w, bits)
    d, d16, q = _activation_blocks(x)
    y = F.linear((d16 * q).flatten(-2), from_codes(c))
    if c.m is None:
        return y
    # from_codes adds m * sum(x_deq) per block; the kernel adds m * s with s rounded to float16
    sums = q.sum(-1, keepdim=True)
    ds = ((d * sums).to(torch.float16).float() - d16 * sums).squeeze(-1)  # (..., nb)
    return y + ds @ c.m.float().squeeze(-1).T


# ---- Named types -------------------------------------------------------------------------------------
# A matrix's choice is its bit-width (the four types above, as the `phone` profile has always named them)
# or, for llama.cpp's K-quants and IQ4_NL, the type's name. Device profiles may name every type
# (`allowed_types`); NAMES maps each name to its choice, so Q4_0 / Q5_1 / Q8_0 / F16 keep their integer
# form and a config written before named types existed reads (and hashes) the same.
KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
CHOICES = BITS + KTYPES
NAMES: dict[str, int | str] = {"Q4_0": 4, "Q5_1": 5, "Q8_0": 8, "F16": 16, **{k: k for k in KTYPES}}
TYPE_OF_BITS = {4: "Q4_0", 5: "Q5_1", 8: "Q8_0", 16: "F16"}
# Learned clipping slot of each named type in the GGUF row of a matrix's clip table (tailor.quant.fake:
# nine slots, indexed by bit-width; GGUF's widths 4, 5 and 8 use theirs, the named types the six others,
# so the table keeps its shape and a checkpoint trained before named types loads unchanged).
CLIP_SLOT = {"Q4_K": 0, "Q5_K": 1, "Q2_K": 2, "Q3_K": 3, "Q6_K": 6, "IQ4_NL": 7}


def _kq():
    from tailor.quant import gguf_kquants  # imports this module: resolved at call time
    return gguf_kquants


def block(choice: int | str) -> int:
    """Elements per block along the input dimension: a matrix takes the type only if its columns are
    whole blocks (Q2_K ... Q6_K: 256; IQ4_NL and the 32-blocks: 32; F16: 1)."""
    if isinstance(choice, str):
        return _kq().ktype(choice).block
    return 1 if choice == 16 else BLOCK


def bits_per_weight(choice: int | str) -> float:
    """Stored bits per weight, block scales included (Q4_0 4.5, Q2_K 2.625, F16 16)."""
    if isinstance(choice, str):
        return _kq().ktype(choice).bits_per_weight
    return 16.0 if choice == 16 else 8 * BLOCK_BYTES[choice] / BLOCK


def codes_of(w: torch.Tensor, choice: int | str):
    """Stored fields of `w` at `choice` (`Codes`, or `gguf_kquants.KCodes` for a named type)."""
    return _kq().codes(w, choice) if isinstance(choice, str) else codes(w, choice)


def clip_block(choice: int | str) -> int:
    """Elements that share one range (learned clipping's block): a named type's sub-block (16 or 32)."""
    return _kq().ktype(choice).sub if isinstance(choice, str) else BLOCK


def block_range(b: torch.Tensor, choice: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The range a named type's quantizer derives its sub-block scale from (`gguf_kquants.block_range`)."""
    return _kq().block_range(b, choice)
