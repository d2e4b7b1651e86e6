"""tailor.quant.formats: the names, blocks and parsing every format shares, against llama.cpp's and
ONNX Runtime's own names (GGUF 4 bits is stored as Q4_0, 16 as F16; ONNX has no named types), and the
errors a wrong name or width gets."""
from __future__ import annotations

import re

import pytest

from tailor.quant import formats as f


def test_bit_widths_and_choices_per_format() -> None:
    assert f.allowed_bits("gguf") == (4, 5, 8, 16) and f.allowed_bits("onnx") == (2, 4, 8, 16)
    assert f.choices("onnx") == (2, 4, 8, 16)
    assert f.choices("gguf") == (4, 5, 8, 16, "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


@pytest.mark.parametrize("fmt, choice, name", [("gguf", 4, "Q4_0"), ("gguf", 5, "Q5_1"), ("gguf", 8, "Q8_0"),
                                               ("gguf", 16, "F16"), ("gguf", "Q3_K", "Q3_K"), ("gguf", "IQ4_NL", "IQ4_NL"),
                                               ("onnx", 4, "4-bit"), ("onnx", 2, "2-bit")])
def test_type_name(fmt: str, choice, name: str) -> None:
    assert f.type_name(fmt, choice) == name


@pytest.mark.parametrize("fmt, choice", [("gguf", "Q9"), ("gguf", 2), ("onnx", 3), ("onnx", "Q4_K")])
def test_type_name_refuses_what_the_format_cannot_store(fmt: str, choice) -> None:
    allowed = re.escape(str(f.choices(fmt)))
    with pytest.raises(ValueError, match=rf"^format {fmt} has no type {re.escape(repr(choice))} \(allowed {allowed}\)$"):
        f.type_name(fmt, choice)


@pytest.mark.parametrize("v, want", [(4, 4), ("8", 8), ("-1", -1), ("Q8_0", 8), ("Q4_0", 4), ("F16", 16),
                                     ("Q4_K", "Q4_K"), ("IQ4_NL", "IQ4_NL")])
def test_parse_choice(v, want) -> None:
    assert f.parse_choice(v) == want


def test_parse_choice_refuses_booleans_and_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"^not a quantization choice: True$"):
        f.parse_choice(True)
    for bad in ("Q9_X", "X1", "-"):
        with pytest.raises(ValueError, match=rf"^unknown quantization type '{bad}' \(known: F16, IQ4_NL, Q2_K, Q3_K, "
                                             r"Q4_0, Q4_K, Q5_1, Q5_K, Q6_K, Q8_0\)$"):
            f.parse_choice(bad)


def test_is_float_only_for_16() -> None:
    assert f.is_float(16) and not any(f.is_float(b) for b in (2, 4, 5, 8, 17, "Q6_K"))


@pytest.mark.parametrize("choice, block", [(16, 1), (8, 32), (5, 32), (4, 32), (2, 32), ("IQ4_NL", 32),
                                           ("Q2_K", 256), ("Q4_K", 256), ("Q6_K", 256)])
def test_block_of(choice, block: int) -> None:
    assert f.block_of(choice) == block
    assert f.eligible(choice, 3 * block) and (block == 1 or not f.eligible(choice, 3 * block + 16))


def test_matrix_bytes_checks_the_types_block_not_the_32_block() -> None:
    # 288 columns are whole 32-blocks (Q4_0: 9 blocks of 18 bytes per row) but not whole 256-blocks
    assert f.matrix_bytes("gguf", 4, 2, 288) == 2 * 9 * 18
    with pytest.raises(ValueError, match=r"^288 columns are not whole 256-element blocks of gguf type 'Q4_K'$"):
        f.matrix_bytes("gguf", "Q4_K", 2, 288)
    with pytest.raises(ValueError, match=r"^format onnx has no type 'Q4_K'"):
        f.matrix_bytes("onnx", "Q4_K", 2, 256)
