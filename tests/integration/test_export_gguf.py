"""GGUF export: llama.cpp runs the exported file with the torch model's numbers, and the file's tensors
are exactly the bytes the cost model counts.

The stored weights are the fake-quant grid bit for bit (checked by reading the file back with gguf-py;
tests/unit/test_gguf_grid.py checks ggml's own C dequantizer). The runtime is not bit-exact with torch:
llama.cpp's CPU matmuls round activations to 8-bit blocks (Q8_0 against Q8_0 weights, Q8_1 with
float16 block sums against Q4_1/Q5_1) and to float16 against F16 weights, and its KV cache is float16.
Stated bounds: logits within 10% of their standard deviation on the tiny random model (measured ~5%);
perplexity within 1% where the model is sane (tiny models, full model at Q8_0), wider where the
measured rounding effect is wider (see each test).
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants
from transformers.modeling_outputs import CausalLMOutputWithPast

from tailor.arch import MATRICES, BaseArch, LayerConfig, SubnetConfig
from tailor.eval.ppl import perplexity as torch_perplexity
from tailor.export import llamacpp
from tailor.export.gguf import ExportError, export, predicted_file_bytes, rope_permute
from tailor.models.model import QLinear, TailorConfig, TailorForCausalLM
from tailor.quant import gguf_grid

pytestmark = pytest.mark.integration

# This machine's cores are shared with other busy jobs, where spinning thread barriers collapse
# (llama.cpp: 2 threads ran ~700x slower than 1; torch ppl ~10x): one thread keeps tests fast and stable.
THREADS = 1


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)

_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}

SENTENCES = (Path(__file__).parent / "sentences.txt").read_text().splitlines()  # shared held-out text


def _module(block: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        block = getattr(block, part)
    return block


def compress(dense: TailorForCausalLM, keep: list[int], kv: list[int], ffn: list[int],
             bits: list[dict[str, int]], embed_bits: int) -> tuple[TailorForCausalLM, SubnetConfig]:
    """A standalone GGUF-grid model from `dense`: layers `keep`, KV groups and FFN neurons kept as
    prefixes (as export_active will slice them), plus the SubnetConfig it stands for.

    16-bit matrices (and a 16-bit embedding) are rounded to float16 values, which is what the file
    stores: fake_quant passes 16-bit weights unchanged, so torch would otherwise use float32 weights."""
    c = dense.config
    d = {k: v for k, v in c.to_dict().items() if k not in ("model_type", "transformers_version")}
    d.update(num_hidden_layers=len(keep), layer_kv_heads=list(kv), layer_ffn=list(ffn), layer_bits=bits,
             embed_bits=embed_bits, quant_format="gguf")
    model = TailorForCausalLM(TailorConfig(**d))
    q_per_kv, hd = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    f16 = lambda w, b: w.half().float() if b == 16 else w  # noqa: E731
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(f16(dense.model.embed_tokens.weight, embed_bits))
        model.model.norm.weight.copy_(dense.model.norm.weight)
        for dst, i, n_kv, n_ff, b in zip(model.model.layers, keep, kv, ffn, bits):
            src = dense.model.layers[i]
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
            q, k = n_kv * q_per_kv * hd, n_kv * hd
            rows = {"q": (q, None), "k": (k, None), "v": (k, None), "o": (None, q),
                    "gate": (n_ff, None), "up": (n_ff, None), "down": (None, n_ff)}
            for m, (r, col) in rows.items():
                w = _module(src, _MODULES[m]).weight[:r, :col]
                _module(dst, _MODULES[m]).weight.copy_(f16(w, b[m]))
    model.tie_weights()
    by_src = dict(zip(keep, zip(kv, ffn, bits)))
    arch = BaseArch.from_hf(c)
    layers = tuple(LayerConfig(i in by_src, *by_src.get(i, (arch.n_kv_heads, arch.ffn, {m: 16 for m in MATRICES})))
                   for i in range(arch.n_layers))
    return model.eval(), SubnetConfig(layers, embed_bits=embed_bits)


@contextlib.contextmanager
def llamacpp_arithmetic(model: TailorForCausalLM) -> Iterator[None]:
    """Within the block the model computes as llama.cpp's CPU kernels do (gguf_grid.runtime_linear in
    every matmul, the LM head included): separates what the export decides (weights, graph) from the
    runtime's own activation rounding."""
    def grid(m: QLinear):  # codes once: the table alone is 28M weights
        w = m.weight.detach()[: m.active_out, : m.active_in]
        return w if m.bits >= 16 else gguf_grid.codes(w, m.bits)

    layers = [m for m in model.model.modules() if isinstance(m, QLinear)]
    for m in layers:
        m.forward = lambda x, m=m, wc=grid(m): gguf_grid.runtime_linear(x[..., : m.active_in], wc, m.bits)
    head, head_grid = model.lm_head, grid(model.lm_head)

    def forward(input_ids: torch.Tensor, **_) -> CausalLMOutputWithPast:
        table = head.active_weight()  # token embedding lookups are exact in llama.cpp (get_rows)
        h = model.hidden_states(input_ids, table if head.bits < 16 else None)
        return CausalLMOutputWithPast(logits=gguf_grid.runtime_linear(h, head_grid, head.bits).float())

    model.forward = forward
    try:
        yield
    finally:
        for m in layers + [model]:
            del m.forward


