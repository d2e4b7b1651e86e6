"""One test per stage, each calling the stage's run() on the real model sliced to 2 layers, in
pipeline order over one shared workspace; each checks the invariant its stage promises."""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
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
    base, _ = load_base(n_layers=2)
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
    # blind = the least-KL candidate under the budget, recomputed here from the candidates themselves
    fit = [c for c in out["candidates"] if c.nbytes <= m["budget_bytes"]]
    fair = m["fairness"]
    assert fair["blind"]["hash"] == min(fit, key=lambda c: c.kl).config.hash
    # aware minimises kl + weight x positive worst-group rise: it can never score worse than blind on that
    objective = {k: fair[k]["kl"] + fair["weight"] * max(0.0, fair[k]["worst_group_delta"]) for k in ("blind", "aware")}
    assert objective["aware"] <= objective["blind"] + 1e-4  # deltas are rounded to 4 places in the metrics
    assert m["chosen_hash"] == fair["aware" if fair["enabled"] else "blind"]["hash"]
    assert (ws["art"] / "search" / "phone" / "sensitivity.json").is_file()
    cfg = SubnetConfig.from_json((ws["art"] / "search" / "phone" / "config.json").read_text())
    assert cfg.hash == m["chosen_hash"]
    # where the time went: every phase, each strategy's own seconds, and together no more than the whole
    ph = m["phase_seconds"]
    assert set(ph) == {"setup", "sensitivity", "latency", "fairness"} | {f"strategy.{k}" for k in m["strategies"]}
    assert all(v >= 0 for v in ph.values()) and ph["sensitivity"] > 0 and ph["fairness"] > 0
    assert sum(v for k, v in ph.items() if k != "setup") <= m["search_seconds"] + 0.05


def test_latency_child_fills_the_cache_the_search_reads(ws, tmp_path, monkeypatch):
    """latency.Background (on a GPU machine the search's exports and timings run in a child, on the CPU, beside
    the GPU work) leaves the cache entry that latency.run then reads: the same subnets, not timed again. A child
    that fails says so, and run measures in-process as before."""
    from steps.search import device_space
    from tailor.models.base import base_dir, load_model_dir
    from tailor.search import latency
    from tailor.search.sampled import seeds

    p, model_dir = ws["params"], ws["art"] / "supernet" / "model"
    model = load_model_dir(model_dir)
    space = device_space(p, "laptop", model, json.loads((ws["art"] / "supernet" / "space.json").read_text()))
    cache = tmp_path / "latency"
    # on 1 thread (search.latency_threads), which the child must key its entry by, not by its own torch threads
    bg = latency.Background(model_dir, base_dir(p.model.source), space, "onnx", 2, seeds(space), cache, threads=1)
    assert bg.wait(300) == "ok"
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("timed again"))
    out = latency.run(model, space, "onnx", None, 2, seeds(space), cache, threads=1)
    assert out["cached"]
    want = [c.hash for c in latency.timed_configs(space, "onnx", 2, seeds(space), False)]
    assert sorted(pt["config_hash"] for pt in out["points"]) == sorted(want) and len(want) == 2
    bad = latency.Background(tmp_path / "no-model", base_dir(p.model.source), space, "onnx", 2, seeds(space),
                             tmp_path / "other")
    assert bad.wait(300) == "exit 1" and not list((tmp_path / "other").glob("*.json"))  # no entry, its lock only


