"""finetune (per device): extract the chosen subnet as a standalone, physically smaller model and
fine-tune it with quantization-aware distillation from the base model on the export format's grid."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file

from steps._common import (artifact_dir, base_model_tags, load_shard, main_for, report_dir, staged_dir, write_csv, write_json,
                           writes_outputs)
from tailor import distributed, tracking
from tailor.arch import SubnetConfig
from tailor.config import FinetuneParams, Params
from tailor.distill import mean_kl, teacher_logits, teacher_samples
from tailor.elastic.supernet import bake_clip_, export_active, round16_
from tailor.models.base import load_base, load_model_dir, save_state, sha256_file
from tailor.train import TrainSpec, checkpoint_dir, pick_device, train_kd


def run(params: Params, device: str, supernet_dir: Path, search_dir: Path, data_dir: Path, out_dir: Path,
        ckpt_dir: Path) -> dict:
    ft, prof = params.finetune, params.device(device)
    dev = pick_device(ft.device)
    cfg = SubnetConfig.from_json((search_dir / "config.json").read_text())
    supernet = load_model_dir(supernet_dir / "model")
    student = export_active(supernet, cfg, prof.format).to(dev)
    del supernet
    base, tok = load_base(params.model.source, params.model.n_layers, device=dev)
    base.requires_grad_(False)
    train, val = load_shard(data_dir / "train.safetensors"), load_shard(data_dir / "val.safetensors")
    val = val[: params.search.val_seqs]
    t_val = teacher_logits(base, val)
    kl_before = mean_kl(student, val, t_val)
    spec = train_spec(ft, device, cfg.hash, sha256_file(data_dir / "train.safetensors"))
    ckpt = checkpoint_dir(ckpt_dir, spec.fingerprint)
    train = torch.cat([train, generated(base, train, ft, ckpt)]) if ft.generated_seqs else train
    result = train_kd(student, base, train, spec, lambda step, gen: [lambda: None], ckpt,
                      desc=f"finetune {device}")
    bake_clip_(student)  # the clipping learned in fine-tuning goes into the weights export packs
    round16_(student)  # training moved 16-bit weights off the float16 grid the file stores
    kl_after = mean_kl(student, val, t_val)
    with staged_dir(out_dir) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "subnet.json").write_text(cfg.to_json())
    metrics = {"kl_before": kl_before, "kl_after": kl_after, "steps": ft.steps, "config_hash": cfg.hash,
               "resumed_from": result.resumed_from, "train_seconds": round(result.seconds, 2), "device": str(dev)}
    return {"metrics": metrics, "curve": result.curve}


# How a run trains, not what it trains: a checkpoint resumes across these (another process count, eager/compiled)
RESUMES_ACROSS = {"parallel", "nproc", "compile"}


def train_spec(ft: FinetuneParams, device: str, config_hash: str, shard_sha256: str) -> TrainSpec:
    """The fine-tune's TrainSpec; its fingerprint names what is trained (device, subnet, recipe, data) so a
    checkpoint of another run is refused, and leaves out RESUMES_ACROSS."""
    recipe = json.dumps(ft.model_dump(exclude=RESUMES_ACROSS), sort_keys=True)
    return TrainSpec(ft.steps, ft.batch_size, ft.lr, ft.kd_temperature, ft.seed, ckpt_every=max(1, ft.steps // 4),
                     schedule=ft.schedule, warmup_steps=ft.warmup_steps, train_embeddings=ft.train_embeddings,
                     parallel=ft.parallel, compile=ft.compile,
                     fingerprint=f"finetune:{device}:{config_hash}:{recipe}:{shard_sha256[:16]}")


def generated(base: torch.nn.Module, train: torch.Tensor, ft: FinetuneParams, ckpt: Path) -> torch.Tensor:
    """`ft.generated_seqs` sequences sampled from the base model, as long as the shard's. Kept beside the
    run's checkpoints, so a resumed run trains on the same samples without drawing them again."""
    cached = ckpt / "generated.safetensors"
    if cached.is_file():
        seqs = load_file(cached)["input_ids"]
        if seqs.shape == (ft.generated_seqs, train.shape[1]):
            return seqs
    with Progress(TextColumn("[bold]sampling the teacher"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), disable=not os.isatty(1)) as bar:
        task = bar.add_task("sample", total=ft.generated_seqs)
        seqs = teacher_samples(base, ft.generated_seqs, train.shape[1], train[:, 0].unique(), ft.seed,
                               batch_size=ft.generate_batch, progress=lambda k: bar.advance(task, k))
    ckpt.mkdir(parents=True, exist_ok=True)
    save_state({"input_ids": seqs}, cached)  # under torchrun every rank draws and writes the same samples
    return seqs


def main() -> None:
    def stage(params: Params, device: str | None) -> None:
        ckpt = Path(f".cache/ckpt/finetune-{device}")

        def train(out_dir: Path) -> dict:
            return run(params, device, artifact_dir("supernet"), artifact_dir("search", device), artifact_dir("calibrate"),
                       out_dir, ckpt)

        if not writes_outputs(params.finetune.nproc, "steps.finetune", lambda tmp: train(tmp / "finetune")):
            return
        with tracking.stage_run("finetune", device, params=params.finetune.model_dump(), tags=base_model_tags()) as tr:
            out = train(artifact_dir("finetune", device))
            shutil.rmtree(ckpt, ignore_errors=True)
            rep = report_dir("finetune", device)
            write_json(rep / "metrics.json", out["metrics"])
            write_csv(rep / "curve.csv", [{"step": p["step"], "loss": round(p["loss"], 6)} for p in out["curve"]])
            tr.log_metrics(out["metrics"])
            tr.log_curve(out["curve"])
        distributed.finish()

    main_for("finetune", stage, per_device=True)


if __name__ == "__main__":
    main()
