"""Gated promotion on the embedded sqlite registry: `champion` moves only to a version whose logged
gates pass and whose registered file still hashes to its `sha256` tag; every attempt is in the audit
log, every move in the version's tags; --rollback replays the recorded history."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailor import promote, tracking

ROOT = Path(__file__).resolve().parents[2]


def register(tmp: Path, name: str, gates_pass: bool, ppl_verdict: str | None = None) -> tuple[str, Path]:
    """A version as steps/register.py makes it: file, gate tags, gates.json + dvc.lock evidence."""
    d = tmp / f"v{os.urandom(3).hex()}"
    d.mkdir()
    f = d / "model.gguf"
    f.write_bytes(b"GGUF" + os.urandom(256))
    ppl = {"name": "ppl_increase", "passed": gates_pass, "reason": "perplexity 9.0 vs base 8.0"}
    if ppl_verdict:
        ppl["verdict"] = ppl_verdict
    gates = {"passed": gates_pass, "gates": [ppl, {"name": "group_worsening", "passed": True, "reason": "ok"}]}
    (d / "gates.json").write_text(json.dumps(gates))
    (d / "dvc.lock").write_text("schema: '2.0'\n")
    tags = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "gates_passed": str(gates_pass),
            **{f"gate.{g['name']}": g.get("verdict") or ("pass" if g["passed"] else "fail") for g in gates["gates"]}}
    with tracking.stage_run("register", "phone") as tr:
        v, _ = tracking.register(name, tr, f, tags, "candidate", evidence={"gates": d / "gates.json", "repro": d / "dvc.lock"})
    return v, Path(tracking.version(name, v)["source"].removeprefix("file://"))


@pytest.fixture
def audit(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(promote.AUDIT_ENV, str(tmp_path / "audit" / "registry_audit.jsonl"))
    return tmp_path / "audit" / "registry_audit.jsonl"


def test_champion_moves_only_through_gates_and_hashes(audit, tmp_path):
    name = "tailor-phone"
    v1, _ = register(tmp_path, name, True)
    v2, f2 = register(tmp_path, name, True)
    v3, _ = register(tmp_path, name, False)

    assert promote.move(name, v1, root=tmp_path, reason="first")["from"] is None
    rec = promote.move(name, v2, root=tmp_path, reason="better")
    assert (rec["from"], rec["to"], rec["gates"]) == (v1, v2, {"ppl_increase": "pass", "group_worsening": "pass"})
    with pytest.raises(promote.PromotionRefused, match="gate ppl_increase failed: perplexity 9.0"):
        promote.move(name, v3, root=tmp_path)
    assert tracking.aliases(name)["champion"] == v2

    back = promote.move(name, None, root=tmp_path, rollback=True, reason="regression")
    assert (back["action"], back["from"], back["to"]) == ("rollback", v2, v1)
    f2.write_bytes(f2.read_bytes() + b"tampered")  # the registered file of v2 changes in the store
    with pytest.raises(promote.PromotionRefused, match="hash mismatch"):
        promote.move(name, v2, root=tmp_path)
    with pytest.raises(promote.PromotionRefused, match="no previous champion"):
        promote.move(name, None, root=tmp_path, rollback=True)
    assert tracking.aliases(name) == {"candidate": v3, "champion": v1}

    log = promote.read_audit(audit)
    assert [(r["action"], r["to"], r["outcome"]) for r in log] == [
        ("promote", v1, "moved"), ("promote", v2, "moved"), ("promote", v3, "refused"),
        ("rollback", v1, "moved"), ("promote", v2, "refused"), ("rollback", None, "refused")]
    assert all(r["who"] and r["when"] and "reason" in r for r in log)
    assert "hash mismatch" in log[4]["why"] and log[1]["reason"] == "better"
    # every move is also on the version it moved to, in the registry itself
    v1_audit = [json.loads(t) for k, t in tracking.version(name, v1)["tags"].items() if k.startswith("audit.")]
    assert sorted((a["action"], a["from"]) for a in v1_audit) == [("promote", None), ("rollback", v2)]


def test_an_indicative_gate_is_not_a_pass(audit, tmp_path):
    v, _ = register(tmp_path, "tailor-phone", False, ppl_verdict="indicative")  # too few items to tell
    with pytest.raises(promote.PromotionRefused, match="gate ppl_increase is only indicative: perplexity 9.0"):
        promote.move("tailor-phone", v, root=tmp_path)


def test_gates_json_and_tags_must_agree(audit, tmp_path):
    v, _ = register(tmp_path, "tailor-phone", True)
    tracking.set_version_tags("tailor-phone", v, {"gate.group_worsening": "fail"})  # tags edited afterwards
    with pytest.raises(promote.PromotionRefused, match="differ from the version's tags"):
        promote.move("tailor-phone", v, root=tmp_path)


def test_cli_promote_names_the_failing_gate(audit, tmp_path):
    from tailor.cli import app

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    v_bad, _ = register(tmp_path, "tailor-phone", False)
    r = CliRunner().invoke(app, ["promote", "phone", v_bad, "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 1 and "gate ppl_increase failed" in r.output, r.output
    v_ok, _ = register(tmp_path, "tailor-phone", True)
    r = CliRunner().invoke(app, ["promote", "phone", v_ok, "--reason", "ok", "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 0 and f"champion (none) -> {v_ok}" in r.output, r.output
    r = CliRunner().invoke(app, ["promote", "watch", "1", "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 2 and "unknown device 'watch'" in r.output
    r = CliRunner().invoke(app, ["promote", "phone", "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 2 and "VERSION" in r.output
    r = CliRunner().invoke(app, ["status", "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 0 and "champion" in r.output and "candidate" in r.output, r.output
