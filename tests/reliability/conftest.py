"""Session fixtures of the reliability tests (helpers in reliability_harness.py)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from reliability_harness import make_project, run_stage


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory) -> Path:
    """A project with the calibrate stage done (shared read-only: copy it before changing it); the model
    sliced to 2 layers to keep the supernet runs short."""
    root = make_project(tmp_path_factory.mktemp("calibrated") / "proj", n_layers=2)
    t0 = time.perf_counter()
    proc = run_stage(root, "calibrate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"calibrate: {time.perf_counter() - t0:.1f} s")
    return root


@pytest.fixture(scope="session")
def supernet_ref(calibrated, tmp_path_factory) -> tuple[Path, float]:
    """`calibrated` plus one uninterrupted supernet run: the reference for resume and later stages."""
    root = tmp_path_factory.mktemp("supernet") / "proj"
    shutil.copytree(calibrated, root)
    t0 = time.perf_counter()
    proc = run_stage(root, "supernet")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, seconds
