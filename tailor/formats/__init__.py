"""The export seam: one backend per runtime format, the only place that holds the format's facts.

Adding a runtime format is adding a module here that defines a `Backend` (grid, writer and runner
modules, artifact files, overheads) and listing it in `BACKENDS`; device profiles, the cost model,
search, export, register, promote and reproduce ask `backend(name)`. The order of `BACKENDS` is the
order of the learned clipping slots (`tailor.quant.fake.FMT_INDEX`): append, never reorder.
"""
from __future__ import annotations

from tailor.formats import gguf, onnx
from tailor.formats.base import Backend

BACKENDS: dict[str, Backend] = {b.name: b for b in (gguf.BACKEND, onnx.BACKEND)}


def backend(name: str) -> Backend:
    """The backend of format `name`; ValueError listing the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown export format {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


__all__ = ["BACKENDS", "Backend", "backend"]
