"""FSDP2 training (torchrun, `parallel="fsdp"`, gloo on CPU): two sharded ranks at the same global batch
follow the one-process loss curve and end with the same weights; checkpoints cross between FSDP and one
process in both directions."""
import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tailor.config import ConfigError, parse_params
from tailor.elastic.space import SearchSpace, sandwich_configs
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.train import TrainSpec, train_kd

DATA = torch.randint(0, 320, (16, 12), generator=torch.Generator().manual_seed(0))
SPEC = TrainSpec(steps=3, batch_size=4, lr=1e-3, temperature=1.0, seed=0, ckpt_every=10**6, parallel="fsdp")


def _train(steps: int = 3, ckpt: Path | None = None, over: dict | None = None) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    # 3 layers, max_drop 0.5: the min subnet drops a block, so a sharded group sits out a forward
    student, teacher = tiny_model(n_layers=3), tiny_model(seed=1, n_layers=3)
    arch = arch_of(student)
    spaces = {"gguf": SearchSpace.build(arch, [4, 8, 16], [8, 16], 0.25, 1, 0.5, None),
              "onnx": SearchSpace.build(arch, [2, 4, 16], [8, 16], 0.25, 1, 0.5, None)}

    def sandwich(step, gen):
        return [lambda c=c, f=f: set_active(student, c, f) for c, f in sandwich_configs(spaces, step, 1, gen)]

    res = train_kd(student, teacher, DATA, dataclasses.replace(SPEC, steps=steps, **(over or {})), sandwich, ckpt)
    return [p["loss"] for p in res.curve], {k: v.detach().clone() for k, v in student.state_dict().items()}


def _rank(rank: int, port: int, root: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        full = _train()
        stopped = _train(2, Path(root) / "fsdp")  # checkpoint at step 2, for one process to resume
        resumed = _train(3, Path(root) / "single")  # resumes the one-process checkpoint of step 2
        if rank == 0:
            out["full"], out["stopped"], out["resumed"] = full, stopped, resumed
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    single = _train()
    _train(2, root / "single")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_rank, args=(port, str(root), out), nprocs=2, join=True)
        got = {k: (v[0], dict(v[1])) for k, v in out.items()}
    return {"single": single, "root": root, **got}


def _close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, **tol)


def test_fsdp_ranks_match_one_process_at_the_same_global_batch(runs):
    (curve1, state1), (curve2, state2) = runs["single"], runs["full"]
    assert curve2 == pytest.approx(curve1, rel=1e-4, abs=1e-5)
    _close(state1, state2, rtol=1e-4, atol=1e-5)


def test_fsdp_checkpoint_resumes_in_one_process(runs):
    _, fsdp_state = runs["stopped"]
    curve, state = _train(2, runs["root"] / "fsdp")  # nothing left to train: the checkpoint's weights
    assert len(curve) == 2
    _close(fsdp_state, state, rtol=0, atol=0)
    curve3, state3 = _train(3, runs["root"] / "fsdp")  # one more step from it, as an unbroken run
    assert curve3 == pytest.approx(runs["single"][0], rel=1e-4, abs=1e-5)
    _close(runs["single"][1], state3, rtol=1e-4, atol=1e-5)


def test_one_process_checkpoint_resumes_under_fsdp(runs):
    curve, state = runs["resumed"]
    assert curve == pytest.approx(runs["single"][0], rel=1e-4, abs=1e-5)
    _close(runs["single"][1], state, rtol=1e-4, atol=1e-5)


def _ckpt_rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = _train(2, over={"checkpointing": True})
        if rank == 0:
            out["got"] = got
    finally:
        dist.destroy_process_group()


def test_fsdp_with_activation_checkpointing_matches_one_process():
    """The 8B shape's end-to-end path (FSDP2 shards, every block recomputed in backward: the recompute
    runs inside the sharded block's own hooks) trains as one process without checkpointing does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_ckpt_rank, args=(port, out), nprocs=2, join=True)
        curve2, state2 = out["got"][0], dict(out["got"][1])
    curve1, state1 = _train(2)
    assert curve2 == pytest.approx(curve1, rel=1e-4, abs=1e-5)
    _close(state1, state2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("section", ["supernet", "finetune"])
def test_parallel_knob_defaults_to_ddp_and_a_bad_value_is_named(section):
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert getattr(parse_params(raw), section).parallel == "ddp"
    raw[section]["parallel"] = "fsdp"
    assert getattr(parse_params(raw), section).parallel == "fsdp"
    raw[section]["parallel"] = "zero3"
    with pytest.raises(ConfigError, match=rf"{section}\.parallel: .*'zero3'"):
        parse_params(raw)
