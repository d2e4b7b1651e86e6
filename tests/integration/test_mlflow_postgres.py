"""The pipeline's tracking against MLflow on a real PostgreSQL (the shared-services setup of
docs/deploy.md): a nightly parent run, stage child runs with candidates, a skipped stage, then the real
`register` stage process registering a file with its alias, all read back through the same store.

The server comes from TAILOR_TEST_PG_URI (`.ci/run` starts one), else this test starts a throwaway
cluster itself when PostgreSQL's initdb is installed, else it skips saying why."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_server():
    """postgresql://user@127.0.0.1:port: the CI's server, or a throwaway cluster in a temp dir."""
    if os.environ.get("TAILOR_TEST_PG_URI"):
        yield os.environ["TAILOR_TEST_PG_URI"].rstrip("/")
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin) and "
                    "TAILOR_TEST_PG_URI unset: `apt-get install postgresql`, or run .ci/run")
    tmp = Path(tempfile.mkdtemp(prefix="tailor-pg-"))
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(tmp, "postgres", "postgres")
    port, data = _free_port(), tmp / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(tmp / "log"), "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {tmp}", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_tracking(pg_server, tmp_path, monkeypatch):
    """A fresh database per test; MLflow creates its schema there on first use."""
    import psycopg2

    db = f"tailor_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(f"{pg_server}/postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the pinned driver is psycopg2, named here.
    uri = f"{pg_server}/{db}".replace("postgresql://", "postgresql+psycopg2://", 1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TAILOR_ROOT", str(tmp_path))  # artifacts under tmp_path/mlartifacts: outside the repo
    return uri


def _export_outputs(root: Path, device: str) -> None:
    """What export and evaluate leave for `register`: a device file and its measured metrics."""
    from tailor.models.base import sha256_file

    art = root / "artifacts" / "export" / device
    art.mkdir(parents=True)
    (art / "model.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    (art / "subnet.json").write_text(json.dumps({"version": 1, "layers": []}))
    rep = root / "reports"
    (rep / "export" / device).mkdir(parents=True)
    (rep / "evaluate" / device).mkdir(parents=True)
    (rep / "export" / device / "metrics.json").write_text(json.dumps(
        {"sha256": sha256_file(art / "model.gguf"), "file_bytes": 4100, "runtime_ppl": 12.5}))
    (rep / "evaluate" / device / "metrics.json").write_text(json.dumps({"ppl": 12.4, "ppl_base": 11.0, "piqa": 0.6, "piqa_base": 0.62}))
    (rep / "evaluate" / device / "gates.json").write_text(json.dumps(
        {"passed": True, "gates": [{"name": "ppl", "passed": True}]}))


def test_pipeline_tracking_on_postgres(pg_tracking, tmp_path, monkeypatch):
    from tailor import tracking

    t0 = time.perf_counter()
    parent = tracking.start_parent("nightly", {"tailor.profile": "test", "tailor.devices": "phone"})
    print(f"MLflow schema on a fresh PostgreSQL database + parent run: {time.perf_counter() - t0:.1f} s")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)  # what the flow hands each stage
    with tracking.stage_run("search", "phone", params={"n_candidates": 2}) as tr:
        tr.log_metrics({"kl": 0.25, "bytes": 1000})
        tr.log_candidates([{"config_hash": "aa", "kl": 0.25, "chosen": True}, {"config_hash": "bb", "kl": 0.5}])
    tracking.log_skipped(parent, "calibrate")

    # The real register stage, as DVC runs it: its own process, MLflow URI from the environment.
    root = tmp_path
    shutil.copytree(ROOT / "steps", root / "steps", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    _export_outputs(root, "phone")
    proc = subprocess.run([sys.executable, "-m", "steps.register", "--device", "phone"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tracking.end_parent(parent, "FINISHED", {"phone.bytes": 1000})
    print(f"tracking + register stage on PostgreSQL: {time.perf_counter() - t0:.1f} s")

    c = tracking.client()
    assert c.tracking_uri == pg_tracking and pg_tracking.startswith("postgresql+psycopg2://")
    exp = c.get_experiment_by_name("tailor").experiment_id
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_name for r in children} >= {"search@phone", "calibrate", "register@phone"}
    assert len(c.search_runs([exp], "tags.`tailor.kind` = 'candidate'")) == 2
    assert c.get_run(parent).info.status == "FINISHED"
    # Registered, alias read back, tags intact.
    assert [str(mv.version) for mv in c.search_model_versions("name='tailor-phone'")] == ["1"]
    assert tracking.aliases("tailor-phone") == {"candidate": "1"}
    mv = c.get_model_version_by_alias("tailor-phone", "candidate")
    assert mv.tags["sha256"] == json.loads((root / "reports/export/phone/metrics.json").read_text())["sha256"]
    assert json.loads((root / "reports/register/phone/metrics.json").read_text())["version"] == 1
    # The file itself sits in the artifact store outside the database, and reads back byte for byte.
    got = tracking.download(mv.source, tmp_path / "dl")
    assert got.read_bytes() == (root / "artifacts/export/phone/model.gguf").read_bytes()
