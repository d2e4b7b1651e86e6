"""One test per stage, each calling the stage's run() on the real model sliced to 2 layers, in
pipeline order over one shared workspace; each checks the invariant its stage promises."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tailor.config import parse_params

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profiles"]["test"]["model"]["n_layers"] = 2
    root = tmp_path_factory.mktemp("stages")
    return {"root": root, "params": parse_params(raw, "test"), "art": root / "artifacts"}


def test_calibrate(ws):
    from steps import calibrate

    m = calibrate.run(ws["params"], ws["art"] / "calibrate")
    c = ws["params"].calibrate
    assert m["train_tokens"] == c.train_seqs * c.seq_len
    assert {p.name for p in (ws["art"] / "calibrate" / "eval").iterdir()} >= {"wiki.jsonl", "piqa.jsonl", "crows_pairs.jsonl"}


def test_supernet(ws):
    from steps import supernet
    from tailor.elastic.supernet import set_max
    from tailor.models.base import load_base, load_model_dir

    out = supernet.run(ws["params"], ws["art"] / "calibrate", ws["art"] / "supernet", ws["root"] / "ckpt")
    ws["supernet_curve"] = [p["loss"] for p in out["curve"]]
    m = out["metrics"]
    assert set(m["val_loss_before"]) == {"min", "mid", "max", "min_onnx", "mid_onnx"}
    assert m["steps"] == ws["params"].supernet.steps and m["formats"] == {"gguf": [4, 5, 8, 16], "onnx": [2, 4, 8, 16]}
    assert len(out["curve"]) == ws["params"].supernet.steps
    model = load_model_dir(ws["art"] / "supernet" / "model")
    set_max(model)
    assert json.loads((ws["art"] / "supernet" / "space.json").read_text())["drop_order"]
    base, _ = load_base(2)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())


def test_supernet_blockwise(ws, tmp_path):
    """`supernet.mode: blockwise`: every block trained against the teacher block (tailor.elastic.blockwise),
    then the short end-to-end phase; the output is the same kind of supernet the search reads."""
    from steps import supernet
    from tailor.models.base import load_model_dir

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profiles"]["test"]["model"]["n_layers"] = 2
    raw["supernet"].update(mode="blockwise", block_steps=3, block_lr=1e-4)
    params = parse_params(raw, "test")
    out = supernet.run(params, ws["art"] / "calibrate", tmp_path / "supernet", tmp_path / "ckpt")
    m = out["metrics"]
    assert m["mode"] == "blockwise" and len(m["block_loss"]) == 2
    assert len(out["curve"]) == params.supernet.steps  # the end-to-end phase after the blocks
    assert all(b.active for b in load_model_dir(tmp_path / "supernet" / "model").model.layers)
    assert (tmp_path / "supernet" / "space.json").is_file()


def test_supernet_stage_under_torchrun(ws, tmp_path):
    """`supernet.nproc: 2`: the stage starts itself under torchrun (2 CPU processes, gloo), trains data
    parallel, and rank 0 alone writes the outputs; at the same global batch its loss curve is the
    single-process one."""
    import shutil
    import subprocess
    import sys

    if "supernet_curve" not in ws:
        pytest.skip("needs test_supernet's single-process run")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "test"
    raw["profiles"]["test"]["model"]["n_layers"] = 2
    raw["supernet"]["nproc"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(ws["art"] / "calibrate", tmp_path / "artifacts" / "calibrate")
    env = dict(os.environ, TAILOR_ROOT=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "steps.supernet", "--params", "params.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = [float(r.split(",")[1]) for r in (tmp_path / "reports/supernet/curve.csv").read_text().split()[1:]]
    assert curve == pytest.approx(ws["supernet_curve"], rel=1e-4)
    assert (tmp_path / "artifacts/supernet/model/model.safetensors").is_file()
    assert not (tmp_path / ".cache/ckpt/supernet").exists()


def test_search(ws):
    from steps import search
    from tailor.arch import SubnetConfig

    out = search.run(ws["params"], "phone", ws["art"] / "supernet", ws["art"] / "calibrate", ws["art"] / "search" / "phone")
    m = out["metrics"]
    assert m["bytes"] <= m["budget_bytes"] and m["n_candidates"] >= 2
    assert set(m["strategies"]) == {"mip", "nsga", "gumbel"}
    assert all(s["best_kl"] is not None and s["best_bytes"] <= m["budget_bytes"] for s in m["strategies"].values())
    assert m["fairness"]["blind"]["kl"] <= m["fairness"]["aware"]["kl"]
    assert (ws["art"] / "search" / "phone" / "sensitivity.json").is_file()
    cfg = SubnetConfig.from_json((ws["art"] / "search" / "phone" / "config.json").read_text())
    assert cfg.hash == m["chosen_hash"]


@pytest.mark.slow  # 36 s; tests/integration/test_dask_search.py proves the fan-out itself in `make test`
def test_search_fans_out_on_dask(ws, tmp_path):
    """runner.kind dask: the search stage scores its MIP and sampled candidates on a 2-worker Dask
    cluster and chooses what the in-process scorer chooses, with the same scores."""
    pytest.importorskip("dask.distributed")
    from steps import search

    p = ws["params"]
    sp = p.search.model_copy(update={"strategies": ["mip", "sampled"], "latency_configs": 0})
    runs = {}
    for kind in ("local", "dask"):
        params = p.model_copy(update={"search": sp, "runner": p.runner.model_copy(update={"kind": kind, "workers": 2})})
        runs[kind] = search.run(params, "phone", ws["art"] / "supernet", ws["art"] / "calibrate", tmp_path / kind)
    local, dask = runs["local"], runs["dask"]
    assert dask["metrics"]["chosen_hash"] == local["metrics"]["chosen_hash"]
    scores = {kind: {c.config.hash: c.kl for c in r["candidates"]} for kind, r in runs.items()}
    assert scores["dask"].keys() == scores["local"].keys() and len(scores["local"]) >= 4
    assert all(abs(scores["dask"][h] - kl) <= 1e-5 * max(1.0, abs(kl)) for h, kl in scores["local"].items())


def test_finetune(ws):
    from steps import finetune
    from transformers import AutoModelForCausalLM

    out = finetune.run(ws["params"], "phone", ws["art"] / "supernet", ws["art"] / "search" / "phone",
                       ws["art"] / "calibrate", ws["art"] / "finetune" / "phone", ws["root"] / "ckpt-ft")
    assert out["metrics"]["kl_after"] >= 0
    d = ws["art"] / "finetune" / "phone"
    model = AutoModelForCausalLM.from_pretrained(d)  # standard loading once tailor is imported
    cfg = json.loads((d / "subnet.json").read_text())
    kept = [lc for lc in cfg["layers"] if lc["keep"]]
    assert model.config.num_hidden_layers == len(kept)
    assert [b.mlp.gate_proj.weight.shape[0] for b in model.model.layers] == [lc["ffn"] for lc in kept]


def test_evaluate(ws):
    from steps import evaluate

    out = evaluate.run(ws["params"], "phone", ws["art"] / "finetune" / "phone", ws["art"] / "calibrate" / "eval")
    ws["evaluate"] = out
    assert {"ppl", "ppl_base", "piqa", "piqa_base"} <= set(out["metrics"])
    assert {s["group"] for s in out["slices"]["crows_pairs"]}
    assert {g["name"] for g in out["gates"]["gates"]} == {"ppl_increase", "accuracy_retention", "group_worsening"}


@pytest.mark.parametrize("device", ["phone", "laptop"])
def test_export(ws, device):
    from steps import export, finetune, search

    art = ws["art"]
    if device == "laptop":  # the ONNX branch needs its own subnet on the onnx grid
        search.run(ws["params"], device, art / "supernet", art / "calibrate", art / "search" / device)
        finetune.run(ws["params"], device, art / "supernet", art / "search" / device, art / "calibrate",
                     art / "finetune" / device, ws["root"] / "ckpt-ft2")
    out = export.run(ws["params"], device, art / "finetune" / device, art / "calibrate" / "eval", art / "export" / device)
    ws[f"export_{device}"] = out
    m = out["metrics"]
    assert abs(m["runtime_ppl"] - m["torch_ppl"]) / m["torch_ppl"] <= 0.02
    assert m["weight_bytes"] == m["predicted_bytes"]
    assert out["file"].is_file() and m["file_bytes"] == out["file"].stat().st_size
    if device == "phone":  # the GGUF container is laid out from the config: the whole file is predicted
        assert abs(m["file_bytes"] - m["predicted_file_bytes"]) <= 64, m


def test_register(ws, mlflow_uri, monkeypatch):
    from steps import register
    from steps._common import write_json
    from tailor import tracking

    monkeypatch.chdir(ws["root"])
    write_json(Path("reports/evaluate/phone/gates.json"), ws["evaluate"]["gates"])
    write_json(Path("reports/evaluate/phone/metrics.json"), ws["evaluate"]["metrics"])
    write_json(Path("reports/export/phone/metrics.json"), ws["export_phone"]["metrics"])
    out = register.run(ws["params"], "phone", Path("artifacts/export/phone"))
    assert {"git_sha", "dvc_lock_md5", "params_md5", "sha256"} <= set(out["tags"])
    for expected in (("1", True), ("1", False)):  # the same file twice: one version
        with tracking.stage_run("register", "phone") as tr:
            assert tracking.register("tailor-phone", tr, out["file"], out["tags"], "candidate") == expected
    assert tracking.aliases("tailor-phone") == {"candidate": "1"}
