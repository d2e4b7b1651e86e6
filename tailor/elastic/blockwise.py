"""Blockwise supernet training: each decoder block's elastic choices learn to reproduce the teacher
block's output from the teacher's own input hidden states, one block on the GPU at a time.

Sources. EfficientQAT (Chen et al. 2024, "Block-AP") trains all parameters of one quantized block at a
time against the full-precision block's output, then only the quantization parameters end to end;
Puzzle / ModelOpt (Bercovich et al. 2024, "blockwise local distillation") trains its library of block
variants each against the parent block, fed the parent's inputs, so blocks train independently and in
parallel. Tailor does both at once for a weight-sharing block: every step draws the sandwich of this
block's choices (max, the min of one export grid, random ones: KV groups, FFN width, bits per matrix
on each grid) and sums their losses, as the end-to-end sandwich does for whole subnets.

Pipeline (`train_blocks`):
1. `TeacherActs`: the teacher runs over the data one block at a time (embedding, then block i on the
   device, the rest on the CPU) and stores block i's input hidden states (N, T, H) on disk
   (`x-007.safetensors`, written atomically), walking forward only as far as the blocks being trained
   need and deleting x_i once block i is done: two layers on disk at a time, and a rerun restarts the
   walk from the newest file left.
2. `train_block(i)`: block i of the student (the importance-ordered supernet, initialised as the
   teacher) moves to the device with its AdamW state, learns x_i -> x_{i+1}, and moves back. Its loss is
   ||f(x) - y||^2 / ||y - x||^2 over the batch: the error relative to what the teacher block adds to the
   residual stream (1.0 = as bad as skipping the block, which is what elastic depth does).
   Blocks share nothing, so a list of them splits over processes or GPUs (`blocks=`; under torchrun
   `train_blocks_shared` gives each rank its contiguous share and every rank ends with every block).
3. Resumable per block: `<ckpt>/block-007/step-000040/` (weights, AdamW and sampler state) written whole
   then renamed; a block whose newest checkpoint is its last step is done and only loaded.
Elastic depth needs no training here (a skipped block is the identity); search scores it as before.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file

from tailor.arch import LayerConfig
from tailor.elastic.space import SearchSpace, sandwich_configs
from tailor.elastic.supernet import set_block_active
from tailor.models.base import save_state
from tailor.models.model import Block, TailorForCausalLM, rope_tables

Sandwich = Callable[[int, torch.Generator], list[tuple[LayerConfig, str]]]


class BlockCheckpointError(ValueError):
    """A block checkpoint that does not belong to this run: the message names the file."""


@dataclass
class BlockSpec:
    steps: int  # optimizer steps per block
    batch_size: int  # sequences per step
    lr: float
    seed: int
    ckpt_every: int = 10
    clip_lr: float = 1e-3  # the learned clipping factors, as in TrainSpec
    weight_decay: float = 0.0
    amp: bool = True  # bf16 autocast on CUDA
    fingerprint: str = ""  # what the run is: a checkpoint of another run is refused


@dataclass
class BlockResult:
    block: int
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "tokens_per_s"}
    resumed_from: int = 0
    seconds: float = 0.0


def block_sandwich(spaces: dict[str, SearchSpace], layer: int, n_random: int) -> Sandwich:
    """Block `layer`'s share of the end-to-end sandwich rule: the layer configs (and grid) that layer takes
    in the max, min and `n_random` random subnets of `sandwich_configs`. A config that drops the layer
    still trains its widths and bits (the drop itself needs no training)."""
    def draw(step: int, gen: torch.Generator) -> list[tuple[LayerConfig, str]]:
        return [(cfg.layers[layer], fmt) for cfg, fmt in sandwich_configs(spaces, step, n_random, gen)]
    return draw


def rel_mse(out: torch.Tensor, target: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """||out - target||^2 / ||target - inp||^2 over the whole batch, in fp32 (all (B, T, H))."""
    return (out.float() - target.float()).pow(2).sum() / (target.float() - inp.float()).pow(2).sum().clamp_min(1e-12)


def _act_file(root: Path, i: int) -> Path:
    return root / f"x-{i:03d}.safetensors"


@torch.no_grad()
def _embed(teacher: TailorForCausalLM, data: torch.Tensor, device: torch.device, batch_size: int,
           dtype: torch.dtype) -> torch.Tensor:
    home = next(teacher.parameters()).device
    emb = teacher.model.embed_tokens.to(device)
    x = torch.cat([emb(data[i: i + batch_size].to(device).long()).to(dtype).cpu()
                   for i in range(0, len(data), batch_size)])  # (N, T, H)
    emb.to(home)
    return x


@torch.no_grad()
def _teacher_block(teacher: TailorForCausalLM, i: int, x: torch.Tensor, device: torch.device, batch_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Teacher block i over `x` ((N, T, H) on the CPU), the block on `device` only meanwhile."""
    cfg = teacher.config
    block = teacher.model.layers[i]
    home = next(block.parameters()).device
    block.to(device)
    wdt = next(block.parameters()).dtype  # the teacher's own precision (a bf16 teacher needs no fp32 copy)
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(x.shape[1], device=device), wdt,
                           getattr(cfg, "rope_freq_scaling", None))
    with _amp(device, True):
        y = torch.cat([block(x[j: j + batch_size].to(device, wdt), cos, sin).to(dtype).cpu()
                       for j in range(0, len(x), batch_size)])
    block.to(home)
    return y


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TeacherActs:
    """The teacher's hidden states at each block's input, x_0 (embeddings) ... x_L (last block's output),
    each (N, T, H) in one safetensors file under `root`, made on demand by walking the teacher forward
    from the nearest file below (or the embeddings). `drop(i)` deletes x_i once nothing needs it, so a
    run walking up the blocks keeps two layers of activations on disk, not L + 1."""

    def __init__(self, teacher: TailorForCausalLM, data: torch.Tensor, root: Path, device: torch.device,
                 batch_size: int = 8, dtype: torch.dtype | None = None):
        self.teacher, self.data, self.root, self.device, self.batch_size = teacher, data, Path(root), device, batch_size
        self.dtype = dtype or _default_dtype(device)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, i: int) -> Path:
        return _act_file(self.root, i)

    def get(self, i: int) -> torch.Tensor:
        if self.path(i).is_file():
            return load_file(self.path(i))["x"]
        below = [j for j in range(i) if self.path(j).is_file()]
        j = below[-1] if below else 0
        x = load_file(self.path(j))["x"] if below else _embed(self.teacher, self.data, self.device, self.batch_size,
                                                               self.dtype)
        if not below:
            save_state({"x": x}, self.path(0))
        for k in range(j, i):
            x = _teacher_block(self.teacher, k, x, self.device, self.batch_size, self.dtype)
            save_state({"x": x}, self.path(k + 1))  # written atomically: a rerun starts from here
        return x

    def drop(self, i: int) -> None:
        self.path(i).unlink(missing_ok=True)


