"""GPU speed switches shared by training and benchmarks."""
from __future__ import annotations

from tailor import distill
from tailor.quant import fake


def enable_compile() -> None:
    """torch.compile the paths made of many small kernels: the per-matrix quantizer and the KD loss.
    The decoder blocks stay eager: elastic widths and per-matrix bit-widths would recompile them for
    nearly every sampled subnet."""
    fake.enable_compile()
    distill.enable_compile()
