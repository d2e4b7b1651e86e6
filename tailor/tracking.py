"""MLflow helpers: the one place the library and the steps touch MLflow.

Defaults are embedded: a sqlite store `mlflow.db` and artifacts in `mlartifacts/` at the project
root (override with MLFLOW_TRACKING_URI). The nightly flow opens a parent run and passes its id to
each stage process in TAILOR_PARENT_RUN_ID; each stage opens a child run named after the stage.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

EXPERIMENT = "tailor"
PARENT_ENV = "TAILOR_PARENT_RUN_ID"


def _mlflow():
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    import mlflow

    return mlflow


def project_root() -> Path:
    return Path(os.environ.get("TAILOR_ROOT", Path.cwd())).resolve()


def configure() -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    mlflow = _mlflow()
    root = project_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        location = None if uri.startswith("http") else (root / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent process
            pass
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def client():
    configure()
    return _mlflow().MlflowClient()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in _flat(d).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class StageRun:
    """What a stage may do with its MLflow run."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        m = numeric(metrics)
        if m:
            _mlflow().log_metrics(m, step=step)

    def log_curve(self, curve: list[dict], key: str = "loss") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(f"curve.{key}", float(p[key]), now, int(p["step"])) for p in curve if key in p]
        for i in range(0, len(ms), 900):
            _mlflow().MlflowClient().log_batch(self.run_id, metrics=ms[i: i + 900])

    def set_tags(self, tags: dict[str, Any]) -> None:
        _mlflow().set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifact(str(path), artifact_path)

    def log_candidates(self, rows: list[dict[str, Any]]) -> None:
        """One child run per candidate, written in batches (hundreds cost seconds, not minutes)."""
        from mlflow.entities import Metric, Param, RunTag

        c = _mlflow().MlflowClient()
        exp = c.get_run(self.run_id).info.experiment_id
        now = int(time.time() * 1000)
        for row in rows:
            run = c.create_run(exp, run_name=f"candidate-{row.get('config_hash', '')}",
                               tags={"mlflow.parentRunId": self.run_id, "tailor.kind": "candidate"})
            metrics = [Metric(k, v, now, 0) for k, v in numeric(row).items()]
            params = [Param(k, str(v)) for k, v in row.items() if isinstance(v, str)]
            c.log_batch(run.info.run_id, metrics=metrics, params=params,
                        tags=[RunTag("tailor.chosen", str(bool(row.get("chosen", False))))])
            c.set_terminated(run.info.run_id)


@contextlib.contextmanager
def stage_run(stage: str, device: str | None = None, params: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """A run named after the stage (`search@phone` for per-device stages), child of the nightly run."""
    mlflow = _mlflow()
    configure()
    name = f"{stage}@{device}" if device else stage
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"tailor.stage": stage, **({"tailor.device": device} if device else {})}
    with mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(params).items()})
        yield StageRun(run.info.run_id)


def start_parent(name: str, tags: dict[str, str]) -> str:
    """Open the nightly parent run (terminated by `end_parent`); returns its id."""
    c = client()
    exp = configure()
    return c.create_run(exp, run_name=name, tags={"tailor.kind": "nightly", **tags}).info.run_id


def end_parent(run_id: str, status: str = "FINISHED", metrics: dict[str, Any] | None = None) -> None:
    c = client()
    now = int(time.time() * 1000)
    if metrics:
        from mlflow.entities import Metric

        c.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numeric(metrics).items()])
    c.set_terminated(run_id, status=status)


def log_skipped(parent_id: str, name: str) -> None:
    """A child run that records a stage DVC found unchanged (so every nightly run shows every stage)."""
    c = client()
    exp = c.get_run(parent_id).info.experiment_id
    run = c.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent_id, "tailor.skipped": "true"})
    c.set_terminated(run.info.run_id)


def registered_name(prefix: str, device: str) -> str:
    return f"{prefix}{device}"


def register(name: str, run: StageRun, file: Path, tags: dict[str, str], alias: str) -> tuple[str, bool]:
    """Register `file` as a new version of `name` with `tags` and point `alias` at it.

    Idempotent on the file's sha256: a version holding the same file is reused, not duplicated.
    Returns (version, created)."""
    c = _mlflow().MlflowClient()
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name, tags={"tailor.device": name})
    for mv in c.search_model_versions(f"name='{name}'"):
        if mv.tags.get("sha256") == tags["sha256"]:
            c.set_registered_model_alias(name, alias, mv.version)
            return str(mv.version), False
    run.log_artifact(file, "model")
    art = c.get_run(run.run_id).info.artifact_uri.rstrip("/") + f"/model/{file.name}"
    mv = c.create_model_version(name, source=art, run_id=run.run_id, tags={k: str(v) for k, v in tags.items()})
    c.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version), True


def aliases(name: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in client().get_registered_model(name).aliases.items()}
    except Exception:
        return {}
