"""Roles on a real MLflow server on loopback (`tailor server`'s setup): the server itself refuses the
auditor's and the pipeline's attempts to move `champion`; the release manager's promotion succeeds
when the gates pass and is refused when a gate fails or the registered file changed; the audit log
records every attempt."""
import importlib.util
import json
import os
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailor import promote, server, tracking

ROOT = Path(__file__).resolve().parents[2]
# The same fake versions as the unit tests make (file + gates.json + dvc.lock, as steps/register.py does).
_spec = importlib.util.spec_from_file_location("_promote_unit", ROOT / "tests" / "unit" / "test_promote.py")
_unit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_unit)
register = _unit.register

pytestmark = pytest.mark.integration
MODEL = "tailor-phone"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    home = tmp_path_factory.mktemp("server")
    creds_file = home / "credentials.json"  # outside the repo, owner-only, made up for this test
    creds_file.write_text(json.dumps({r: secrets.token_urlsafe(16) for r in server.ROLES}))
    creds_file.chmod(0o600)
    mp = pytest.MonkeyPatch()
    mp.setenv("TAILOR_CREDENTIALS", str(creds_file))
    creds = server.credentials(ROOT)
    s = server.start(home / "data", creds, [MODEL, "tailor-laptop"])
    yield s, creds
    s.stop()
    mp.undo()


@pytest.fixture
def as_role(srv, monkeypatch, tmp_path):
    s, creds = srv
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.url)
    monkeypatch.setenv("TAILOR_ROOT", str(tmp_path))
    monkeypatch.setenv(promote.AUDIT_ENV, str(tmp_path / "registry_audit.jsonl"))

    def use(role: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", role)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", creds[role])
    return use


def test_server_enforces_who_moves_champion(srv, as_role, tmp_path):
    s, _ = srv
    as_role("pipeline")  # the pipeline registers and sets `candidate`...
    good, _ = register(tmp_path, MODEL, True)
    bad, _ = register(tmp_path, MODEL, False)
    assert tracking.aliases(MODEL) == {"candidate": bad}
    with pytest.raises(Exception) as e:  # ...but the server refuses it `champion`, even with passing gates
        tracking.set_alias(MODEL, "champion", good)
    assert tracking.is_permission_denied(e.value) and "needs MANAGE" in str(e.value)
    with pytest.raises(promote.PromotionRefused, match="the server refused pipeline"):
        promote.move(MODEL, good, root=tmp_path)

    as_role("auditor")  # the auditor reads everything and changes nothing
    assert tracking.version(MODEL, good)["tags"]["gates_passed"] == "True"
    for alias in ("champion", "candidate"):
        with pytest.raises(Exception) as e:
            tracking.set_alias(MODEL, alias, good)
        assert tracking.is_permission_denied(e.value)
    r = CliRunner().invoke(__import__("tailor.cli", fromlist=["app"]).app,
                           ["promote", "phone", good, "--params", str(ROOT / "params.yaml")])
    assert r.exit_code == 1 and "the server refused auditor" in r.output, r.output

    as_role("release-manager")
    rec = promote.move(MODEL, good, root=tmp_path, reason="gates pass")
    assert (rec["who"], rec["from"], rec["to"]) == ("release-manager", None, good)
    with pytest.raises(promote.PromotionRefused, match="gate ppl_increase failed"):
        promote.move(MODEL, bad, root=tmp_path)
    as_role("pipeline")
    changed, _ = register(tmp_path, MODEL, True)
    source = tracking.version(MODEL, changed)["source"]  # mlflow-artifacts:/<exp>/<run>/artifacts/model/...
    stored = s.data / "mlartifacts" / source.removeprefix("mlflow-artifacts:/")
    stored.write_bytes(stored.read_bytes()[:-1] + b"!")  # the file in the server's store changes
    as_role("release-manager")
    with pytest.raises(promote.PromotionRefused, match="hash mismatch"):
        promote.move(MODEL, changed, root=tmp_path)
    assert tracking.aliases(MODEL) == {"candidate": changed, "champion": good}

    log = promote.read_audit(tmp_path / "registry_audit.jsonl")
    assert [(r["who"], r["to"], r["outcome"]) for r in log] == [
        ("pipeline", good, "refused"), ("auditor", good, "refused"), ("release-manager", good, "moved"),
        ("release-manager", bad, "refused"), ("release-manager", changed, "refused")]
    assert "server refused" in log[0]["why"] and "gate ppl_increase" in log[3]["why"] and "hash" in log[4]["why"]
    assert os.stat(tmp_path / "registry_audit.jsonl").st_size > 0
