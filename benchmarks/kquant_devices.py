"""Do CPU and CUDA choose the same K-quant / IQ4_NL codes? (`tailor.quant.gguf_kquants` sums by a fixed
pairwise tree so that the choice should not depend on the device's reduction order.) Writes
reports/bench/kquant_devices.json: per type, the share of elements whose code differs and whether the
dequantized values are bitwise equal, on Gaussian and Student-t weights, [512, 2048]."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tailor.quant import gguf_kquants as kq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("reports/bench/kquant_devices.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kquant_devices: needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    weights = {"gaussian": torch.randn(512, 2048, generator=g) * 0.02,
               "student_t3": torch.distributions.StudentT(3.0).sample((512, 2048)) * 0.02}
    rows = []
    for dist, w in weights.items():
        for name in kq.TYPES:
            c_cpu = kq.codes(w, name)
            torch.cuda.synchronize()
            t = time.perf_counter()
            c_gpu = kq.codes(w.cuda(), name)
            torch.cuda.synchronize()
            gpu_ms = (time.perf_counter() - t) * 1e3
            diff = (c_cpu.q != c_gpu.q.cpu()).float().mean().item()
            same = torch.equal(kq.from_codes(c_cpu), kq.from_codes(c_gpu).cpu())
            rows.append({"weights": dist, "type": name, "codes_differ": diff, "dequantized_bitwise_equal": same,
                         "gpu_ms": round(gpu_ms, 2)})
            print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": [512, 2048], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
