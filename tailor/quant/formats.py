"""Exact byte counts of each export format; one module per format holds its grid and its sizes.

These numbers are what `SubnetConfig.nbytes` adds up and what export must produce: tests compare them
with the tensors written into the real files.
"""
from __future__ import annotations

from tailor.formats import BACKENDS, backend

BLOCK = 32
FORMATS = {name: b.bits for name, b in BACKENDS.items()}


def grid(fmt: str):
    """The grid module of format `fmt` (its backend's); ValueError naming the known formats."""
    return backend(fmt).grid


def allowed_bits(fmt: str) -> tuple[int, ...]:
    return grid(fmt).BITS


def matrix_bytes(fmt: str, bits: int, rows: int, cols: int) -> int:
    g = grid(fmt)
    if bits not in g.BITS:
        raise ValueError(f"format {fmt} has no {bits}-bit type (allowed {g.BITS})")
    if bits != 16 and cols % BLOCK:
        raise ValueError(f"{cols} columns are not whole {BLOCK}-element blocks")
    return g.matrix_bytes(bits, rows, cols)


def embedding_bytes(fmt: str, bits: int, vocab: int, hidden: int) -> int:
    """The tied token embedding / LM head, stored once."""
    return grid(fmt).embedding_bytes(bits, vocab, hidden)


def vector_bytes(fmt: str, n: int) -> int:
    return grid(fmt).vector_bytes(n)
