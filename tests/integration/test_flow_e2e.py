"""End to end: the Prefect nightly flow on the `test` profile (real model sliced to 4 layers, real
Prefect, MLflow, DVC, lm-eval, llama.cpp, onnxruntime), then a second run that DVC skips."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COPY = ["tailor", "steps", "flows", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvcignore", ".gitignore"]

pytestmark = pytest.mark.integration


def _project(tmp: Path) -> Path:
    root = tmp / "proj"
    root.mkdir()
    for rel in COPY:
        src, dst = ROOT / rel, root / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    text = (root / "params.yaml").read_text().replace("profile: quick", "profile: test", 1)
    (root / "params.yaml").write_text(text)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def test_nightly_flow_end_to_end(tmp_path, monkeypatch, prefect_harness):
    from flows.nightly import nightly, targets
    from tailor import tracking

    root = _project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("TAILOR_ROOT", str(root))
    monkeypatch.chdir(root)
    t0 = time.perf_counter()
    rows = nightly(root=str(root))
    first = time.perf_counter() - t0
    assert {r["device"] for r in rows} == {"phone", "laptop"}

    for d in ("phone", "laptop"):
        ev = json.loads((root / f"reports/evaluate/{d}/metrics.json").read_text())
        assert {"ppl", "ppl_base", "piqa", "piqa_base"} <= set(ev)
        ex = json.loads((root / f"reports/export/{d}/metrics.json").read_text())
        assert {"runtime_ppl", "torch_ppl", "file_bytes", "sha256"} <= set(ex)
        assert abs(ex["runtime_ppl"] - ex["torch_ppl"]) / ex["torch_ppl"] <= 0.02
        assert (root / f"reports/evaluate/{d}/slices.json").is_file()
        assert (root / f"reports/evaluate/{d}/gates.json").is_file()

    c = tracking.client()
    for d in ("phone", "laptop"):
        mv = c.get_model_version_by_alias(f"tailor-{d}", "candidate")
        assert {"git_sha", "dvc_lock_md5", "params_md5", "sha256"} <= set(mv.tags)
    exp = c.get_experiment_by_name("tailor").experiment_id
    parents = c.search_runs([exp], "tags.`tailor.kind` = 'nightly'")
    assert len(parents) == 1
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    names = {r.info.run_name for r in children}
    assert set(targets(root, ["phone", "laptop"])) <= names
    candidates = c.search_runs([exp], "tags.`tailor.kind` = 'candidate'")
    assert len(candidates) >= 2

    # Unchanged inputs: DVC re-runs nothing and the registry gains no version.
    t0 = time.perf_counter()
    nightly(root=str(root))
    second = time.perf_counter() - t0
    print(f"first run {first:.0f} s, second (all skipped) {second:.0f} s")
    parents = c.search_runs([exp], "tags.`tailor.kind` = 'nightly'", order_by=["attributes.start_time DESC"])
    again = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(again) == len(names) and all(r.data.tags.get("tailor.skipped") == "true" for r in again)
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=root, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout or "{}") == {}
    for d in ("phone", "laptop"):
        assert len(c.search_model_versions(f"name='tailor-{d}'")) == 1
