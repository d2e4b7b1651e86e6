"""Decode cost per GGUF type in llama.cpp on this CPU (issue 22, item 3): reports/bench/kquant_decode.json.

    python benchmarks/kquant_decode.py [--out reports/bench/kquant_decode.json] [--tools .cache/llama-tools]
                                       [--work /tmp/kquantdecode] [--rounds 5]

SmolLM2-135M cannot hold a K-quant in most matrices (576 = 2.25 x 256 input columns: llama-quantize falls
back to 32-block types even with --pure), so the files timed here are a SmolLM2-sized Llama whose every
width is whole 256s (hidden 768, 12 heads / 4 KV heads of 64, FFN 2048, SmolLM2's 49,152-token vocabulary,
random weights: decode time does not depend on the values), at two depths. Tailor exports it in F16;
`llama-quantize --pure --token-embedding-type q8_0` makes one file per type with every layer matrix of
that type and the tied embedding / LM head Q8_0 in all of them. Each file is timed by llama.cpp's decode
counters (llama-cpp-python, 1 thread, 64 one-token steps), best of --rounds, the files taking turns.

Per type: ns per weight = (time at the deep file - time at the shallow file) / (layer weights added),
which cancels the head, the embedding and the fixed cost; and the same points fitted by the latency
model itself (`tailor.search.latency.calibrate(per_type=True)`: per-type cost per weight + per-layer
overhead + fixed, leave-one-out error), which is what the search uses.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q8_0", "F16")
DEPTHS = (4, 16)
SHAPE = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, head_dim=64, intermediate_size=2048)
THREADS = 1


def layer_weights(n_layers: int) -> int:
    h, q, kv, f = SHAPE["hidden_size"], SHAPE["num_attention_heads"] * SHAPE["head_dim"], \
        SHAPE["num_key_value_heads"] * SHAPE["head_dim"], SHAPE["intermediate_size"]
    return n_layers * (h * q + 2 * h * kv + q * h + 3 * h * f)


def build_files(work: Path, tools: Path, tok) -> dict[tuple[str, int], Path]:
    from tailor.export.gguf import export
    from tailor.models.tiny import tiny_model

    files = {}
    for depth in DEPTHS:
        src = work / f"f16-L{depth}.gguf"
        if not src.is_file():
            model = tiny_model(vocab=len(tok), n_layers=depth, seed=depth, **SHAPE)
            with __import__("torch").no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.02)
            export(model, tok, src)
            del model
        for t in TYPES:
            dst = work / f"{t}-L{depth}.gguf"
            if not dst.is_file():
                log = work / f"{t}-L{depth}.log"
                with log.open("w") as f:
                    rc = subprocess.run([str(tools / "llama-quantize"), "--pure", "--token-embedding-type", "q8_0",
                                         str(src), str(dst.with_suffix(".tmp")), t, str(THREADS)],
                                        stdout=f, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    raise RuntimeError(f"llama-quantize {t} L{depth}: exit {rc}: {log.read_text()[-800:]}")
                os.replace(dst.with_suffix(".tmp"), dst)
            files[(t, depth)] = dst
    return files


def file_types(path: Path) -> dict[str, int]:
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) == 2))


def point(path: Path, ms: float, name: str) -> dict:
    """A latency-model point read off the file: weights each decoded token multiplies through per type
    (every layer matrix; the LM head = output.weight, else the tied token_embd), and the layer count."""
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(path)
    names = {t.name for t in r.tensors}
    tw: dict[str, int] = {}
    layers = set()
    for t in r.tensors:
        if len(t.shape) != 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        if t.name.startswith("blk."):
            layers.add(int(t.name.split(".")[1]))
        tw[t.tensor_type.name] = tw.get(t.tensor_type.name, 0) + int(np.prod(t.shape))
    return {"config_hash": name, "weight_bytes": path.stat().st_size, "layers": len(layers), "measured_ms": ms,
            "type_weights": dict(sorted(tw.items()))}


def smollm2_files(work: Path, tools: Path, f16: Path) -> dict[tuple[str, int], Path]:
    """SmolLM2-135M itself, --pure at the 32-block types (its 576-wide inputs take them whole): a second
    layer shape, so the per-layer overhead is told apart from the per-weight costs in the fit."""
    out = {}
    for t in ("Q4_0", "Q8_0", "IQ4_NL"):
        dst = work / f"smollm2-{t}.gguf"
        if not dst.is_file():
            rc = subprocess.run([str(tools / "llama-quantize"), "--pure", str(f16), str(dst.with_suffix(".tmp")), t,
                                 str(THREADS)], capture_output=True, text=True)
            if rc.returncode != 0:
                raise RuntimeError(f"llama-quantize SmolLM2 {t}: {rc.stdout[-800:]}{rc.stderr[-800:]}")
            os.replace(dst.with_suffix(".tmp"), dst)
        out[(f"smollm2-{t}", 30)] = dst
    out[("smollm2-F16", 30)] = f16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/bench/kquant_decode.json")
    ap.add_argument("--tools", default=os.environ.get("LLAMA_TOOLS", str(ROOT / ".cache" / "llama-tools")))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "kquantdecode"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smollm2", default=None, help="SmolLM2-135M's F16 GGUF (kquant_table's base row): adds its "
                                                     "--pure Q4_0 / Q8_0 / IQ4_NL / F16 files to the latency fit")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import llama_cpp
    import torch
    from transformers import AutoTokenizer

    from tailor.export import llamacpp
    from tailor.models.base import base_dir
    from tailor.search.latency import calibrate

    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = Path(a.tools) / "bin"
    tok = AutoTokenizer.from_pretrained(base_dir())
    t0 = time.perf_counter()
    files = build_files(work, tools, tok)
    if a.smollm2:
        files.update(smollm2_files(work, tools, Path(a.smollm2)))
    build_s = time.perf_counter() - t0
    best = {k: 0.0 for k in files}
    for _ in range(a.rounds):  # the files take turns, so a burst of load on the shared CPU hits them alike
        for k, f in files.items():
            best[k] = max(best[k], llamacpp.tokens_per_s(f, tok, 64, n_threads=THREADS))
    points = [point(f, 1e3 / best[k], f"{k[0]}-L{k[1]}" if not k[0].startswith("smollm2") else k[0]) for k, f in files.items()]
    per_type = {}
    for t in TYPES:
        ms = {d: 1e3 / best[(t, d)] for d in DEPTHS}
        added = layer_weights(DEPTHS[1]) - layer_weights(DEPTHS[0])
        per_type[t] = {"ns_per_weight": round((ms[DEPTHS[1]] - ms[DEPTHS[0]]) * 1e6 / added, 5),
                       **{f"ms_per_token_L{d}": round(ms[d], 3) for d in DEPTHS},
                       **{f"tokens_per_s_L{d}": round(best[(t, d)], 1) for d in DEPTHS},
                       **{f"file_bytes_L{d}": files[(t, d)].stat().st_size for d in DEPTHS},
                       "tensor_types_L16": file_types(files[(t, DEPTHS[1])])}
    fit = calibrate(points, per_type=True)
    bytes_fit = calibrate([{k: v for k, v in p.items() if k != "type_weights"} for p in points])
    q40 = per_type["Q4_0"]["ns_per_weight"]
    for t in TYPES:
        per_type[t]["relative_to_Q4_0"] = round(per_type[t]["ns_per_weight"] / q40, 3)
    out = {"machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (shared), {platform.system()}",
           "runtime": f"llama-cpp-python {llama_cpp.__version__}, {THREADS} thread",
           "tools": (Path(a.tools) / "VERSION").read_text().strip() if (Path(a.tools) / "VERSION").is_file() else str(tools),
           "model": {"what": "SmolLM2-sized Llama, every width whole 256s, random weights", **SHAPE,
                     "vocab": len(tok), "depths": list(DEPTHS), "embedding": "Q8_0 (tied LM head)"},
           "timing": f"llama.cpp decode counters, 64 one-token steps after a short prompt, best of {a.rounds}, files interleaved",
           "per_type": per_type,
           "latency_fit": {k: v for k, v in fit.items() if k != "points"},
           "bytes_model_fit": {k: v for k, v in bytes_fit.items() if k != "points"},
           "latency_fit_points": [{k: p[k] for k in ("config_hash", "layers", "measured_ms", "predicted_ms_loo", "type_weights")}
                                  for p in fit["points"]],
           "build_s": round(build_s, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({t: (v["ns_per_weight"], v["relative_to_Q4_0"], v["tokens_per_s_L16"]) for t, v in per_type.items()}, indent=1))
    print("fit:", out["latency_fit"], "\nbytes model:", out["bytes_model_fit"])


if __name__ == "__main__":
    main()
