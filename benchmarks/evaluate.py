"""Time the evaluate suite of the base model for a profile (default full: every task and item, MMLU
included) and write reports/bench/evaluate.json: seconds per run, items and tokens/s per task.

Needs the calibrate eval sets (artifacts/calibrate/eval). On a GPU machine:

    python benchmarks/evaluate.py --profile full [--batch-size 64] [--out reports/bench/evaluate.json]
    python benchmarks/evaluate.py --profile quick    # CPU: what each `make run` evaluate stage costs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from tailor.config import load_params
from tailor.eval.harness import run_suite, suite_options
from tailor.models.base import load_base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="full")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--eval-dir", default="artifacts/calibrate/eval")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the profile's evaluate.batch_size")
    ap.add_argument("--out", default="reports/bench/evaluate.json")
    args = ap.parse_args()
    p = load_params(args.params, args.profile)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    opts = suite_options(p.evaluate) | ({"batch_size": args.batch_size} if args.batch_size else {})
    t0 = time.perf_counter()
    model, tok = load_base(p.model.n_layers, device=dev)
    load_s = time.perf_counter() - t0
    res = run_suite(model, tok, Path(args.eval_dir), device=dev, **opts)
    out = {
        "profile": args.profile, "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "batch_size": opts["batch_size"],
        "max_length": opts["max_length"], "load_s": round(load_s, 2), "suite_s": res.meta["seconds"],
        "suite_cpu_s": res.meta["cpu_seconds"], "items": res.meta["n"],
        "ppl": res.ppl(), "accuracy": {t: res.acc(t) for t in res.tasks},
        "note": "one model; a device's evaluate stage runs this for the compressed model (base suite cached)",
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
