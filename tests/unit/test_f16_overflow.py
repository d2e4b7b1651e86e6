"""Values a file cannot hold at their declared precision are refused naming the tensor (a 16-bit weight
beyond float16, a block scale or minimum overflowing its float16 field), and the export parity check
fails on NaN instead of letting `nan > bound` pass."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from steps.export import ParityError, ppl_parity
from tailor.quant.f16 import PrecisionError, to_f16
from tailor.quant.gguf_grid import dequantized
from tailor.quant.gguf_pack import pack


def _w(value: float, at: tuple[int, int] = (1, 2)) -> torch.Tensor:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    w[at] = value
    return w


def test_16_bit_weight_beyond_float16_is_refused_by_name():
    with pytest.raises(PrecisionError, match=r"^blk\.0\.attn_q\.weight: weight at \[1, 2\] 70000 exceeds float16's "
                                             r"range \(\+-65504\); it cannot be stored as float16$"):
        pack(_w(70000.0), 16, "blk.0.attn_q.weight")


@pytest.mark.parametrize("value, ok", [(65504.0, True), (65519.0, True), (65520.0, False), (-65520.0, False)])
def test_float16_edge(value, ok):
    """65519 still rounds to 65504; from 65520 on float16 holds inf."""
    if ok:
        assert math.isfinite(float(to_f16(_w(value), "w")[1, 2]))
    else:
        with pytest.raises(PrecisionError, match="exceeds float16's range"):
            to_f16(_w(value), "w")


@pytest.mark.parametrize("bits, value, what", [(8, 1e7, "block scale"), (4, 1e6, "block scale"),
                                               (5, -70000.0, "block minimum")])
def test_block_field_overflow_is_refused_by_name(bits, value, what):
    with pytest.raises(PrecisionError, match=rf"^output\.weight: {what} of block 0 in row 1 overflows float16"):
        pack(_w(value), bits, "output.weight")


@pytest.mark.parametrize("bits", [4, 5, 8, 16])
def test_non_finite_weight_is_refused(bits):
    with pytest.raises(PrecisionError, match=r"token_embd\.weight: weight at \[1, 2\] (is|.*)inf"):
        pack(_w(float("inf")), bits, "token_embd.weight")


@pytest.mark.parametrize("bits", [4, 5, 8, 16])
def test_ordinary_weights_still_pack(bits):
    w = _w(0.5)
    assert pack(w, bits, "w").shape[0] == 4
    assert torch.isfinite(dequantized(w, bits)).all()


def test_parity_check_fails_on_nan_and_passes_within_bound():
    assert ppl_parity("model.gguf", 10.1, 10.0, 0.02) == pytest.approx(0.01)
    for runtime, torch_ppl in ((float("nan"), 10.0), (10.0, float("nan")), (float("inf"), 10.0)):
        with pytest.raises(ParityError, match="perplexity is not finite"):
            ppl_parity("model.gguf", runtime, torch_ppl, 0.02)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        ppl_parity("model.gguf", 10.5, 10.0, 0.02)


# ---- named types (K-quants, IQ4_NL) through the same pack(): 256 columns, whole super-blocks --------------
KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"]


def _wk(value: float) -> torch.Tensor:
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[1, 2] = value
    return w


@pytest.mark.parametrize("name", KTYPES)
def test_named_types_pack_what_gguf_py_reads_back(name):
    from gguf import GGMLQuantizationType, quants

    from tailor.quant.gguf_kquants import dequantized as kdequantized

    w = _wk(0.5)
    back = quants.dequantize(pack(w, name, "w"), GGMLQuantizationType[name]).reshape(w.shape)
    assert np.array_equal(back, kdequantized(w, name).numpy())


@pytest.mark.parametrize("name", KTYPES)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_weight_is_refused_for_named_types(name, value):
    with pytest.raises(PrecisionError, match=rf"^blk\.3\.ffn_down\.weight: weight at \[1, 2\] is {value}; "
                                             r"it cannot be quantized$"):
        pack(_wk(value), name, "blk.3.ffn_down.weight")


# a power of ten whose super-block scale overflows float16 (a hundredth of it fits), per type; Q5_K's +1e8 fits
# (only its minimum overflows, at -1e8), Q6_K's int8 sub-scales hold 1e8
@pytest.mark.parametrize("name, value", [("Q2_K", 1e7), ("Q3_K", 1e7), ("Q4_K", 1e8), ("Q5_K", -1e8), ("IQ4_NL", 1e7)])
def test_named_type_scale_overflow_is_refused_by_name(name, value):
    with pytest.raises(PrecisionError, match=rf"^ffn_down\.weight: a {name} super-block scale overflows float16 "
                                             rf"\(weights up to {re.escape(format(abs(value), '.6g'))}\); it cannot be stored$"):
        pack(_wk(value), name, "ffn_down.weight")
    fits = _wk(value / 100)
    assert np.isfinite(pack(fits, name, "w")).all()


def test_q5_k_positive_outlier_fits_where_the_negative_one_overflows_its_minimum():
    from tailor.quant.gguf_kquants import codes

    c = codes(_wk(-1e8), "Q5_K")
    assert torch.isfinite(c.d).all() and not torch.isfinite(c.dmin).all()  # the minimum alone: both fields checked
    assert torch.isfinite(torch.as_tensor(pack(_wk(1e8), "Q5_K", "w"))).all()
