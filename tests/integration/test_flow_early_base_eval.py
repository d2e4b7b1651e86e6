"""The nightly flow starts the base model's evaluate suite right after calibrate, beside the training stages
(`runner.base_eval: early`), and not at all with `in-stage`. A small DVC project with the real flow, params
and DVC; the early command is a script that meets the supernet stage while both run."""
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

# each of `early` and `supernet` touches its marker and waits (up to 120 s) for the other's: run one after the
# other, they never meet, and whoever came first records None
MEET = '''import json, sys, time
from pathlib import Path
me, other = sys.argv[1], sys.argv[2]
Path("sync").mkdir(exist_ok=True)
Path(f"sync/{me}").touch()
start, saw = time.time(), None
while other and saw is None and time.time() - start < 120:
    saw = other if Path(f"sync/{other}").exists() else None
    time.sleep(0.05)
Path("out").mkdir(exist_ok=True)
Path(f"out/{me}.json").write_text(json.dumps({"saw": saw}))
'''
DVC_YAML = {"stages": {
    "calibrate": {"cmd": "python meet.py calibrate ''", "deps": ["meet.py"], "outs": ["out/calibrate.json"]},
    "supernet": {"cmd": "python meet.py supernet {other}", "deps": ["out/calibrate.json"], "outs": ["out/supernet.json"]},
    "evaluate": {"foreach": "${devices}", "do": {"cmd": "python meet.py evaluate${key} ''",
                                                 "deps": ["out/supernet.json"], "outs": ["out/evaluate${key}.json"]}}}}


def _project(tmp: Path, base_eval: str, kind: str) -> Path:
    root = tmp / f"proj-{base_eval}"
    root.mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["runner"] = {"kind": kind, "workers": 2, "address": None, "base_eval": base_eval}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stages = json.loads(json.dumps(DVC_YAML).replace("{other}", "early" if base_eval == "early" else "''"))
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    (root / "meet.py").write_text(MEET)
    exe = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for args in (["init", "-q"], ["remote", "add", "-d", "local", str(tmp / f"remote-{base_eval}")]):
        subprocess.run([exe, *args], cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.parametrize("base_eval,kind,forced", [("early", "local", False), ("early", "dask", False),
                                                   ("early", "local", True), ("in-stage", "local", False)])
def test_the_base_suite_starts_after_calibrate_beside_the_supernet(tmp_path, mlflow_uri, monkeypatch, prefect_harness,
                                                                   base_eval, kind, forced):
    from flows import nightly

    if kind == "dask":
        pytest.importorskip("prefect_dask")
    root = _project(tmp_path, base_eval, kind)
    monkeypatch.chdir(root)
    monkeypatch.setattr(nightly, "EARLY_BASE_EVAL", ["meet.py", "early", "supernet"])
    if forced:  # the base model changed under its path: calibrate re-runs first, outside the stage loop
        monkeypatch.setattr(nightly, "base_model_changed", lambda root, source: True)
    nightly.for_params(root / "params.yaml")(root=str(root))
    supernet = json.loads((root / "out/supernet.json").read_text())
    if base_eval == "early":
        # they met: the early run was going while the supernet stage ran (no timing threshold)
        assert supernet["saw"] == "early"
        assert json.loads((root / "out/early.json").read_text())["saw"] == "supernet"
    else:
        assert not (root / "sync/early").exists()  # never started


def test_a_failing_flow_ends_the_early_child(tmp_path, mlflow_uri, monkeypatch, prefect_harness):
    from flows import nightly

    root = _project(tmp_path, "early", "local")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    stages["stages"]["supernet"]["cmd"] = ("python -c \"import pathlib, sys, time; "
                                           "[time.sleep(0.05) for _ in range(2400) if not pathlib.Path('early.pid').exists()]; "
                                           "sys.exit(1)\"")  # fails once the early child is running
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setattr(nightly, "EARLY_BASE_EVAL", ["-c", "import os, time; open('early.pid', 'w').write(str(os.getpid()));"
                                                           " time.sleep(300)"])
    with pytest.raises(Exception, match="supernet"):
        nightly.for_params(root / "params.yaml")(root=str(root))
    pid = int((root / "early.pid").read_text())
    with pytest.raises(ProcessLookupError):  # ended and reaped by the flow, not left scoring for minutes
        os.kill(pid, 0)
