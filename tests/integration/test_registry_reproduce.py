"""`tailor reproduce`: a registered version is rebuilt from its git sha, its registered dvc.lock and
the DVC remote in a temp worktree, and the exported file's hash is compared with the registered one.
The fast test builds a small git + DVC project with the same stage names; the slow one reproduces
the `candidate` that `make run` registered in this repository."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tailor import tracking
from tailor.reproduce import ReproduceError, reproduce

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
DVC = str(Path(sys.executable).parent / "dvc")


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {(proc.stderr + proc.stdout)[-2000:]}"
    return proc.stdout


@pytest.fixture
def project(tmp_path, mlflow_uri):
    """A git repo whose dvc.yaml has `export@phone` (seeded file) upstream of nothing else, pushed to a
    local remote given by a relative url, as in this repo; one version registered from it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "t@example.com"], repo)
    sh(["git", "config", "user.name", "t"], repo)
    sh([DVC, "init", "-q"], repo)
    sh([DVC, "remote", "add", "-d", "local", "../remote"], repo)  # a relative url, like ours
    (repo / "make.py").write_text("import hashlib, pathlib, sys\n"
                                  "d = pathlib.Path('artifacts/export') / sys.argv[1]; d.mkdir(parents=True, exist_ok=True)\n"
                                  "seed = pathlib.Path('seed.txt').read_bytes()\n"
                                  "(d / 'model.gguf').write_bytes(b''.join(hashlib.sha256(seed + bytes([i])).digest() for i in range(64)))\n")
    (repo / "seed.txt").write_text("tailor\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"export": {"foreach": {"phone": {"format": "gguf"}}, "do": {
        "cmd": f"{sys.executable} make.py ${{key}}", "deps": ["make.py", "seed.txt"],
        "outs": ["artifacts/export/${key}"]}}}}))
    sh([DVC, "repro"], repo)
    sh([DVC, "push"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "pipeline"], repo)
    sha = sh(["git", "rev-parse", "HEAD"], repo).strip()
    f = repo / "artifacts/export/phone/model.gguf"
    lock = repo / "dvc.lock"
    tags = {"git_sha": sha, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "format": "gguf",
            "dvc_lock_md5": hashlib.md5(lock.read_bytes()).hexdigest()}
    with tracking.stage_run("register", "phone") as tr:
        v, _ = tracking.register("tailor-phone", tr, f, tags, "candidate", evidence={"repro": lock})
    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote holds the data now
    return repo, v


def test_reproduce_pulls_and_matches(project):
    repo, v = project
    r = reproduce("tailor-phone", "phone", v, repo)
    assert r["match"] and r["dvc_lock"] == "registered" and r["ran"] == [], r
    assert r["remote"] == str((repo.parent / "remote").resolve())
    assert sh(["git", "worktree", "list"], repo).count("\n") == 1  # the temp worktree is gone


def test_reproduce_reports_a_mismatch(project):
    repo, v = project
    # A later commit changes the stage's input; the registered dvc.lock still pins the old one, so
    # DVC rebuilds (the pull finds the old object, but the seed at this commit differs) ...
    (repo / "seed.txt").write_text("changed\n")
    sh(["git", "commit", "-qam", "new seed"], repo)
    tracking.set_version_tags("tailor-phone", v, {"git_sha": sh(["git", "rev-parse", "HEAD"], repo).strip()})
    r = reproduce("tailor-phone", "phone", v, repo)
    assert r["ran"] == ["export@phone"] and not r["match"], r
    tracking.set_version_tags("tailor-phone", v, {"dvc_lock_md5": "0" * 32})  # ... and a tampered lock is refused
    with pytest.raises(ReproduceError, match="registered dvc.lock has md5"):
        reproduce("tailor-phone", "phone", v, repo)


@pytest.mark.slow
def test_reproduce_make_run_candidate(monkeypatch):
    """The version `make run` registered in this repo (its `candidate`) reproduces with matching hashes."""
    from tailor.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TAILOR_ROOT", str(ROOT))
    for device in ("phone", "laptop"):
        version = tracking.aliases(f"tailor-{device}").get("candidate")
        assert version, f"no candidate for {device}: run `make run` first"
        r = CliRunner().invoke(app, ["reproduce", device, version, "--params", str(ROOT / "params.yaml")])
        assert r.exit_code == 0 and "hashes match" in r.output, r.output
