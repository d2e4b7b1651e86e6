"""The ONNX grid: packing for MatMulNBits reproduces the fake quantizer exactly, slicing commutes with
quantization, and the byte formulas are the bytes of the packed tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tailor.quant import formats, onnx_grid, onnx_pack


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block (scale falls back to 1)
    w[1, :32] = w[1, :32].abs() + 0.01  # all positive: range widened down to 0
    w[2, :32] = -w[2, :32].abs() - 0.01  # all negative: range widened up to 0
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [32, 96, 160, 576])  # 1, 3, 5, 18 blocks: zero points need padding
def test_pack_unpack_equals_dequantized(bits: int, cols: int) -> None:
    w = _weight(7, cols)
    p = onnx_pack.pack(w, bits)
    n_blocks = cols // 32
    assert p.b.shape == (7, n_blocks, 32 * bits // 8) and p.b.dtype == np.uint8
    assert p.scales.shape == (7, n_blocks) and p.scales.dtype == np.float32
    assert p.zero_points.shape == (7, math.ceil(n_blocks * bits / 8)) and p.zero_points.dtype == np.uint8
    assert torch.equal(onnx_pack.unpack(p), onnx_grid.dequantized(w, bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_is_an_integer_grid_close_to_w(bits: int) -> None:
    w = _weight(16, 128)
    q, s, zp = onnx_grid.quantize(w, bits)
    qmax = 2**bits - 1
    for t in (q, zp):
        assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= qmax
    err = (onnx_grid.dequantized(w, bits) - w).reshape(16, 4, 32).abs()
    assert (err <= s * 0.5 + s * 1e-5 + 1e-12).all()  # round to nearest: within half a step (0 widens range)
    assert torch.equal(onnx_grid.dequantized(w, bits), ((q - zp) * s).reshape(w.shape))


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_slicing_commutes_with_quantization(bits: int) -> None:
    w = _weight(48, 192, seed=1)
    full = onnx_grid.dequantized(w, bits)
    assert torch.equal(full[5:29], onnx_grid.dequantized(w[5:29], bits))  # any row slice
    for c in (32, 64, 160):  # whole 32-blocks of the input dimension (KV groups, FFN prefixes)
        assert torch.equal(full[:, :c], onnx_grid.dequantized(w[:, :c], bits))
    if bits < 16:  # and the packed bytes of a row slice are the row slice of the packed bytes
        p, ps = onnx_pack.pack(w, bits), onnx_pack.pack(w[5:29], bits)
        assert np.array_equal(p.b[5:29], ps.b) and np.array_equal(p.scales[5:29], ps.scales)
        assert np.array_equal(p.zero_points[5:29], ps.zero_points)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows,cols", [(3, 32), (576, 576), (192, 1536), (576, 64 * 5)])
def test_matrix_bytes_are_packed_bytes(bits: int, rows: int, cols: int) -> None:
    p = onnx_pack.pack(torch.randn(rows, cols), bits)
    assert p.nbytes == onnx_grid.matrix_bytes(bits, rows, cols) == formats.matrix_bytes("onnx", bits, rows, cols)
    assert formats.embedding_bytes("onnx", bits, rows, cols) == p.nbytes  # the tied table is stored once


def test_byte_formulas_16_bit_and_vectors() -> None:
    assert formats.matrix_bytes("onnx", 16, 576, 1536) == 576 * 1536 * 2  # float16
    assert formats.embedding_bytes("onnx", 16, 49152, 576) == 49152 * 576 * 2
    assert formats.vector_bytes("onnx", 576) == 576 * 4  # float32 norms
    # 4 bits, 18 blocks a row: 16 bytes + a float32 scale per block, 9 bytes of zero points per row
    assert formats.matrix_bytes("onnx", 4, 10, 576) == 10 * (18 * 16 + 18 * 4 + 9)


def test_pack_refuses_bits_onnxruntime_does_not_run() -> None:
    with pytest.raises(ValueError, match="3 bits"):
        onnx_pack.pack(torch.randn(4, 64), 3)
    with pytest.raises(ValueError, match="columns"):
        onnx_grid.quantize(torch.randn(4, 48), 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_onnxruntime_dequantizes_packed_tensors_exactly(bits: int) -> None:
    """MatMulNBits(I, W) = W^T exactly (one nonzero product per output), and GatherBlockQuantized reads
    the same B viewed as [N, K*bits/8] with the same scales and zero points."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    n, k = 10, 96
    w = _weight(n, k, seed=2)
    p = onnx_pack.pack(w, bits)
    ids = np.array([[0, 2, 9], [1, 1, 4]], np.int64)
    nodes = [
        helper.make_node("MatMulNBits", ["a", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                         block_size=32, accuracy_level=0),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([n, -1], np.int64))),
        helper.make_node("Reshape", ["B", "shape"], ["rows"]),
        helper.make_node("GatherBlockQuantized", ["rows", "ids", "S", "Z"], ["e"], domain="com.microsoft",
                         bits=bits, block_size=32, gather_axis=0, quantize_axis=1),
    ]
    graph = helper.make_graph(
        nodes, "probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(p.b, "B"), numpy_helper.from_array(p.scales, "S"),
                     numpy_helper.from_array(p.zero_points, "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, e = sess.run(None, {"a": np.eye(k, dtype=np.float32), "ids": ids})
    ref = onnx_grid.dequantized(w, bits).numpy()
    assert np.array_equal(y.T, ref)
    assert np.array_equal(e, ref[ids])
