"""Two runs started at once on one repository: the second waits for the first (a file lock around the
nightly flow), both finish, DVC's lock and cache and the MLflow registry stay consistent."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from reliability_harness import PY, make_project, registry, stage_env

pytestmark = pytest.mark.integration
FLOW = "from flows.nightly import nightly; nightly(devices={devices!r}, root='.')"


def start(root: Path, argv: list[str], name: str) -> subprocess.Popen:
    env = stage_env(root, PREFECT_HOME=str(root.parent / f"prefect-{name}"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # two servers starting on 2 busy cores
    env.pop("PREFECT_API_URL", None)  # each process its own ephemeral Prefect API
    return subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def both(root: Path, argv: list[str], timeout: float) -> list[tuple[int, str, float]]:
    t0 = time.perf_counter()
    procs = [start(root, argv, n) for n in ("a", "b")]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text, time.perf_counter() - t0))
    return out


def dvc_status(root: Path) -> dict:
    proc = subprocess.run([str(Path(PY).parent / "dvc"), "status", "--json"], cwd=root, env=stage_env(root),
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout or "{}")


def test_two_flows_at_once_second_waits(tmp_path, monkeypatch):
    """Two processes run the real nightly flow (calibrate stage only) on one repo at the same moment."""
    root = make_project(tmp_path / "proj")
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {"calibrate": dvc_yaml["stages"]["calibrate"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True)

    results = both(root, [PY, "-c", FLOW.format(devices=["phone"])], timeout=600)
    for code, text, seconds in results:
        print(f"exit {code} after {seconds:.1f} s")
        assert code == 0, text[-3000:]
    waited = [text for _, text, _ in results if "waiting for another run" in text]
    assert len(waited) == 1, [t[-1500:] for _, t, _ in results]
    assert "calibrate: unchanged, skipped" in waited[0]  # the second found the first's work done

    assert dvc_status(root) == {}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["calibrate"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("TAILOR_ROOT", str(root))
    from tailor import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name("tailor").experiment_id
    parents = c.search_runs([exp], "tags.`tailor.kind` = 'nightly'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    stage_runs = c.search_runs([exp], "attributes.run_name = 'calibrate'")
    assert sorted(r.data.tags.get("tailor.skipped", "false") for r in stage_runs) == ["false", "true"]
    assert not list((root / "artifacts").glob(".*tmp-*"))


@pytest.mark.slow
def test_two_tailor_runs_at_once_register_one_version(tmp_path):
    """`tailor run` twice at the same moment on the whole test-profile pipeline (phone)."""
    root = make_project(tmp_path / "proj", git=True)
    results = both(root, [PY, "-m", "tailor.cli", "run", "--devices", "phone"], timeout=1500)
    for code, text, seconds in results:
        print(f"exit {code} after {seconds:.1f} s")
        assert code == 0, text[-3000:]
    assert sum("waiting for another run" in text for _, text, _ in results) == 1
    assert registry(root) == [("tailor-phone", 1)]
    assert not [k for k in dvc_status(root) if "laptop" not in k]  # every stage of the phone branch recorded
    assert os.path.isfile(root / "artifacts/export/phone/model.gguf")
