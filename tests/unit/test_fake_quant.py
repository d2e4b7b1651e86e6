"""Learned clipping on the export grids: forward exactly the reference quantizer of the clamped weight,
baking is exact, and gamma gets LSQ's gradient (and learns to clip where clipping lowers the error)."""

import pytest
import torch

from tailor.quant import fake, gguf_grid
from tailor.quant.fake import clipped, fake_quant, runtime_linear, runtime_weight
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


def test_runtime_weight_is_what_each_runtime_stores_and_linear_computes_with_it():
    """GGUF keeps its block codes (the runtime's matmul reads scales and codes, computed once); MatMulNBits'
    matmul is float32 on the dequantized grid; 16 bits on GGUF is the plain float16 matrix, no codes."""
    w = _w(4, rows=6, cols=64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    onnx_w = runtime_weight(w, 4, "onnx")
    assert torch.equal(onnx_w, grid("onnx").dequantized(w, 4))
    torch.testing.assert_close(runtime_linear(x, onnx_w, 4, "onnx"), x @ onnx_w.T, rtol=1e-6, atol=1e-7)
    for bits in (4, 5, 8):
        codes = runtime_weight(w, bits, "gguf")
        assert isinstance(codes, gguf_grid.Codes)
        assert torch.equal(gguf_grid.from_codes(codes), grid("gguf").dequantized(w, bits))
        assert torch.equal(runtime_linear(x, codes, bits, "gguf"), gguf_grid.runtime_linear(x, w, bits))
    w16 = runtime_weight(w, 16, "gguf")
    assert isinstance(w16, torch.Tensor) and torch.equal(w16, grid("gguf").dequantized(w, 16))


def test_enable_compile_compiles_the_quantizer_once_with_dynamic_shapes(monkeypatch):
    calls = []

    def compile_(fn, **kw):
        calls.append((fn, kw))
        return lambda *a: ("compiled", a)

    monkeypatch.setattr(fake, "_compiled", None)
    monkeypatch.setattr(torch, "compile", compile_)
    fake.enable_compile()
    fake.enable_compile()  # a second call keeps the first graph
    assert calls == [(fake._fake_quant, {"dynamic": True})]
    assert fake._compiled(1) == ("compiled", (1,))
    w = _w()
    assert torch.equal(fake_quant(w, 4, "onnx"), grid("onnx").dequantized(w, 4))  # CPU tensors skip the graph


def _blocks(w):
    return w.reshape(w.shape[0], -1, 32)


@pytest.mark.parametrize("fmt,bits", [("gguf", 8), ("gguf", 4), ("gguf", 5), ("onnx", 4)])
def test_each_format_clips_its_own_block_range(fmt, bits):
    """Per block of 32: Q8_0/Q4_0 shrink ±absmax to ±gamma*absmax; Q5_1 shrinks [min, max] towards the end
    nearer 0 for a one-signed block (towards 0 otherwise); MatMulNBits first widens the range to hold 0."""
    g = 0.6
    w = _w(6, rows=3, cols=64)
    w[1] = w[1].abs() + 0.01   # all positive
    w[2] = -w[2].abs() - 0.01  # all negative
    out, b = _blocks(clipped(w, torch.tensor(g), fmt, bits)), _blocks(w)
    lo, hi = b.amin(-1), b.amax(-1)
    if fmt == "gguf" and bits in (8, 4):
        a = b.abs().amax(-1)
        torch.testing.assert_close(out.abs().amax(-1), g * a)
        assert torch.all(out.abs() <= g * a.unsqueeze(-1) + 1e-7)
    elif fmt == "gguf":  # row 0 straddles 0: both ends shrink towards 0
        torch.testing.assert_close(out[0].amin(-1), g * lo[0])
        torch.testing.assert_close(out[0].amax(-1), g * hi[0])
        torch.testing.assert_close(out[1].amin(-1), lo[1])  # positive block: the min stays, the max comes in
        torch.testing.assert_close(out[1].amax(-1), lo[1] + g * (hi[1] - lo[1]))
        torch.testing.assert_close(out[2].amax(-1), hi[2])
        torch.testing.assert_close(out[2].amin(-1), hi[2] + g * (lo[2] - hi[2]))
    else:  # [0, max] for a positive block, [min, 0] for a negative one
        torch.testing.assert_close(out[1].amin(-1), lo[1])
        torch.testing.assert_close(out[1].amax(-1), g * hi[1])
        torch.testing.assert_close(out[2].amin(-1), g * lo[2])
        torch.testing.assert_close(out[2].amax(-1), hi[2])


def test_gamma_is_held_in_its_range_and_16_bits_passes_the_weight_itself():
    w = _w(7)
    assert torch.equal(clipped(w, torch.tensor(0.2), "onnx", 4), clipped(w, torch.tensor(0.5), "onnx", 4))
    assert torch.equal(fake_quant(w, 4, "onnx", torch.tensor(0.2)), fake_quant(w, 4, "onnx", torch.tensor(0.5)))
    assert torch.equal(fake_quant(w, 4, "onnx", torch.tensor(1.5)), grid("onnx").dequantized(w, 4))
    assert fake_quant(w, 16, "gguf") is w and fake_quant(w, 16, "onnx", torch.tensor(0.7)) is w


GROUP_CASES = CASES + [("gguf", "IQ4_NL"), ("gguf", "Q2_K"), ("gguf", "Q3_K"), ("gguf", "Q4_K"), ("gguf", "Q5_K"),
                       ("gguf", "Q6_K")]


@pytest.mark.parametrize("fmt,bits", GROUP_CASES)
def test_grouped_quantizer_equals_each_matrix_alone_with_its_gradients(fmt, bits):
    """One call over several matrices (row and column slices of different shapes, each its own clip)
    gives each matrix's own fake quantization bit for bit, the same weight gradients bit for bit, and
    each clip's gradient up to float32 summation order."""
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(24, 512, generator=g), torch.randn(40, 256, generator=g) * 3, torch.randn(16, 768, generator=g)]
    slices = [(24, 512), (33, 256), (16, 512)]
    gammas = (0.9, 0.7, 1.0)
    coef = [torch.randn(r, c, generator=g) for r, c in slices]

    def run(grouped):
        ws = [f.clone().requires_grad_() for f in full]
        gs = [torch.tensor(v, requires_grad=True) for v in gammas]
        parts = [w[:r, :c] for w, (r, c) in zip(ws, slices)]
        out = fake.fake_quant_group(parts, bits, fmt, gs) if grouped else \
            [fake_quant(p, bits, fmt, gm) for p, gm in zip(parts, gs)]
        sum((o * c).sum() for o, c in zip(out, coef)).backward()
        return out, [w.grad for w in ws], [gm.grad for gm in gs]

    (ref, ref_w, ref_g), (got, got_w, got_g) = run(False), run(True)
    assert [o.shape for o in got] == [o.shape for o in ref]
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(got, ref))
    assert all(torch.equal(a, b) for a, b in zip(got_w, ref_w))
    assert all(b.abs() > 0 for b in ref_g[:2])  # clipped matrices: their clip gets a gradient
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got_g, ref_g))


def test_grouped_quantizer_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="16 bits"):
        fake.fake_quant_group([_w()], 16, "gguf", [torch.tensor(1.0)])
    with pytest.raises(ValueError, match="not whole 256-element blocks"):
        fake.fake_quant_group([torch.randn(4, 512), torch.randn(4, 96)], "Q4_K", "gguf", [torch.tensor(1.0)] * 2)
    with pytest.raises(ValueError, match="2 weights but 1"):
        fake.fake_quant_group([_w(), _w(1)], 4, "gguf", [torch.tensor(1.0)])
