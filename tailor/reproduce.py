"""`tailor reproduce DEVICE VERSION`: rebuild a registered version from its pinned code and data and
compare hashes.

The version's `git_sha` is checked out in a temporary `git worktree`; the dvc.lock logged when it was
registered (md5-checked against its `dvc_lock_md5` tag) replaces the one at that commit; DVC is
pointed at the project's own remote (`dvc remote modify --local`), `dvc pull` fetches what the lock
pins and `dvc repro export@DEVICE` rebuilds whatever is not up to date (nothing, when the remote holds
it all). The exported file's sha256 must equal the version's `sha256` tag. The register stage is not
run: reproducing must not write into the registry (stages that do run log to a throwaway MLflow store).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tailor import tracking
from tailor.formats import backend



class ReproduceError(RuntimeError):
    """The version cannot be reproduced as registered; the message names the step or input."""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise ReproduceError(f"{what} failed (exit {proc.returncode}): {last}")
    return proc.stdout + proc.stderr


def _dvc() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def _default_remote(repo: Path, env: dict[str, str]) -> tuple[str, str]:
    """(name, absolute url) of the project's default DVC remote; relative local urls resolved."""
    name = _run([_dvc(), "remote", "default"], repo, env, "dvc remote default").strip().splitlines()[-1]
    # `dvc config` prints the one value; `dvc remote list` is a table that wraps long urls at $COLUMNS
    url = _run([_dvc(), "config", f"remote.{name}.url"], repo, env, f"dvc config remote.{name}.url").strip()
    if url:
        if "://" not in url and not os.path.isabs(url):
            url = str((repo / ".dvc" / url).resolve())  # DVC resolves relative urls from .dvc/
        return name, url
    raise ReproduceError(f"{repo}: no DVC remote named {name!r}")


def reproduce(name: str, device: str, version: str, repo: Path, keep: bool = False) -> dict[str, Any]:
    """Rebuild `version` of `name` and compare hashes; returns what ran and whether the hashes match."""
    v = tracking.version(name, version)
    tags = v["tags"]
    for key in ("git_sha", "sha256", "format"):
        if not tags.get(key) or tags[key] == "unknown":
            raise ReproduceError(f"{name} version {version}: no '{key}' tag to reproduce from")
    tmp = Path(tempfile.mkdtemp(prefix="tailor-reproduce-"))
    wt = tmp / "worktree"
    env = dict(os.environ, DVC_NO_ANALYTICS="1", TAILOR_ROOT=str(wt),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    for k in (tracking.PARENT_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result: dict[str, Any] = {"model": name, "version": str(version), "git_sha": tags["git_sha"], "workdir": str(wt)}
    _run(["git", "worktree", "add", "--detach", str(wt), tags["git_sha"]], repo, env, f"git worktree add {tags['git_sha'][:12]}")
    try:
        lock = tracking.run_artifact(tags.get("evidence_run_id") or v["run_id"], "repro/dvc.lock", tmp / "lock")
        if lock is not None:
            md5 = hashlib.md5(lock.read_bytes()).hexdigest()
            if tags.get("dvc_lock_md5") not in (None, md5):
                raise ReproduceError(f"registered dvc.lock has md5 {md5}, the version's tag says {tags['dvc_lock_md5']}")
            shutil.copyfile(lock, wt / "dvc.lock")
            result["dvc_lock"] = "registered"
        else:  # registered before the lock was logged: the commit's own
            md5 = hashlib.md5((wt / "dvc.lock").read_bytes()).hexdigest() if (wt / "dvc.lock").is_file() else "missing"
            result["dvc_lock"] = "git" + ("" if md5 == tags.get("dvc_lock_md5") else " (md5 differs from the registered one)")
        remote, url = _default_remote(repo, env)
        _run([_dvc(), "remote", "modify", "--local", remote, "url", url], wt, env, "dvc remote modify --local")
        result["remote"] = url
        target = f"export@{device}"
        # Pull what the lock pins for the target and its upstream; a missing object is not fatal here
        # (repro rebuilds it), so --allow-missing.
        _run([_dvc(), "pull", "--allow-missing", "--with-deps", target], wt, env, "dvc pull")
        out = _run([_dvc(), "repro", target], wt, env, f"dvc repro {target}")
        result["ran"] = re.findall(r"Running stage '([^']+)'", out)
        result["unchanged"] = re.findall(r"Stage '([^']+)' didn't change", out)
        be = backend(tags["format"])
        out_dir = wt / "artifacts" / "export" / device
        file = be.files(out_dir)[0]
        if not file.is_file():
            raise ReproduceError(f"dvc repro {target} left no {file.relative_to(wt)}")
        result |= {"sha256": be.sha256(out_dir), "registered_sha256": tags["sha256"]}
        result["match"] = result["sha256"] == tags["sha256"]
        return result
    finally:
        if not keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=repo, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
