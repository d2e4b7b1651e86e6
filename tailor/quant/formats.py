"""Exact byte counts of each export format; one module per format holds its grid and its sizes.

These numbers are what `SubnetConfig.nbytes` adds up and what export must produce: tests compare them
with the tensors written into the real files.

A matrix's *choice* (`Choice`) is a bit-width (the format's type of that width: GGUF 4 = Q4_0, ONNX 4 =
4-bit MatMulNBits; 16 = float16 everywhere) or a type name that one grid defines (GGUF's K-quants and
IQ4_NL: "Q2_K" ... "Q6_K", "IQ4_NL"). The helpers below that take no format resolve a name through the
grid that defines it (names are unique across formats), so the search space can order and filter choices
without knowing its format.
"""
from __future__ import annotations

from typing import Iterable, Union

from tailor.formats import BACKENDS, backend

Choice = Union[int, str]
BLOCK = 32
FORMATS = {name: b.bits for name, b in BACKENDS.items()}


def grid(fmt: str):
    """The grid module of format `fmt` (its backend's); ValueError naming the known formats."""
    return backend(fmt).grid


def allowed_bits(fmt: str) -> tuple[int, ...]:
    return grid(fmt).BITS


def choices(fmt: str) -> tuple[Choice, ...]:
    """Every choice format `fmt` can store: its bit-widths, then its named types."""
    return tuple(getattr(grid(fmt), "CHOICES", grid(fmt).BITS))


def type_names(fmt: str) -> dict[str, Choice]:
    """Type name -> choice of format `fmt` ({} for a format that only knows bit-widths)."""
    return dict(getattr(grid(fmt), "NAMES", {}))


def type_name(fmt: str, choice: Choice) -> str:
    """The name format `fmt` stores `choice` as (GGUF 4 -> "Q4_0", "Q4_K" -> "Q4_K"); a format without
    named types: "<bits>-bit"."""
    for name, c in type_names(fmt).items():
        if c == choice:
            return name
    if choice not in choices(fmt):
        raise ValueError(f"format {fmt} has no type {choice!r} (allowed {choices(fmt)})")
    return f"{choice}-bit"


def _owner(name: str):
    for b in BACKENDS.values():
        if name in getattr(b.grid, "NAMES", {}):
            return b.grid
    known = sorted({n for b in BACKENDS.values() for n in getattr(b.grid, "NAMES", {})})
    raise ValueError(f"unknown quantization type {name!r} (known: {', '.join(known)})")


def is_float(choice: Choice) -> bool:
    """16 = the float16 copy of the weight (no quantization)."""
    return choice == 16


def parse_choice(v: Choice) -> Choice:
    """A choice as JSON or YAML holds it: an int bit-width, or a type name (canonical: 'Q8_0' -> 8)."""
    if isinstance(v, bool):
        raise ValueError(f"not a quantization choice: {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    return _owner(str(v)).NAMES[str(v)]


def bits_per_weight(choice: Choice) -> float:
    """Nominal order of choices: a bit-width itself, a named type its stored bits per weight."""
    return float(choice) if isinstance(choice, int) else float(_owner(choice).bits_per_weight(choice))


def sort_choices(cs: Iterable[Choice]) -> tuple[Choice, ...]:
    """Fewest bits first (ints sort as before; Q4_K and IQ4_NL, both 4.5 bits, by name)."""
    return tuple(sorted(set(cs), key=lambda c: (bits_per_weight(c), str(c))))


def block_of(choice: Choice) -> int:
    """Columns a matrix must have in whole multiples of to take `choice` (F16 1, 32-blocks 32, K-quants 256)."""
    if isinstance(choice, str):
        return _owner(choice).block(choice)
    return 1 if choice == 16 else BLOCK


def eligible(choice: Choice, cols: int) -> bool:
    return cols % block_of(choice) == 0


def matrix_bytes(fmt: str, bits: Choice, rows: int, cols: int) -> int:
    g = grid(fmt)
    if bits not in choices(fmt):
        raise ValueError(f"format {fmt} has no type {bits!r} (allowed {choices(fmt)})")
    blk = block_of(bits)
    if cols % blk:
        raise ValueError(f"{cols} columns are not whole {blk}-element blocks of {fmt} type {bits!r}")
    return g.matrix_bytes(bits, rows, cols)


def embedding_bytes(fmt: str, bits: Choice, vocab: int, hidden: int) -> int:
    """The tied token embedding / LM head, stored once."""
    return grid(fmt).embedding_bytes(bits, vocab, hidden)


def vector_bytes(fmt: str, n: int) -> int:
    return grid(fmt).vector_bytes(n)
