"""Data-parallel training (torchrun / DDP, gloo on CPU): two ranks at the same global batch follow the
one-process loss curve and end with the same weights; ranks draw the same subnets."""
import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tailor.elastic.space import SearchSpace, sandwich_configs
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.train import TrainSpec, train_kd

DATA = torch.randint(0, 320, (16, 12), generator=torch.Generator().manual_seed(0))
SPEC = TrainSpec(steps=3, batch_size=4, lr=1e-3, temperature=1.0, seed=0, ckpt_every=10**6)


def _train(rank: int = 0, over: dict | None = None) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    student, teacher = tiny_model(n_layers=2), tiny_model(seed=1, n_layers=2)
    arch = arch_of(student)
    spaces = {"gguf": SearchSpace.build(arch, [4, 8, 16], [8, 16], 0.25, 1, 0.5, None),
              "onnx": SearchSpace.build(arch, [2, 4, 16], [8, 16], 0.25, 1, 0.5, None)}

    def sandwich(step, gen):
        return [lambda c=c, f=f: set_active(student, c, f) for c, f in sandwich_configs(spaces, step, 1, gen)]

    res = train_kd(student, teacher, DATA, dataclasses.replace(SPEC, **(over or {})), sandwich)
    return [p["loss"] for p in res.curve], {k: v.clone() for k, v in student.state_dict().items()}


def _rank(rank: int, port: int, out: dict, over: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        curve, state = _train(rank, over)
        if rank == 0:
            out["curve"], out["state"] = curve, state
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("over", [{}, {"kd_chunk": 7, "checkpointing": True}], ids=["plain", "chunked-kd+ckpt"])
def test_two_ranks_match_one_process_at_the_same_global_batch(over):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_rank, args=(port, out, over), nprocs=2, join=True)
        curve2, state2 = out["curve"], dict(out["state"])
    curve1, state1 = _train(over=over)
    assert curve2 == pytest.approx(curve1, rel=1e-4, abs=1e-5)
    for k, v in state1.items():
        torch.testing.assert_close(state2[k], v, rtol=1e-4, atol=1e-5)
