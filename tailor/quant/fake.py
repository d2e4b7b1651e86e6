"""Fake quantization on the export formats' own grids, with straight-through gradients and a learned
clipping range per matrix and bit-width.

Blocks of 32 run along the input dimension (the last axis of an [out, in] weight), as in GGUF and
MatMulNBits, so a row slice or a 32-aligned column slice of a fake-quantized matrix equals the fake
quantization of the slice: elastic slicing and quantization commute.

Learned clipping. Each block's range [lo, hi] (what the format's quantizer derives its step from:
min/max for Q5_1 and MatMulNBits, ±absmax for Q8_0 and Q4_0) is shrunk towards the block's centre by a
factor gamma in [CLIP_MIN, 1], one gamma per matrix, format and bit-width. The weight is clamped to the
shrunk range and then quantized by the unchanged reference quantizer, so the clipped weight, written
back into the matrix ("baked"), quantizes to exactly the same values in the exporter and the runtime:
export stays exact. Gamma's gradient is LSQ's with the codes held fixed: the block's dequantized
values scale with its range, d wq / d gamma = (wq - centre) / gamma.

Named types (GGUF's K-quants and IQ4_NL, `tailor.quant.gguf_kquants`): the same estimator on their
bit-exact grid, the range clipped per sub-block (16 or 32 elements: what owns a scale) as their
quantizer reads it (`gguf_kquants.block_range`), in the slot `gguf_grid.CLIP_SLOT` gives them.
"""
from __future__ import annotations

import torch

from tailor.formats import BACKENDS
from tailor.quant import gguf_grid
from tailor.quant.formats import BLOCK, Choice, block_of, grid

FMT_INDEX = {name: i for i, name in enumerate(BACKENDS)}  # learned-clip slot per format (append-only)
CLIP_MIN = 0.5   # clipping more than half a block's range away never helps at >= 2 bits
CLIP_SLOTS = 9   # gamma[fmt, slot]: bit-widths 0..8 at their own index, named types at clip_slot (16: none)


def clip_slot(fmt: str, bits: Choice) -> int:
    """Column of `bits` in a matrix's clip table row for `fmt` (a bit-width: itself; a named type: its
    grid's CLIP_SLOT)."""
    return bits if isinstance(bits, int) else grid(fmt).CLIP_SLOT[bits]


def _clip_block(fmt: str, bits: Choice) -> int:
    return grid(fmt).clip_block(bits) if isinstance(bits, str) else BLOCK


def _block_range(b: torch.Tensor, fmt: str, bits: Choice) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(bits, str):
        return grid(fmt).block_range(b, bits)
    if fmt == "gguf" and bits in (8, 4):  # Q8_0 / Q4_0 are symmetric: d = absmax / 127 or signed max / -8
        a = b.abs().amax(-1, keepdim=True)
        return -a, a
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    if fmt == "onnx":  # MatMulNBits' quantizer widens the range to include 0
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    return lo, hi


