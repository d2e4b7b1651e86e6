"""Blockwise supernet training (EfficientQAT Block-AP / Puzzle BLD): the teacher pass stores what the
teacher computes, a trained block reproduces its teacher block better than before, and a block killed
mid-training resumes to exactly the uninterrupted result."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from tailor.elastic.blockwise import (BlockSpec, block_sandwich, block_share, load_trained, rel_mse, teacher_inputs,
                                      train_block, train_blocks, train_blocks_shared)
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_block_active
from tailor.models.model import rope_tables
from tailor.models.tiny import tiny_model
from safetensors.torch import load_file

DATA = torch.randint(0, 320, (16, 12), generator=torch.Generator().manual_seed(0))


def _spaces(model):
    arch = arch_of(model)
    return {"gguf": SearchSpace.build(arch, [4, 8, 16], [8, 16], 0.25, 1, 0.25, None),
            "onnx": SearchSpace.build(arch, [2, 4, 8, 16], [8, 16], 0.25, 1, 0.25, None)}


def _rope(model, seq):
    return rope_tables(model.config.head_dim, model.config.rope_theta, torch.arange(seq), torch.float32)


def test_teacher_pass_stores_each_blocks_input(tmp_path):
    teacher = tiny_model(seed=2, n_layers=3)
    files = teacher_inputs(teacher, DATA, tmp_path, torch.device("cpu"), batch_size=5)
    assert len(files) == 4
    x = [load_file(f)["x"] for f in files]
    assert x[0].shape == (16, 12, 64)
    cos, sin = _rope(teacher, 12)
    with torch.no_grad():
        torch.testing.assert_close(x[2], teacher.model.layers[1](x[1], cos, sin))
        torch.testing.assert_close(teacher.model.norm(x[3]), teacher.hidden_states(DATA))


@torch.no_grad()
def _block_error(block, x, y, cos, sin, lc, fmt):
    set_block_active(block, lc, fmt)
    return float(rel_mse(block(x, cos, sin), y, x))


def test_trained_block_reproduces_its_teacher_block_better(tmp_path):
    teacher = tiny_model(seed=2, n_layers=2)
    student = copy.deepcopy(teacher)
    spaces = _spaces(student)
    spec = BlockSpec(steps=30, batch_size=4, lr=2e-3, seed=0, ckpt_every=100)
    files = teacher_inputs(teacher, DATA, tmp_path / "acts", torch.device("cpu"))
    x, y = load_file(files[1])["x"], load_file(files[2])["x"]
    cos, sin = _rope(student, 12)
    block = student.model.layers[1]
    lo = {f: s.min().layers[1] for f, s in spaces.items()}
    before = {f: _block_error(block, x, y, cos, sin, lc, f) for f, lc in lo.items()}
    res = train_blocks(student, teacher, DATA, spec, spaces, n_random=1, work=tmp_path)
    assert [r.block for r in res] == [0, 1]
    after = {f: _block_error(block, x, y, cos, sin, lc, f) for f, lc in lo.items()}
    for f in lo:  # each grid's smallest config of this block: 2/4 bits, a quarter of the FFN, one KV group
        assert after[f] < 0.7 * before[f], (f, before[f], after[f])
    assert res[1].curve[-1]["loss"] < res[1].curve[0]["loss"]
    assert all(b.active for b in student.model.layers)


class Killed(Exception):
    pass


def _train(tmp, kill_at=None):
    teacher = tiny_model(seed=2, n_layers=2)
    student = copy.deepcopy(teacher)
    files = teacher_inputs(teacher, DATA, tmp / "acts", torch.device("cpu"))
    x, y = load_file(files[0])["x"], load_file(files[1])["x"]
    cos, sin = _rope(student, 12)

    def on_step(step, loss):
        if step == kill_at:
            raise Killed

    spec = BlockSpec(steps=6, batch_size=4, lr=2e-3, seed=0, ckpt_every=2, fingerprint="a")
    res = train_block(student.model.layers[0], x, y, cos, sin, spec, block_sandwich(_spaces(student), 0, 2),
                      tmp / "block-000", index=0, on_step=on_step)
    return student, res, spec


def test_resume_mid_block_gives_the_uninterrupted_result(tmp_path):
    full, res_full, _ = _train(tmp_path / "full")
    with pytest.raises(Killed):
        _train(tmp_path / "part", kill_at=3)  # step 3 done, its checkpoint not yet written (every 2)
    resumed, res, spec = _train(tmp_path / "part")
    assert res.resumed_from == 2
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [p["loss"] for p in res.curve] == pytest.approx([p["loss"] for p in res_full.curve])
    # another process picks the finished block up from its checkpoint
    fresh = tiny_model(seed=2, n_layers=2)
    assert load_trained(fresh, tmp_path / "part", spec) == [1]
    torch.testing.assert_close(fresh.model.layers[0].state_dict(), resumed.model.layers[0].state_dict())


def test_walk_keeps_two_layers_of_activations_and_restarts_from_the_newest(tmp_path):
    teacher = tiny_model(seed=2, n_layers=3)
    student = copy.deepcopy(teacher)
    spec = BlockSpec(steps=2, batch_size=4, lr=1e-3, seed=0)
    left = []
    train_blocks(student, teacher, DATA, spec, _spaces(student), 1, tmp_path,
                 progress=lambda r: left.append(sorted(p.name for p in (tmp_path / "acts").iterdir())))
    assert left == [["x-001.safetensors"], ["x-002.safetensors"], ["x-003.safetensors"]]
    # a process whose share starts at block 2 walks the teacher there itself, from its own files
    other = copy.deepcopy(teacher)
    train_blocks(other, teacher, DATA, spec, _spaces(other), 1, tmp_path / "other", blocks=[2])
    torch.testing.assert_close(other.model.layers[2].state_dict(), student.model.layers[2].state_dict())


@pytest.mark.parametrize("n, world", [(3, 2), (4, 2), (5, 3), (2, 4), (32, 8)])
def test_block_shares_cover_every_block_once_in_contiguous_runs(n, world):
    shares = [block_share(n, r, world) for r in range(world)]
    assert sum(shares, []) == list(range(n))  # in order: each share a contiguous run
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _shared_rank(rank: int, port: int, work: str, out: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        teacher = tiny_model(seed=2, n_layers=3)
        student = copy.deepcopy(teacher)
        res = train_blocks_shared(student, teacher, DATA, SHARED_SPEC, _spaces(student), 1, Path(work))
        out[rank] = ([r.block for r in res], {k: v.clone() for k, v in student.state_dict().items()})
    finally:
        dist.destroy_process_group()


SHARED_SPEC = BlockSpec(steps=3, batch_size=4, lr=2e-3, seed=0, ckpt_every=2)


def test_blocks_split_over_two_ranks_train_as_one_process(tmp_path):
    """Two gloo ranks share the blocks (rank 0: block 0, rank 1: blocks 1-2, each walking its own teacher
    activations) and each ends with every block exactly as one process trains them all."""
    import socket

    import torch.multiprocessing as mp

    teacher = tiny_model(seed=2, n_layers=3)
    single = copy.deepcopy(teacher)
    train_blocks(single, teacher, DATA, SHARED_SPEC, _spaces(single), 1, tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_shared_rank, args=(port, str(tmp_path / "two"), out), nprocs=2, join=True)
        got = {r: (v[0], dict(v[1])) for r, v in out.items()}
    assert got[0][0] == [0] and got[1][0] == [1, 2]
    for rank in (0, 1):
        for k, v in single.state_dict().items():
            torch.testing.assert_close(got[rank][1][k], v, rtol=0, atol=0, msg=f"rank {rank}: {k}")


def test_without_torch_distributed_the_shared_run_is_one_process_training_every_block(tmp_path):
    """One rank (no process group): train_blocks_shared trains every block, walks the teacher in
    work/acts-0, checkpoints each block under work, and leaves the student as train_blocks does."""
    teacher = tiny_model(seed=2, n_layers=3)
    single, shared = copy.deepcopy(teacher), copy.deepcopy(teacher)
    train_blocks(single, teacher, DATA, SHARED_SPEC, _spaces(single), 1, tmp_path / "one")
    seen = []
    res = train_blocks_shared(shared, teacher, DATA, SHARED_SPEC, _spaces(shared), 1, tmp_path / "two",
                              progress=seen.append)
    assert [r.block for r in res] == [0, 1, 2] and [r.block for r in seen] == [0, 1, 2]
    assert all(len(r.curve) == SHARED_SPEC.steps for r in res)
    assert (tmp_path / "two" / "acts-0").is_dir()
    assert load_trained(copy.deepcopy(teacher), tmp_path / "two", SHARED_SPEC) == []
    a, b = single.state_dict(), shared.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autocast_only_when_asked_and_on_cuda():
    from tailor.elastic.blockwise import _amp

    amp = _amp(torch.device("cuda"), True)
    assert isinstance(amp, torch.autocast) and amp.device == "cuda" and amp.fast_dtype == torch.bfloat16
    for device, on in (("cuda", False), ("cpu", True), ("cpu", False)):
        assert isinstance(_amp(torch.device(device), on), contextlib.nullcontext)


def test_walk_runs_each_teacher_block_once_and_reads_no_activation_back(tmp_path, monkeypatch):
    """The walk keeps its newest layers in memory: each teacher block runs once over the data and no
    activation file is read back (the walk used to load x_i twice per block); without persisting, no
    file is written either and the student trains the same. A share starting at block 2 walks there
    from the embeddings in memory and trains that block the same too."""
    import tailor.elastic.blockwise as bw

    teacher = tiny_model(seed=2, n_layers=3)
    students = [copy.deepcopy(teacher) for _ in range(3)]
    runs = []
    for i, b in enumerate(teacher.model.layers):
        b.register_forward_hook(lambda mod, args, out, i=i: runs.append(i))
    reads = []
    load = bw.load_file
    monkeypatch.setattr(bw, "load_file", lambda p: reads.append(Path(p).name) or load(p))
    spec = BlockSpec(steps=2, batch_size=4, lr=1e-3, seed=0)
    train_blocks(students[0], teacher, DATA, spec, _spaces(students[0]), 1, tmp_path / "files", act_batch=8)
    assert runs == [0, 0, 1, 1, 2, 2]  # each block once, 16 rows in chunks of 8
    assert reads == []
    runs.clear()
    train_blocks(students[1], teacher, DATA, spec, _spaces(students[1]), 1, tmp_path / "mem", act_batch=8,
                 persist_acts=False)
    assert runs == [0, 0, 1, 1, 2, 2] and list((tmp_path / "mem" / "acts").iterdir()) == []
    train_blocks(students[2], teacher, DATA, spec, _spaces(students[2]), 1, tmp_path / "share", blocks=[2],
                 persist_acts=False)
    for i, (a, b) in enumerate(zip(students[0].model.layers, students[1].model.layers)):
        torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0, msg=str(i))
    torch.testing.assert_close(students[2].model.layers[2].state_dict(), students[0].model.layers[2].state_dict(),
                               rtol=0, atol=0)
    assert reads == []