def teacher_inputs(teacher: TailorForCausalLM, data: torch.Tensor, root: Path, device: torch.device,
                   batch_size: int = 8, dtype: torch.dtype | None = None) -> list[Path]:
    """Every block's input hidden states over `data` ((N, T) ids), one file per block, plus the last
    block's output: L + 1 files of (N, T, H) in `dtype` (bf16 on CUDA, float32 on CPU by default).
    One teacher block is on `device` at a time; files already written (a resumed run) are kept."""
    acts = TeacherActs(teacher, data, root, device, batch_size, dtype)
    acts.get(len(teacher.model.layers))
    return [acts.path(i) for i in range(len(teacher.model.layers) + 1)]


def _amp(device: torch.device, on: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if on and device.type == "cuda" else contextlib.nullcontext()


def _latest(d: Path) -> Path | None:
    done = sorted(p for p in d.glob("step-*") if (p / "meta.json").is_file()) if d.is_dir() else []
    return done[-1] if done else None


def _save(d: Path, block: Block, opt: torch.optim.Optimizer, gen: torch.Generator, step: int,
          spec: BlockSpec, curve: list[dict]) -> None:
    """One directory per checkpoint, filled under a temp name and renamed when whole (as tailor.train)."""
    d.mkdir(parents=True, exist_ok=True)
    final, tmp = d / f"step-{step:06d}", d / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_state({k: v.detach().cpu() for k, v in block.state_dict().items()}, tmp / "weights.safetensors")
    torch.save({"optimizer": opt.state_dict(), "gen": gen.get_state()}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": spec.fingerprint, "curve": curve}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in d.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _load(latest: Path, block: Block, spec: BlockSpec, state: bool = True) -> tuple[int, list[dict], dict]:
    """(step, loss curve, optimizer and generator state) of checkpoint `latest`, its weights loaded into
    `block`; `state=False` leaves the optimizer state unread (twice the weights' bytes under AdamW)."""
    meta = json.loads((latest / "meta.json").read_text())
    if meta.get("fingerprint") != spec.fingerprint:
        raise BlockCheckpointError(f"{latest / 'meta.json'}: checkpoint of another run configuration; "
                                   "delete it to start over")
    try:
        block.load_state_dict(load_file(latest / "weights.safetensors"))
        state = torch.load(latest / "state.pt", weights_only=True, map_location="cpu") if state else {}
    except Exception as e:  # noqa: BLE001 (safetensors and torch raise several types)
        raise BlockCheckpointError(f"{latest}: unreadable or not this block ({' '.join(str(e).split())[:160]})") from None
    return int(meta["step"]), list(meta.get("curve", [])), state


def train_block(block: Block, x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                spec: BlockSpec, sandwich: Sandwich, ckpt_dir: Path | None = None, index: int = 0,
                device: torch.device | str = "cpu",
                on_step: Callable[[int, float], None] | None = None) -> BlockResult:
    """Train one supernet block to map the teacher's input `x` to the teacher's output `y` (both (N, T, H),
    on the CPU) under every layer config `sandwich(step, gen)` draws, summing their `rel_mse` losses.

    The block (its weights and learned clipping; norms too) and its AdamW state live on `device` only
    while it trains; it is back where it was (the CPU, for a model larger than the GPU) when this returns. `cos`/`sin`: the RoPE tables (T, head_dim).
    The data order and the subnet draws are seeded by (spec.seed, index), so a block trains the same
    whichever process runs it; `ckpt_dir` makes it resumable (`on_step(step, loss)` runs after each step)."""
    device = torch.device(device)
    result = BlockResult(index)
    gen = torch.Generator().manual_seed(spec.seed * 100_003 + index)
    start, opt_state = 0, None
    latest = _latest(ckpt_dir) if ckpt_dir else None
    if latest is not None:
        start, result.curve, state = _load(latest, block, spec)
        gen.set_state(state["gen"])
        opt_state = state["optimizer"]
    result.resumed_from = start
    home = next(block.parameters()).device
    block.to(device).train()
    named = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not n.endswith("qclip")]},
              {"params": [p for n, p in named if n.endswith("qclip")], "lr": spec.clip_lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, weight_decay=spec.weight_decay,
                            fused=True if device.type == "cuda" else None)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.seed * 100_003 + index))
    cos, sin = cos.to(device), sin.to(device)
    pin = device.type == "cuda"
    if pin and x.nbytes + y.nbytes < 0.3 * torch.cuda.mem_get_info(device)[0]:
        x, y, pin = x.to(device), y.to(device), False  # a block's activations are small beside an H200: keep them there
    t0 = time.perf_counter()
    for step in range(start, spec.steps):
        ts = time.perf_counter()
        idx = order[torch.arange(step * spec.batch_size, (step + 1) * spec.batch_size) % len(x)].to(x.device)
        xb, yb = x[idx], y[idx]
        if pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb = xb.to(device, non_blocking=True).float()  # (B, T, H): the residual stream in fp32, as end to end
        yb = yb.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)  # summed on the device: one host sync per step, not per subnet
        configs = sandwich(step, gen)
        for lc, fmt in configs:
            set_block_active(block, lc, fmt)
            with _amp(device, spec.amp):
                loss = rel_mse(block(xb, cos, sin), yb, xb)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        n_tok = xb.shape[0] * xb.shape[1] * len(configs)
        result.curve.append({"step": step + 1, "loss": float(total) / len(configs),
                             "tokens_per_s": n_tok / (time.perf_counter() - ts)})
        if ckpt_dir and ((step + 1) % spec.ckpt_every == 0 or step + 1 == spec.steps):
            _save(ckpt_dir, block, opt, gen, step + 1, spec, result.curve)
        if on_step:
            on_step(step + 1, result.curve[-1]["loss"])
    del opt
    block.to(home).eval()
    result.seconds = time.perf_counter() - t0
    return result


