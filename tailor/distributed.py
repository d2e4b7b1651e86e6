"""Multi-process training for the stages: `python -m steps.supernet` with `nproc: N` in its params
section starts itself again under torchrun, N processes (one per GPU); each joins the process group
and `train_kd` trains data parallel (DDP) or sharded (FSDP2). Rank 0 alone writes outputs and logs.

The library stays free of orchestration: this is torch's own launcher, not Prefect or DVC."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

LAUNCHED_ENV = "TAILOR_TORCHRUN"  # set in the children: never relaunch twice


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(nproc: int, module: str, argv: list[str]) -> int | None:
    """Run `python -m module argv` under torchrun with `nproc` processes and return its exit code;
    None when this process should do the work itself (nproc 1, or already a torchrun child)."""
    if nproc <= 1 or under_torchrun() or os.environ.get(LAUNCHED_ENV):
        return None
    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise ValueError(f"nproc: {nproc} processes asked, {torch.cuda.device_count()} GPUs here")
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    return subprocess.run(cmd, env=env).returncode


def init_from_env() -> tuple[int, int]:
    """(rank, world size); under torchrun joins the process group first: NCCL with one GPU per
    LOCAL_RANK when there are GPUs, gloo on CPU."""
    if not under_torchrun() or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
