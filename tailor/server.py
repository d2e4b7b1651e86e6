"""`tailor server`: an MLflow tracking server on 127.0.0.1 with authentication and Tailor's roles.

Roles (users on the server) and what the server grants them:
- `pipeline`: EDIT on the `tailor` experiment and on every `tailor-<device>` model: runs, artifacts,
  new versions, version tags, alias `candidate`. Not `champion` (see tracking.server_authorize).
- `release-manager`: MANAGE on every `tailor-<device>` model: the only non-admin who may move `champion`.
- `auditor`: nothing but the server's default READ.
Passwords come from TAILOR_<ROLE>_PASSWORD (ROLE = ADMIN, PIPELINE, RELEASE_MANAGER, AUDITOR) or from a
JSON file named by TAILOR_CREDENTIALS ({"admin": "...", "pipeline": "...", ...}) that must live outside
the repository and be readable by its owner only. Nothing secret is written to disk by this module.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROLES = ("admin", "pipeline", "release-manager", "auditor")
GRANTS = {"pipeline": {"experiment": "EDIT", "registered_model": "EDIT"},
          "release-manager": {"registered_model": "MANAGE"}}


class ServerError(RuntimeError):
    """Bad credentials or a server that would not start; the message names the input."""


def _env_name(role: str) -> str:
    return f"TAILOR_{role.upper().replace('-', '_')}_PASSWORD"


def credentials(repo: Path) -> dict[str, str]:
    """role -> password, from TAILOR_CREDENTIALS (a file outside `repo`) or TAILOR_<ROLE>_PASSWORD."""
    creds: dict[str, str] = {}
    path = os.environ.get("TAILOR_CREDENTIALS")
    if path:
        f = Path(path).expanduser().resolve()
        if f.is_relative_to(repo.resolve()):
            raise ServerError(f"TAILOR_CREDENTIALS: {f} is inside the repository; keep credentials outside it")
        if not f.is_file():
            raise ServerError(f"TAILOR_CREDENTIALS: {f}: no such file")
        if f.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ServerError(f"TAILOR_CREDENTIALS: {f} is readable by others (chmod 600 it)")
        try:
            creds = {str(k): str(v) for k, v in json.loads(f.read_text()).items()}
        except (ValueError, AttributeError) as e:
            raise ServerError(f"TAILOR_CREDENTIALS: {f}: not a JSON object of role -> password ({e})") from None
    for role in ROLES:
        if os.environ.get(_env_name(role)):
            creds[role] = os.environ[_env_name(role)]
    missing = [r for r in ROLES if not creds.get(r)]
    if missing:
        raise ServerError(f"credentials: no password for {', '.join(missing)} "
                          f"(set {', '.join(_env_name(r) for r in missing)} or TAILOR_CREDENTIALS)")
    short = [r for r in ROLES if len(creds[r]) < 12]
    if short:  # MLflow's own rule; failing here names the role instead of a server-side 400
        raise ServerError(f"credentials: password of {', '.join(short)} is shorter than 12 characters")
    return creds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _auth_ini(data: Path) -> Path:
    """The basic-auth config. No password in it: the admin's comes through MLFLOW_AUTH_ADMIN_PASSWORD."""
    ini = data / "basic_auth.ini"
    tmp = ini.with_suffix(".tmp")
    tmp.write_text("[mlflow]\n"
                   "default_permission = READ\n"
                   f"database_uri = sqlite:///{data / 'basic_auth.db'}\n"
                   "admin_username = admin\n"
                   "authorization_function = tailor.tracking:server_authorize\n"
                   # PBKDF2 per request costs ~0.3 s of CPU; one worker, so the cache is never stale.
                   "auth_cache_ttl_seconds = 300\n")
    os.replace(tmp, ini)
    return ini


@dataclass
class Server:
    url: str
    data: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(data: Path, creds: dict[str, str], models: list[str], port: int | None = None,
          timeout: float = 120.0) -> Server:
    """Start the server on 127.0.0.1, wait until it answers, create users, experiment, models, grants."""
    from tailor import tracking

    data = data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(_auth_ini(data)), MLFLOW_AUTH_ADMIN_PASSWORD=creds["admin"],
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_AUTH_ADMIN_USERNAME="admin")
    # CSRF key of the web UI's forms: one worker, so a fresh random key per start is enough.
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    for v in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(v, None)
    log = open(data / "server.log", "ab")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
           "--artifacts-destination", str(data / "mlartifacts")]
    proc = subprocess.Popen(cmd, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(url, data, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerError(f"mlflow server exited with {proc.returncode}; see {data / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"mlflow server did not answer on {url} within {timeout:.0f} s; see {data / 'server.log'}")
        time.sleep(0.5)
    try:
        tracking.bootstrap_server(url, ("admin", creds["admin"]), {r: creds[r] for r in ROLES if r != "admin"},
                                  GRANTS, models)
    except Exception:
        server.stop()
        raise
    return server
