"""Learned clipping on the export grids: forward exactly the reference quantizer of the clamped weight,
baking is exact, and gamma gets LSQ's gradient (and learns to clip where clipping lowers the error)."""

import pytest
import torch

from tailor.quant.fake import clipped, fake_quant
from tailor.quant.formats import grid

CASES = [("gguf", 4), ("gguf", 5), ("gguf", 8), ("onnx", 2), ("onnx", 4), ("onnx", 8)]


def _w(seed=0, rows=8, cols=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


@pytest.mark.parametrize("fmt,bits", CASES)
def test_forward_is_the_reference_quantizer_of_the_clamped_weight(fmt, bits):
    w = _w()
    gamma = torch.tensor(0.8)
    out = fake_quant(w.clone().requires_grad_(), bits, fmt, gamma.clone().requires_grad_())
    ref = grid(fmt).dequantized(clipped(w, gamma, fmt, bits), bits)
    assert torch.equal(out.detach(), ref)
    # gamma = 1 is the plain quantizer, bit for bit
    assert torch.equal(fake_quant(w, bits, fmt, torch.tensor(1.0)), grid(fmt).dequantized(w, bits))


@pytest.mark.parametrize("fmt,bits", CASES)
def test_baked_weight_quantizes_to_the_same_values(fmt, bits):
    w, gamma = _w(1), torch.tensor(0.7)
    baked = clipped(w, gamma, fmt, bits)
    assert torch.equal(grid(fmt).dequantized(baked, bits), fake_quant(w, bits, fmt, gamma))
    assert torch.equal(grid(fmt).dequantized(baked, bits), fake_quant(baked, bits, fmt, torch.tensor(1.0)))


def test_gradients_reach_weight_and_gamma():
    w = _w(2).requires_grad_()
    gamma = torch.tensor(0.9, requires_grad=True)
    out = fake_quant(w, 4, "onnx", gamma)
    out.sum().backward()
    assert gamma.grad is not None and gamma.grad != 0
    # straight-through inside the range, zero for the clamped values
    inside = (clipped(w.detach(), gamma, "onnx", 4) == w.detach())
    assert torch.equal(w.grad, inside.float())


def test_gamma_learns_to_clip_a_heavy_tailed_matrix_at_2_bits():
    """Minimising the quantization error of a matrix with outliers at 2 bits: gamma moves below 1
    and the error drops — the point of learning the range."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.01] *= 12  # a few outliers per block stretch the range
    gamma = torch.tensor(1.0, requires_grad=True)
    opt = torch.optim.Adam([gamma], lr=0.02)
    err0 = float((fake_quant(w, 2, "onnx", gamma.detach()) - w).pow(2).mean())
    for _ in range(60):
        opt.zero_grad()
        (fake_quant(w, 2, "onnx", gamma) - w).pow(2).mean().backward()
        opt.step()
    err1 = float((fake_quant(w, 2, "onnx", gamma.detach()) - w).pow(2).mean())
    assert float(gamma) < 0.95 and err1 < 0.9 * err0