def _clip(w: torch.Tensor, gamma: torch.Tensor, fmt: str, bits: Choice):
    """(clamped blocks, block centre, shape) — clamp differentiable in w, gamma detached."""
    rows, cols = w.shape
    blk = _clip_block(fmt, bits)
    b = w.reshape(rows, cols // blk, blk)
    lo, hi = _block_range(b.detach(), fmt, bits)
    c = torch.zeros_like(lo).clamp(lo, hi)  # 0, or the nearer end for a one-signed block
    g = gamma.detach().clamp(CLIP_MIN, 1.0).to(w.dtype)
    return torch.minimum(torch.maximum(b, c + g * (lo - c)), c + g * (hi - c)), c


@torch.no_grad()
def clipped(w: torch.Tensor, gamma: torch.Tensor | float | None, fmt: str, bits: Choice) -> torch.Tensor:
    """The weight clamped to its learned range: what export packs (quantizing it is the identity on
    the clamp, so it can be baked into the matrix)."""
    if not learns_clip(bits) or gamma is None or float(gamma) >= 1.0:
        return w
    blk = _clip_block(fmt, bits)
    if w.shape[-1] % blk:
        raise ValueError(f"{fmt}: {w.shape[-1]} columns are not whole {blk}-element blocks")
    gamma = torch.as_tensor(gamma, device=w.device)
    return _clip(w, gamma, fmt, bits)[0].reshape(w.shape)


def learns_clip(bits: Choice) -> bool:
    """Whether a choice has a learned clipping slot: every quantized one (not 16)."""
    return bits != 16


_compiled = None  # torch.compile'd _fake_quant, set by enable_compile() (GPU training)


def enable_compile() -> None:
    """Fuse the quantizer's dozen small kernels per matrix into a couple (CUDA only; shapes dynamic, so
    elastic slices do not recompile; one graph per format x bit-width)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_fake_quant, dynamic=True)


def fake_quant(w: torch.Tensor, bits: Choice, fmt: str, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize `w` ([out, in]) on format `fmt`'s grid after learned clipping; straight-through
    gradient for `w` inside the clipping range, LSQ gradient for `gamma`.

    At 16 bits the weight passes unchanged (the supernet's max config must equal the dense model)."""
    if bits == 16:
        return w
    if _compiled is not None and w.is_cuda:
        return _compiled(w, bits, fmt, gamma)
    return _fake_quant(w, bits, fmt, gamma)


def fake_quant_group(ws: list[torch.Tensor], bits: Choice, fmt: str, gammas: list[torch.Tensor] | torch.Tensor,
                     dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """`[fake_quant(w, bits, fmt, g) for w, g in zip(ws, gammas)]` in one quantizer call: equal bit for bit,
    gradients included.

    Why: a supernet or QAT step on a small model is bound by kernel launches, not FLOPs: the quantizer
    is ~70 small ops per matrix (forward and backward; IQ4_NL's scale search ~1,100), run for each of
    the ~210 matrices of each subnet pass. Every grid quantizes blocks independently (a block never
    reads another: `_block_range`, the formats' `codes`), so the matrices' blocks are stacked as the rows
    of one [N, block] matrix (block = the choice's own: 32, or a K-quant's 256-wide super-block), each
    block carrying its matrix's clipping factor, quantized once and split back. This is horizontal
    fusion as in torch._foreach_*; the stacking costs one copy of the weights.

    ws: [out_i, in_i] weights (slices are fine), every in_i a whole number of blocks of `bits`; gammas:
    each matrix's clipping factor (0-d tensors: learned clipping, as `QLinear.gamma`), or all of them as
    one [len(ws)] tensor (fewer gradient kernels: one expansion to the blocks); dtype: cast the
    results to it in one kernel (autocast's bf16: what F.linear would cast each matrix to). Returns tensors
    of the ws' shapes. ValueError if a width is not whole blocks, or bits is 16."""
    if bits == 16:
        raise ValueError("fake_quant_group: 16 bits is no quantization (use the weights)")
    if len(ws) != len(gammas):
        raise ValueError(f"fake_quant_group: {len(ws)} weights but {len(gammas)} clipping factors")
    blk = block_of(bits)
    for w in ws:
        if w.shape[-1] % blk:
            raise ValueError(f"{fmt} {bits!r}: {w.shape[-1]} columns are not whole {blk}-element blocks")
    rows = [w.numel() // blk for w in ws]
    stacked = torch.cat([w.reshape(n, blk) for w, n in zip(ws, rows)])
    gvec = gammas if isinstance(gammas, torch.Tensor) else torch.stack(list(gammas))
    counts = torch.tensor(rows)
    if gvec.is_cuda:  # from pinned memory: a pageable copy would wait for the GPU's queue (a host sync)
        counts = counts.pin_memory().to(gvec.device, non_blocking=True)
    g = torch.repeat_interleave(gvec.reshape(-1), counts, output_size=stacked.shape[0]).reshape(-1, 1, 1)
    fq = _compiled if _compiled is not None and stacked.is_cuda else _fake_quant
    out = fq(stacked, bits, fmt, g)
    if dtype is not None:
        out = out.to(dtype)
    return [o.reshape(w.shape) for o, w in zip(out.split(rows), ws)]


def _fake_quant(w: torch.Tensor, bits: Choice, fmt: str, gamma: torch.Tensor | None) -> torch.Tensor:
    if gamma is None:
        wq = grid(fmt).dequantized(w.detach(), bits).to(w.dtype)
        return wq + (w - w.detach())  # exactly wq forward (w + (wq - w) is an ulp off), identity gradient
    wc, c = _clip(w, gamma, fmt, bits)
    wq = grid(fmt).dequantized(wc.detach().reshape(w.shape), bits).to(w.dtype).reshape(wc.shape)
    g = gamma.clamp(CLIP_MIN, 1.0).to(w.dtype)
    scale = g / g.detach()  # 1.0 exactly forward; carries d/d gamma
    out = wq + (wc - wc.detach()) + ((wq - c) * scale - (wq - c))  # forward: exactly wq
    return out.reshape(w.shape)


def runtime_weight(w: torch.Tensor, bits: Choice, fmt: str):
    """What `runtime_linear` needs of a weight, precomputed once (block codes for GGUF)."""
    if fmt == "gguf" and bits != 16:
        return gguf_grid.codes_of(w, bits)
    return grid(fmt).dequantized(w, bits)


def runtime_linear(x: torch.Tensor, w, bits: Choice, fmt: str) -> torch.Tensor:
    """x @ w.T as the device runtime computes it (inference only). llama.cpp's CPU kernels also round
    the activations (Q8_0/Q8_1 blocks, float16); onnxruntime's MatMulNBits computes in float32."""
    if fmt == "gguf":
        return gguf_grid.runtime_linear(x, w, bits)
    return torch.nn.functional.linear(x, w)
