"""Storing values as float16 (16-bit weights, GGUF block scales and minima): refuse what does not fit.

float16's largest finite value is 65504; anything beyond rounds to inf, which the runtimes load
without complaint and then compute NaN from (a GGUF holding one such weight ran with perplexity NaN,
and `nan > bound` let the export stage's parity check pass). The quantizer's fp32 model never sees
the overflow, so the file would silently differ from what was evaluated.
"""
from __future__ import annotations

import torch

F16_MAX = float(torch.finfo(torch.float16).max)  # 65504


class PrecisionError(ValueError):
    """A value cannot be stored at its declared precision; the message names the tensor."""


def to_f16(x: torch.Tensor, name: str, what: str = "weight") -> torch.Tensor:
    """`x` as float16, or PrecisionError naming `name`, the first bad element and its value."""
    x = x.detach()
    bad = ~torch.isfinite(x)
    if not bad.any():
        x16 = x.to(torch.float16)
        bad = ~torch.isfinite(x16)  # finite in fp32, beyond float16's range
        if not bad.any():
            return x16
    at = tuple(int(i) for i in bad.nonzero()[0])
    v = float(x[at])
    why = f"is {v}" if not torch.isfinite(torch.tensor(v)) else f"{v:.6g} exceeds float16's range (+-{F16_MAX:.0f})"
    raise PrecisionError(f"{name}: {what} at {list(at)} {why}; it cannot be stored as float16")
