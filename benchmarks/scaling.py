"""Data-parallel supernet training: tokens/s per GPU and scaling efficiency vs 1 GPU, and the loss
curve at the same global batch. Run once per world size under torchrun, then combine:

    torchrun --nproc_per_node=1 benchmarks/scaling.py --out /tmp/w1.json
    torchrun --nproc_per_node=2 benchmarks/scaling.py --out /tmp/w2.json
    python benchmarks/scaling.py --combine /tmp/w1.json /tmp/w2.json   # -> reports/bench/scaling.json

`--parallel fsdp` shards the student with FSDP2 instead of replicating it (DDP); `--combine ... --key fsdp`
writes the combined result under that key of an existing scaling.json, leaving its other keys as they are.

The training step is Tailor's own (`tailor.train.train_kd` with the sandwich of `steps.supernet`), on
the SmolLM2-135M architecture random-initialised (speed does not depend on weight values) and random
token data; the teacher is another random model of the same shape.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def worker(a) -> None:
    from tailor.elastic.space import sandwich_configs
    from tailor.arch import BaseArch
    from tailor.elastic.space import SearchSpace
    from tailor.elastic.supernet import set_active
    from tailor.models.model import TailorConfig, TailorForCausalLM
    from tailor.train import TrainSpec, train_kd

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 or "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    cfg = TailorConfig() if a.layers is None else TailorConfig(num_hidden_layers=a.layers)
    student = TailorForCausalLM(cfg).to(device)
    torch.manual_seed(1)
    teacher = TailorForCausalLM(cfg).to(device).requires_grad_(False).eval()
    arch = BaseArch.from_hf(cfg)
    spaces = {"gguf": SearchSpace.build(arch, [4, 5, 8, 16], [8, 16], 0.25, 1, 0.25, None),
              "onnx": SearchSpace.build(arch, [2, 4, 8, 16], [8, 16], 0.25, 1, 0.25, None)}
    data = torch.randint(0, cfg.vocab_size, (a.batch * (a.steps + 1), a.seq), generator=torch.Generator().manual_seed(2))

    def sandwich(step, gen):
        return [lambda c=c, f=f: set_active(student, c, f) for c, f in sandwich_configs(spaces, step, 2, gen)]

    if a.keep_gathered:  # benchmark variant: FSDP blocks stay gathered between forward and backward
        import functools

        from tailor import fsdp
        fsdp.shard_copy = functools.partial(fsdp.shard_copy, reshard_after_forward=False)
    spec = TrainSpec(a.steps, a.batch, 1e-4, 1.0, 0, ckpt_every=10**9, amp=True, compile=a.compile, parallel=a.parallel)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof = torch.profiler.profile() if a.profile else contextlib.nullcontext()
    with prof:
        res = train_kd(student, teacher, data, spec, sandwich, None, desc=f"rank{rank}")
    if a.profile and rank == 0:  # where the step's time goes, by op (CPU and GPU self time)
        keys = prof.key_averages()
        Path(a.profile).write_text(keys.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
                                   + keys.table(sort_by="self_cpu_time_total", row_limit=25))
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    warm = a.warmup
    tps = [p["tokens_per_s"] for p in res.curve[warm:]]
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)) if cuda else 0.0, device=device)
    if dist.is_initialized():  # the busiest GPU's peak
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    out = {"world": world, "parallel": (a.parallel + ("-keep-gathered" if a.keep_gathered else "")) if world > 1 else "none", "global_batch": a.batch, "seq_len": a.seq, "steps": a.steps, "compile": a.compile,
           "tokens_per_s": sum(tps) / len(tps), "tokens_per_s_per_gpu": sum(tps) / len(tps) / world,
           "seconds": dt, "loss": [round(p["loss"], 6) for p in res.curve],
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "peak_mem_gb": round(float(peak) / 2**30, 2) if cuda else None}
    if rank == 0:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))
        print(json.dumps({k: v for k, v in out.items() if k != "loss"}))
    if dist.is_initialized():
        dist.destroy_process_group()


def combine(files: list[str], out: str, key: str | None = None) -> None:
    runs = sorted((json.loads(Path(f).read_text()) for f in files), key=lambda r: (r["world"], r.get("parallel", "")))
    one = runs[0]
    rows = []
    for r in runs:
        diff = max(abs(x - y) for x, y in zip(r["loss"], one["loss"]))
        rows.append({"world": r["world"], "parallel": r.get("parallel", "ddp"), "tokens_per_s": round(r["tokens_per_s"], 1),
                     "tokens_per_s_per_gpu": round(r["tokens_per_s_per_gpu"], 1),
                     "scaling_efficiency": round(r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 4),
                     "max_loss_diff_vs_1gpu": round(diff, 6), "peak_mem_gb": r["peak_mem_gb"]})
    res = {"device": one["device"], "torch": one["torch"], "global_batch": one["global_batch"], "seq_len": one["seq_len"],
           "steps": one["steps"], "compile": one["compile"], "runs": rows,
           "loss_curves": {f"{r['world']}:{r.get('parallel', 'ddp')}": r["loss"] for r in runs}}
    if key:  # one more section of an existing file
        res = {**json.loads(Path(out).read_text()), key: res}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="replicate (DDP) or shard (FSDP2) under torchrun")
    ap.add_argument("--keep-gathered", action="store_true", help="fsdp: no reshard between forward and backward")
    ap.add_argument("--profile", default=None, help="write rank 0's torch.profiler op table here")
    ap.add_argument("--out", default="reports/bench/scaling-run.json", help="this world size's result")
    ap.add_argument("--combine", nargs="+")
    ap.add_argument("--combined-out", default="reports/bench/scaling.json")
    ap.add_argument("--key", default=None, help="write the combined result under this key of --combined-out")
    a = ap.parse_args()
    if a.combine:
        combine(a.combine, a.combined_out, a.key)
    else:
        worker(a)
