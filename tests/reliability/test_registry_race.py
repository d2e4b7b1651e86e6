"""Two processes register the same file for the same device at the same instant (sqlite store, the model
not yet registered): one version holds that sha256, both processes report it, neither dies.

Two variants: the local store as shipped (registrations serialised by a per-model file lock), and the
lock taken out, as with a tracking server no file lock can cover (the processes then settle on the
lowest version of the sha256 and the other deletes its duplicate)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from reliability_harness import ROOT

CHILD = textwrap.dedent("""
    import contextlib, json, os, sys, time
    from pathlib import Path
    from tailor import tracking
    if sys.argv[3] == "no-lock":  # what a tracking-server store gets: no lock spans the machines
        tracking.registry_lock = lambda name: contextlib.nullcontext()
    f, barrier = Path(sys.argv[1]), Path(sys.argv[2])
    with tracking.stage_run("register", "phone") as tr:
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 2:  # both processes imported MLflow and opened their run
            time.sleep(0.002)
        v, created = tracking.register("tailor-phone", tr, f, {"sha256": sys.argv[4]}, "candidate")
    print(json.dumps([v, created]))
""")


@pytest.mark.parametrize("mode", ["lock", "no-lock"])
def test_two_processes_register_one_file_once(tmp_path, mlflow_uri, mode):
    from tailor import tracking

    tracking.configure()  # the store and experiment exist (as after any earlier stage); the model does not
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "TAILOR_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT),
           "HOME": str(tmp_path), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(f), str(barrier), mode, sha], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(tuple(json.loads(out.strip().splitlines()[-1])))
    versions = tracking.versions("tailor-phone")
    holding = [v for v in versions if v["tags"].get("sha256") == sha]
    assert len(holding) == 1, versions
    v = str(holding[0]["version"])
    assert sorted(results) == [(v, False), (v, True)]  # both report the survivor; exactly one created it
    assert tracking.aliases("tailor-phone") == {"candidate": v}
