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
   device, the rest on the CPU), walking forward only as far as the blocks being trained need: block
   i's input x_i (N, T, H) and output x_{i+1} are held in memory (on the device when they fit there:
   then no activation leaves it) and x_i is forgotten once block i is done. On the CPU each layer is
   also written to disk (`x-007.safetensors`, atomically) so that a rerun restarts the walk from the
   newest file; on a device, redoing the walk (one block forward per layer) is cheaper than the writes.
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
           dtype: torch.dtype, out: torch.device) -> torch.Tensor:
    """x_0 = the embeddings of `data` ((N, T) ids) as (N, T, H) in `dtype`, written into one tensor on `out`."""
    home = next(teacher.parameters()).device
    emb = teacher.model.embed_tokens.to(device)
    x = torch.empty(*data.shape, teacher.config.hidden_size, dtype=dtype, device=out,
                    pin_memory=out.type == "cpu" and device.type == "cuda")
    for i in range(0, len(data), batch_size):
        x[i: i + batch_size].copy_(emb(data[i: i + batch_size].to(device).long()), non_blocking=True)
    _sync(device)
    emb.to(home)
    return x


@torch.no_grad()
def _teacher_block(teacher: TailorForCausalLM, i: int, x: torch.Tensor, device: torch.device, batch_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Teacher block i over `x` ((N, T, H)), the block on `device` only meanwhile; the output is one tensor
    where `x` is (the device itself when the activations live there: no copy leaves it), written chunk
    by chunk in place, with no host sync per chunk."""
    cfg = teacher.config
    block = teacher.model.layers[i]
    home = next(block.parameters()).device
    block.to(device)
    wdt = next(block.parameters()).dtype  # the teacher's own precision (a bf16 teacher needs no fp32 copy)
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(x.shape[1], device=device), wdt,
                           getattr(cfg, "rope_freq_scaling", None))
    y = torch.empty(x.shape, dtype=dtype, device=x.device, pin_memory=x.device.type == "cpu" and device.type == "cuda")
    with _amp(device, True):
        for j in range(0, len(x), batch_size):
            y[j: j + batch_size].copy_(block(x[j: j + batch_size].to(device, wdt, non_blocking=True), cos, sin),
                                       non_blocking=True)
    _sync(device)  # a pinned CPU output is read as soon as this returns
    block.to(home)
    return y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _fits(device: torch.device, nbytes: int) -> bool:
    """`nbytes` fit in 30% of `device`'s free memory (an accelerator; the CPU holds them anyway)."""
    return device.type == "cuda" and nbytes < 0.3 * torch.cuda.mem_get_info(device)[0]


class TeacherActs:
    """The teacher's hidden states at each block's input, x_0 (embeddings) ... x_L (last block's output),
    each (N, T, H), made on demand by walking the teacher forward from the nearest layer below (held in
    memory, or a file under `root`, or the embeddings). The two newest layers stay in memory, on the
    device itself when two of them fit in 30% of its free memory (`resident`; there the walk, the
    block's training and the next walk never copy them off it), else on the CPU.

    `persist`: also write each layer walked to `root` (`x-007.safetensors`, atomically), so that a rerun
    restarts the walk from the newest file; default: only when the layers live on the CPU. On a device
    that holds them, redoing the walk from the embeddings (one block forward per layer) costs far less
    than writing every layer to disk (the bf16 layer of a 3,600 x 512-token shard at 576 wide: 2.1 GB).
    `drop(i)` forgets x_i (file and memory) once nothing needs it: at most two layers held at a time."""

    def __init__(self, teacher: TailorForCausalLM, data: torch.Tensor, root: Path, device: torch.device,
                 batch_size: int = 8, dtype: torch.dtype | None = None, persist: bool | None = None,
                 resident: bool | None = None):
        self.teacher, self.data, self.root, self.device, self.batch_size = teacher, data, Path(root), torch.device(device), batch_size
        self.dtype = dtype or _default_dtype(self.device)
        layer = data.numel() * teacher.config.hidden_size * self.dtype.itemsize
        if resident is None:
            resident = _fits(self.device, 2 * layer)
        self.home = self.device if resident else torch.device("cpu")
        self.persist = self.home.type == "cpu" if persist is None else persist
        self.mem: dict[int, torch.Tensor] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, i: int) -> Path:
        return _act_file(self.root, i)

    def _keep(self, i: int, x: torch.Tensor) -> torch.Tensor:
        self.mem[i] = x
        for j in [j for j in self.mem if j < i - 1]:  # the two newest: x_i and the x_{i-1} it came from
            del self.mem[j]
        return x

    def _load(self, i: int) -> torch.Tensor:
        x = load_file(self.path(i))["x"]
        return x.to(self.home) if self.home.type != "cpu" else x

    def get(self, i: int) -> torch.Tensor:
        if i in self.mem:
            return self.mem[i]
        if self.path(i).is_file():
            return self._keep(i, self._load(i))
        j = max([k for k in self.mem if k < i] + [k for k in range(i) if self.path(k).is_file()], default=-1)
        if j < 0:
            j, x = 0, _embed(self.teacher, self.data, self.device, self.batch_size, self.dtype, self.home)
            if self.persist:
                save_state({"x": x.cpu()}, self.path(0))
        else:
            x = self.mem[j] if j in self.mem else self._load(j)
        self._keep(j, x)
        for k in range(j, i):
            x = self._keep(k + 1, _teacher_block(self.teacher, k, x, self.device, self.batch_size, self.dtype))
            if self.persist:
                save_state({"x": x.cpu()}, self.path(k + 1))  # written atomically: a rerun starts from here
        return x

    def drop(self, i: int) -> None:
        self.mem.pop(i, None)
        self.path(i).unlink(missing_ok=True)