def test_the_early_latency_job_times_what_the_search_then_reads(ws, tmp_path, monkeypatch):
    """`search --latency-only` (the flow's early job on a GPU machine: from the base model, before the supernet
    has trained) leaves the very cache entry the search stage reads: the search times nothing. Without CUDA the
    job does nothing."""
    import torch

    from steps import search
    from tailor.search import latency

    cache = tmp_path / "cache"
    monkeypatch.setattr(search, "cache_dir", lambda: cache)
    p = ws["params"]
    # search.latency_threads 1, this process's torch threads 2: the job and the search must both time (and key the
    # entry) on the configured count, whatever thread share each process was given
    p = p.model_copy(update={"search": p.search.model_copy(update={"strategies": ["mip"], "latency_configs": 2,
                                                                   "latency_threads": 1})})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request = []
    seconds_per_token = latency.seconds_per_token
    monkeypatch.setattr(latency, "seconds_per_token", lambda *a, **k: request.append(k["threads"]) or seconds_per_token(*a, **k))
    if not torch.cuda.is_available():
        assert search.latency_only(p, ["laptop"]).startswith("the supernet trains on the CPU") and not cache.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        said = search.latency_only(p, ["laptop"])
    finally:
        torch.set_num_threads(threads)
    assert said.startswith("latency subnets: laptop ") and "subnets timed" in said, said
    assert request and set(request) == {1}
    # asked again (a nightly where nothing changed): the entry is there, the base model is not even loaded
    load_base = search.load_base
    monkeypatch.setattr(search, "load_base", lambda *a, **k: pytest.fail("loaded the base model"))
    assert search.latency_only(p, ["laptop"]) == "latency subnets: laptop cached"
    monkeypatch.setattr(search, "load_base", load_base)  # the search needs it (its teacher)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the search on the CPU: no background child
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("timed again"))
    torch.set_num_threads(2)
    try:
        out = search.run(p, "laptop", ws["art"] / "supernet", ws["art"] / "calibrate", tmp_path / "search")
    finally:
        torch.set_num_threads(threads)
    lat = out["metrics"]["latency_model"]
    assert lat["cached"] and lat["background"] == "cached before the search" and len(out["latency_points"]) >= 2


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
    assert out["metrics"]["kl_after"] < out["metrics"]["kl_before"]  # distillation moved the subnet toward the base
    d = ws["art"] / "finetune" / "phone"
    model = AutoModelForCausalLM.from_pretrained(d)  # standard loading once tailor is imported
    cfg = json.loads((d / "subnet.json").read_text())
    kept = [lc for lc in cfg["layers"] if lc["keep"]]
    assert model.config.num_hidden_layers == len(kept)
    assert [b.mlp.gate_proj.weight.shape[0] for b in model.model.layers] == [lc["ffn"] for lc in kept]


def test_evaluate(ws):
    from steps import evaluate

    t0 = time.perf_counter()
    out = evaluate.run(ws["params"], "phone", ws["art"] / "finetune" / "phone", ws["art"] / "calibrate" / "eval")
    wall = time.perf_counter() - t0
    ws["evaluate"] = out
    # where the stage's time went: successive phases, and one suite (one shard) inside its phase
    ph, suite = out["metrics"]["phase_seconds"], out["metrics"]["suite_seconds"]
    assert list(ph) == ["base", "suite", "compare"] and sum(ph.values()) <= wall and min(ph.values()) >= 0
    assert len(suite) == ws["params"].evaluate.shards == 1 and 0 < suite[0] <= ph["suite"]
    assert {"ppl", "ppl_base", "piqa", "piqa_base"} <= set(out["metrics"])
    # one row per bias type present, each with exactly the pairs of that type the eval set holds
    rows = [json.loads(x) for x in (ws["art"] / "calibrate" / "eval" / "crows_pairs.jsonl").read_text().splitlines()]
    counts = {t: sum(r["bias_type"] == t for r in rows) for t in {r["bias_type"] for r in rows}}
    limit = ws["params"].evaluate.limits.get("crows")
    assert {r["group"]: r["n"] for r in out["slices"]["crows_pairs"]} == {
        t: min(n, limit) if limit else n for t, n in counts.items()}
    gates = {g["name"]: g for g in out["gates"]["gates"]}
    assert set(gates) == {"ppl_increase", "accuracy_retention", "group_worsening"}
    assert all(g["verdict"] in ("pass", "fail", "indicative") and g["passed"] == (g["verdict"] == "pass")
               for g in gates.values())
    ppl = gates["ppl_increase"]
    assert ppl["ci_low"] <= ppl["delta"] <= ppl["ci_high"] and ppl["n"] == out["metrics"]["n_wiki"]
    assert ppl["margin"] == pytest.approx(ws["params"].evaluate.gates.max_ppl_increase * out["metrics"]["ppl_base"])


