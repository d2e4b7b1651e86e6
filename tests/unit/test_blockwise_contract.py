"""What blockwise training promises a run, beyond "it learns" (test_blockwise.py): the loss reads as
documented, a student equal to its teacher starts at zero loss, the learning rates and checkpoints do what
BlockSpec says, a rerun of finished blocks trains nothing, rank shares partition the blocks, and a
checkpoint of another run or another block is refused naming the file. Tiny blocks: a few seconds."""

import copy
import json

import pytest
import torch

from tailor.arch import MATRICES, LayerConfig
from tailor.elastic.blockwise import (BlockCheckpointError, BlockSpec, load_trained, rel_mse, teacher_inputs,
                                      train_block, train_blocks)
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_block_active
from tailor.models.model import rope_tables
from tailor.models.tiny import tiny_model
from safetensors.torch import load_file

DATA = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(1))  # (N, T)
CPU = torch.device("cpu")


def _lc(model, bits=16, ffn=None, kv=None):
    c = model.config
    return LayerConfig(True, kv or c.num_key_value_heads, ffn or c.intermediate_size, {m: bits for m in MATRICES})


@torch.no_grad()
def _block0_io(model):
    """Block 0's teacher input and output (N, T, H) and the RoPE tables."""
    cos, sin = rope_tables(model.config.head_dim, model.config.rope_theta, torch.arange(DATA.shape[1]), torch.float32)
    x = model.model.embed_tokens(DATA)
    return x, model.model.layers[0](x, cos, sin), cos, sin


@torch.no_grad()
def _loss(block, lc, x, y, cos, sin):
    set_block_active(block, lc, "gguf")
    return float(rel_mse(block(x, cos, sin), y, x))


def _state(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def test_rel_mse_is_zero_when_exact_and_one_when_the_block_is_skipped():
    """1.0 = as bad as skipping the block (output = input), at any scale of the residual stream."""
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 30.0):
        x, y = scale * torch.randn(2, 3, 8, generator=g), scale * torch.randn(2, 3, 8, generator=g)
        assert float(rel_mse(x, y, x)) == pytest.approx(1.0, rel=1e-5)
        assert float(rel_mse(y, y, x)) == 0.0
        half = x + 0.5 * (y - x)  # halfway to the teacher's output: a quarter of the skip error
        assert float(rel_mse(half, y, x)) == pytest.approx(0.25, rel=1e-4)


def test_teacher_pass_stores_the_dtype_asked_for(tmp_path):
    teacher = tiny_model(seed=2, n_layers=2)
    ref = [load_file(f)["x"] for f in teacher_inputs(teacher, DATA, tmp_path / "f32", CPU, batch_size=3)]
    files = teacher_inputs(teacher, DATA, tmp_path / "bf16", CPU, batch_size=3, dtype=torch.bfloat16)
    for f, r in zip(files, ref):
        x = load_file(f)["x"]
        assert x.dtype == torch.bfloat16, f
        torch.testing.assert_close(x.float(), r, rtol=0.05, atol=0.05)