def check_file_holds_grid(path: Path, model: TailorForCausalLM, embedding: bool = True) -> None:
    """Every tensor in the file dequantizes (gguf-py, = ggml) to the model's grid values bit for bit."""
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd

    def stored(name: str) -> torch.Tensor:
        t = tensors[name]
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        return torch.from_numpy(quants.dequantize(t.data, t.tensor_type).reshape(rows, -1).copy())

    cfg = model.config
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    if embedding:  # gguf-py dequantizes a 49152-row table slowly (seconds)
        emb = gguf_grid.dequantized(model.model.embed_tokens.weight, model.lm_head.bits)
        assert torch.equal(stored("token_embd.weight"), emb)
    for i, block in enumerate(model.model.layers):
        assert torch.equal(stored(f"blk.{i}.attn_norm.weight")[0], block.input_layernorm.weight)
        for m, name in _GGUF_NAMES.items():
            lin = _module(block, _MODULES[m])
            want = gguf_grid.dequantized(lin.weight, lin.bits)
            if m in ("q", "k"):
                heads = block.self_attn.kv_heads * (q_per_kv if m == "q" else 1)
                want = rope_permute(want, heads, cfg.head_dim)
            assert torch.equal(stored(f"blk.{i}.{name}.weight"), want), f"blk.{i}.{name}"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tailor.models.base import base_dir

    return AutoTokenizer.from_pretrained(base_dir())


def test_tiny_deci_per_layer_sizes_match_torch(tmp_path: Path, tokenizer) -> None:
    from tailor.models.tiny import tiny_model

    dense = tiny_model(vocab=49152, n_layers=3)
    bits = [{"q": 4, "k": 5, "v": 8, "o": 16, "gate": 4, "up": 5, "down": 8},
            {"q": 8, "k": 8, "v": 4, "o": 5, "gate": 16, "up": 4, "down": 4},
            {"q": 5, "k": 4, "v": 16, "o": 8, "gate": 8, "up": 8, "down": 5}]
    model, subnet = compress(dense, [0, 1, 2], kv=[3, 1, 2], ffn=[256, 128, 192], bits=bits, embed_bits=8)
    path = tmp_path / "tiny.gguf"
    info = export(model, tokenizer, path)

    assert info["arch"] == "deci"
    assert info["weight_bytes"] == subnet.nbytes(BaseArch.from_hf(dense.config), "gguf")
    assert info["file_bytes"] == path.stat().st_size > info["weight_bytes"]
    # the whole file, container included, predicted from the config alone
    assert predicted_file_bytes(subnet, BaseArch.from_hf(dense.config)) == info["file_bytes"]
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*.tmp"))
    check_file_holds_grid(path, model)

    ids = tokenizer.encode(SENTENCES[0] + " " + SENTENCES[1])
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llamacpp.logits(path, ids, n_threads=THREADS)
    assert np.abs(got - want).max() < 0.1 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    seqs = [tokenizer.encode(s) for s in SENTENCES[:4]]
    ours, theirs = torch_perplexity(model, seqs), llamacpp.perplexity(path, seqs, n_threads=THREADS)
    assert abs(theirs / ours - 1) < 0.01


def test_tiny_uniform_pruned_exports_as_llama(tmp_path: Path, tokenizer) -> None:
    from tailor.models.tiny import tiny_model

    dense = tiny_model(vocab=49152, n_layers=2, seed=1)
    bits = [{m: 5 for m in MATRICES}, {m: 4 for m in MATRICES}]
    # 2 of 3 KV groups: head_count * head_dim != hidden, so the file must state the head size
    model, subnet = compress(dense, [0, 1], kv=[2, 2], ffn=[128, 128], bits=bits, embed_bits=16)
    mixed, _ = compress(dense, [0, 1], kv=[2, 1], ffn=[128, 128], bits=bits, embed_bits=16)
    with pytest.raises(ExportError, match="deci"):  # llama builds every layer at layer 0's sizes
        export(mixed, tokenizer, tmp_path / "x.gguf", arch="llama")
    info = export(model, tokenizer, tmp_path / "u.gguf")
    assert info["arch"] == "llama"
    assert info["weight_bytes"] == subnet.nbytes(BaseArch.from_hf(dense.config), "gguf")
    assert predicted_file_bytes(subnet, BaseArch.from_hf(dense.config)) == info["file_bytes"]
    seqs = [tokenizer.encode(s) for s in SENTENCES[4:8]]
    ours, theirs = torch_perplexity(model, seqs), llamacpp.perplexity(tmp_path / "u.gguf", seqs, n_threads=THREADS)
    assert abs(theirs / ours - 1) < 0.01