@pytest.mark.parametrize("device", ["phone", "laptop"])
def test_export(ws, device, monkeypatch):
    import torch

    from steps import export, finetune, search

    art = ws["art"]
    if device == "laptop":  # the ONNX branch needs its own subnet on the onnx grid
        search.run(ws["params"], device, art / "supernet", art / "calibrate", art / "search" / device)
        finetune.run(ws["params"], device, art / "supernet", art / "search" / device, art / "calibrate",
                     art / "finetune" / device, ws["root"] / "ckpt-ft2")
    asked = []  # the PyTorch reference runs where pick_device("auto") says (the GPU on a GPU machine)
    monkeypatch.setattr(export, "pick_device", lambda name: asked.append(name) or torch.device("cpu"))
    t0 = time.perf_counter()
    out = export.run(ws["params"], device, art / "finetune" / device, art / "calibrate" / "eval", art / "export" / device)
    wall = time.perf_counter() - t0
    assert asked == ["auto"] and out["metrics"]["torch_device"] == "cpu"
    assert out["metrics"]["runtime_threads"] == torch.get_num_threads()  # the runtime's share, reported
    ws[f"export_{device}"] = out
    m = out["metrics"]
    # where the stage's time goes: successive phases, so together no more than the call took
    ph = m["phase_seconds"]
    assert list(ph) == ["write", "check_size", "runtime_ppl", "torch_ppl", "generate", "tokens_per_s", "torch_generate"]
    assert all(v >= 0 for v in ph.values()) and sum(ph.values()) <= wall and ph["runtime_ppl"] == m["runtime_ppl_seconds"]
    # read back from the file itself, not from what export.run reported about it
    from tailor.arch import BaseArch, SubnetConfig
    from tailor.models.base import load_model_dir, sha256_file

    assert out["file"].is_file() and m["file_bytes"] == out["file"].stat().st_size
    assert sha256_file(out["file"]) == m["sha256"]
    cfg = SubnetConfig.from_json((art / "export" / device / "subnet.json").read_text())
    arch = BaseArch.from_hf(load_model_dir(art / "finetune" / device).config)
    expected = cfg.nbytes(replace(arch, n_layers=len(cfg.layers)), m["format"])  # its config keeps base dims
    if device == "phone":
        from gguf import GGUFReader

        assert sum(int(t.n_bytes) for t in GGUFReader(out["file"]).tensors) == expected
    if device == "phone":  # the GGUF container is laid out from the config: the whole file is predicted
        assert abs(m["file_bytes"] - m["predicted_file_bytes"]) <= 64, m


def test_export_refuses_a_16_bit_weight_beyond_float16(ws, tmp_path):
    """Field report: one 16-bit matrix holding 70000 became inf in the GGUF and the stage passed with
    runtime_ppl NaN. Now the writer refuses it naming the tensor, and the stage leaves no output."""
    import shutil

    from safetensors.torch import load_file, save_file

    from steps import export
    from steps._common import known_errors
    from tailor.quant.f16 import PrecisionError

    d = tmp_path / "finetune"
    shutil.copytree(ws["art"] / "finetune" / "phone", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_bits"][0]["q"] = 16  # the first kept layer's q projection stored as F16
    (d / "config.json").write_text(json.dumps(cfg))
    state = load_file(d / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"][3, 5] = 70000.0
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "export"
    with pytest.raises(PrecisionError, match=r"^blk\.0\.attn_q\.weight: weight at \[\d+, 5\] 70000 exceeds float16's "
                                             r"range \(\+-65504\); it cannot be stored as float16$"):
        export.run(ws["params"], "phone", d, ws["art"] / "calibrate" / "eval", out)
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    assert PrecisionError in known_errors()  # main_for: one line, exit 2


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
