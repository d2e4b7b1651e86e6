"""GPU speed switches shared by training and benchmarks."""
from __future__ import annotations

from tailor import distill
from tailor.models import model
from tailor.quant import fake


def enable_compile() -> None:
    """torch.compile the paths made of many small kernels: the quantizer, the KD loss, and the blocks'
    elementwise chains (norms, RoPE, SwiGLU; training only). Whole decoder blocks stay eager: elastic widths
    and per-matrix bit-widths would recompile them for nearly every sampled subnet."""
    import torch._dynamo

    # One quantizer graph per (grid, bit-width) and a few shape regimes: Dynamo's default limit of 8
    # graphs per function was hit at 1B (both grids' 6 bit-widths), leaving the rest eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fake.enable_compile()
    distill.enable_compile()
    model.enable_compile()


def disable_compile() -> None:
    """Back to the eager quantizer and KD loss, e.g. after torch.compile failed to build a graph (a
    caller that falls back to eager training calls this first)."""
    fake._compiled = None
    distill._compiled = distill._kd_chunk_compiled = None
    model.disable_compile()
