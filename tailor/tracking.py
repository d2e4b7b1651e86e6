"""MLflow helpers: the one place the library and the steps touch MLflow.

Defaults are embedded: a sqlite store `mlflow.db` and artifacts in `mlartifacts/` at the project
root (override with MLFLOW_TRACKING_URI). The nightly flow opens a parent run and passes its id to
each stage process in TAILOR_PARENT_RUN_ID; each stage opens a child run named after the stage.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
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
def stage_run(stage: str, device: str | None = None, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """A run named after the stage (`search@phone` for per-device stages), child of the nightly run;
    `tags` (e.g. the base model's name and hash) are set on it."""
    mlflow = _mlflow()
    configure()
    name = f"{stage}@{device}" if device else stage
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"tailor.stage": stage, **({"tailor.device": device} if device else {}), **(tags or {})}
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


def register(name: str, run: StageRun, file: Path | list[Path], tags: dict[str, str], alias: str,
             evidence: dict[str, Path] | None = None) -> tuple[str, bool]:
    """Register `file` (or an artifact of several files, main file first: an ONNX model with its
    weights beside it) as a new version of `name` with `tags` and point `alias` at it; the version's
    source is the file, or the folder holding all of the artifact's files.

    Idempotent on the file's sha256: a version holding the same file is reused, not duplicated.
    `evidence` files (e.g. {"repro": dvc.lock, "gates": gates.json}) are logged in the run under
    those folders and the version is tagged `evidence_run_id`, so promotion can re-read the gates and
    `tailor reproduce` can fetch the exact dvc.lock. A later run that registers the same file with
    different tags (re-evaluated under new gates, or built by a newer commit) brings the version's tags
    and evidence up to that run, and keeps the run it replaced in `previous_evidence_run_id`: the
    registry shows the latest verdict on the file, never a stale one. Returns (version, created).

    Concurrent registrations of one file (two processes, same model, same moment) give one version:
    with a local store they are serialised per model by a file lock; with a tracking server, which no
    lock here can cover, each process re-reads the versions after creating its own and the one that
    did not create the lowest version of that sha256 deletes its duplicate and reports the survivor."""
    c = _mlflow().MlflowClient()
    with registry_lock(name):
        return _register(c, name, run, file, tags, alias, evidence)


def _already_exists(e: Exception) -> bool:
    return getattr(e, "error_code", None) == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(e)


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """An exclusive flock per registered model beside a local (sqlite/file) store; none for a server."""
    uri = _mlflow().get_tracking_uri()
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///"):]).resolve()
    elif uri.startswith("file:") or "://" not in uri:
        store = Path(uri.removeprefix("file://").removeprefix("file:")).resolve() / ".registry"
    else:
        yield
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(f".{store.name}.{name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _register(c: Any, name: str, run: StageRun, file: Path, tags: dict[str, str], alias: str,
              evidence: dict[str, Path] | None) -> tuple[str, bool]:
    try:
        c.get_registered_model(name)
    except Exception:  # noqa: BLE001 - absent (or unreadable: create says which)
        try:
            c.create_registered_model(name, tags={"tailor.device": name})
        except Exception as e:  # noqa: BLE001
            if not _already_exists(e):  # created meanwhile by a concurrent process: what we wanted
                raise

    def log_evidence() -> None:
        for folder, path in (evidence or {}).items():
            run.log_artifact(path, folder)

    for mv in c.search_model_versions(f"name='{name}'"):
        if mv.tags.get("sha256") == tags["sha256"]:
            changed = {k: str(v) for k, v in tags.items() if mv.tags.get(k) != str(v)}
            if evidence and (changed or "evidence_run_id" not in mv.tags):
                log_evidence()
                if "evidence_run_id" in mv.tags:
                    changed["previous_evidence_run_id"] = mv.tags["evidence_run_id"]
                changed["evidence_run_id"] = run.run_id
            for k, v in changed.items():
                c.set_model_version_tag(name, mv.version, k, v)
            _set_alias(c, name, alias, mv.version)
            return str(mv.version), False
    files = [file] if isinstance(file, Path) else list(file)
    for f in files:
        run.log_artifact(f, "model")
    log_evidence()
    art = c.get_run(run.run_id).info.artifact_uri.rstrip("/") + "/model" + (f"/{files[0].name}" if len(files) == 1 else "")
    all_tags = {k: str(v) for k, v in tags.items()} | ({"evidence_run_id": run.run_id} if evidence else {})
    mv = c.create_model_version(name, source=art, run_id=run.run_id, tags=all_tags)
    same = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'")
                  if v.tags.get("sha256") == tags["sha256"])
    if same and same[0] != int(mv.version):  # a concurrent registration (server store) got there first
        c.delete_model_version(name, mv.version)
        _set_alias(c, name, alias, str(same[0]))
        return str(same[0]), False
    _set_alias(c, name, alias, mv.version)
    return str(mv.version), True


def _set_alias(c: Any, name: str, alias: str, version: str | int, tries: int = 3) -> None:
    """Point `alias` of model `name` at `version`. MLflow's SQL store reads the alias, then inserts or
    updates it, in two statements: two processes setting a new alias at once both insert, and one fails
    on the table's unique key (seen in tests/reliability/test_registry_race.py, sqlite). The alias exists
    after that failure, so setting it again updates it. Raises whatever else the store raises, and the
    unique-key error after `tries` attempts."""
    for attempt in range(tries):
        try:
            c.set_registered_model_alias(name, alias, str(version))
            return
        except Exception as e:  # noqa: BLE001 - MlflowException wraps the driver's IntegrityError
            if "unique constraint" not in str(e).lower() or attempt == tries - 1:
                raise


