"""Every family behind the model seam exports: a pruned, mixed-bit subnet of a tiny random Llama (tied,
untied, llama3 RoPE), Mistral and Qwen2 (q/k/v biases, tied and untied) runs in llama.cpp (GGUF, `deci`)
and onnxruntime (ONNX) with the torch model's numbers, and the files hold exactly the bytes the cost model
counts. Bounds are the existing export tests' (tests/integration/test_export_{gguf,onnx}.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tailor.arch import MATRICES, BaseArch, LayerConfig, SubnetConfig
from tailor.elastic.supernet import export_active
from tailor.export import gguf as gguf_writer
from tailor.export import llamacpp
from tailor.export import onnx as onnx_writer
from tailor.export import ort as ort_rt
from tailor.models.base import build_model, gguf_path, load_base
from tailor.models.tiny import tiny_hf_model

pytestmark = pytest.mark.integration

VOCAB = 49152  # SmolLM2's tokenizer and tokenizer GGUF serve as the tiny models' vocabulary
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama-tied": ("llama", {}),
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3, "head_dim": 32, "num_attention_heads": 2,
                              "num_key_value_heads": 2}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-tied": ("qwen2", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(None, n_layers=1)[1]


def _model(case: str):
    family, over = CASES[case]
    hf = tiny_hf_model(family, seed=11, vocab=VOCAB, num_hidden_layers=3, **over)
    cfg = hf.config.to_dict()
    return build_model(cfg, hf.state_dict(), case)


def _subnet(arch: BaseArch, fmt: str) -> SubnetConfig:
    """Layer 1 dropped, a KV group and half the FFN pruned in layer 2, mixed bits, 8-bit tables."""
    hi = {"gguf": (4, 5, 8, 16), "onnx": (2, 4, 8, 16)}[fmt]
    mix = [dict(zip(MATRICES, (hi[(i + j) % 4] for j in range(7)))) for i in range(3)]
    return SubnetConfig((LayerConfig(True, arch.n_kv_heads, arch.ffn, mix[0]),
                         LayerConfig(False, arch.n_kv_heads, arch.ffn, mix[1]),
                         LayerConfig(True, arch.n_kv_heads - 1, arch.ffn // 2, mix[2])), embed_bits=8)


def _ids(t: int = 40) -> list[int]:
    return torch.randint(0, VOCAB, (t,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("case", CASES)
def test_gguf_runs_in_llamacpp(case, tmp_path, tokenizer):
    dense = _model(case)
    arch = BaseArch.from_hf(dense.config)
    sub = _subnet(arch, "gguf")
    small = export_active(dense, sub, "gguf")  # runtime emulation on: llama.cpp's activation rounding
    path = tmp_path / "m.gguf"
    info = gguf_writer.export(small, tokenizer, path, template=gguf_path())
    assert info["arch"] == "deci"
    assert info["weight_bytes"] == sub.nbytes(arch, "gguf")  # biases and an untied head are costed
    want = gguf_writer.predicted_file_bytes(sub, arch, gguf_path(), name=f"tailor {small.config.name_or_path or 'model'}",
                                            rope_scaled=bool(small.config.rope_freq_scaling))
    assert abs(info["file_bytes"] - want) <= 64  # the model name's length is not modelled
    ids = _ids()
    got = llamacpp.logits(path, ids, n_threads=1)
    with torch.no_grad():
        ref = small(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - ref).max() / ref.std()
    assert err < 0.1, f"{case}: llama.cpp logits differ by {err:.3f} std"  # the existing GGUF bound


@pytest.mark.parametrize("case", CASES)
def test_onnx_runs_in_onnxruntime(case, tmp_path, tokenizer):
    dense = _model(case)
    arch = BaseArch.from_hf(dense.config)
    sub = _subnet(arch, "onnx")
    small = export_active(dense, sub, "onnx")
    info = onnx_writer.export(small, tokenizer, tmp_path / "m.onnx")
    assert info["weight_bytes"] == sub.nbytes(arch, "onnx")
    ids = _ids()
    got = ort_rt.logits(ort_rt.session(tmp_path / "m.onnx"), [ids])[0]
    with torch.no_grad():
        ref = small(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6, case


def test_gguf_parity_needs_the_biases(tmp_path, tokenizer):
    """The Qwen2 cases would pass without biases only if they did nothing: dropping them from the file
    (written as zeros) must move llama.cpp's logits far outside the bound."""
    dense = _model("qwen2-tied")
    small = export_active(dense, _subnet(BaseArch.from_hf(dense.config), "gguf"), "gguf")
    ids = _ids()
    with torch.no_grad():
        ref = small(torch.tensor([ids])).logits[0].numpy()
        for mod in small.modules():
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    gguf_writer.export(small, tokenizer, tmp_path / "nobias.gguf", template=gguf_path())
    got = llamacpp.logits(tmp_path / "nobias.gguf", ids, n_threads=1)
    assert np.abs(got - ref).max() / ref.std() > 0.5
