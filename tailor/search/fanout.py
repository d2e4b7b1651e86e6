"""Candidate scoring fanned out over an engine (tailor.parallel): each worker loads the supernet, the
validation sequences and the teacher logits once from files, then scores the candidates it is sent
with the same `score` the in-process search uses. Only small things travel: paths and SubnetConfigs.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from tailor.elastic.space import SearchSpace
from tailor.parallel import map_candidates, process_cache, worker_device
from tailor.search.sampled import Candidate, best_scored, propose, score

if TYPE_CHECKING:  # pydantic stays out of the workers' import path (the GPU machines lack it)
    from tailor.config import DeviceProfile


@dataclass(frozen=True)
class ScoreJob:
    """What a worker needs to score candidates; hashable, so it keys the per-process cache."""
    model_dir: str        # supernet model directory (config.json + model.safetensors)
    inputs: str           # safetensors written by `write_inputs`: val sequences + teacher logits
    fmt: str              # the device's format: its quantization grid
    batch_size: int = 8
    device: str = "cpu"   # "cuda": each local worker takes its own GPU (tailor.parallel.worker_device)


def write_inputs(path: Path, seqs: torch.Tensor, teacher: list[torch.Tensor]) -> Path:
    """Store the validation sequences and teacher logits once for every worker (atomic write)."""
    path = Path(path)
    tensors = {"seqs": seqs.contiguous(), **{f"teacher.{j}": t.contiguous() for j, t in enumerate(teacher)}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def _load(job: ScoreJob):
    from tailor.models.base import load_model_dir

    model = load_model_dir(Path(job.model_dir)).to(worker_device(job.device))
    data = load_file(job.inputs)
    teacher = [data[f"teacher.{j}"] for j in range(sum(k.startswith("teacher.") for k in data))]
    return model, data["seqs"], teacher


def score_one(job: ScoreJob, cand: Candidate) -> tuple[float, float]:
    """(kl, val_loss) of one candidate; runs in whichever process the engine picks."""
    model, seqs, teacher = process_cache(("tailor.search.fanout", job), lambda: _load(job))
    cand = replace(cand)  # the local runner must not fill the caller's object behind its back
    score(model, cand, job.fmt, seqs, teacher, job.batch_size)
    return cand.kl, cand.val_loss


def score_candidates(job: ScoreJob, cands: list[Candidate], runner: str = "local", workers: int = 2,
                     address: str | None = None) -> None:
    """Fill in every candidate's kl and val_loss, scored by `runner` ('local' or 'dask')."""
    results = map_candidates(functools.partial(score_one, job), cands, runner, workers, address)
    for cand, (kl, val_loss) in zip(cands, results):
        cand.kl, cand.val_loss = kl, val_loss


def run_search_on(job: ScoreJob, space: SearchSpace, device: DeviceProfile, n: int, seed: int,
                  runner: str = "local", workers: int = 2, address: str | None = None) -> tuple[Candidate, list[Candidate]]:
    """`sampled.run_search` with scoring fanned out: same proposals, same choice (lowest KL, first on ties)."""
    job = replace(job, fmt=device.format)  # the device's grid, whatever the job was written with
    cands = propose(space, device, n, seed)
    score_candidates(job, cands, runner, workers, address)
    return best_scored(cands), cands