def aliases(name: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in client().get_registered_model(name).aliases.items()}
    except Exception:
        return {}


# --- registry reads and alias moves (used by promote / status / reproduce) ---------------------------

CHAMPION = "champion"


def version(name: str, version: str) -> dict[str, Any]:
    """One registered version as plain data: tags, source URI, run id, aliases."""
    mv = client().get_model_version(name, str(version))
    return {"name": name, "version": str(mv.version), "tags": dict(mv.tags), "source": mv.source,
            "run_id": mv.run_id, "aliases": list(mv.aliases)}


def versions(name: str) -> list[dict[str, Any]]:
    return sorted(({"version": str(mv.version), "tags": dict(mv.tags)}
                   for mv in client().search_model_versions(f"name='{name}'")), key=lambda v: int(v["version"]))


def set_alias(name: str, alias: str, version: str) -> None:
    """Move `alias`; a server with `tailor server`'s auth refuses this for users without the right."""
    _set_alias(client(), name, alias, version)


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, str(v))


def download(uri: str, dst: Path) -> Path:
    """Fetch an artifact (a version's `source`, or runs:/ID/path) into `dst`; returns the local path."""
    configure()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep CLI output to its lines
    from mlflow.artifacts import download_artifacts

    dst.mkdir(parents=True, exist_ok=True)
    return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def run_artifact(run_id: str, path: str, dst: Path) -> Path | None:
    """A run's artifact, or None when the run never logged it."""
    try:
        return download(f"runs:/{run_id}/{path}", dst)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for "not there"
        if is_permission_denied(e):
            raise
        return None


def whoami() -> str:
    """The identity MLflow requests carry (the server authenticates it); the OS user otherwise."""
    import getpass

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def is_permission_denied(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "403" in str(exc) or "401" in str(exc)


def nightly_runs(limit: int = 5) -> list[dict[str, Any]]:
    """The last nightly parent runs, newest first, each with its stage child runs."""
    c = client()
    exp = configure()
    parents = c.search_runs([exp], "tags.`tailor.kind` = 'nightly'", order_by=["attributes.start_time DESC"],
                            max_results=limit)
    out = []
    for p in parents:
        kids = c.search_runs([exp], f"tags.mlflow.parentRunId = '{p.info.run_id}'", order_by=["attributes.start_time ASC"])
        out.append({"run_id": p.info.run_id, "start_time": p.info.start_time, "end_time": p.info.end_time,
                    "status": p.info.status, "profile": p.data.tags.get("tailor.profile", ""),
                    "stages": [{"name": k.info.run_name, "status": k.info.status,
                                "skipped": k.data.tags.get("tailor.skipped") == "true"} for k in kids]})
    return out


# --- the authenticated server (`tailor server`) -------------------------------------------------------

def bootstrap_server(uri: str, admin: tuple[str, str], users: dict[str, str], grants: dict[str, dict[str, str]],
                     models: list[str]) -> None:
    """As the admin: create `users` (name -> password), the experiment and `models`, and grant
    `grants` (user -> {"experiment" | "registered_model": permission}). Idempotent (a restart
    re-applies it). Creating models here, not in the pipeline, matters: MLflow gives the creator of
    a registered model MANAGE on it, and MANAGE is what moving `champion` requires."""
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin
    try:
        auth = AuthServiceClient(uri)
        for user, password in users.items():
            try:
                auth.create_user(user, password)
            except Exception:  # exists: keep the stored password in step with the credentials
                auth.update_user_password(user, password)
        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else c.create_experiment(EXPERIMENT)
        for m in models:
            try:
                c.get_registered_model(m)
            except Exception:
                c.create_registered_model(m, tags={"tailor.device": m})
        for user, perms in grants.items():
            for rtype, perm in perms.items():
                for rid in ([exp_id] if rtype == "experiment" else models):
                    auth.grant_user_permission(user, rtype, rid, perm)  # an upsert
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)


def server_authorize():
    """The server's `authorization_function` (MLflow basic-auth config): basic auth as usual, plus one
    rule MLflow's permission levels cannot express. Setting any alias needs only EDIT on the model,
    so this hook refuses setting or deleting the `champion` alias unless the user holds MANAGE on
    that registered model (or is an admin). It runs inside the server, before MLflow's validators."""
    from flask import Response, g, request
    from mlflow.server import auth

    result = auth.authenticate_request_basic_auth()
    if isinstance(result, Response) or g.get("tailor_alias_checked"):
        return result
    g.tailor_alias_checked = True  # the permission lookup below re-enters this hook
    if request.path.endswith("/registered-models/alias") and request.method in ("POST", "DELETE"):
        try:
            alias, name = auth._get_request_param("alias"), auth._get_request_param("name")
        except Exception:  # malformed request: MLflow's own handler answers it
            return result
        if alias == CHAMPION and not auth.store.get_user(result.username).is_admin \
                and not auth._get_registered_model_permission(name).can_manage:
            msg = f"user '{result.username}' may not move alias '{CHAMPION}' of '{name}': needs MANAGE (release manager)"
            return Response(json.dumps({"error_code": "PERMISSION_DENIED", "message": msg}), status=403,
                            mimetype="application/json")
    return result