def test_student_equal_to_its_teacher_starts_at_zero_loss(tmp_path):
    """With only the max subnet to train, an untrained student (= the teacher) reproduces the teacher's own
    activations: the data, positions and RoPE (here Llama 3.1 scaled) the block sees match the teacher pass."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    teacher = tiny_model(seed=2, n_layers=2, rope_freq_scaling=scaling)
    student = copy.deepcopy(teacher)
    only_max = {"gguf": SearchSpace.build(arch_of(student), [16], [16], 1.0, 3, 0.0, None)}
    spec = BlockSpec(steps=1, batch_size=4, lr=1e-3, seed=0)
    res = train_blocks(student, teacher, DATA, spec, only_max, 1, tmp_path)
    assert [r.curve[0]["loss"] for r in res] == pytest.approx([0.0, 0.0], abs=1e-8)


def test_curve_callbacks_and_throughput_say_what_happened():
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    block = copy.deepcopy(teacher).model.layers[0]
    configs = [(_lc(teacher), "gguf"), (_lc(teacher, bits=4, ffn=64, kv=1), "gguf")]
    seen = []
    spec = BlockSpec(steps=3, batch_size=4, lr=1e-3, seed=0)
    res = train_block(block, x, y, cos, sin, spec, lambda step, gen: configs, on_step=lambda s, l: seen.append((s, l)))
    assert res.resumed_from == 0 and [p["step"] for p in res.curve] == [1, 2, 3]
    assert seen == [(p["step"], p["loss"]) for p in res.curve]
    # tokens_per_s: the sequences x positions x subnets each step pushed through, over that step's time; the
    # steps' times add up to (nearly all of) the block's seconds
    step_seconds = sum(4 * 12 * len(configs) / p["tokens_per_s"] for p in res.curve)
    assert 0.5 * res.seconds <= step_seconds <= res.seconds


def test_curve_loss_is_the_mean_over_the_sandwich_and_zero_lr_changes_nothing():
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    block = copy.deepcopy(teacher).model.layers[0]
    big, small = _lc(teacher, bits=8, ffn=128), _lc(teacher, bits=4, ffn=64, kv=1)  # both well short of the teacher
    before = _state(block)
    spec = BlockSpec(steps=2, batch_size=8, lr=0.0, seed=0, clip_lr=0.0)  # batch = all 8 rows: the whole set
    res = train_block(block, x, y, cos, sin, spec, lambda step, gen: [(big, "gguf"), (small, "gguf")])
    for k, v in _state(block).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    want = (_loss(block, big, x, y, cos, sin) + _loss(block, small, x, y, cos, sin)) / 2
    assert [p["loss"] for p in res.curve] == pytest.approx([want, want], rel=1e-4)


@pytest.mark.parametrize("lr, clip_lr", [(0.0, 1e-2), (1e-2, 0.0)])
def test_clip_lr_drives_the_clipping_factors_and_lr_the_rest(lr, clip_lr):
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    block = copy.deepcopy(teacher).model.layers[0]
    before = _state(block)
    spec = BlockSpec(steps=2, batch_size=4, lr=lr, seed=0, clip_lr=clip_lr)
    train_block(block, x, y, cos, sin, spec, lambda step, gen: [(_lc(teacher, bits=4), "gguf")])
    after = _state(block)
    clip_moved = any(not torch.equal(after[k], before[k]) for k in before if k.endswith("qclip"))
    rest_moved = any(not torch.equal(after[k], before[k]) for k in before if not k.endswith("qclip"))
    assert (clip_moved, rest_moved) == (clip_lr > 0, lr > 0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_what_no_subnet_uses_is_left_alone(weight_decay):
    """Training only a narrow 4-bit subnet must not move the FFN neurons beyond its width (without weight
    decay) nor ever decay the clipping factors of bit-widths it never used."""
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    block = copy.deepcopy(teacher).model.layers[0]
    before = _state(block)
    spec = BlockSpec(steps=2, batch_size=4, lr=1e-2, seed=0, clip_lr=1e-2, weight_decay=weight_decay)
    train_block(block, x, y, cos, sin, spec, lambda step, gen: [(_lc(teacher, bits=4, ffn=64, kv=1), "gguf")])
    after = _state(block)
    assert not torch.equal(after["mlp.gate_proj.weight"][:64], before["mlp.gate_proj.weight"][:64])
    if weight_decay == 0.0:
        unused_rows = before["mlp.gate_proj.weight"][64:]
        torch.testing.assert_close(after["mlp.gate_proj.weight"][64:], unused_rows, rtol=0, atol=0)
    for k in before:
        if k.endswith("qclip"):
            unused = torch.ones_like(before[k], dtype=torch.bool)
            unused[0, 4] = False  # gguf's 4-bit slot: the only one trained
            torch.testing.assert_close(after[k][unused], before[k][unused], rtol=0, atol=0, msg=k)


def test_each_step_takes_batch_size_sequences_and_each_epoch_sees_every_one():
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    block = copy.deepcopy(teacher).model.layers[0]
    rows = []
    hook = block.register_forward_pre_hook(
        lambda mod, args: rows.append([int((args[0][b] - x).abs().sum((1, 2)).argmin()) for b in range(len(args[0]))]))
    spec = BlockSpec(steps=4, batch_size=4, lr=1e-3, seed=0)
    train_block(block, x, y, cos, sin, spec, lambda step, gen: [(_lc(teacher), "gguf")])
    hook.remove()
    assert [len(r) for r in rows] == [4, 4, 4, 4]
    assert sorted(rows[0] + rows[1]) == list(range(8)) and sorted(rows[2] + rows[3]) == list(range(8))


class Killed(Exception):
    pass


def test_checkpoints_every_ckpt_every_steps_and_at_the_end_keeping_only_the_newest(tmp_path):
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    spec = BlockSpec(steps=7, batch_size=4, lr=1e-3, seed=0, ckpt_every=3, fingerprint="a")
    ckpt = tmp_path / "run" / "not-yet" / "block-000"  # its parents are made too

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    sandwich = lambda step, gen: [(_lc(teacher), "gguf")]  # noqa: E731
    with pytest.raises(Killed):
        train_block(copy.deepcopy(teacher).model.layers[0], x, y, cos, sin, spec, sandwich, ckpt, on_step=kill_at_5)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000003"]
    (ckpt / ".tmp-step-000006").mkdir()  # a write killed half way leaves its temp directory behind
    (ckpt / ".tmp-step-000006" / "weights.safetensors").write_bytes(b"partial")
    res = train_block(copy.deepcopy(teacher).model.layers[0], x, y, cos, sin, spec, sandwich, ckpt)
    assert res.resumed_from == 3 and [p["step"] for p in res.curve] == list(range(1, 8))
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000007"]  # 7 is no multiple of 3: the end is saved too
    assert load_trained(copy.deepcopy(teacher), tmp_path / "run" / "not-yet", spec) == []


def test_a_checkpoint_of_another_run_or_block_is_refused_naming_it(tmp_path):
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    sandwich = lambda step, gen: [(_lc(teacher), "gguf")]  # noqa: E731
    spec = BlockSpec(steps=1, batch_size=4, lr=1e-3, seed=0, fingerprint="a")
    train_block(copy.deepcopy(teacher).model.layers[0], x, y, cos, sin, spec, sandwich, tmp_path)
    other = BlockSpec(steps=1, batch_size=4, lr=1e-3, seed=0, fingerprint="b")
    with pytest.raises(BlockCheckpointError) as e:
        train_block(copy.deepcopy(teacher).model.layers[0], x, y, cos, sin, other, sandwich, tmp_path)
    assert str(tmp_path / "step-000001" / "meta.json") in str(e.value) and "delete it to start over" in str(e.value)
    wider = tiny_model(seed=2, n_layers=1, intermediate_size=320).model.layers[0]
    with pytest.raises(BlockCheckpointError) as e:
        train_block(wider, x, y, cos, sin, spec, sandwich, tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'step-000001'}: unreadable or not this block") and "size mismatch" in msg
    assert "\n" not in msg


def _spaces(model):
    return {"gguf": SearchSpace.build(arch_of(model), [4, 8, 16], [8, 16], 0.25, 1, 0.25, None)}


def test_rank_shares_partition_the_blocks_and_a_rerun_trains_nothing(tmp_path):
    """Two processes, one block each, into one work directory: each trains only its own share; together they
    finish the model. A rerun over finished blocks only loads them: no teacher pass, the same weights."""
    teacher = tiny_model(seed=2, n_layers=2)
    spec = BlockSpec(steps=2, batch_size=4, lr=1e-2, seed=0, fingerprint="a")
    shares, done = {}, []
    for rank, blocks in enumerate(([1], [0])):
        student = copy.deepcopy(teacher)
        res = train_blocks(student, teacher, DATA, spec, _spaces(student), 1, tmp_path / "work", blocks=blocks,
                           acts_dir=tmp_path / f"acts-{rank}", progress=done.append)
        assert [r.block for r in res] == blocks
        for i in (0, 1):  # the other share is untouched here
            same = all(torch.equal(a, b) for a, b in zip(student.model.layers[i].state_dict().values(),
                                                          teacher.model.layers[i].state_dict().values()))
            assert same == (i not in blocks), (blocks, i)
        shares[blocks[0]] = _state(student.model.layers[blocks[0]])
    assert [r.block for r in done] == [1, 0]
    merged = copy.deepcopy(teacher)
    assert load_trained(merged, tmp_path / "work", spec) == []
    rerun = copy.deepcopy(teacher)
    res = train_blocks(rerun, teacher, DATA, spec, _spaces(rerun), 1, tmp_path / "work", acts_dir=tmp_path / "acts-2")
    assert [r.resumed_from for r in res] == [2, 2]
    assert list((tmp_path / "acts-2").iterdir()) == []  # the teacher never ran
    for i in (0, 1):
        for k, v in shares[i].items():
            torch.testing.assert_close(merged.model.layers[i].state_dict()[k], v, rtol=0, atol=0)
            torch.testing.assert_close(rerun.model.layers[i].state_dict()[k], v, rtol=0, atol=0)
    assert json.loads((tmp_path / "work" / "block-000" / "step-000002" / "meta.json").read_text())["step"] == 2


def test_loading_others_blocks_reads_their_weights_only_and_skips_ones_own(tmp_path):
    """After the barrier a rank loads the blocks the others trained: not its own (already in its student,
    so its checkpoint is never read) and not their optimizer state (twice the weights' bytes)."""
    teacher = tiny_model(seed=2, n_layers=2)
    spec = BlockSpec(steps=2, batch_size=4, lr=1e-2, seed=0, fingerprint="a")
    trained = copy.deepcopy(teacher)
    train_blocks(trained, teacher, DATA, spec, _spaces(trained), 1, tmp_path / "work", acts_dir=tmp_path / "acts")
    (tmp_path / "work/block-000/step-000002/weights.safetensors").write_bytes(b"not read: block 0 is this rank's")
    (tmp_path / "work/block-001/step-000002/state.pt").write_bytes(b"not read: optimizer state")
    mine = copy.deepcopy(teacher)
    assert load_trained(mine, tmp_path / "work", spec, skip=[0]) == []
    same = lambda a, b: all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # noqa: E731
    assert same(mine.model.layers[1], trained.model.layers[1])  # the other's block, loaded
    assert same(mine.model.layers[0], teacher.model.layers[0])  # its own, left as it was
    assert not same(trained.model.layers[1], teacher.model.layers[1])  # (training moved it: loading shows)
    with pytest.raises(BlockCheckpointError):  # without skip, block 0's spoiled file is read and refused
        load_trained(copy.deepcopy(teacher), tmp_path / "work", spec)


def test_losses_read_once_at_the_end_equal_those_read_every_step():
    """Without a callback the losses stay on the device until the end (one host sync): the curve is the
    one a per-step callback reads, and the steps' tokens_per_s still add up to the block's time."""
    teacher = tiny_model(seed=2, n_layers=1)
    x, y, cos, sin = _block0_io(teacher)
    configs = [(_lc(teacher), "gguf"), (_lc(teacher, bits=4, ffn=64, kv=1), "gguf")]
    spec = BlockSpec(steps=4, batch_size=4, lr=1e-3, seed=0)
    runs = [train_block(copy.deepcopy(teacher).model.layers[0], x, y, cos, sin, spec, lambda step, gen: configs,
                        on_step=cb) for cb in (None, lambda s, l: None)]
    assert [p["loss"] for p in runs[0].curve] == [p["loss"] for p in runs[1].curve]
    assert [sorted(p) for p in runs[0].curve] == [["loss", "step", "tokens_per_s"]] * 4
    step_seconds = sum(4 * 12 * len(configs) / p["tokens_per_s"] for p in runs[0].curve)
    assert 0.5 * runs[0].seconds <= step_seconds <= runs[0].seconds
