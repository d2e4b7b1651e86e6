"""FSDP2 (`fully_shard`) for `train_kd`, for students whose weights, gradients and AdamW state
(16 bytes a parameter) do not fit one GPU.

The caller's student stays a plain module: training runs on a sharded copy (each decoder block its own
FSDP group, then the root: embedding, final norm, tied head), the sandwich's switches set on the
student are mirrored onto the copy, and the trained weights are copied back at the end. A plain
module is what the stages need afterwards (`set_max`, `bake_clip_`, `save_pretrained` write and slice
whole tensors, which sharded DTensor parameters do not allow outside forward). Checkpoints are
gathered to whole tensors in exactly the single-process format (index-keyed AdamW state), so an FSDP
checkpoint resumes in one process and the other way round.

Elastic slicing needs no change: FSDP2 all-gathers a group's parameters before its forward and
registers the whole tensors on the modules, so `weight[:active_out, :active_in]` slices the full
weight; the reduce-scatter after backward shards the (zero-padded) gradient. A dropped block is never
called, so its group neither gathers nor reduces: on every rank alike, since ranks draw the same subnets.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

_SWITCH = (bool, int, float, str)


def shard_copy(student: nn.Module, device: torch.device, world: int, reshard_after_forward: bool = True) -> nn.Module:
    """A copy of `student` sharded over `world` ranks on `device`'s type. Parameters stay float32 in
    the all-gather (no MixedPrecisionPolicy): fake quantization rounds the float32 weight, as on one
    process, and bf16 autocast casts for the matmuls as it does there. `reshard_after_forward=False`
    keeps each block gathered from forward to backward (one all-gather fewer per subnet, ZeRO-2 memory)."""
    shadow = copy.deepcopy(student)
    # each block's weights are shards until its own forward gathers them: no quantizing them all up front
    shadow.grouped_quant = False
    mesh = init_device_mesh(device.type, (world,))
    for block in shadow.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(shadow, mesh=mesh)
    return shadow


def mirror(src: nn.Module, dst: nn.Module) -> None:
    """Copy the elastic switches set on `src` (block.active, widths, bits, format: plain scalar
    attributes) onto its sharded copy `dst`, module by module."""
    for a, b in zip(src.modules(), dst.modules()):
        for k, v in vars(a).items():
            if not k.startswith("_") and isinstance(v, _SWITCH):
                setattr(b, k, v)


def _full(v):
    return v.full_tensor().detach().cpu() if isinstance(v, DTensor) else v.detach().cpu() if torch.is_tensor(v) else v


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on CPU on every rank, one tensor gathered at a time (a collective: every
    rank calls it). The tied head is left out, as single-process checkpoints leave it out."""
    return {k: _full(v) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def full_optim_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every sharded tensor gathered: the single-process format (collective)."""
    sd = opt.state_dict()
    return {"state": {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def load_optim_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process optimizer state into an optimizer over sharded parameters: each whole
    tensor is cut into this rank's shard (every rank read the same file). Saved ids are positions in
    the parameter groups, as `Optimizer.load_state_dict` maps them."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, s in state["state"].items():
        p = params[int(i)]
        for k, v in s.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape:
                s[k] = distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements)
    opt.load_state_dict(state)
