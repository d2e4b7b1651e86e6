"""llama.cpp's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_NL as a fake-quant grid: torch
quantizer, dequantizer bit-exact with ggml, block range for learned clipping, runtime emulation.

Sources (llama.cpp as vendored by llama-cpp-python 0.3.36; gguf-py 0.19 `gguf.quants` is the oracle):
  layouts     ggml/src/ggml-common.h: block_q2_K ... block_q6_K, block_iq4_nl, kvalues_iq4nl, block_q8_K
  values      ggml/src/ggml-quants.c: dequantize_row_q{2..6}_K, dequantize_row_iq4_nl
  activations ggml/src/ggml-quants.c quantize_row_q8_K_ref (used as is by ggml-cpu on x86 and ARM; the
              AVX2 repack variant picks the other sign on ties, which gives the same values d * q)

Values per element, in ggml's order of operations (all float32; d, dmin stored as float16):
  Q2_K   16 sub-blocks of 16   (d * sc) * q - (dmin * m)      q 0..3,    sc, m 4-bit unsigned
  Q3_K   16 sub-blocks of 16   (d * sc) * q                   q -4..3,   sc 6-bit signed -32..31
  Q4_K    8 sub-blocks of 32   (d * sc) * q - (dmin * m)      q 0..15,   sc, m 6-bit unsigned
  Q5_K    8 sub-blocks of 32   (d * sc) * q - (dmin * m)      q 0..31,   sc, m 6-bit unsigned
  Q6_K   16 sub-blocks of 16   (d * sc) * q                   q -32..31, sc int8
  IQ4_NL blocks of 32          d * kvalues_iq4nl[q]           q 0..15 (a 16-entry table, -127..113)
Every product above is exact in float32 (an fp16 mantissa of 11 bits times integers of at most 6 + 6
bits needs at most 23), so only the final subtraction rounds: the values do not depend on evaluation
order or on FMA contraction (torch.compile / Triton may fuse `a * b - c`), and equal ggml's bit for bit.

The quantizer is ours, not llama.cpp's (its per-block iterative searches are sequential C loops):
deterministic, vectorised over all blocks, with a Python loop only over a few candidate scales.
  1. Each sub-block gets a float scale (and offset <= 0 for the affine types) by a grid of candidate
     inverse scales around "range / levels", each refitted by least squares on its codes; the candidate
     with the smallest squared error wins (llama.cpp's make_qkx2_quants / make_qx_quants idea, with
     unit weights: we minimise plain RMSE).
  2. The sub-block scales (and offsets) are quantized to their integer codes against the fp16
     super-block scale, computed from the fp16 value actually stored.
  3. The element codes are re-chosen as the nearest level of the stored (dequantized) sub-block scales
     (IQ4_NL: of the fp16 d), so what is stored is the best the stored scales can do.
  4. (K-quants) One refinement: each sub-block's scale (and offset) is refitted to its codes by least
     squares, re-quantized and re-assigned, and kept where it lowers that sub-block's error.
Relative RMSE (RMSE / std) against llama.cpp's own quantizer (ggml_quantize_chunk without imatrix, what
llama-quantize writes), 256 x 2048 weights, ours / llama.cpp's:
            Gaussian                   Student-t(3)               SmolLM2 ffn_down (Q4_1 values)
  Q2_K      0.2676 / 0.2961  (0.904)   0.2989 / 0.3485  (0.858)   0.2730 / 0.3056  (0.893)
  Q3_K      0.1436 / 0.1508  (0.952)   0.1793 / 0.1862  (0.963)   0.1463 / 0.1544  (0.948)
  Q4_K      0.0709 / 0.0713  (0.994)   0.0908 / 0.0911  (0.997)   0.0185 / 0.0185  (0.999)
  Q5_K      0.0359 / 0.0361  (0.996)   0.0469 / 0.0470  (0.999)   0.0180 / 0.0195  (0.926)
  Q6_K      0.0169 / 0.0177  (0.952)   0.0250 / 0.0257  (0.971)   0.0164 / 0.0179  (0.916)
  IQ4_NL    0.0736 / 0.0760  (0.968)   0.0968 / 0.0998  (0.970)   0.0672 / 0.0757  (0.888)
(llama.cpp minimises an |x|-weighted error, we the plain one; with an imatrix its weighting differs again.)
Cost: a few dozen elementwise passes over the weight per call (the candidate loop: 16/5/21/16/7/8 steps
for Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_NL, two orientations for the symmetric types); `KType.steps` trades
accuracy for speed. Measured on this host's CPU, one thread, a 576 x 1536 matrix: Q2_K 133 ms, Q3_K 82,
Q4_K 126, Q5_K 150, Q6_K 153, IQ4_NL 386 (gguf_grid's Q4_0: 42 ms). Not yet timed on a GPU. The codes are not idempotent: re-quantizing dequantized values can pick other,
equally good codes (5-10% of elements for Q2_K/Q4_K/Q5_K), so export must pack the same float (clipped)
weights the fake quantizer saw, or pack the codes themselves (`gguf_kpack.pack_codes`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from tailor.quant.gguf_grid import _activation_blocks

QK_K = 256
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class KType:
    """One ggml block type. `sub` is the sub-block that owns a scale: the block learned clipping uses."""

    name: str
    qtype: T
    block: int           # elements per (super-)block along the input dimension
    block_bytes: int     # sizeof(block_*) in ggml-common.h
    sub: int             # elements per scale
    qmin: int            # element code range
    qmax: int
    affine: bool         # has a per-sub-block min (x = a * q - b); else symmetric (x = a * q)
    sc_min: int = 0      # sub-block scale code range (min code range is 0..sc_max when affine)
    sc_max: int = 0
    steps: tuple[float, ...] = ()  # candidate level offsets searched per sub-block (step 1)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def activation_block(self) -> int:
        """Block of the activations' quantization in llama.cpp's CPU dot product (Q8_K or Q8_0)."""
        return QK_K if self.block == QK_K else 32


def _steps(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))


TYPES: dict[str, KType] = {t.name: t for t in (
    KType("Q2_K", T.Q2_K, QK_K, 84, 16, 0, 3, True, 0, 15, _steps(-0.5, 1.0, 16)),
    KType("Q3_K", T.Q3_K, QK_K, 110, 16, -4, 3, False, -32, 31, _steps(-0.6, 0.6, 5)),
    KType("Q4_K", T.Q4_K, QK_K, 144, 32, 0, 15, True, 0, 63, _steps(-1.0, 1.0, 21)),
    KType("Q5_K", T.Q5_K, QK_K, 176, 32, 0, 31, True, 0, 63, _steps(-0.5, 1.0, 16)),
    KType("Q6_K", T.Q6_K, QK_K, 210, 16, -32, 31, False, -128, 127, _steps(-0.9, 0.9, 7)),
    KType("IQ4_NL", T.IQ4_NL, 32, 18, 32, 0, 15, False, 0, 0, _steps(-7.0, 7.0, 8)),
)}


def ktype(name: str | T | KType) -> KType:
    if isinstance(name, KType):
        return name
    key = name.name if isinstance(name, T) else str(name).upper()
    if key not in TYPES:
        raise ValueError(f"no K-quant/IQ4_NL grid for {name!r} (known: {sorted(TYPES)})")
    return TYPES[key]


def matrix_bytes(name: str | T, rows: int, cols: int) -> int:
    t = ktype(name)
    _check_cols(t, cols)
    return rows * (cols // t.block) * t.block_bytes


class KCodes(NamedTuple):
    """Stored fields of a [rows, cols] weight, nb = cols // block super-blocks per row.

    d: (rows, nb, 1) float16; dmin: (rows, nb, 1) float16 (Q2_K/Q4_K/Q5_K) or None;
    sc: (rows, nb, block // sub) int16 sub-block scale codes (signed for Q3_K/Q6_K, as ggml uses them,
    i.e. Q3_K's stored value minus 32), None for IQ4_NL; m: like sc, min codes, or None;
    q: (rows, nb, block) int16 element codes in the type's range (IQ4_NL: table indices)."""

    type: str
    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor | None
    m: torch.Tensor | None
    q: torch.Tensor


def _check_cols(t: KType, cols: int) -> None:
    if cols % t.block:
        raise ValueError(f"{t.name} needs columns in whole {t.block}-element blocks, got {cols} columns")


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, 0 where b == 0 (an all-zero block has scale 0 and codes 0)."""
    nz = b != 0
    return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(a))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


# -- step 1: float scale (and offset) per sub-block, grid of candidates + least squares ------------------

def _sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis (16, 32: a power of two) by a fixed pairwise tree of elementwise adds, so
    the sums do not depend on a device's reduction order. Measured on an H200 (torch 2.11) against this
    CPU (`benchmarks/kquant_devices.py`, reports/bench/kquant_devices.json): Q3_K, Q6_K and IQ4_NL
    give bitwise the same values; Q4_K/Q5_K differ in up to 4e-6 of the codes and Q2_K in some scales
    on one of two weight sets (other float ops, e.g. division and fp16 rounding paths, still differ).
    So export must pack on the device the model was trained and evaluated on, or pack the codes.
    (..., n) -> (..., 1)."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x


def _fit_affine(x: torch.Tensor, t: KType) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) -> scale a >= 0, offset b <= 0 (..., 1) minimising sum((a * L + b - x)^2) over the
    candidates L = clamp(round((x - min) * (qmax + s) / range)), min = min(x, 0).

    All sums go through _sum's fixed tree (see _sum for what that does and does not make device-independent)."""
    n = x.shape[-1]
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    rng = x.amax(-1, keepdim=True) - lo
    xs = x - lo                                                   # >= 0
    inv = _div(torch.ones_like(rng), rng)                         # per sub-block: no per-element division
    best_a, best_b = (rng / t.qmax), lo  # plain min/max: the fallback for degenerate fits
    L = torch.round(xs * (inv * t.qmax)).clamp(0, t.qmax)
    best = _sum((best_a * L + best_b - x) ** 2)
    sx, sx2 = _sum(x), _sum(x * x)
    for s in t.steps:
        L = torch.round(xs * (inv * (t.qmax + s))).clamp(0, t.qmax)
        sl, sl2, sxl = _sum(L), _sum(L * L), _sum(x * L)
        det = n * sl2 - sl * sl
        a = _div(n * sxl - sx * sl, det)
        b = _div(sl2 * sx - sl * sxl, det)
        pos = b > 0  # the format's offset is -dmin * m <= 0: refit the scale alone
        a, b = torch.where(pos, _div(sxl, sl2), a), torch.where(pos, torch.zeros_like(b), b)
        # sum((a L + b - x)^2) from the sums (no second pass over the elements)
        err = a * a * sl2 + 2 * a * b * sl + n * b * b - 2 * a * sxl - 2 * b * sx + sx2
        better = (det > 0) & (err < best)
        best = torch.where(better, err, best)
        best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
    return best_a.clamp(min=0), best_b.clamp(max=0)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest |x| with its sign (the first one on ties), (..., 1)."""
    return torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))


def _fit_symmetric(x: torch.Tensor, t: KType) -> torch.Tensor:
    """x (..., n) -> signed scale a (..., 1) minimising sum((a * L - x)^2), L = clamp(round(x / a_k))
    for candidates mapping the largest |x| to the extra negative level qmin (- s) or to qmax (+ s).
    Sums by _sum's fixed tree, as _fit_affine."""
    mx = _signed_max(x)
    inv = _div(torch.ones_like(mx), mx)
    best_a = (mx / t.qmin)
    best = _sum((best_a * torch.round(x * (inv * t.qmin)).clamp(t.qmin, t.qmax) - x) ** 2)
    sx2 = _sum(x * x)
    for k in [t.qmin - s for s in t.steps] + [t.qmax + s for s in t.steps]:
        L = torch.round(x * (inv * k)).clamp(t.qmin, t.qmax)
        sxl, sl2 = _sum(x * L), _sum(L * L)
        a = _div(sxl, sl2)
        err = sx2 - a * sxl  # sum((a L - x)^2) at the least-squares a
        better = err < best
        best, best_a = torch.where(better, err, best), torch.where(better, a, best_a)
    return best_a


# -- steps 2 and 3 --------------------------------------------------------------------------------------

def _super_scale(a: torch.Tensor, levels: float) -> torch.Tensor:
    """fp16 super-block scale d for sub-block scales a (rows, nb, nsub): the largest maps to `levels`
    (negative levels for signed codes: the signed largest maps to the extra negative code)."""
    ref = _signed_max(a) if levels < 0 else a.amax(-1, keepdim=True)
    return _fp16(ref / levels)


def _lsq_given_codes(x: torch.Tensor, L: torch.Tensor, affine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares (a, b) of x ~ a * L + b per sub-block for fixed codes L (b = 0 when not affine,
    b <= 0 when affine) by _sum's fixed tree; returns (a, b, ok) with ok False where the fit is degenerate."""
    sl2, sxl = _sum(L * L), _sum(x * L)
    if not affine:
        return _div(sxl, sl2), torch.zeros_like(sxl), sl2 > 0
    n, sl, sx = x.shape[-1], _sum(L), _sum(x)
    det = n * sl2 - sl * sl
    a, b = _div(n * sxl - sx * sl, det), _div(sl2 * sx - sl * sxl, det)
    pos = b > 0
    a, b = torch.where(pos, _div(sxl, sl2), a), torch.where(pos, torch.zeros_like(b), b)
    return a, b, det > 0


def _assign(b: torch.Tensor, t: KType, a: torch.Tensor, off: torch.Tensor | None, d: torch.Tensor,
            dmin: torch.Tensor | None):
    """Scale codes for float sub-block scales a (and offsets off >= 0) against the stored d (dmin),
    then element codes at the stored scales' levels: (sc, m, q, squared error per sub-block)."""
    sc = torch.round(_div(a, d.float())).clamp(t.sc_min, t.sc_max)
    dl = (d.float() * sc).unsqueeze(-1)                           # exactly ggml's d * sc
    if off is None:
        m, ml = None, torch.zeros_like(dl)
        q = torch.round(b * _div(torch.ones_like(dl), dl)).clamp(t.qmin, t.qmax)
        v = dl * q
    else:
        m = torch.round(_div(off, dmin.float())).clamp(0, t.sc_max)
        ml = (dmin.float() * m).unsqueeze(-1)
        q = torch.round((b + ml) * _div(torch.ones_like(dl), dl)).clamp(t.qmin, t.qmax)
        v = dl * q - ml
    return sc, m, q, ((v - b) ** 2).sum(-1)


def _codes_superblocks(b: torch.Tensor, t: KType) -> KCodes:
    """Q2_K ... Q6_K: b (rows, nb, nsub, sub). Steps 1-3 of the module docstring, then one refinement:
    refit each sub-block's scale (and offset) to its codes by least squares, re-quantize against the
    same d (dmin), re-assign, and keep it where it lowers that sub-block's error (~0.5% RMSE)."""
    rows, nb, nsub, sub = b.shape
    if t.affine:
        a, off = _fit_affine(b, t)                                # (rows, nb, nsub, 1)
        a, off = a.squeeze(-1), (-off).squeeze(-1)                # offsets as the stored, >= 0, minimum
        d, dmin = _super_scale(a, t.sc_max), _super_scale(off, t.sc_max)
    else:
        a, off = _fit_symmetric(b, t).squeeze(-1), None
        d, dmin = _super_scale(a, float(t.sc_min)), None
    sc, m, q, err = _assign(b, t, a, off, d, dmin)
    a2, b2, ok = _lsq_given_codes(b, q, t.affine)
    a2 = torch.where(ok, a2, a.unsqueeze(-1)).squeeze(-1)
    off2 = None if off is None else torch.where(ok, -b2, off.unsqueeze(-1)).squeeze(-1).clamp(min=0)
    sc2, m2, q2, err2 = _assign(b, t, a2 if off is None else a2.clamp(min=0), off2, d, dmin)
    better = err2 < err                                           # (rows, nb, nsub)
    sc, q = torch.where(better, sc2, sc), torch.where(better.unsqueeze(-1), q2, q)
    m = None if m is None else torch.where(better, m2, m)
    i16 = torch.int16
    return KCodes(t.name, d, dmin, sc.to(i16), None if m is None else m.to(i16),
                  q.reshape(rows, nb, nsub * sub).to(i16))


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] via index_select (advanced indexing is ~30x slower on CPU)."""
    return table.index_select(0, idx.flatten()).reshape(idx.shape)


def _table(device: torch.device) -> torch.Tensor:
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


_LUT_HALF = 256  # covers 2 * y in [-256, 256], beyond every midpoint of the table


def _build_lut(device: torch.device) -> torch.Tensor:
    """For j in [-_LUT_HALF, _LUT_HALF]: how many of the IQ4_NL table's midpoints m/2 have m <= j."""
    table = _table(device)
    mids2 = table[1:] + table[:-1]  # 2 * midpoints, integers
    j = torch.arange(-_LUT_HALF, _LUT_HALF + 1, device=device, dtype=table.dtype)
    return (mids2 <= j.unsqueeze(-1)).sum(-1)


_cached_lut = functools.lru_cache(maxsize=8)(_build_lut)  # eager: built once per device, not per candidate


def _nearest_index(y: torch.Tensor) -> torch.Tensor:
    """Index of the IQ4_NL table's entry nearest to y (the lower one at exact midpoints), as
    torch.bucketize(y, midpoints) but ~5x faster on CPU: the midpoints are multiples of 1/2, so
    j = ceil(2 y) - 1 (y in (j/2, (j+1)/2]) decides every comparison; a lookup table counts them."""
    # under torch.compile the table is built in the graph (constant-folded), not read from a Python cache
    lut = _build_lut(y.device) if torch.compiler.is_compiling() else _cached_lut(y.device)
    pos = (torch.ceil(2 * y) - 1).clamp(-_LUT_HALF, _LUT_HALF) + _LUT_HALF
    return _lookup(lut, pos.int())


def _codes_iq4nl(b: torch.Tensor, t: KType) -> KCodes:
    """Blocks b (rows, nb, 32): candidates d = max / (-127 + s) and max / (113 + s), each refitted by
    least squares; the best is rounded to fp16 and the codes re-assigned to its levels."""
    table = _table(b.device)
    mx = _signed_max(b)
    inv = _div(torch.ones_like(mx), mx)
    bx2 = _sum(b * b)
    best_d = best = None
    for k in [KVALUES_IQ4NL[0] + s for s in t.steps] + [KVALUES_IQ4NL[-1] + s for s in t.steps]:
        v = _lookup(table, _nearest_index(b * (inv * k)))
        sxv, sv2 = _sum(b * v), _sum(v * v)
        d = _div(sxv, sv2)
        err = bx2 - d * sxv
        if best is None:
            best, best_d = err, d
            continue
        better = err < best
        best, best_d = torch.where(better, err, best), torch.where(better, d, best_d)
    d = _fp16(best_d)
    q = _nearest_index(b * _div(torch.ones_like(best_d), d.float()))  # levels of the stored d
    return KCodes(t.name, d, None, None, None, q.to(torch.int16))


def codes(w: torch.Tensor, name: str | T) -> KCodes:
    """Quantize `w` ([rows, cols], cols a multiple of the type's block) to the type's stored fields."""
    t = ktype(name)
    if w.dim() != 2:
        raise ValueError(f"{t.name} codes expect a [rows, cols] matrix, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    _check_cols(t, cols)
    b = w.detach().float().reshape(rows, cols // t.block, t.block)
    if t.name == "IQ4_NL":
        return _codes_iq4nl(b, t)
    b = b.reshape(rows, cols // t.block, t.block // t.sub, t.sub)
    return _codes_superblocks(b, t)


def from_codes(c: KCodes) -> torch.Tensor:
    """float32 [rows, cols] values of the blocks exactly as ggml's dequantize_row_* computes them."""
    t = ktype(c.type)
    rows, nb, n = c.q.shape
    q = c.q.float()
    if c.sc is None:  # IQ4_NL: d * kvalues[q]
        return (c.d.float() * _lookup(_table(q.device), c.q.int())).reshape(rows, nb * n)
    nsub = n // t.sub
    q = q.reshape(rows, nb, nsub, t.sub)
    out = (c.d.float() * c.sc.float()).unsqueeze(-1) * q
    if c.m is not None:
        out = out - (c.dmin.float() * c.m.float()).unsqueeze(-1)
    return out.reshape(rows, nb * n)


def dequantized(w: torch.Tensor, name: str | T) -> torch.Tensor:
    """Values of `w` after a round trip through the type: what llama.cpp reads from `pack(w)`."""
    return from_codes(codes(w, name))


def block_range(b: torch.Tensor, name: str | T) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned clipping's range of blocks b (..., ktype(name).sub): what the quantizer derives its step
    from. Symmetric types (Q3_K, Q6_K, IQ4_NL) scale from the largest |x|: [-amax, amax]; affine types
    (Q2_K, Q4_K, Q5_K) from [min(x, 0), max(x)] (their offset is never positive)."""
    t = ktype(name)
    if t.affine:
        return b.amin(-1, keepdim=True).clamp(max=0), b.amax(-1, keepdim=True)
    a = b.abs().amax(-1, keepdim=True)
    return -a, a


# -- runtime emulation -------------------------------------------------------------------------------

def q8_k(x: torch.Tensor) -> torch.Tensor:
    """Activations (..., n) as llama.cpp's quantize_row_q8_K leaves them (n a multiple of 256), as
    float32 values d * q: iscale = -127 / (signed largest |x|), q = round-half-even(iscale * x) (its
    nearest_int), q <= 127, d = 1 / iscale."""
    *lead, n = x.shape
    b = x.float().reshape(*lead, n // QK_K, QK_K)
    mx = _signed_max(b)
    iscale = _div(torch.full_like(mx, -127.0), mx)
    q = torch.round(b * iscale).clamp(max=127) + 0.0  # an int8 code: no -0.0
    return (_div(torch.ones_like(iscale), iscale) * q).reshape(*lead, n)


def runtime_linear(x: torch.Tensor, w: torch.Tensor | KCodes, name: str | T) -> torch.Tensor:
    """x @ w.T as llama.cpp's CPU kernels compute it for `w` ([out, in]) stored as `name`, up to float
    summation order: the activations are rounded to Q8_K blocks of 256 (K-quants: the integer dot
    products use d_x * q_x exactly) or to Q8_0 blocks of 32 with float16 d (IQ4_NL), the weights are the
    grid. `w` may be its precomputed `codes(w, name)`."""
    t = ktype(name)
    c = w if isinstance(w, KCodes) else codes(w, t.name)
    if t.name == "IQ4_NL":  # Q8_0 activations, as against Q8_0 / Q4_0 weights
        _, d16, q = _activation_blocks(x)
        xq = (d16 * q).flatten(-2)
    else:
        xq = q8_k(x)
    return F.linear(xq, from_codes(c))
