"""`tailor server` credentials: from TAILOR_<ROLE>_PASSWORD or an owner-only file outside the repo;
anything else is refused with one line naming the input."""
import json
from pathlib import Path

import pytest

from tailor import server

ROOT = Path(__file__).resolve().parents[2]
ENV = {r: f"TAILOR_{r.upper().replace('-', '_')}_PASSWORD" for r in server.ROLES}


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for v in [*ENV.values(), "TAILOR_CREDENTIALS"]:
        monkeypatch.delenv(v, raising=False)


def test_env_and_file(monkeypatch, tmp_path):
    for r, v in ENV.items():
        monkeypatch.setenv(v, f"{r}-password-0123")
    assert server.credentials(ROOT)["release-manager"] == "release-manager-password-0123"
    f = tmp_path / "creds.json"
    f.write_text(json.dumps({r: "from-the-file-0123" for r in server.ROLES}))
    f.chmod(0o600)
    monkeypatch.setenv("TAILOR_CREDENTIALS", str(f))
    monkeypatch.delenv(ENV["auditor"])
    creds = server.credentials(ROOT)
    assert creds["auditor"] == "from-the-file-0123" and creds["admin"] == "admin-password-0123"  # env wins


def test_refusals(monkeypatch, tmp_path):
    with pytest.raises(server.ServerError, match="no password for admin, pipeline.*TAILOR_ADMIN_PASSWORD"):
        server.credentials(ROOT)
    f = tmp_path / "creds.json"
    f.write_text(json.dumps({r: "x" * 12 for r in server.ROLES}))
    f.chmod(0o644)
    monkeypatch.setenv("TAILOR_CREDENTIALS", str(f))
    with pytest.raises(server.ServerError, match="readable by others"):
        server.credentials(ROOT)
    monkeypatch.setenv("TAILOR_CREDENTIALS", str(ROOT / "params.yaml"))
    with pytest.raises(server.ServerError, match="inside the repository"):
        server.credentials(ROOT)
    f.chmod(0o600)
    f.write_text(json.dumps({r: "short" for r in server.ROLES}))
    monkeypatch.setenv("TAILOR_CREDENTIALS", str(f))
    with pytest.raises(server.ServerError, match="shorter than 12"):
        server.credentials(ROOT)