def teacher_inputs(teacher: TailorForCausalLM, data: torch.Tensor, root: Path, device: torch.device,
                   batch_size: int = 8, dtype: torch.dtype | None = None) -> list[Path]:
    """Every block's input hidden states over `data` ((N, T) ids), one file per block, plus the last
    block's output: L + 1 files of (N, T, H) in `dtype` (bf16 on CUDA, float32 on CPU by default).
    One teacher block is on `device` at a time; files already written (a resumed run) are kept."""
    acts = TeacherActs(teacher, data, root, device, batch_size, dtype, persist=True)
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
    pin = device.type == "cuda" and x.device.type == "cpu"  # TeacherActs may hand over layers already on the device
    if pin and _fits(device, x.nbytes + y.nbytes):
        x, y, pin = x.to(device), y.to(device), False  # a block's activations are small beside an H200: keep them there
    order = order.to(x.device)
    # The losses stay on the device until a flush (a callback, a checkpoint, the end): one host sync
    # there, not one per step, so the host queues the next steps while the device runs. The steps of a
    # flush share its wall time in their tokens_per_s.
    pending: list[tuple[dict, torch.Tensor]] = []
    t0 = tw = time.perf_counter()

    def flush() -> None:
        nonlocal tw
        if not pending:
            return
        losses = torch.stack([v for _, v in pending]).tolist()
        now = time.perf_counter()
        for (point, _), loss in zip(pending, losses):
            point["loss"] = loss / point.pop("n")
            point["tokens_per_s"] = point["tokens_per_s"] * len(pending) / (now - tw)
        pending.clear()
        tw = now

    for step in range(start, spec.steps):
        idx = order[torch.arange(step * spec.batch_size, (step + 1) * spec.batch_size, device=x.device) % len(x)]
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
        point = {"step": step + 1, "loss": None, "tokens_per_s": xb.shape[0] * xb.shape[1] * len(configs),
                 "n": len(configs)}  # tokens now; tokens / second at the flush
        result.curve.append(point)
        pending.append((point, total))
        save = ckpt_dir and ((step + 1) % spec.ckpt_every == 0 or step + 1 == spec.steps)
        if save or on_step or step + 1 == spec.steps:
            flush()
        if save:
            _save(ckpt_dir, block, opt, gen, step + 1, spec, result.curve)
        if on_step:
            on_step(step + 1, result.curve[-1]["loss"])
    flush()
    del opt
    block.to(home).eval()
    result.seconds = time.perf_counter() - t0
    return result


def train_blocks(student: TailorForCausalLM, teacher: TailorForCausalLM, data: torch.Tensor, spec: BlockSpec,
                 spaces: dict[str, SearchSpace], n_random: int, work: Path, device: torch.device | str = "cpu",
                 blocks: list[int] | None = None, act_batch: int = 8, keep_acts: bool = False,
                 acts_dir: Path | None = None, progress: Callable[[BlockResult], None] | None = None,
                 persist_acts: bool | None = None) -> list[BlockResult]:
    """Blockwise supernet training of `student` (trained in place; kept on the CPU for large models)
    against `teacher` over `data` ((N, T) ids): blocks in `blocks` (default all; give each process a
    contiguous share) in increasing order, each from its `work/block-XXX` checkpoints, the teacher walked
    forward alongside (`TeacherActs`: x_i dropped once block i is done unless `keep_acts`, which also
    keeps their files in `work/acts`). Memory: two layers of activations, N x T x hidden x 2 bytes each on
    CUDA (bf16), on the device when they fit there, else on the CPU and (`persist_acts`, by default when
    on the CPU) on disk.
    Returns one BlockResult per block."""
    device = torch.device(device)
    work = Path(work)
    acts = TeacherActs(teacher, data, acts_dir or work / "acts", device, act_batch,  # one per process
                       persist=True if keep_acts else persist_acts)
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
