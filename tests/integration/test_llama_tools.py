"""The llama.cpp tools built by scripts/build_llama_tools.sh (skipped when not built): llama-quantize
writes the same K-quant blocks as the ggml inside llama-cpp-python (one source), and our K-quant grid
is at least as accurate on them.

Tools directory: $LLAMA_TOOLS, else .cache/llama-tools in the repository.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from tailor.export.gguf import export
from tailor.quant import gguf_kquants as kq

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("LLAMA_TOOLS", ROOT / ".cache" / "llama-tools")) / "bin"
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from test_gguf_kquants import llamacpp_quantize  # noqa: E402  (ggml_quantize_chunk through ctypes)


@pytest.mark.skipif(not (TOOLS / "llama-quantize").is_file(), reason=f"no llama tools in {TOOLS}")
def test_llama_quantize_is_llama_cpp_pythons_ggml(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tailor.models.base import base_dir
    from tailor.models.tiny import tiny_model

    model = tiny_model(vocab=49152, n_layers=1, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=32, intermediate_size=512, seed=5)  # every matrix at 16 bits: F16 in the file
    src, dst = tmp_path / "f16.gguf", tmp_path / "q4k.gguf"
    export(model, AutoTokenizer.from_pretrained(base_dir()), src)
    run = subprocess.run([str(TOOLS / "llama-quantize"), "--pure", str(src), str(dst), "Q4_K", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    f16 = {t.name: t for t in GGUFReader(src).tensors}
    checked = 0
    for t in GGUFReader(dst).tensors:
        if not t.name.startswith("blk.") or t.tensor_type != GGMLQuantizationType.Q4_K:
            continue
        rows = int(t.shape[-1])
        w = torch.from_numpy(quants.dequantize(f16[t.name].data, GGMLQuantizationType.F16).reshape(rows, -1).copy())
        theirs = np.asarray(t.data).view(np.uint8).ravel()
        assert np.array_equal(theirs, llamacpp_quantize(w, int(GGMLQuantizationType.Q4_K))), t.name
        back = quants.dequantize(theirs, GGMLQuantizationType.Q4_K).reshape(w.shape)
        rmse = lambda v: float(((torch.as_tensor(v) - w) ** 2).mean().sqrt())  # noqa: E731
        assert rmse(kq.dequantized(w, "Q4_K")) <= rmse(back), t.name
        checked += 1
    assert checked == 7  # q k v o gate up down
