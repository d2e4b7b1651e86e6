"""Per-token NLL from llama.cpp's logits rows: the float64 numpy log-softmax export used until session 20 (baseline)
against `tailor.export.llamacpp._nll` (torch cross-entropy, float32 rows), on the shapes of the full profile's
export: `--docs` documents of `--tokens` tokens over SmolLM2's 49,152-token vocabulary, random logits.

    python benchmarks/llamacpp_nll.py [--docs 40] [--tokens 400] [--threads 2] [--out reports/bench/llamacpp_nll.json]

Why: session 20 read export@phone's 166 s llama.cpp perplexity (500 documents) as mostly this log-softmax. It was
not: the export's documents average 12.4 tokens, not 400, and the time was llama.cpp's 16 spinning threads
(session 21, benchmarks/runtime_threads.py). Both sides score the same rows; the JSON holds seconds a document for
each and their largest difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def baseline(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The code as it was: float64 log-softmax of every row, then the target's entry."""
    x = scores.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "reports/bench/llamacpp_nll.json"))
    a = ap.parse_args()
    import torch

    from tailor.export.llamacpp import _nll

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    docs = [((rng.standard_normal((a.tokens, a.vocab)) * 4).astype(np.float32), rng.integers(0, a.vocab, a.tokens))
            for _ in range(a.docs)]
    out, ref = {}, None
    for name, fn in (("baseline_numpy_f64", baseline), ("candidate_torch_ce", _nll)):
        t0 = time.perf_counter()
        got = [fn(s, t) for s, t in docs]
        out[name] = {"s_per_doc": round((time.perf_counter() - t0) / a.docs, 4)}
        ref = got if ref is None else ref
        out[name]["max_abs_diff_vs_baseline"] = float(max(np.abs(g - r).max() for g, r in zip(got, ref)))
    out["speedup"] = round(out["baseline_numpy_f64"]["s_per_doc"] / out["candidate_torch_ce"]["s_per_doc"], 2)
    out["setup"] = {"docs": a.docs, "tokens": a.tokens, "vocab": a.vocab, "torch_threads": a.threads,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