def train_blocks(student: TailorForCausalLM, teacher: TailorForCausalLM, data: torch.Tensor, spec: BlockSpec,
                 spaces: dict[str, SearchSpace], n_random: int, work: Path, device: torch.device | str = "cpu",
                 blocks: list[int] | None = None, act_batch: int = 8, keep_acts: bool = False,
                 acts_dir: Path | None = None, progress: Callable[[BlockResult], None] | None = None
                 ) -> list[BlockResult]:
    """Blockwise supernet training of `student` (trained in place; kept on the CPU for large models)
    against `teacher` over `data` ((N, T) ids): blocks in `blocks` (default all; give each process a
    contiguous share) in increasing order, each from its `work/block-XXX` checkpoints, the teacher walked
    forward alongside into `work/acts` (x_i dropped once block i is done unless `keep_acts`).
    Disk: two layers of activations, N x T x hidden x 2 bytes each on CUDA (bf16). CPU memory: the same.
    Returns one BlockResult per block."""
    device = torch.device(device)
    work = Path(work)
    acts = TeacherActs(teacher, data, acts_dir or work / "acts", device, act_batch)  # one per process
    cfg = student.config
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(data.shape[1]), torch.float32,
                           getattr(cfg, "rope_freq_scaling", None))
    results = []
    for i in sorted(range(len(student.model.layers)) if blocks is None else blocks):
        ckpt = work / f"block-{i:03d}"
        latest = _latest(ckpt)
        if latest is not None and json.loads((latest / "meta.json").read_text()).get("step") == spec.steps:
            x = y = torch.empty(0, data.shape[1], cfg.hidden_size)  # done: only its weights are loaded
        else:
            x, y = acts.get(i), acts.get(i + 1)
        res = train_block(student.model.layers[i], x, y, cos, sin, spec, block_sandwich(spaces, i, n_random), ckpt,
                          index=i, device=device)
        results.append(res)
        if not keep_acts:
            acts.drop(i)
        if progress:
            progress(res)
    for block in student.model.layers:
        block.active = True
    return results


