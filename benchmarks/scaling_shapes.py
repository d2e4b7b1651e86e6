"""Multi-GPU supernet training and search at real shapes (random weights): Llama-3.2-1B and Llama-3.1-8B
(benchmarks/supernet_scale.py's SHAPES, FLOP count and kernel summary), on one GPU and on several.

Each subcommand writes one row (JSON) to --out; `run_scaling_x2.sh` runs them on a 2-GPU machine, each
under its own timeout, and `--combine` merges the rows into reports/bench/scaling.json under "shapes".

  e2e        Tailor's end-to-end supernet step (`tailor.train.train_kd`: the sandwich of 4 whole subnets
             over both export grids, bf16 teacher) on --nproc ranks at --per-gpu-batch sequences each:
             `--parallel ddp` (replicated) or `fsdp` (FSDP2-sharded student, tailor.fsdp). Per GPU: student
             tokens/s (tokens x subnets), MFU (supernet_scale's count), peak memory, and one profiled
             step's kernel time by kind, NCCL collectives apart ("comm", overlapping compute).
  blockwise  `tailor.elastic.blockwise.train_blocks_shared` (the stage's blockwise mode) at the shape's width
             with --layers blocks: each rank trains its contiguous share of blocks with its own teacher
             walk, then loads the others'. Blocks/s per GPU, and where each rank's time went.
  fanout     search candidates scored through the Dask runner (`tailor.search.fanout.score_candidates`,
             tailor.parallel), one worker per GPU (`worker_device`): candidates/s with 1 and with N
             workers, cold (cluster start + model load) and steady.

Ranks: under torchrun (WORLD_SIZE set) the process is one rank; otherwise `--nproc N` starts N ranks
itself (torch.multiprocessing, one process group: a timeout that kills the command kills them all).
Timing: the period between consecutive sandwich draws (one per step, after a device sync), over
--steps steps after --warmup; the row is written as soon as the timed steps end.

    python benchmarks/scaling_shapes.py e2e --shape tiny --nproc 2 --out /tmp/r.json     # CPU, gloo
    bash benchmarks/run_scaling_x2.sh                                                    # 2 GPUs
    python benchmarks/scaling_shapes.py combine rows.json                                # -> scaling.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` from the repo root

from benchmarks import scaling_rows  # noqa: E402
from benchmarks.scaling_rows import _write  # noqa: E402
from benchmarks.supernet_scale import PEAK, _sync, config, kernel_summary, sandwich_flops, spaces_for  # noqa: E402


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK.items() if k in name), None)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _init() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _round(row: dict) -> dict:
    return {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------- e2e
def e2e(a) -> None:
    from tailor.elastic.space import sandwich_configs
    from tailor.elastic.supernet import arch_of, set_active
    from tailor.models.model import TailorForCausalLM
    from tailor.train import TrainSpec, train_kd

    rank, world, device = _init()
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = config(a.shape, a.layers)
    torch.manual_seed(0)
    with torch.device(device):  # built on the GPU (fast init); train_kd moves an FSDP student to the CPU itself
        student = TailorForCausalLM(cfg)
    torch.manual_seed(1)
    with torch.device(device):
        teacher = TailorForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    teacher.requires_grad_(False).eval()
    arch = arch_of(student)
    spaces = spaces_for(arch)
    kd_chunk = 0 if (a.parallel == "fsdp" and world > 1) else a.kd_chunk  # train_kd refuses chunked KD under FSDP
    W, T = a.warmup, a.steps
    batch = a.per_gpu_batch * world
    data = torch.randint(0, cfg.vocab_size, (batch * (W + T + 2), a.seq), generator=torch.Generator().manual_seed(2))
    spec = TrainSpec(steps=W + T + 1, batch_size=batch, lr=1e-5, temperature=1.0, seed=0, ckpt_every=10**9,
                     parallel=a.parallel, kd_chunk=kd_chunk, checkpointing=a.checkpointing)
    row = {"kind": "e2e", "name": a.name, "shape": a.shape, "layers": cfg.num_hidden_layers, "world": world,
           "parallel": a.parallel if world > 1 else "none", "per_gpu_batch": a.per_gpu_batch, "seq": a.seq,
           "kd_chunk": kd_chunk, "checkpointing": a.checkpointing, "warmup": W, "steps": T,
           "params": sum(p.numel() for p in student.parameters()), "device": _device_name(device),
           "gpus_visible": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__}
    drawn: list[list] = []
    stamps: list[float] = []
    prof_box: dict = {}
    peak = _peak_flops(device)
    t_start = time.perf_counter()

    def finish_row() -> None:
        periods = [stamps[k + 1] - stamps[k] for k in range(W, W + T)]
        secs = sum(periods)
        tokens = a.per_gpu_batch * a.seq  # this rank's share of each step
        mflops, recompute = sandwich_flops(arch, drawn[W:W + T], tokens, a.seq, a.checkpointing)
        student_tokens = sum(tokens * len(c) for c in drawn[W:W + T])
        peaks = _gather(_peak_gb(device))
        comm = _gather(prof_box.get("summary", {}).get("comm_kernel_s"))
        row.update(step_s=secs / T, step_s_each=[round(p, 4) for p in periods],
                   student_tokens_per_s=student_tokens * world / secs, student_tokens_per_s_per_gpu=student_tokens / secs,
                   model_tflops_per_s_per_gpu=mflops / secs / 1e12, hw_tflops_per_s_per_gpu=(mflops + recompute) / secs / 1e12,
                   peak_mem_gb=max(p or 0 for p in peaks) if cuda else None, peak_mem_gb_per_gpu=peaks,
                   setup_s=stamps[0] - t_start, seconds_to_row=time.perf_counter() - t_start)
        if peak:
            row.update(mfu=round(mflops / secs / peak, 4), hfu=round((mflops + recompute) / secs / peak, 4))
        if "summary" in prof_box:
            row["profile_rank0"] = prof_box["summary"]
            row["comm_kernel_s_per_rank"] = comm
            row["profiled_step_s"] = round(prof_box["wall"], 4)
        if rank == 0:
            _write(a.out, _round(row))
            print(json.dumps({k: v for k, v in _round(row).items() if k not in ("profile_rank0", "step_s_each")}), flush=True)

    def sandwich(step, gen):
        _sync(device)
        now = time.perf_counter()
        if cuda and step == 1:  # peak memory of the training steps, not of building the models
            torch.cuda.reset_peak_memory_stats(device)
        if a.profile and cuda and step == 1:  # the second step: warm, and outside the timed ones
            prof_box["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            prof_box["prof"].start()
            prof_box["t0"] = now
        elif "prof" in prof_box and step == 2:
            prof_box["prof"].stop()
            prof_box["wall"] = now - prof_box["t0"]
            prof_box["summary"] = kernel_summary(prof_box.pop("prof").key_averages(), prof_box["wall"])
            now = time.perf_counter()  # the profile's processing stays out of the next period
        stamps.append(now)
        if step == W + T:  # every timed step is done: the row is written before the last step and the wrap-up
            finish_row()
        cfgs = sandwich_configs(spaces, step, a.n_random, gen)
        drawn.append([c for c, _ in cfgs])
        return [lambda c=c, f=f: set_active(student, c, f) for c, f in cfgs]

    assert W >= (2 if a.profile and cuda else 1), "--warmup: the profiled step 1 must not be timed"
    res = train_kd(student, teacher, data, spec, sandwich, None, desc=f"rank{rank}")
    if rank == 0:  # the loss curve and the wrap-up (FSDP: gathering the trained student back) once done
        row.update(loss=[round(p["loss"], 5) for p in res.curve], total_s=time.perf_counter() - t_start)
        _write(a.out, _round(row))


# ---------------------------------------------------------------------------------------- blockwise
def blockwise(a) -> None:
    from tailor.elastic.blockwise import BlockSpec, block_share, train_blocks_shared
    from tailor.elastic.supernet import arch_of
    from tailor.models.model import TailorForCausalLM

    rank, world, device = _init()
    cuda = device.type == "cuda"
    cfg = config(a.shape, a.layers)
    torch.manual_seed(0)
    with torch.device(device):
        student = TailorForCausalLM(cfg)
    student = student.to("cpu")  # the pipeline's layout: the model on the CPU, one block on the GPU at a time
    teacher = copy.deepcopy(student).to(torch.bfloat16 if cuda else torch.float32).requires_grad_(False)
    spaces = spaces_for(arch_of(student))
    data = torch.randint(0, cfg.vocab_size, (a.seqs, a.seq), generator=torch.Generator().manual_seed(0))
    spec = BlockSpec(steps=a.block_steps, batch_size=a.batch, lr=1e-5, seed=0, ckpt_every=a.block_steps)
    work = Path(a.work)
    done: list[dict] = []
    if world > 1:
        dist.barrier()
    _sync(device)
    t0 = time.perf_counter()

    def progress(r) -> None:  # after each block: when it ended, its training's seconds, its steady step time
        done.append({"block": r.block, "at_s": round(time.perf_counter() - t0, 3), "train_s": round(r.seconds, 3),
                     "step_s_median": round(_median([_step_s(p, a) for p in r.curve[1:]] or [0.0]), 4)})

    train_blocks_shared(student, teacher, data, spec, spaces, a.n_random, work, device, act_batch=a.batch,
                        progress=progress)
    _sync(device)
    t_all = time.perf_counter() - t0  # every rank has every block (the barrier and the others' blocks loaded)
    mine = {"rank": rank, "blocks": block_share(cfg.num_hidden_layers, rank, world), "share_s": done[-1]["at_s"] if done else 0.0,
            "train_s": round(sum(d["train_s"] for d in done), 3), "per_block": done, "peak_mem_gb": _peak_gb(device)}
    mine["walk_io_s"] = round(mine["share_s"] - mine["train_s"], 3)  # teacher walk + activation files
    ranks = _gather(mine)
    if rank == 0:
        L = cfg.num_hidden_layers
        row = {"kind": "blockwise", "name": a.name, "shape": a.shape, "layers": L, "world": world, "seqs": a.seqs,
               "seq": a.seq, "batch": a.batch, "block_steps": a.block_steps, "n_random": a.n_random,
               "wall_s": t_all, "blocks_per_s": L / t_all, "blocks_per_s_per_gpu": L / t_all / world,
               "slowest_share_s": max(r["share_s"] for r in ranks), "exchange_s": t_all - max(r["share_s"] for r in ranks),
               "block_step_s_median": _median([d["step_s_median"] for r in ranks for d in r["per_block"]] or [0.0]),
               "peak_mem_gb": max((r["peak_mem_gb"] or 0) for r in ranks) if cuda else None,
               "ranks": ranks, "device": _device_name(device), "torch": torch.__version__}
        _write(a.out, _round(row))
        print(json.dumps({k: v for k, v in _round(row).items() if k != "ranks"}), flush=True)


def _step_s(point: dict, a) -> float:
    """A block step's seconds from its curve point (tokens_per_s counts tokens x subnets)."""
    return a.batch * a.seq * (a.n_random + 2) / point["tokens_per_s"]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ------------------------------------------------------------------------------------------- fanout
