"""The nightly flow starts the base model's evaluate suite right after calibrate, beside the training stages
(`runner.base_eval: early`), and not at all with `in-stage`; and the latency subnets' timing (`--latency-only`)
for the devices whose search is to run. A small DVC project with the real flow, params and DVC; the early
commands are a script that meets the supernet stage while they all run."""
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
me, others = sys.argv[1], [o for o in sys.argv[2].split(",") if o]
Path("sync").mkdir(exist_ok=True)
Path(f"sync/{me}").touch()
start, saw = time.time(), []
while others and len(saw) < len(others) and time.time() - start < 120:
    saw = [o for o in others if Path(f"sync/{o}").exists()]
    time.sleep(0.05)
Path("out").mkdir(exist_ok=True)
Path(f"out/{me}.json").write_text(json.dumps({"saw": ",".join(saw) or None, "args": sys.argv[3:]}))
'''
DVC_YAML = {"stages": {
    "calibrate": {"cmd": "python meet.py calibrate ''", "deps": ["meet.py"], "outs": ["out/calibrate.json"]},
    "supernet": {"cmd": "python meet.py supernet {other}", "deps": ["out/calibrate.json"], "outs": ["out/supernet.json"]},
    "search": {"foreach": "${devices}", "do": {"cmd": "python meet.py search${key} ''",
                                               "deps": ["out/supernet.json"], "outs": ["out/search${key}.json"]}},
    "evaluate": {"foreach": "${devices}", "do": {"cmd": "python meet.py evaluate${key} ''",
                                                 "deps": ["out/search${key}.json"], "outs": ["out/evaluate${key}.json"]}}}}


def _project(tmp: Path, base_eval: str, kind: str) -> Path:
    root = tmp / f"proj-{base_eval}"
    root.mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["runner"] = {"kind": kind, "workers": 2, "address": None, "base_eval": base_eval}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stages = json.loads(json.dumps(DVC_YAML).replace("{other}", "early,latency" if base_eval == "early" else "latency"))
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
    monkeypatch.setattr(nightly, "EARLY_LATENCY", ["meet.py", "latency", "supernet"])
    if forced:  # the base model changed under its path: calibrate re-runs first, outside the stage loop
        monkeypatch.setattr(nightly, "base_model_changed", lambda root, source: True)
    nightly.for_params(root / "params.yaml")(root=str(root))
    supernet = json.loads((root / "out/supernet.json").read_text())
    # they met: the early runs were going while the supernet stage ran (no timing threshold)
    latency = json.loads((root / "out/latency.json").read_text())
    assert latency["saw"] == "supernet" and latency["args"] == ["--devices", "phone,laptop"]
    if base_eval == "early":
        assert supernet["saw"] == "early,latency"
        assert json.loads((root / "out/early.json").read_text())["saw"] == "supernet"
    else:
        assert supernet["saw"] == "latency"
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
    monkeypatch.setattr(nightly, "EARLY_LATENCY", ["-c", "import os, time; open('latency.pid', 'w').write(str(os.getpid()));"
                                                         " time.sleep(300)"])
    with pytest.raises(Exception, match="supernet"):
        nightly.for_params(root / "params.yaml")(root=str(root))
    for name in ("early.pid", "latency.pid"):
        pid = int((root / name).read_text())
        with pytest.raises(ProcessLookupError):  # ended and reaped by the flow, not left working for minutes
            os.kill(pid, 0)