def load_trained(student: TailorForCausalLM, work: Path, spec: BlockSpec, skip: Iterable[int] = ()) -> list[int]:
    """Load every finished block's weights from `work/block-XXX` (e.g. those other processes trained),
    except the blocks in `skip` (this process's own, already in `student`); returns the indices of the
    blocks not finished there. Only weights are read, not the optimizer state (at the 8B width, reading
    both for every block was 18 s of a 2-GPU run's 101)."""
    missing, skip = [], set(skip)
    for i, block in enumerate(student.model.layers):
        if i in skip:
            continue
        latest = _latest(Path(work) / f"block-{i:03d}")
        if latest is None or _load(latest, block, spec, state=False)[0] != spec.steps:
            missing.append(i)
    return missing


def block_share(n_blocks: int, rank: int, world: int) -> list[int]:
    """The blocks rank `rank` of `world` trains: a contiguous share, sizes differing by at most one.
    Contiguous, not strided: each process walks the teacher forward from the embeddings to its last
    block, so the lowest shares stop early (strided shares would make every rank walk nearly all of it);
    the highest rank walks the whole teacher either way, which bounds the speed-up (docs/scale.md)."""
    return list(range(rank * n_blocks // world, (rank + 1) * n_blocks // world))


def train_blocks_shared(student: TailorForCausalLM, teacher: TailorForCausalLM, data: torch.Tensor,
                        spec: BlockSpec, spaces: dict[str, SearchSpace], n_random: int, work: Path,
                        device: torch.device | str = "cpu", act_batch: int = 8,
                        progress: Callable[[BlockResult], None] | None = None) -> list[BlockResult]:
    """`train_blocks` over the processes of torch.distributed (one when it is not initialised): each rank
    trains its `block_share` with its own teacher walk (`work/acts-<rank>`), checkpoints go to the shared
    `work/block-XXX`, and after a barrier every rank loads the blocks the others trained, so each ends
    with the whole trained student. `work` must be one filesystem for all ranks. Returns this rank's results."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    work = Path(work)
    mine = block_share(len(student.model.layers), rank, world)
    out = train_blocks(student, teacher, data, spec, spaces, n_random, work, device, blocks=mine,
                       act_batch=act_batch, acts_dir=work / f"acts-{rank}", progress=progress)
    if world > 1:
        dist.barrier()
        missing = load_trained(student, work, spec, skip=mine)
        if missing:
            raise BlockCheckpointError(f"{work}: blocks {missing} unfinished after every rank's share")
    return out
