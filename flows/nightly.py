"""The nightly Prefect flow: the stages of dvc.yaml, one task each, run through `dvc repro` so that the
DAG is defined once and unchanged stages are skipped. An MLflow parent run spans the flow; each stage
process opens its child run under it (TAILOR_PARENT_RUN_ID)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tailor import tracking
from tailor.config import load_params, pick_devices

BAD_INPUT = 2  # exit code of a stage that refused its input: retrying cannot help


class StageFailed(RuntimeError):
    def __init__(self, target: str, code: int, message: str):
        super().__init__(f"{target} failed (exit {code}): {message}")
        self.code = code


def targets(root: Path, devices: list[str]) -> list[str]:
    """dvc.yaml's stages in file order (which is topological), per-device ones expanded."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [t for name, st in stages.items() for t in ([f"{name}@{d}" for d in devices] if "foreach" in st else [name])]


def _bin(name: str) -> str:
    """Prefer the tool next to this interpreter (the project's venv)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def stage_env(parent_run: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    if parent_run:
        env[tracking.PARENT_ENV] = parent_run
    return env


def _no_retry_on_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as e:
        return e.code != BAD_INPUT
    except Exception:
        return True
    return False


@task(retries=1, retry_delay_seconds=[5], retry_condition_fn=_no_retry_on_bad_input, task_run_name="{target}")
def run_stage(target: str, root: str, parent_run: str | None) -> dict:
    """`dvc repro --single-item TARGET`, or record it as skipped when DVC finds nothing changed."""
    log = get_run_logger()
    env = stage_env(parent_run)
    status = subprocess.run([_bin("dvc"), "status", target, "--json"], cwd=root, env=env, capture_output=True, text=True)
    if status.returncode == 0 and json.loads(status.stdout or "{}") == {}:
        log.info("%s: unchanged, skipped", target)
        if parent_run:
            tracking.log_skipped(parent_run, target)
        return {"target": target, "skipped": True, "seconds": 0.0}
    t0 = time.perf_counter()
    proc = subprocess.run([_bin("dvc"), "repro", "--single-item", target], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("tailor ")]
        why = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        code = BAD_INPUT if lines else proc.returncode
        raise StageFailed(target, code, why)
    log.info("%s: done in %.1f s", target, seconds)
    return {"target": target, "skipped": False, "seconds": round(seconds, 1)}


@task(retries=2, retry_delay_seconds=[2, 5])
def push(root: str) -> None:
    """Store artifacts in the DVC remote (a local directory outside the repo by default)."""
    subprocess.run([_bin("dvc"), "push", "-q"], cwd=root, env=stage_env(None), check=True, capture_output=True)


def summary(root: Path, devices: list[str], results: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for d in devices:
        def read(stage: str) -> dict:
            f = root / "reports" / stage / d / "metrics.json"
            return json.loads(f.read_text()) if f.is_file() else {}
        ev, ex, se, rg = read("evaluate"), read("export"), read("search"), read("register")
        rows.append({"device": d, "bits_per_param": se.get("bits_per_param"), "file_bytes": ex.get("file_bytes"),
                     "ppl": ev.get("ppl"), "ppl_base": ev.get("ppl_base"), "piqa": ev.get("piqa"),
                     "piqa_base": ev.get("piqa_base"), "runtime_ppl": ex.get("runtime_ppl"),
                     "gates_passed": ev.get("gates_passed"), "version": rg.get("version")})
    lines = ["# Tailor nightly", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['target']} | {'skipped' if r['skipped'] else 'ran'} | {r['seconds']} |" for r in results]
    return "\n".join(lines), rows


@flow(name="tailor-nightly", log_prints=True)
def nightly(devices: list[str] | None = None, root: str = ".") -> list[dict]:
    """Run every stage of dvc.yaml once, in order, for the given devices (all by default)."""
    rootp = Path(root).resolve()
    os.environ["TAILOR_ROOT"] = str(rootp)
    params = load_params(rootp / "params.yaml")
    devs = pick_devices(params, devices)
    parent = tracking.start_parent("nightly", {"tailor.profile": params.profile, "tailor.devices": ",".join(devs)})
    results, status = [], "FAILED"
    try:
        for target in targets(rootp, devs):
            results.append(run_stage(target, str(rootp), parent))
        push(str(rootp))
        status = "FINISHED"
    finally:
        md, rows = summary(rootp, devs, results)
        tracking.end_parent(parent, status, {f"{r['device']}.{k}": v for r in rows for k, v in r.items()
                                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        create_markdown_artifact(md, key="tailor-nightly-stages", description="stages run or skipped")
        if rows:
            create_table_artifact(rows, key="tailor-nightly-devices", description="per-device results")
    return rows


def deployment(cron: str, timezone: str, name: str = "nightly"):
    """The nightly deployment with the schedule from params.yaml."""
    from prefect.schedules import Cron

    # concurrency_limit=1: two nightly runs never interleave on one registry and one DVC workspace.
    return nightly.to_deployment(name=name, schedule=Cron(cron, timezone=timezone), concurrency_limit=1,
                                 tags=["tailor", "nightly"], description="Tailor nightly compression run")
