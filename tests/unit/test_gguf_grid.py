"""GGUF grid and packing are bit-exact with gguf-py's reference quantizers (themselves bit-exact with
ggml's C reference), and commute with the slicing elastic models do."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from tailor.quant import formats, gguf_grid
from tailor.quant.gguf_pack import ggml_type, pack

BITS = (4, 5, 8, 16)
BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))  # 0.5 - 2^-25


def edge_weights(seed: int = 0, rows: int = 48, cols: int = 160) -> torch.Tensor:
    """Random rows at very different scales plus blocks that stress each rounding rule."""
    g = torch.Generator().manual_seed(seed)
    # scales up to 5e3 keep |w| (about 5 sigma) inside float16's range, as every real weight is
    scale = torch.tensor([1e-7, 1e-4, 0.02, 1.0, 30.0, 5e3])[torch.randint(0, 6, (rows, 1), generator=g)]
    w = torch.randn(rows, cols, generator=g) * scale
    w[0, :32] = 0.0  # all-zero block: d = 0, inverse scale taken as 0
    w[1, :32] = 1.7  # constant block: Q4_1/Q5_1 d = 0, value = fp16(min)
    w[2, :32] = -3e4  # large constant, still inside fp16 range
    w[3, :32] = torch.linspace(-1, 1, 32)  # exact ties for Q4_1 / Q5_1 (x - min) / d = k + 0.5
    w[4, :32] = 0.0
    w[4, 0], w[4, 1], w[4, 2] = 127.0, BELOW_HALF, -BELOW_HALF  # Q8_0: floor(x + 0.5) would give 1
    w[5, :32] = torch.arange(32) * 0.5 - 8.0  # Q8_0 half-way values x = k + 0.5
    w[6, 32:64] = 6e4  # fp16 scale near its maximum
    w[7, 32:64] = torch.randn(32, generator=g) * 1e-6  # fp16-subnormal scales
    w[8, :32] = torch.where(torch.arange(32) % 2 == 0, -2.0, 2.0)  # Q4_0: |max| tied, the first (-2) sets d's sign
    w[9, :32] = torch.arange(32) * 0.25 - 4.0  # Q4_0: x / d + 8.5 lands on whole numbers
    return w


def ref_bytes(w: torch.Tensor, bits: int) -> np.ndarray:
    return quants.quantize(w.numpy(), ggml_type(bits)).view(np.uint8)


def bits_of(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("bits", BITS)
def test_pack_bytes_equal_gguf_reference(bits: int) -> None:
    for seed in range(3):
        w = edge_weights(seed)
        assert np.array_equal(pack(w, bits), ref_bytes(w, bits)), f"seed {seed}"


@pytest.mark.parametrize("bits", BITS)
def test_dequantized_equals_gguf_dequantize_bitwise(bits: int) -> None:
    w = edge_weights(7)
    ref = quants.dequantize(ref_bytes(w, bits), ggml_type(bits)).reshape(w.shape)
    ours = gguf_grid.dequantized(w, bits)
    assert np.array_equal(bits_of(ours), bits_of(ref))  # bitwise: distinguishes -0.0 and NaN payloads
    # what llama.cpp reads back from our bytes is the fake-quant value itself
    back = quants.dequantize(pack(w, bits), ggml_type(bits)).reshape(w.shape)
    assert np.array_equal(bits_of(back), bits_of(ours))


def test_q8_0_rounds_like_roundf_below_one_half() -> None:
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 127.0, BELOW_HALF, -BELOW_HALF
    assert gguf_grid.dequantized(w, 8)[0, :3].tolist() == [127.0, 0.0, 0.0]


@pytest.mark.parametrize("bits", BITS)
def test_slicing_commutes_with_quantization(bits: int) -> None:
    w = edge_weights(3, rows=40, cols=192)
    full_q, full_p = gguf_grid.dequantized(w, bits), pack(w, bits)
    per_block = full_p.shape[1] // (192 // 32)  # bytes of one 32-column block (64 for F16)
    rows = torch.tensor([5, 0, 39, 17])  # rows move whole: any subset or order
    assert torch.equal(gguf_grid.dequantized(w[rows], bits), full_q[rows])
    assert np.array_equal(pack(w[rows], bits), full_p[rows.numpy()])
    for c0, c1 in ((0, 64), (32, 160), (96, 192)):
        assert torch.equal(gguf_grid.dequantized(w[:, c0:c1], bits), full_q[:, c0:c1])
        assert np.array_equal(pack(w[:, c0:c1], bits), full_p[:, c0 // 32 * per_block: c1 // 32 * per_block])


@pytest.mark.parametrize("bits", BITS)
def test_packed_size_is_format_size(bits: int) -> None:
    w = torch.randn(24, 96)
    assert pack(w, bits).nbytes == formats.matrix_bytes("gguf", bits, 24, 96)


def test_fake_quant_is_the_grid() -> None:
    from tailor.quant.fake import fake_quant

    w = edge_weights(1).requires_grad_()
    for bits in (4, 5, 8):
        assert torch.equal(fake_quant(w, bits, "gguf").detach(), gguf_grid.dequantized(w, bits))


def test_rejects_unaligned_columns_and_unknown_bits() -> None:
    with pytest.raises(ValueError, match="whole 32"):
        gguf_grid.dequantized(torch.randn(2, 40), 4)
    with pytest.raises(ValueError, match="3 bits"):
        pack(torch.randn(2, 32), 3)


def _ggml_traits(qtype: int):
    """ggml's own type traits (C dequantizer and reference quantizer) from llama-cpp-python's libggml."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
    from_float = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64)

    class Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", to_float), ("from_float_ref", from_float)]

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib.ggml_get_type_traits(qtype).contents, ctypes


@pytest.mark.parametrize("bits", BITS)
def test_ggml_c_code_reads_and_writes_our_blocks(bits: int) -> None:
    """The C library llama.cpp runs: its dequantizer reads our bytes as our grid, bit for bit, and its
    reference quantizer writes the same bytes we do."""
    traits, ctypes = _ggml_traits(int(ggml_type(bits)))
    w = edge_weights(5)
    packed = np.ascontiguousarray(pack(w, bits))
    values = np.empty(w.numel(), dtype=np.float32)
    traits.to_float(packed.ctypes.data, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), w.numel())
    assert np.array_equal(bits_of(values), bits_of(gguf_grid.dequantized(w, bits).numpy().ravel()))
    theirs = np.empty_like(packed)
    x = np.ascontiguousarray(w.numpy().ravel())
    traits.from_float_ref(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), theirs.ctypes.data, w.numel())
    assert np.array_equal(theirs, packed)


@pytest.mark.parametrize("bits", BITS)
def test_runtime_linear_is_the_grid_matmul_up_to_activation_rounding(bits: int) -> None:
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(48, 96, generator=g) * 0.05, torch.randn(3, 5, 96, generator=g)
    exact = torch.nn.functional.linear(x, gguf_grid.dequantized(w, bits))
    ours = gguf_grid.runtime_linear(x, w, bits)
    assert ours.shape == exact.shape
    assert not torch.equal(ours, exact)  # the activations really are rounded
    assert (ours - exact).abs().max() < 0.02 * exact.abs().max()
    if bits < 16:  # precomputed codes give the same result
        assert torch.equal(gguf_grid.runtime_linear(x, gguf_grid.codes(w, bits), bits), ours)
