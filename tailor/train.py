"""Distillation training loop shared by the supernet (sandwich rule) and fine-tuning (one subnet).

Resumable: every `ckpt_every` steps it writes weights (safetensors), optimizer and RNG state
(torch.save, read back with weights_only=True) and the step, atomically. Data order is a seeded
permutation, so the step number is the data position.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file

from tailor import fsdp as tfsdp
from tailor.distill import HeadInputs, chunked_kd_loss, kd_loss, teacher_logits_chunked
from tailor.accel import enable_compile
from tailor.models.base import save_state
from tailor.models.model import TailorForCausalLM


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run: the message names the file."""


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    temperature: float
    seed: int
    ckpt_every: int = 10
    weight_decay: float = 0.0
    fingerprint: str = ""  # what the run is (config hash): a checkpoint from another run is refused
    # The tied embedding (Q8_0 by default, near lossless) stays frozen: its fake quantization is then
    # computed once and cached instead of on 28M values at every forward, and it holds 20% of the weights.
    train_embeddings: bool = False
    # The learned clipping factors move in [0.5, 1]: at the weights' lr (1e-5) they would never move.
    clip_lr: float = 1e-3
    amp: bool = True  # bf16 autocast on CUDA; CPU trains in float32 either way
    compile: bool = False  # torch.compile the hot small-kernel paths on CUDA
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2-sharded, tailor.fsdp)
    schedule: str = "constant"  # lr over the steps: "constant", or "cosine" (linear warm-up, then cosine to 10%)
    warmup_steps: int = 0
    # Memory at 1B+: tokens per chunk of the chunked KD loss (0 = the plain loss over whole-batch fp32
    # logits), and activation checkpointing of every decoder block (recompute in backward).
    kd_chunk: int = 0
    checkpointing: bool = False


PROGRESS_S = 60.0  # seconds between progress lines when stdout is not a terminal


def progress_line(desc: str, step: int, steps: int, start: int, loss: float, seconds: float, tokens: int) -> str:
    """One plain progress line: steps done, the last step's loss, student tokens/s and the time left at
    this run's rate (`start`: the step it resumed from, so a resumed run's rate is its own)."""
    done = step - start
    left = (steps - step) * seconds / done if done else float("nan")
    return (f"{desc}: step {step}/{steps} loss {loss:.4f} {tokens / max(seconds, 1e-9):,.0f} tok/s, "
            f"{left / 60:.1f} min left")


def lr_factor(spec: TrainSpec, step: int) -> float:
    """The lr multiplier at 0-based `step`: a pure function of the step, so a resumed run needs no
    scheduler state to continue on the same curve."""
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule != "cosine":
        raise ValueError(f"schedule: {spec.schedule!r} is not one of constant, cosine")
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - spec.warmup_steps) / span)))


@dataclass
class TrainResult:
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "tokens_per_s"}
    resumed_from: int = 0
    tokens: int = 0
    seconds: float = 0.0


