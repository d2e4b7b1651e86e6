"""The nightly flow with `runner.kind: dask`: per-device branches run side by side on a real 2-worker
Dask cluster (prefect-dask), DVC records every stage as a one-by-one `dvc repro` would (status clean
afterwards, so the next run skips them all). A small DVC project with the real flow, params and DVC."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

STAGE = '''import json, os, sys, time
from pathlib import Path
stage, dev = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
start, saw, met = time.time(), None, None
Path("sync").mkdir(exist_ok=True)
Path(f"sync/{stage}-{dev}").touch()
if stage == "work":  # a rendezvous: each device's work waits for the other's, and for its own device's side stage
    # stages that run one after the other never meet (side comes after work in dvc.yaml's order)
    while (saw is None or not met) and time.time() - start < float(sys.argv[3]):
        saw = next((p.name[5:] for p in Path("sync").iterdir() if p.name.startswith("work-") and p.name != f"work-{dev}"), None)
        met = Path(f"sync/side-{dev}").exists()
        time.sleep(0.05)
Path("out").mkdir(exist_ok=True)
Path(f"out/{stage}{dev}.json").write_text(json.dumps({"start": start, "end": time.time(), "saw": saw, "met": met,
                                                          "omp": os.environ.get("OMP_NUM_THREADS")}))
'''
DVC_YAML = {"stages": {
    "prep": {"cmd": "python stage.py prep", "deps": ["stage.py"], "outs": ["out/prep.json"]},
    "work": {"foreach": "${devices}", "do": {"cmd": "python stage.py work ${key} 120",
                                             "deps": ["stage.py", "out/prep.json"], "outs": ["out/work${key}.json"]}},
    # reads only prep's output: the flow starts it beside work, not after it (as export beside evaluate)
    "side": {"foreach": "${devices}", "do": {"cmd": "python stage.py side ${key}",
                                             "deps": ["stage.py", "out/prep.json"], "outs": ["out/side${key}.json"]}},
    "finish": {"foreach": "${devices}", "do": {"cmd": "python stage.py finish ${key}",
                                               "deps": ["out/work${key}.json", "out/side${key}.json"],
                                               "outs": ["out/finish${key}.json"]}}}}


def _dvc(root: Path, *args: str) -> str:
    exe = str(Path(sys.executable).parent / "dvc")
    return subprocess.run([exe, *args], cwd=root, check=True, capture_output=True, text=True).stdout


def _project(tmp: Path) -> Path:
    root = tmp / "proj"
    root.mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["runner"] = {"kind": "dask", "workers": 4, "address": None}  # both works and both sides at once
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "stage.py").write_text(STAGE)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    _dvc(root, "remote", "add", "-d", "local", str(tmp / "remote"))
    return root


def test_device_branches_run_side_by_side_on_dask(tmp_path, mlflow_uri, monkeypatch, prefect_harness):
    pytest.importorskip("prefect_dask")
    from flows.nightly import for_params, targets

    root = _project(tmp_path)
    monkeypatch.chdir(root)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # as on a machine that sets none
        monkeypatch.delenv(var, raising=False)
    flow = for_params(root / "params.yaml")
    assert type(flow.task_runner).__name__ == "DaskTaskRunner"
    flow(root=str(root))

    # each branch saw the other's marker while it waited: both ran at once (no timing threshold: a slow,
    # shared machine only makes the wait shorter or longer, never the answer)
    span = {d: json.loads((root / f"out/work{d}.json").read_text()) for d in ("phone", "laptop")}
    assert {d: s["saw"] for d, s in span.items()} == {"phone": "laptop", "laptop": "phone"}, \
        f"branches did not run concurrently: {span}"
    assert {d: s["met"] for d, s in span.items()} == {"phone": True, "laptop": True}, \
        f"a device's side stage waited for its work stage, which it does not read: {span}"
    # Dask pins a worker to one thread, and by default the flow's own process too: the stages take a share
    # of the cores instead, and the shared stage (run by the flow) and this process keep an unset variable unset
    share = str(max(1, len(os.sched_getaffinity(0)) // 4))
    assert {d: s["omp"] for d, s in span.items()} == {"phone": share, "laptop": share}
    assert json.loads((root / "out/prep.json").read_text())["omp"] is None
    assert "OMP_NUM_THREADS" not in os.environ
    assert json.loads(_dvc(root, "status", "--json") or "{}") == {}  # dvc.lock complete: nothing left to run
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(targets(root, ["phone", "laptop"])) == set(lock)
