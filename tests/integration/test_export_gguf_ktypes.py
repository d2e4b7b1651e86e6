"""A subnet whose matrices take K-quant / IQ4_NL types, through the product path: `set_active` on the
supernet, `export_active` (runtime emulation on), `tailor.export.gguf.export` (each matrix packed with
its own type by `gguf_kpack`), llama.cpp (llama-cpp-python).

Checked per type (every matrix of a tiny Llama with 256-multiple rows at that type) and on a pruned
mix (a dropped layer, 2 of 4 KV groups, a 512 FFN, every type at least once): the file's tensors are the
config's types, dequantize (gguf-py = ggml) to the fake-quantized weights bit for bit, their bytes are
the cost model's exactly; llama.cpp's perplexity is within the export stage's bound (params.yaml
`export.max_ppl_rel_diff`, 2%) of the model's own (which emulates llama.cpp's activation rounding), and
its logits within 10% of their standard deviation with the same argmax on >= 90% of positions (the
bounds of tests/integration/test_export_gguf_kquants.py; measured: 6% at Q2_K).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants

from tailor.arch import MATRICES, BaseArch, LayerConfig, SubnetConfig
from tailor.elastic.supernet import arch_of, export_active, linear, set_active
from tailor.eval.ppl import perplexity as torch_perplexity
from tailor.export import llamacpp
from tailor.export.gguf import export, rope_permute
from tailor.quant.formats import matrix_bytes
from tailor.quant.gguf_pack import ggml_type

pytestmark = pytest.mark.integration

SENTENCES = (Path(__file__).parent / "sentences.txt").read_text().splitlines()
GGUF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
        "down": "ffn_down"}
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
MAX_PPL_REL_DIFF = 0.02  # params.yaml export.max_ppl_rel_diff


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tailor.models.base import base_dir

    return AutoTokenizer.from_pretrained(base_dir())


@pytest.fixture(scope="module")
def supernet():
    from tailor.models.tiny import tiny_model

    model = tiny_model(vocab=49152, n_layers=3, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=32, intermediate_size=768, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(0.5)  # saner activations than init
    return model


def export_subnet(supernet, cfg: SubnetConfig, tokenizer, path: Path):
    set_active(supernet, cfg, "gguf")
    model = export_active(supernet, cfg, "gguf")
    info = export(model, tokenizer, path)
    return model, info


def check_file(path: Path, model, cfg: SubnetConfig, arch: BaseArch, info: dict) -> None:
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert info["weight_bytes"] == cfg.nbytes(arch, "gguf")
    qpk, hd = model.config.num_attention_heads // model.config.num_key_value_heads, model.config.head_dim
    for i, (block, lc) in enumerate(zip(model.model.layers, [lc for lc in cfg.layers if lc.keep])):
        for m in MATRICES:
            t, lin, choice = tensors[f"blk.{i}.{GGUF[m]}.weight"], linear(block, m), lc.bits[m]
            assert t.tensor_type == ggml_type(choice), (i, m, choice)
            rows, cols = lin.active_out, lin.active_in
            assert int(t.n_bytes) == matrix_bytes("gguf", choice, rows, cols)
            with torch.no_grad():
                want = lin.active_weight().float()
            if m in ("q", "k"):
                want = rope_permute(want, block.self_attn.kv_heads * (qpk if m == "q" else 1), hd)
            got = quants.dequantize(t.data, t.tensor_type).reshape(rows, cols)
            assert np.array_equal(got, want.numpy()), f"blk.{i}.{GGUF[m]} ({choice})"


def check_parity(path: Path, model, tokenizer) -> tuple[float, float]:
    seqs = [tokenizer.encode(s) for s in SENTENCES[:12]]
    ours = torch_perplexity(model, seqs)  # export_active's model emulates llama.cpp's arithmetic
    theirs = llamacpp.perplexity(path, seqs, n_threads=1)
    assert abs(theirs / ours - 1) < MAX_PPL_REL_DIFF, (ours, theirs)
    ids = seqs[0] + seqs[1]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llamacpp.logits(path, ids, n_threads=1)
    gap = np.abs(got - want).max()
    print(f"\n|llama.cpp - torch| logits max {gap:.4g} (std {want.std():.4g})", end="")
    assert gap < 0.1 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    return ours, theirs


@pytest.mark.parametrize("name", TYPES)
def test_every_matrix_at_one_type(name: str, supernet, tokenizer, tmp_path: Path) -> None:
    arch = arch_of(supernet)
    cfg = SubnetConfig.uniform(arch, name, embed_bits=8)
    model, info = export_subnet(supernet, cfg, tokenizer, tmp_path / f"{name}.gguf")
    check_file(tmp_path / f"{name}.gguf", model, cfg, arch, info)
    ours, theirs = check_parity(tmp_path / f"{name}.gguf", model, tokenizer)
    print(f"\n{name}: torch ppl {ours:.6g}, llama.cpp {theirs:.6g} ({theirs / ours - 1:+.4%})")


def test_pruned_mix_of_types(supernet, tokenizer, tmp_path: Path) -> None:
    arch = arch_of(supernet)
    cfg = SubnetConfig((
        LayerConfig(True, 4, 768, {"q": "Q4_K", "k": "Q5_K", "v": "Q6_K", "o": "Q3_K", "gate": "Q2_K",
                                   "up": "IQ4_NL", "down": "Q4_K"}),
        LayerConfig(False, 4, 768, {m: 16 for m in MATRICES}),
        # 2 KV groups: o reads 128 columns, too few for a K-quant; FFN 512 = 2 super-blocks for down
        LayerConfig(True, 2, 512, {"q": 4, "k": "Q2_K", "v": 8, "o": "IQ4_NL", "gate": "Q5_K", "up": 5,
                                   "down": "Q6_K"}),
    ), embed_bits=8)
    with pytest.raises(ValueError, match=r"bits\.o=Q4_K"):
        cfg.with_layer(2, bits={**cfg.layers[2].bits, "o": "Q4_K"}).validate(arch)
    model, info = export_subnet(supernet, cfg, tokenizer, tmp_path / "mix.gguf")
    assert info["arch"] == "deci"
    check_file(tmp_path / "mix.gguf", model, cfg, arch, info)
    ours, theirs = check_parity(tmp_path / "mix.gguf", model, tokenizer)
    print(f"\nmix: torch ppl {ours:.6g}, llama.cpp {theirs:.6g} ({theirs / ours - 1:+.4%})")
