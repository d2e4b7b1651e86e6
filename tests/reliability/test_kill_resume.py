"""Crash and resume: a run killed with SIGKILL is finished by running it again. Completed stages are
not recomputed, training resumes from its last checkpoint, the final results equal an uninterrupted
run's, and the registry ends with exactly one version."""
from __future__ import annotations

import filecmp
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from reliability_harness import (PY, copy_project, kill_when, make_project, one_line_error, outputs, read_json,
                                 registry, run_stage, stable, stage_env)

pytestmark = pytest.mark.integration
CKPT = ".cache/ckpt/supernet/*/step-*/meta.json"


def test_supernet_killed_after_first_checkpoint_resumes_to_the_same_model(supernet_ref, calibrated, tmp_path):
    ref, ref_seconds = supernet_ref
    proj = copy_project(calibrated, tmp_path / "proj")

    _, killed_at = kill_when([PY, "-m", "steps.supernet"], proj, CKPT)
    assert outputs(proj, "supernet") == []  # killed mid-stage: no output, only the checkpoint
    [meta] = list(proj.glob(CKPT))
    assert meta.parent.name == "step-000001"

    # A checkpoint of another configuration in its place is refused, naming the file.
    good = meta.read_text()
    meta.write_text(json.dumps(json.loads(good) | {"fingerprint": "supernet:another-config"}))
    line = one_line_error(run_stage(proj, "supernet"))
    assert line.startswith(f"tailor supernet: {meta.relative_to(proj)}: checkpoint of another run configuration"), line
    assert outputs(proj, "supernet") == []
    meta.write_text(good)

    t0 = time.perf_counter()
    proc = run_stage(proj, "supernet")
    resumed_seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"supernet uninterrupted {ref_seconds:.1f} s; killed after {killed_at:.1f} s; resumed run {resumed_seconds:.1f} s")

    m, m_ref = read_json(proj / "reports/supernet/metrics.json"), read_json(ref / "reports/supernet/metrics.json")
    assert m["resumed_from"] == 1 and m_ref["resumed_from"] == 0
    assert stable(m) == stable(m_ref)
    assert filecmp.cmp(proj / "reports/supernet/curve.csv", ref / "reports/supernet/curve.csv", shallow=False)
    for f in ("model/model.safetensors", "space.json", "model/config.json"):
        assert filecmp.cmp(proj / "artifacts/supernet" / f, ref / "artifacts/supernet" / f, shallow=False), f
    assert not list((proj / ".cache/ckpt").rglob("meta.json"))  # finished: nothing left to resume


# --- the whole pipeline through DVC, killed at five points ---------------------------------------------

TARGET = "register@phone"
STAGES = ["calibrate", "supernet", "search@phone", "finetune@phone", "evaluate@phone", "export@phone", "register@phone"]


def dvc_repro(root: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(PY).parent / "dvc"), "repro", TARGET], cwd=root, env=stage_env(root, **env),
                          capture_output=True, text=True, timeout=900)
    return proc, time.perf_counter() - t0


def ran(out: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out)


def skipped(out: str) -> list[str]:
    return re.findall(r"Stage '([^']+)' didn't change, skipping", out)


@pytest.mark.slow
def test_pipeline_killed_at_five_points_finishes_like_an_uninterrupted_run(tmp_path):
    ref = make_project(tmp_path / "ref", git=True)
    proc, ref_seconds = dvc_repro(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ran(proc.stdout) == STAGES

    proj = make_project(tmp_path / "proj", git=True)
    dvc = [str(Path(PY).parent / "dvc"), "repro", TARGET]
    log = []
    # 1. supernet: the whole `dvc repro` process group killed right after the first training checkpoint
    log.append(("supernet, after checkpoint 1", *kill_when(dvc, proj, CKPT, timeout=900)))
    # 2. search: every output written, killed before the process exits (DVC has not recorded it)
    proc, s = dvc_repro(proj, TAILOR_CRASH_AT="search@phone:end")
    assert proc.returncode != 0 and "calibrate" in skipped(proc.stdout) and ran(proc.stdout) == STAGES[1:3], proc.stdout
    log.append(("search@phone, at its end", proc.returncode, s))
    # 3. finetune: killed right after its first training checkpoint
    log.append(("finetune@phone, after checkpoint 1",
                *kill_when(dvc, proj, ".cache/ckpt/finetune-phone/*/step-*/meta.json", timeout=900)))
    # 4. export: killed once the GGUF file is written, before parity is checked and the output renamed
    log.append(("export@phone, file written", *kill_when(dvc, proj, "artifacts/export/.phone.tmp-*/model.gguf",
                                                         timeout=900)))
    # 5. register: the version is registered, the process killed before it exits
    proc, s = dvc_repro(proj, TAILOR_CRASH_AT="register@phone:end")
    assert proc.returncode != 0 and ran(proc.stdout)[-1] == "register@phone", proc.stdout
    assert registry(proj) == [("tailor-phone", 1)]
    log.append(("register@phone, at its end", proc.returncode, s))

    proc, final_seconds = dvc_repro(proj)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ran(proc.stdout) == ["register@phone"] and set(skipped(proc.stdout)) == set(STAGES[:-1]), proc.stdout
    for what, code, s in log:
        print(f"killed at {what}: exit {code} after {s:.1f} s")
    print(f"last rerun {final_seconds:.1f} s; uninterrupted run {ref_seconds:.1f} s")

    reports = sorted(p.relative_to(ref) for p in (ref / "reports").rglob("*.json"))
    assert reports == sorted(p.relative_to(proj) for p in (proj / "reports").rglob("*.json"))
    for rel in reports:
        assert stable(read_json(proj / rel)) == stable(read_json(ref / rel)), rel
    for rel in ("reports/supernet/curve.csv", "reports/finetune/phone/curve.csv", "artifacts/export/phone/model.gguf"):
        assert filecmp.cmp(proj / rel, ref / rel, shallow=False), rel
    assert registry(proj) == [("tailor-phone", 1)]  # the rerun reused the version (same sha256)
    assert read_json(proj / "reports/register/phone/metrics.json")["created"] is False
    status = subprocess.run([str(Path(PY).parent / "dvc"), "status", "--json"], cwd=proj, env=stage_env(proj),
                            capture_output=True, text=True, check=True)
    assert not any(k in json.loads(status.stdout or "{}") for k in STAGES)
    assert not [p for p in proj.rglob(".*tmp-*") if ".dvc" not in p.parts]  # no temp paths left