REAL_BITS = [{"q": 8, "k": 8, "v": 16, "o": 5, "gate": 4, "up": 4, "down": 5},
             {"q": 4, "k": 5, "v": 8, "o": 4, "gate": 5, "up": 8, "down": 16},
             {"q": 5, "k": 4, "v": 4, "o": 8, "gate": 4, "up": 5, "down": 8}]


def export_and_compare(tmp_path: Path, dense: TailorForCausalLM, tok, keep: list[int], kv: list[int],
                       ffn: list[int], bits: list[dict[str, int]]) -> tuple[float, float, float]:
    """Export a compressed model; check bytes and stored values; return perplexities
    (torch, torch with llama.cpp's activation rounding, llama.cpp)."""
    model, subnet = compress(dense, keep, kv=kv, ffn=ffn, bits=bits, embed_bits=8)
    path = tmp_path / "phone.gguf"
    t0 = time.perf_counter()
    info = export(model, tok, path)
    t_export = time.perf_counter() - t0
    assert info["arch"] == ("llama" if len(set(kv)) == len(set(ffn)) == 1 else "deci")
    assert info["weight_bytes"] == subnet.nbytes(BaseArch.from_hf(dense.config), "gguf")
    check_file_holds_grid(path, model, embedding=False)  # the embedding path is checked on the tiny model

    seqs = [tok.encode(s) for s in SENTENCES]
    ours = torch_perplexity(model, seqs)
    with llamacpp_arithmetic(model):
        emulated = torch_perplexity(model, seqs)
    theirs = llamacpp.perplexity(path, seqs, n_threads=THREADS)
    speed = llamacpp.tokens_per_s(path, tok, 32, n_threads=THREADS)
    text = llamacpp.generate(path, tok, "The capital of France is", 8, n_threads=THREADS)
    print(f"\ngguf {len(keep)} layers: torch ppl {ours:.4g}, llama.cpp ppl {theirs:.4g} ({theirs / ours - 1:+.2%}), "
          f"vs torch with llama.cpp rounding {emulated:.4g} ({theirs / emulated - 1:+.2%}); "
          f"file {info['file_bytes']} B, weights {info['weight_bytes']} B; export {t_export:.1f} s; "
          f"{speed:.0f} tokens/s (1 thread); greedy: {text!r}")
    assert speed > 0 and isinstance(text, str) and text
    return ours, emulated, theirs


def test_real_model_mixed_bits_parity(tmp_path: Path) -> None:
    """Against plain torch within 6%: the first 4 layers of SmolLM2 alone are a degenerate LM (ppl ~3e9,
    ~22 nats/token) where exp(dNLL) magnifies the runtime's 8-bit activation rounding (measured -1.1%
    here, +2.4% to +3.6% for uniform 4/5/8-bit layers, +0.007% with 16-bit layers). Against torch with
    llama.cpp's matmul rounding within 2% (measured -0.6%; the rest is float16 attention)."""
    from tailor.models.base import load_base

    dense, tok = load_base(n_layers=4)
    # layer 2 dropped (blocks renumbered in the file), 3/2/1 KV groups, three FFN widths
    ours, emulated, theirs = export_and_compare(tmp_path, dense, tok, [0, 1, 3], kv=[3, 2, 1],
                                                ffn=[1536, 1024, 512], bits=REAL_BITS)
    assert abs(theirs / emulated - 1) < 0.02
    assert abs(theirs / ours - 1) < 0.06


@pytest.mark.slow
@pytest.mark.parametrize("mix, bound", [("q8_0", 0.01), ("mixed", 0.06)])
def test_full_model_perplexity_parity(tmp_path: Path, mix: str, bound: float) -> None:
    """The full model, one layer dropped. Against plain torch the brief's 1% bar holds at Q8_0 (measured
    -0.15%); untrained mixed 4/5-bit layers (ppl ~800) meet llama.cpp's Q8_1 activation blocks with
    float16 block sums: measured +4.1% here, -0.8% to +2.1% for other mixes, +1.8% for all Q5_1.
    Against torch with llama.cpp's matmul rounding within 2% (measured -1.1%, -0.7%)."""
    from tailor.models.base import load_base

    dense, tok = load_base()
    keep = [i for i in range(30) if i != 24]
    n = len(keep)
    if mix == "q8_0":
        kv, ffn, bits = [3] * n, [1536] * n, [{m: 8 for m in MATRICES}] * n
    else:
        kv, ffn = [(3, 3, 2)[i % 3] for i in range(n)], [(1536, 1280, 1024, 1536)[i % 4] for i in range(n)]
        bits = [REAL_BITS[i % 3] for i in range(n)]
    ours, emulated, theirs = export_and_compare(tmp_path, dense, tok, keep, kv=kv, ffn=ffn, bits=bits)
    assert abs(theirs / emulated - 1) < 0.02
    assert abs(theirs / ours - 1) < bound


def test_runtime_names_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="bad.gguf"):
        llamacpp.perplexity(bad, [[1, 2, 3]], n_threads=THREADS)
