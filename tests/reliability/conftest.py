"""Session fixtures of the reliability tests (helpers in reliability_harness.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from reliability_harness import make_project, run_stage


def _once(tmp_path_factory, name: str, build: Callable[[Path], float]) -> tuple[Path, float]:
    """A session project built once for all pytest-xdist workers (each worker has its own session, so a
    plain session fixture is built by every worker that needs it: two 2-layer supernet runs instead of one).
    The first worker builds it under a file lock in the run's shared temp root; the others wait for it and
    use the same (read-only) project. `build(dir)` returns the seconds it took."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        d = tmp_path_factory.mktemp(name)
        return d / "proj", build(d)
    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{shared}.lock"):
        done = shared / "done.json"
        if not done.is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            done.write_text(json.dumps({"seconds": build(shared)}))
        return shared / "proj", json.loads(done.read_text())["seconds"]


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory) -> Path:
    """A project with the calibrate stage done (shared read-only: copy it before changing it); the model
    sliced to 2 layers to keep the supernet runs short."""
    def build(d: Path) -> float:
        root = make_project(d / "proj", n_layers=2)
        t0 = time.perf_counter()
        proc = run_stage(root, "calibrate")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return time.perf_counter() - t0

    root, seconds = _once(tmp_path_factory, "calibrated", build)
    print(f"calibrate: {seconds:.1f} s")
    return root


@pytest.fixture(scope="session")
def supernet_ref(calibrated, tmp_path_factory) -> tuple[Path, float]:
    """`calibrated` plus one uninterrupted supernet run: the reference for resume and later stages."""
    def build(d: Path) -> float:
        root = d / "proj"
        shutil.copytree(calibrated, root)
        t0 = time.perf_counter()
        proc = run_stage(root, "supernet")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return time.perf_counter() - t0

    return _once(tmp_path_factory, "supernet", build)
