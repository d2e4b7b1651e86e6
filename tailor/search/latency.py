"""Calibrate the latency model against the real runtime on this machine.

A handful of subnets spanning the space (bytes from small to large, depth from shallow to full) are
exported from the supernet, loaded in the device's runtime (llama.cpp or onnxruntime) and timed per
decoded token. Decode is memory bound, so the model is

    seconds/token = bytes / bandwidth + layers x per-layer overhead + fixed,

fitted by least squares (non-negative). The error reported is leave-one-out: each point predicted by
the fit on the others, so it says how well the model predicts a subnet it has not seen. The fitted
per-layer overhead then replaces the default in the device's cost model; the bandwidth stays the
device's spec-sheet figure (this host is not the device).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from tailor.arch import SubnetConfig
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import export_active
from tailor.formats import backend
from tailor.models.base import gguf_path



def spread(space: SearchSpace, fmt: str, n: int, candidates: list[SubnetConfig]) -> list[SubnetConfig]:
    """`n` configs evenly spread over bytes (from the given pool), distinct, smallest to largest."""
    arch = space.arch
    pool = sorted({c.hash: c for c in candidates}.values(), key=lambda c: c.nbytes(arch, fmt))
    if len(pool) <= n:
        return pool
    idx = np.unique(np.linspace(0, len(pool) - 1, n).round().astype(int))
    return [pool[i] for i in idx]


def seconds_per_token(path: Path, fmt: str, tokenizer: Any, n_tokens: int = 32) -> float:
    """Seconds per decoded token of the file in its format's runtime (the backend's runner)."""
    return backend(fmt).runner.seconds_per_token(path, tokenizer, n_tokens)


def measure(model, cfgs: list[SubnetConfig], fmt: str, tokenizer: Any, gguf_template: Path | None = None) -> list[dict]:
    """Export each subnet and time it in its runtime. `gguf_template`: the model's tokenizer GGUF."""
    be = backend(fmt)
    writer, name = be.writer, be.file_name
    arch_layers = model.config.num_hidden_layers
    rows = []
    with tempfile.TemporaryDirectory(prefix="tailor-latency-") as d:
        for k, cfg in enumerate(cfgs):
            small = export_active(model, cfg, fmt)
            path = Path(d) / f"{k}-{name}"
            kw = {"template": gguf_template or gguf_path()} if be.needs_tokenizer_file else {}
            info = writer.export(small, tokenizer, path, **kw)
            s = seconds_per_token(path, fmt, tokenizer)
            rows.append({"config_hash": cfg.hash, "weight_bytes": int(info["weight_bytes"]), "layers": len(cfg.kept),
                         "measured_ms": s * 1e3, "of_layers": arch_layers})
            del small
            path.unlink(missing_ok=True)
            for extra in Path(d).glob(f"{k}-*"):
                extra.unlink(missing_ok=True)
    return rows


def _fit(rows: list[dict]) -> np.ndarray:
    A = np.array([[r["weight_bytes"], r["layers"], 1.0] for r in rows])
    y = np.array([r["measured_ms"] / 1e3 for r in rows])
    scale = A.max(0)
    coef, _ = nnls(A / scale, y)
    return coef / scale


def calibrate(rows: list[dict]) -> dict:
    """Fit (bandwidth, per-layer overhead, fixed) and the leave-one-out MAPE."""
    coef = _fit(rows)
    errs = []
    for k in range(len(rows)):
        c = _fit(rows[:k] + rows[k + 1:])
        r = rows[k]
        pred = c @ np.array([r["weight_bytes"], r["layers"], 1.0])
        errs.append(abs(pred - r["measured_ms"] / 1e3) / (r["measured_ms"] / 1e3))
        r["predicted_ms_loo"] = round(float(pred) * 1e3, 4)
    return {"host_bandwidth_gbs": round(1 / coef[0] / 1e9, 2) if coef[0] > 0 else None,
            "layer_overhead_us": round(coef[1] * 1e6, 3), "fixed_us": round(coef[2] * 1e6, 3),
            "latency_mape": round(float(np.mean(errs)), 4), "n_configs": len(rows), "points": rows}


def cache_key(fmt: str, cfgs: list[SubnetConfig]) -> str:
    """Decode time depends on the structure and bit-widths, the runtime and the machine, not on the
    weight values: measurements are reused across supernets and budgets."""
    import hashlib
    import json
    import os
    import platform

    from tailor.export import runtime_versions
    blob = json.dumps({"fmt": fmt, "cfgs": [c.hash for c in cfgs], "rt": runtime_versions(),
                       "host": [platform.machine(), platform.processor(), os.cpu_count()]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def run(model, space: SearchSpace, fmt: str, tokenizer: Any, n: int, pool: list[SubnetConfig],
        cache: Path | None = None, gguf_template: Path | None = None) -> dict:
    import json
    import os

    cfgs = spread(space, fmt, n, pool)
    path = cache / f"{cache_key(fmt, cfgs)}.json" if cache else None
    if path is not None and path.is_file():
        rows, cached = json.loads(path.read_text()), True
    else:
        rows, cached = measure(model, cfgs, fmt, tokenizer, gguf_template), False
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(rows))
            os.replace(path.with_suffix(".tmp"), path)
    out = calibrate([{k: v for k, v in r.items() if k != "predicted_ms_loo"} for r in rows])
    out["cached"] = cached
    return out
