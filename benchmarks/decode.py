"""Decode speed and perplexity of the phone GGUF beside the base model quantized to Q4_K_M by llama.cpp
itself (what users pick today), same machine, same process. Writes reports/bench/decode.json.

Needs a finished `export@phone` (artifacts/export/phone/model.gguf) and the calibrate eval sets.

    python benchmarks/decode.py [--docs 60]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import tempfile
from pathlib import Path

import llama_cpp
from transformers import AutoTokenizer

from tailor.arch import SubnetConfig
from tailor.elastic.supernet import arch_of, export_active
from tailor.export import gguf, llamacpp
from tailor.models.base import base_dir, load_base


def quantize_q4_k_m(src: Path, dst: Path) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


def measure(path: Path, tok, seqs: list[list[int]], n_params: int) -> dict:
    size = path.stat().st_size
    return {"file_bytes": size, "bits_per_param": round(8 * size / n_params, 3),
            "ppl": llamacpp.perplexity(path, seqs), "tokens_per_s": llamacpp.tokens_per_s(path, tok, 64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--phone", default="artifacts/export/phone/model.gguf")
    ap.add_argument("--out", default="reports/bench/decode.json")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(base_dir())
    texts = [json.loads(l)["text"] for l in Path("artifacts/calibrate/eval/wiki.jsonl").read_text().splitlines()][: a.docs]
    seqs = [ids for ids in (tok(t)["input_ids"] for t in texts) if len(ids) >= 2]
    base, _ = load_base()
    arch = arch_of(base)
    n_params = SubnetConfig.max(arch).param_count(arch)
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "base-f16.gguf"
        gguf.export(export_active(base, SubnetConfig.max(arch, bits=16, embed_bits=16), "gguf"), tok, f16)
        q4km = Path(tmp) / "base-q4_k_m.gguf"
        quantize_q4_k_m(f16, q4km)
        rows = {"base_f16": measure(f16, tok, seqs, n_params), "llama.cpp_q4_k_m": measure(q4km, tok, seqs, n_params),
                "tailor_phone": measure(Path(a.phone), tok, seqs, n_params)}
    out = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "n_seqs": len(seqs),
           "speedup_vs_q4_k_m": round(rows["tailor_phone"]["tokens_per_s"] / rows["llama.cpp_q4_k_m"]["tokens_per_s"], 3),
           **rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
