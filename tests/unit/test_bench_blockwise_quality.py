"""benchmarks/blockwise_quality.py, the parts a GPU call relies on: the base rebuilt from its GGUF undoes the
export's q/k row order; both processes derive one plan of equal student tokens from the exchanged probes;
the per-sequence KL is mean_kl's measure; the report (with paired intervals) is written from returned files."""
import json
import time
from types import SimpleNamespace

import pytest
import torch

from benchmarks.blockwise_quality import (E2E_SHARE, EXPORT_S, MODES, Run, combine, paired, profile_params, rope_unpermute,
                                          seq_kls)
from tailor.distill import mean_kl, teacher_logits
from tailor.export.gguf import rope_permute
from tailor.models.tiny import tiny_model


@pytest.mark.parametrize("heads", [9, 3, 1])
def test_rope_unpermute_inverts_the_exports_permutation(heads):
    w = torch.randn(heads * 64, 40)
    assert torch.equal(rope_unpermute(rope_permute(w, heads, 64), heads), w)


def _runner(mode: str, deadline: float, steps: int = 200, block_batch: int = 128, sync=None, gpus: int = 1) -> Run:
    r = object.__new__(Run)  # the plans need only the params, the arguments, the deadline and the layer count
    r.mode, r.params, r.deadline, r.res = mode, profile_params("full"), deadline, {"n_layers": 30}
    r.args, r.block_batch, r.gpus = SimpleNamespace(steps=steps, sync=sync), block_batch, gpus
    return r


def test_plan_is_the_same_in_both_processes_and_tokens_are_equal():
    now = time.time()
    probes = {"e2e": {"t_e2e": 0.6, "t_ft": 0.3, "t_done": now - 1},
              "blockwise": {"t_e2e": 0.5, "t_ft": 0.25, "t_block": 0.02, "t_acts_layer": 0.1, "t_done": now}}
    plans = [_runner(m, now + 400).plan(probes) for m in MODES]
    assert plans[0] == plans[1]
    p = plans[0]
    k = 128 // profile_params("full").supernet.batch_size  # block steps take k whole-model steps' sequences
    assert p["block_steps"] * k + p["e2e_phase_steps"] == p["supernet_steps"] == 200
    assert p["block_steps"] == round((1 - E2E_SHARE) * 200 / k)
    # the slower probe prices both; blockwise pays its walk once per layer and its blocks' steps per layer
    assert p["predicted_supernet_s"]["e2e_s"] == pytest.approx(200 * 0.6)
    assert p["predicted_supernet_s"]["blockwise_s"] == pytest.approx(
        30 * (0.1 + p["block_steps"] * 0.02) + p["e2e_phase_steps"] * 0.6, abs=0.1)


def test_plan_caps_at_the_full_profile():
    now = time.time()
    p = _runner("e2e", now + 400, steps=10**6).plan({"e2e": {"t_e2e": 1e-4, "t_ft": 1e-4, "t_done": now}})
    assert p["supernet_steps"] == profile_params("full").supernet.steps


def test_fine_tune_steps_come_from_the_time_left_and_too_few_skip_it(tmp_path):
    full = profile_params("full").finetune.steps
    now = time.time()
    # one process alone: (deadline - now - export - 10 s) / probe, capped at the profile's
    ft = _runner("e2e", now + EXPORT_S + 10 + 50).ft_plan(0.5)
    assert ft["finetune_steps"] == pytest.approx(100, abs=2) and not ft["skipped"]
    assert _runner("e2e", now + 10**6).ft_plan(0.5)["finetune_steps"] == full
    few = _runner("e2e", now + EXPORT_S + 10 + 5).ft_plan(0.5)  # ~10 steps' time: under MIN_FT_STEPS
    assert few["finetune_steps"] == 0 and few["skipped"]
    # side by side on one GPU: both derive the same count from the slower probe, each step taking twice as long
    (tmp_path / "sync").mkdir()
    other = {"t_done": now, "t_ft": 1.0}
    (tmp_path / "sync" / "ft-blockwise.json").write_text(json.dumps(other))
    both = _runner("e2e", now + EXPORT_S + 10 + 200, sync=tmp_path / "sync").ft_plan(0.5)
    assert both["t_ft_shared"] == pytest.approx(2.0) and both["finetune_steps"] == pytest.approx(100, abs=2)