def fanout(a) -> None:
    from tailor.elastic.supernet import arch_of
    from tailor.models.model import TailorForCausalLM
    from tailor.parallel import worker_device
    from tailor.search import fanout as fan
    from tailor.search.sampled import Candidate

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    cfg = config(a.shape, a.layers)
    t0 = time.perf_counter()
    root = Path(a.work)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = TailorForCausalLM(cfg)
    space = spaces_for(arch_of(model))["gguf"]
    model.save_pretrained(root / "model", safe_serialization=True, max_shard_size="200GB")  # one file, as the stage's
    del model
    if cuda:
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, cfg.vocab_size, (a.val_seqs, a.seq), generator=g)
    b = 8
    teacher = [torch.randn(min(b, a.val_seqs - i), a.seq, cfg.vocab_size, generator=g).to(torch.bfloat16)
               for i in range(0, a.val_seqs, b)]
    inputs = fan.write_inputs(root / "inputs.safetensors", seqs, teacher)
    del teacher
    prep_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(2)
    pool = [space.sample(gen) for _ in range(a.candidates + 2 * max(a.workers))]
    job = fan.ScoreJob(str(root / "model"), str(inputs), "gguf", batch_size=b, device="cuda" if cuda else "cpu")
    row = {"kind": "fanout", "name": a.name, "shape": a.shape, "layers": cfg.num_hidden_layers, "val_seqs": a.val_seqs,
           "seq": a.seq, "candidates": a.candidates, "prep_s": prep_s, "runs": [],
           "device": _device_name(device), "gpus_visible": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__}

    _write(a.out, _round(row))

    def cands(cfgs):
        return [Candidate(c, 0, 0.0, 0.0) for c in cfgs]

    from dask.distributed import Client, LocalCluster
    for w in a.workers:
        t1 = time.perf_counter()
        # as map_candidates' own throwaway cluster, kept for a second (warm) call through `address`
        with LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster:
            warm = cands(pool[a.candidates: a.candidates + 2 * w])
            fan.score_candidates(job, warm, "dask", w, cluster.scheduler_address)  # every worker loads the model
            cold_s = time.perf_counter() - t1
            timed = cands(pool[: a.candidates])
            t2 = time.perf_counter()
            fan.score_candidates(job, timed, "dask", w, cluster.scheduler_address)
            steady_s = time.perf_counter() - t2
            with Client(cluster.scheduler_address) as client:  # where each worker's tasks ran (a task per worker)
                devices = sorted(client.gather([client.submit(worker_device, job.device, workers=[w_], pure=False)
                                                for w_ in client.scheduler_info()["workers"]]))
        run = {"workers": w, "cold_s": cold_s, "steady_s": steady_s, "candidates_per_s": a.candidates / steady_s,
               "candidates_per_s_per_worker": a.candidates / steady_s / w, "worker_devices": devices,
               "kl_first": timed[0].kl}
        row["runs"].append(_round(run))
        one = row["runs"][0]
        run["efficiency_vs_1"] = round(run["candidates_per_s_per_worker"] / one["candidates_per_s_per_worker"], 4)
        row["runs"][-1] = _round(run)
        _write(a.out, _round(row))
        print(json.dumps(row["runs"][-1]), flush=True)
    if a.local:  # the in-process loop (runner: local) on one GPU, no Dask: what the workers' overhead is
        from tailor.parallel import clear_cache
        t1 = time.perf_counter()
        fan.score_candidates(job, cands(pool[a.candidates: a.candidates + 2]), "local")
        cold_s = time.perf_counter() - t1
        timed = cands(pool[: a.candidates])
        t2 = time.perf_counter()
        fan.score_candidates(job, timed, "local")
        steady_s = time.perf_counter() - t2
        clear_cache()
        row["local"] = _round({"cold_s": cold_s, "steady_s": steady_s, "candidates_per_s": a.candidates / steady_s,
                               "kl_first": timed[0].kl})
        _write(a.out, _round(row))
        print(json.dumps(row["local"]), flush=True)