def checkpoint_dir(root: Path, fingerprint: str) -> Path:
    """The resume directory of one run configuration under `root`. Checkpoints of other
    configurations (the params changed, so DVC re-runs the stage from scratch) are removed."""
    d = root / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    if root.is_dir():
        for other in root.iterdir():
            if other != d:
                shutil.rmtree(other, ignore_errors=True)
    return d


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_ckpt(ckpt_dir: Path, weights: dict[str, torch.Tensor], opt_state: dict, step: int,
               gen: torch.Generator, spec: TrainSpec, curve: list[dict]) -> None:
    """One directory per checkpoint (`step-000012`), filled under a temp name and renamed when complete:
    a kill at any moment leaves the previous checkpoint whole, never weights of one step beside the
    optimizer state of another."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu() for k, v in weights.items() if k != "lm_head.weight"}
    save_state(state, tmp / "weights.safetensors")
    torch.save({"optimizer": opt_state, "rng": torch.get_rng_state(), "gen": gen.get_state()}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": spec.fingerprint, "curve": curve}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in ckpt_dir.glob("step-*"):  # keep only the newest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _latest_ckpt(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "meta.json").is_file()) if ckpt_dir.is_dir() else []
    return done[-1] if done else None


def _short(fingerprint: str | None) -> str:
    return hashlib.sha256(str(fingerprint).encode()).hexdigest()[:12]


def _load_ckpt(ckpt_dir: Path, model: TailorForCausalLM, gen: torch.Generator,
               spec: TrainSpec) -> tuple[int, list[dict], dict | None]:
    """Load weights and RNG state of the newest checkpoint; return its step, curve and optimizer state
    (loaded by the caller, once the optimizer over the possibly sharded parameters exists)."""
    latest = _latest_ckpt(ckpt_dir)
    if latest is None:
        return 0, [], None
    meta_file = latest / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: unreadable ({e}); delete it to start over") from None
    if meta.get("fingerprint") != spec.fingerprint:
        raise CheckpointError(f"{meta_file}: checkpoint of another run configuration (fingerprint "
                              f"{_short(meta.get('fingerprint'))}, this run {_short(spec.fingerprint)}); "
                              "delete it to start over")
    try:
        weights = load_file(latest / "weights.safetensors")
    except Exception as e:
        raise CheckpointError(f"{latest / 'weights.safetensors'}: unreadable ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError:  # same names, other shapes
        missing, unexpected = [], ["(shapes differ)"]
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise CheckpointError(f"{latest / 'weights.safetensors'}: tensors do not match the model")
    model.tie_weights()
    try:  # optimizer and RNG state: plain tensors and dicts only, never arbitrary pickled objects
        state = torch.load(latest / "state.pt", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{latest / 'state.pt'}: unreadable ({' '.join(str(e).split())[:200]})") from None
    torch.set_rng_state(state["rng"])
    gen.set_state(state["gen"])
    return int(meta["step"]), list(meta.get("curve", [])), state["optimizer"]


def train_kd(student: TailorForCausalLM, teacher: torch.nn.Module, data: torch.Tensor, spec: TrainSpec,
             activate: Callable[[int, torch.Generator], list[Callable[[], None]]], ckpt_dir: Path | None = None,
             desc: str = "train") -> TrainResult:
    """Train `student` to match `teacher` on `data` ([N, T] ids).

    `activate(step, gen)` returns the subnets of this step as callables that switch the student to
    each in turn (the sandwich rule: max, min and random subnets); their losses are summed."""
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(spec.seed)
    # the embedding tables (one tied, or the input table and an untied head) train only when asked
    student.get_input_embeddings().weight.requires_grad_(spec.train_embeddings)
    student.lm_head.weight.requires_grad_(spec.train_embeddings)
    student.lm_head.qclip.requires_grad_(spec.train_embeddings)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if spec.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel: {spec.parallel!r} is not one of ddp, fsdp")
    lr_factor(spec, 0)  # an unknown schedule stops here, before any work
    start, curve, opt_state = _load_ckpt(ckpt_dir, student, gen, spec) if ckpt_dir else (0, [], None)
    fsdp = world > 1 and spec.parallel == "fsdp"
    if fsdp and spec.kd_chunk:
        raise ValueError("kd_chunk: the chunked KD loss runs in one process or under DDP, not under fsdp")
    student.activation_checkpointing = spec.checkpointing
    # FSDP trains a sharded copy (tailor.fsdp); the student waits on the CPU, off the GPU's memory.
    model = tfsdp.shard_copy(student.to("cpu"), device, world) if fsdp else student
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if not n.endswith("qclip")]},
              {"params": [p for n, p in named if n.endswith("qclip")], "lr": spec.clip_lr, "weight_decay": 0.0}]
    # fused: one kernel for every parameter's update on CUDA (not under FSDP's sharded DTensors)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, weight_decay=spec.weight_decay,
                            fused=True if device.type == "cuda" and not fsdp else None)
    base_lrs = [g["lr"] for g in opt.param_groups]
    if opt_state is not None:
        if fsdp:
            tfsdp.load_optim_state(opt, opt_state)
        else:
            opt.load_state_dict(opt_state)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))
    result = TrainResult(curve=curve, resumed_from=start)
    # Under FSDP the teacher stays replicated: it runs forward only, under no_grad, so it holds its
    # weights alone (a quarter of the student's 16 bytes a parameter of training state); sharding it
    # would add a whole-model all-gather to every step.
    teacher.eval()
    student.train()
    model.train()
    on_gpu = device.type == "cuda"
    if spec.compile and on_gpu:
        enable_compile()

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if spec.amp and on_gpu else contextlib.nullcontext()

    # Data parallel under torchrun: every rank draws the same subnets (same generator seed), takes its
    # slice of the global batch, and DDP averages the gradients accumulated over the sandwich's
    # subnets once per step (no_sync for all but the last backward).
    if world > 1 and spec.batch_size % world:
        raise ValueError(f"batch_size {spec.batch_size} does not split over {world} ranks")
    # The chunked loss needs the final hidden states and the head, not logits: DDP wraps a module whose
    # forward returns those, so its gradient hooks still see the forward.
    inner = HeadInputs(student) if spec.kd_chunk else student
    net = (torch.nn.parallel.DistributedDataParallel(inner, device_ids=[device] if on_gpu else None,
                                                     find_unused_parameters=True) if world > 1 and not fsdp
           else HeadInputs(model) if spec.kd_chunk else model)
    t0 = time.perf_counter()
    tty = os.isatty(1)
    # Without a terminal (nightly runs, detached jobs) the bar is off: a plain line every PROGRESS_S instead
    quiet_until = time.perf_counter() + PROGRESS_S
    with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=False, disable=not tty) as bar:
        task = bar.add_task(desc, total=spec.steps, completed=start, loss="-")
        for step in range(start, spec.steps):
            ts = time.perf_counter()
            idx = torch.arange(step * spec.batch_size, (step + 1) * spec.batch_size) % len(data)
            ids = data[order[idx]][rank::world].to(device).long()
            with torch.no_grad(), amp():  # bf16 (N, V) when chunked: never fp32 logits of the whole batch
                t_logits = teacher_logits_chunked(teacher, ids, spec.kd_chunk) if spec.kd_chunk else teacher(ids).logits
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)  # summed on the device: one host sync per step
            switches = activate(step, gen)
            for k, switch in enumerate(switches):
                switch()
                if fsdp:
                    tfsdp.mirror(student, model)
                # FSDP reduce-scatters after every backward and sums into the sharded gradients: a
                # block the last subnet drops would otherwise keep its unreduced gradient.
                sync = world == 1 or fsdp or k == len(switches) - 1
                with amp(), (contextlib.nullcontext() if sync else net.no_sync()):
                    if spec.kd_chunk:
                        loss = chunked_kd_loss(*net(ids), t_logits, temperature=spec.temperature, chunk=spec.kd_chunk)
                    else:
                        loss = kd_loss(net(ids).logits, t_logits, spec.temperature)
                    loss.backward()
                total += loss.detach()
            if world > 1:  # the logged loss is the global batch's, as on one process
                dist.all_reduce(total)
                total /= world
            total = float(total)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(spec, step)
            opt.step()
            n_tok = ids.numel() * len(switches) * world
            result.tokens += n_tok
            point = {"step": step + 1, "loss": total / len(switches), "tokens_per_s": n_tok / (time.perf_counter() - ts)}
            result.curve.append(point)
            bar.update(task, advance=1, loss=f"{point['loss']:.4f}")
            if not tty and rank == 0 and (time.perf_counter() >= quiet_until or step + 1 == spec.steps):
                quiet_until = time.perf_counter() + PROGRESS_S
                print(progress_line(desc, step + 1, spec.steps, start, point["loss"], time.perf_counter() - t0,
                                    result.tokens), flush=True)
            if ckpt_dir and ((step + 1) % spec.ckpt_every == 0 or step + 1 == spec.steps):
                # ranks hold identical weights (or, under FSDP, gather them whole): one writes, all resume from it
                weights, opt_full = ((tfsdp.full_state(model), tfsdp.full_optim_state(opt)) if fsdp
                                     else (student.state_dict(), opt.state_dict()))
                if rank == 0:
                    _save_ckpt(ckpt_dir, weights, opt_full, step + 1, gen, spec, result.curve)
                if world > 1:
                    dist.barrier()
    if fsdp:  # the trained weights back into the caller's plain model
        student.load_state_dict(tfsdp.full_state(model), strict=False)
        student.tie_weights()
        student.to(device)
    student.activation_checkpointing = False
    student.eval()
    result.seconds = time.perf_counter() - t0
    return result
