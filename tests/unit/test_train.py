"""The KD trainer resumes after a kill exactly where the uninterrupted run would be."""

import pytest
import torch

from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.train import CheckpointError, TrainSpec, lr_factor, train_kd

DATA = torch.randint(0, 320, (16, 12), generator=torch.Generator().manual_seed(0))


class Killed(Exception):
    pass


def _run(steps: int, ckpt, fingerprint="a", seed=0, schedule="constant", kill_at=None):
    student = tiny_model(seed=1, n_layers=4)
    teacher = tiny_model(seed=2, n_layers=4)
    space = SearchSpace.build(arch_of(student), [4, 8, 16], [8, 16], 0.25, 1, 0.25, None)

    def sandwich(step, gen):
        if step == kill_at:
            raise Killed
        cfgs = [space.max(), space.min(), space.sample(gen)]
        return [lambda c=c: set_active(student, c, "gguf") for c in cfgs]

    spec = TrainSpec(steps=steps, batch_size=4, lr=1e-3, temperature=1.0, seed=seed, ckpt_every=2, fingerprint=fingerprint,
                     schedule=schedule, warmup_steps=2 if schedule == "cosine" else 0)
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


def test_resume_mid_schedule_continues_the_same_lr_curve(tmp_path):
    full, _ = _run(6, tmp_path / "full", schedule="cosine")
    with pytest.raises(Killed):
        _run(6, tmp_path / "part", schedule="cosine", kill_at=3)  # after the step-2 checkpoint, mid warm-up/decay
    resumed, res = _run(6, tmp_path / "part", schedule="cosine")
    assert res.resumed_from == 2
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_lr_schedules():
    const = TrainSpec(steps=10, batch_size=1, lr=1.0, temperature=1.0, seed=0)
    assert {lr_factor(const, s) for s in range(10)} == {1.0}
    cos = TrainSpec(steps=10, batch_size=1, lr=1.0, temperature=1.0, seed=0, schedule="cosine", warmup_steps=4)
    f = [lr_factor(cos, s) for s in range(10)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up to the full lr
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # then never rises
    assert f[-1] > 0.1 and lr_factor(cos, 10) == pytest.approx(0.1)  # and ends at 10%
    with pytest.raises(ValueError, match="schedule: 'linear'"):
        lr_factor(TrainSpec(steps=1, batch_size=1, lr=1.0, temperature=1.0, seed=0, schedule="linear"), 0)


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


def test_progress_lines_without_a_terminal(monkeypatch, capsys):
    """Nightly runs and detached jobs have no terminal, so no progress bar: a plain line every
    PROGRESS_S seconds (here every step) and one at the end, with the step, loss, rate and time left."""
    import tailor.train as tt

    monkeypatch.setattr(tt, "PROGRESS_S", 0.0)
    monkeypatch.setattr(tt.os, "isatty", lambda fd: False)
    _, res = _run(3, None)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train: step")]
    assert [ln.split()[2] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert f"loss {res.curve[-1]['loss']:.4f}" in lines[-1] and lines[-1].endswith("0.0 min left")
    # the time left is this run's rate (10 steps since it resumed at 50, in 20 s) times the 40 steps left
    assert tt.progress_line("ft", 60, 100, 50, 0.5, 20.0, 1000) == "ft: step 60/100 loss 0.5000 50 tok/s, 1.3 min left"
