"""Search throughput: candidate evaluations per second on the supernet (KL to the base model on the
validation shard), sensitivity-table entries per second, and the MIP's solve time, on this machine's
CPU or GPU. Merges its result under the device kind into reports/bench/search.json, so the CPU and GPU
numbers sit side by side.

    python benchmarks/search.py --profile quick     # CPU: 4 x 128 tokens per candidate
    python benchmarks/search.py --profile full      # GPU: 64 x 512 tokens per candidate (bf16 autocast)

The SmolLM2-135M architecture is random-initialised (speed does not depend on weight values).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tailor.arch import BaseArch
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.models.model import TailorConfig, TailorForCausalLM
from tailor.search import sensitivity
from tailor.search.sampled import Candidate, score

PROFILES = {"quick": dict(seqs=2, seq=128, cands=6, sens_jobs=60), "full": dict(seqs=64, seq=512, cands=40, sens_jobs=None)}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _complete(table, space) -> None:
    """Fill the entries a truncated measurement skipped with zeros (the solve time depends on the
    table's shape, not its values)."""
    from tailor.arch import MATRICES
    for i in range(space.arch.n_layers):
        for m in MATRICES:
            for b in space.bits:
                if b != 16:
                    table.bits.setdefault(f"{i}:{m}:{b}", 0.0)
        for g in range(space.min_kv, space.arch.n_kv_heads):
            table.kv.setdefault(f"{i}:{g}", 0.0)
        for w in sensitivity.ffn_options(space):
            if w != space.arch.ffn:
                table.ffn.setdefault(f"{i}:{w}", 0.0)
    for i in space.droppable:
        table.drop.setdefault(str(i), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--out", default="reports/bench/search.json")
    a = ap.parse_args()
    p = PROFILES[a.profile]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = TailorForCausalLM(TailorConfig()).to(dev).eval()
    teacher = TailorForCausalLM(TailorConfig()).to(dev).eval()
    arch = BaseArch.from_hf(model.config)
    from tailor.arch import SubnetConfig
    budget = int(0.3 * 2 * SubnetConfig.max(arch).param_count(arch))  # the phone's: 30% of the bf16 bytes
    space = SearchSpace.build(arch, [4, 5, 8, 16], [8], 0.25, 1, 0.25, None)
    seqs = torch.randint(0, arch.vocab, (p["seqs"], p["seq"]), generator=torch.Generator().manual_seed(0))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    with amp:
        t_logits = teacher_logits(teacher, seqs)
        gen = torch.Generator().manual_seed(0)
        cands = [space.sample(gen) for _ in range(p["cands"] + 1)]
        c0 = Candidate(cands[0], 0, 0.0, 0.0)
        score(model, c0, "gguf", seqs, t_logits, 8)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for cfg in cands[1:]:
            score(model, Candidate(cfg, 0, 0.0, 0.0), "gguf", seqs, t_logits, 8)
        _sync(dev)
        per_s = p["cands"] / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        table = sensitivity.measure(model, space, "gguf", 8, seqs, t_logits, max_jobs=p["sens_jobs"])
        _sync(dev)
        sens_s = time.perf_counter() - t0
    n_entries = len(table.bits) + len(table.drop) + len(table.kv) + len(table.ffn)
    if p["sens_jobs"]:  # only a sample of the table was timed: the MIP gets the full table's shape
        _complete(table, space)
    try:  # scipy may be missing on a bare GPU machine; the MIP runs on the CPU anyway
        from tailor.search import mip
        t0 = time.perf_counter()
        cfg = mip.solve(table, space, "gguf", 8, budget)
        mip_s = time.perf_counter() - t0
    except ImportError:
        cfg, mip_s = None, float("nan")
    kind = "gpu" if dev.type == "cuda" else "cpu"
    res = {"device": torch.cuda.get_device_name(dev) if kind == "gpu" else
           f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "profile": a.profile, "tokens_per_candidate": p["seqs"] * p["seq"], "torch": torch.__version__,
           "candidates_per_s": round(per_s, 3), "sensitivity_entries": n_entries,
           "sensitivity_entries_per_s": round(n_entries / sens_s, 2), "sensitivity_seconds": round(sens_s, 2),
           "mip_solve_seconds": round(mip_s, 3), "mip_fits": cfg.nbytes(arch, "gguf") <= budget if cfg else None}
    out = Path(a.out)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged[kind] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
