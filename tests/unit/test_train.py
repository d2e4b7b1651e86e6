"""The KD trainer resumes after a kill exactly where the uninterrupted run would be."""

import pytest
import torch

from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.train import CheckpointError, TrainSpec, train_kd

DATA = torch.randint(0, 320, (16, 12), generator=torch.Generator().manual_seed(0))


def _run(steps: int, ckpt, fingerprint="a", seed=0):
    student = tiny_model(seed=1, n_layers=4)
    teacher = tiny_model(seed=2, n_layers=4)
    space = SearchSpace.build(arch_of(student), [4, 8, 16], [8, 16], 0.25, 1, 0.25, None)

    def sandwich(step, gen):
        cfgs = [space.max(), space.min(), space.sample(gen)]
        return [lambda c=c: set_active(student, c, "gguf") for c in cfgs]

    spec = TrainSpec(steps=steps, batch_size=4, lr=1e-3, temperature=1.0, seed=seed, ckpt_every=2, fingerprint=fingerprint)
    res = train_kd(student, teacher, DATA, spec, sandwich, ckpt)
    return student, res


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, res_full = _run(4, tmp_path / "full")
    _run(2, tmp_path / "part")  # "killed" after its step-2 checkpoint
    resumed, res = _run(4, tmp_path / "part")
    assert res.resumed_from == 2
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [p["loss"] for p in res.curve] == pytest.approx([p["loss"] for p in res_full.curve])


def test_training_lowers_the_loss(tmp_path):
    _, res = _run(8, None)
    assert res.curve[-1]["loss"] < res.curve[0]["loss"]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    _run(2, tmp_path / "c", fingerprint="a")
    with pytest.raises(CheckpointError, match="checkpoint of another run"):
        _run(4, tmp_path / "c", fingerprint="b")


def test_checkpoint_dir_keeps_one_configuration(tmp_path):
    from tailor.train import checkpoint_dir

    a = checkpoint_dir(tmp_path, "config-a")
    a.mkdir()
    b = checkpoint_dir(tmp_path, "config-b")
    assert a != b and not a.exists()
    assert checkpoint_dir(tmp_path, "config-b") == b
