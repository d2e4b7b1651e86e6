"""Harness of the reliability tests: a temp copy of the project on the `test` profile, stages
run as DVC runs them (`python -m steps.<stage>` in a subprocess), and what a failed run left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
COPY = ["tailor", "steps", "flows", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvcignore",
        ".gitignore"]
# Metrics that measure time or this process's share of the work, not the result.
VOLATILE = {"train_seconds", "tokens_per_s", "runtime_ppl_seconds", "validation_s", "resumed_from", "tokens",
            "created", "seconds", "runtime_s"}


def make_project(dest: Path, git: bool = False, n_layers: int | None = None) -> Path:
    """The code and params of this repo in `dest`, profile `test` (real model sliced to 4 layers, or
    to `n_layers`)."""
    dest.mkdir(parents=True)
    for rel in COPY:
        src, dst = ROOT / rel, dest / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    text = (dest / "params.yaml").read_text()
    text = text.replace("profile: quick", "profile: test", 1)
    if n_layers is not None:
        text = text.replace("model: {n_layers: 4}", f"model: {{n_layers: {n_layers}}}", 1)
        assert f"n_layers: {n_layers}}}" in text
    (dest / "params.yaml").write_text(text)
    if git:
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
            subprocess.run(cmd, cwd=dest, check=True)
    return dest


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", TAILOR_ROOT=str(root), PYTHONPATH=str(root),
               PATH=f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def run_stage(root: Path, stage: str, device: str | None = None, params: str | None = None,
              timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", f"steps.{stage}"] + (["--device", device] if device else []) + (["--params", params] if params else [])
    return subprocess.run(cmd, cwd=root, env=stage_env(root, **env), capture_output=True, text=True, timeout=timeout)


def kill_when(cmd: list[str], root: Path, appears: str, timeout: float = 300, **env: str) -> tuple[int, float]:
    """Start `cmd` in its own process group, SIGKILL the whole group as soon as a path matching the
    glob `appears` exists under `root`; returns (exit code, seconds until the kill)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=stage_env(root, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        if any(root.glob(appears)):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    code = proc.wait()
    if code != -signal.SIGKILL:
        raise AssertionError(f"{cmd} ended with {code} before {appears} appeared: {proc.stderr.read()[-2000:]}")
    return code, time.perf_counter() - t0


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The stage's error: exit code 2 and exactly one line on stderr starting with `tailor `."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tailor ")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def outputs(root: Path, stage: str, device: str | None = None) -> list[str]:
    """Every path the stage may have written (its artifact and report dirs, temp paths included)."""
    found = []
    for top in ("artifacts", "reports"):
        d = root / top / stage
        if device:
            found += [p.relative_to(root).as_posix() for p in d.glob(f".{device}*")]
            d = d / device
        elif d.parent.is_dir():
            found += [p.relative_to(root).as_posix() for p in d.parent.glob(f".{stage}*")]
        if d.exists():
            found += [p.relative_to(root).as_posix() for p in [d, *d.rglob("*")]]
    return found


def registry(root: Path) -> list[tuple[str, int]]:
    """(registered model, version) rows in the project's MLflow store (none when it has no store)."""
    db = root / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        if "model_versions" not in tables:
            return []
        return sorted(con.execute("select name, version from model_versions").fetchall())


def volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith(("_seconds", "_s", "per_s")) or "seconds" in key


def stable(metrics):
    """Metrics without timings (what must be equal between an interrupted and an uninterrupted run)."""
    if isinstance(metrics, list):
        return [stable(v) for v in metrics]
    if not isinstance(metrics, dict):
        return metrics
    return {k: stable(v) for k, v in metrics.items() if not volatile(k)}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def copy_project(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", ".cache"))
    return dest