# ------------------------------------------------------------------------------------------- launch
def _rank_main(local_rank: int, world: int, port: int, fn_name: str, a) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        globals()[fn_name](a)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn_name: str, a) -> None:
    """Run `fn_name(a)` as one rank (under torchrun) or on `a.nproc` ranks started here. A failure
    without a row written leaves an error row (out of memory is named as such)."""
    t0 = time.perf_counter()
    try:
        if "WORLD_SIZE" in os.environ or a.nproc == 1:
            try:
                globals()[fn_name](a)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
        else:
            import torch.multiprocessing as mp
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_rank_main, args=(a.nproc, port, fn_name, a), nprocs=a.nproc, join=True)
    except BaseException as e:  # noqa: BLE001 — the row records the failure; the driver's next row goes on
        text = f"{type(e).__name__}: {e}"
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        p = Path(a.out)
        row = json.loads(p.read_text()) if p.is_file() else {"kind": fn_name, "name": a.name, "shape": a.shape,
                                                              "world": getattr(a, "nproc", 1)}
        row["error"] = "out of memory" if oom else text.splitlines()[0][:300]
        row["error_detail"] = traceback.format_exc()[-2000:]
        row["failed_after_s"] = round(time.perf_counter() - t0, 1)
        _write(a.out, row)
        print(json.dumps({k: v for k, v in row.items() if k != "error_detail"})[:1000], flush=True)
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--name", required=True)
        p.add_argument("--shape", default="tiny", help="benchmarks/supernet_scale.py SHAPES key")
        p.add_argument("--layers", type=int, default=None, help="keep this many decoder layers")
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--n-random", type=int, default=2, help="random subnets per sandwich (+ max + min)")
        p.add_argument("--nproc", type=int, default=1, help="ranks to start (ignored under torchrun)")
        p.add_argument("--out", required=True)

    p = sub.add_parser("e2e")
    common(p)
    p.add_argument("--per-gpu-batch", type=int, default=8)
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--kd-chunk", type=int, default=4096, help="0 = plain KD loss (forced under fsdp)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="profile step 1's kernels (CUDA only)")

    p = sub.add_parser("blockwise")
    common(p)
    p.add_argument("--seqs", type=int, default=32, help="training sequences (the teacher walk's data)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block-steps", type=int, default=16)
    p.add_argument("--work", default=None, help="shared work directory (default: a fresh temp dir)")

    p = sub.add_parser("fanout")
    common(p)
    p.add_argument("--workers", default="1,2", help="worker counts to run, comma list (1 first: the baseline)")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--val-seqs", type=int, default=8)
    p.add_argument("--local", action="store_true", help="also the in-process loop, no Dask")
    p.add_argument("--work", default=None)

    if sys.argv[1:2] in (["--combine"], ["combine"], ["collect"]):  # the rows' tools (scaling.py's --combine spelling too)
        sys.argv[1] = sys.argv[1].lstrip("-")
        return scaling_rows.main()
    a = ap.parse_args()
    if a.cmd == "fanout":
        a.workers = [int(w) for w in a.workers.split(",")]
    if getattr(a, "work", "x") is None:
        a.work = tempfile.mkdtemp(prefix=f"tailor-{a.cmd}-")
    launch(a.cmd, a)


if __name__ == "__main__":
    main()