def test_seq_kls_average_to_mean_kl():
    torch.manual_seed(0)
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    seqs = torch.randint(0, 320, (5, 12))
    t = teacher_logits(teacher, seqs, batch_size=2)
    per = seq_kls(student, seqs, t, batch_size=2)
    assert len(per) == 5 and sum(per) / 5 == pytest.approx(mean_kl(student, seqs, t, batch_size=2), rel=1e-5)


def test_paired_interval_of_a_constant_shift():
    a = [0.1 * i for i in range(20)]
    c = paired(a, [x + 0.5 for x in a], "shift")
    assert c["delta"] == pytest.approx(0.5) and c["ci95"] == pytest.approx([0.5, 0.5])
    assert paired(a, None, "missing") is None
    nll, tok = [2.0, 4.0], [1, 2]
    assert paired(nll, nll, "ppl", tok)["e2e"] == pytest.approx(7.389056, rel=1e-5)  # exp(6 / 3)


def test_combine_writes_the_report(tmp_path):
    def row(mode, shift):
        kls = {k: [0.1 + shift + 0.01 * i for i in range(4)] for k in ("min", "mid", "max", "min_onnx", "mid_onnx")}
        phases = {"before": {"val_kl": {k: 0.3 for k in kls}},
                  "train": {"student_tokens": 100, "val_kl": {k: sum(v) / 4 for k, v in kls.items()}}}
        per = {"train": kls, "phone": {"before_ft": [0.2] * 4, "after_ft": [0.1 + shift] * 4},
               "ppl": {"nll": [3.0, 4.0], "tokens": [2, 2]}}
        if mode == "blockwise":
            phases["blocks"] = {"student_tokens": 80, "val_kl": {k: 0.2 for k in kls}}
            per["blocks"] = {k: [0.2] * 4 for k in kls}
        return {"mode": mode, "phases": phases, "per_seq": per, "plan": {"supernet_steps": 10, "block_steps": 8,
                "e2e_phase_steps": 2, "finetune_steps": 5, "supernet_fraction_of_profile": 0.005,
                "finetune_fraction_of_profile": 0.005},
                "search": {"chosen_hash": "h", "kept_layers": 3, "bytes": 10, "bits_per_param": 4.5, "search_kl": 0.1},
                "finetune": {"steps": 5, "heldout_kl_before": 0.2, "heldout_kl": 0.1 + shift},
                "export": {"llamacpp_ppl": 20.0 + shift, "torch_ppl": 20.0, "base_torch_ppl": 15.0,
                           "file_holds_model_grid": True}}

    src = tmp_path / "out"
    src.mkdir()
    for mode, shift in zip(MODES, (0.0, 0.05)):
        (src / f"{mode}.json").write_text(json.dumps(row(mode, shift)))
    (src / "launch.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    combine(src, tmp_path / "rep")
    out = json.loads((tmp_path / "rep" / "blockwise_quality.json").read_text())
    s = out["summary"]
    assert s["val_kl"]["mid"]["ci_blockwise_minus_e2e"]["delta"] == pytest.approx(0.05)
    assert s["phone_heldout_kl"]["ci_blockwise_minus_e2e"]["delta"] == pytest.approx(0.05)
    # block phase 0.2 vs e2e's 0.115: the end-to-end phase took blockwise to 0.165, 0.035 of the 0.085 gap closed
    assert s["gap_closed"]["by_e2e_phase"]["mid"] == pytest.approx(1 - 0.05 / 0.085)
    assert s["same_start"] == {"importance": True, "val_kl_before": True}
    md = (tmp_path / "rep" / "blockwise_quality.md").read_text()
    assert "after block phase" in md and "+0.0500 [+0.0500, +0.0500]" in md and "of the full profile's 2000" in md
