"""Decode speed and perplexity of the phone GGUF beside the base model quantized to Q4_K_M by llama.cpp
itself (what users pick today), same machine, same process. Writes reports/bench/decode.json.

Speeds are llama.cpp's own decode timings (64 one-token steps after a prompt), at 1 thread and at every
core, best of --repeats, the files taking turns so that a burst of load on a shared machine hits all of
them alike. Needs a finished `export@phone` (artifacts/export/phone/model.gguf) and the calibrate eval sets.

    python benchmarks/decode.py [--docs 60] [--repeats 5]
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import platform
import tempfile
from pathlib import Path

import llama_cpp
from gguf import GGUFReader
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


def tensor_types(path: Path) -> dict[str, float]:
    """MB of weights per ggml type: what decides which CPU kernels run."""
    mb = collections.Counter()
    for t in GGUFReader(path).tensors:
        mb[t.tensor_type.name] += int(t.n_bytes) / 1e6
    return {k: round(v, 2) for k, v in sorted(mb.items())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--phone", default="artifacts/export/phone/model.gguf")
    ap.add_argument("--out", default="reports/bench/decode.json")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(base_dir())
    texts = [json.loads(l)["text"] for l in Path("artifacts/calibrate/eval/wiki.jsonl").read_text().splitlines()][: a.docs]
    seqs = [ids for ids in (tok(t)["input_ids"] for t in texts) if len(ids) >= 2]
    base, _ = load_base()
    arch = arch_of(base)
    n_params = SubnetConfig.max(arch).param_count(arch)
    threads = sorted({1, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "base-f16.gguf"
        gguf.export(export_active(base, SubnetConfig.max(arch, bits=16, embed_bits=16), "gguf"), tok, f16)
        q4km = Path(tmp) / "base-q4_k_m.gguf"
        quantize_q4_k_m(f16, q4km)
        files = {"base_f16": f16, "llama.cpp_q4_k_m": q4km, "tailor_phone": Path(a.phone)}
        speed = {k: {n: 0.0 for n in threads} for k in files}
        for _ in range(a.repeats):
            for n in threads:
                for k, f in files.items():
                    speed[k][n] = max(speed[k][n], llamacpp.tokens_per_s(f, tok, 64, n_threads=n))
        rows = {}
        for k, f in files.items():
            size = f.stat().st_size
            rows[k] = {"file_bytes": size, "bits_per_param": round(8 * size / n_params, 3),
                       "ppl": llamacpp.perplexity(f, seqs), "types_mb": tensor_types(f),
                       "tokens_per_s": {f"{n}_threads": round(v, 1) for n, v in speed[k].items()}}
    ratio = {f"{n}_threads": round(speed["tailor_phone"][n] / speed["llama.cpp_q4_k_m"][n], 3) for n in threads}
    out = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "n_seqs": len(seqs),
           "timing": f"llama.cpp decode counters, 64 tokens, best of {a.repeats}, files interleaved",
           "speedup_vs_q4_k_m": ratio, **rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
