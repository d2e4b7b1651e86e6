"""Gated promotion: move the `champion` alias of `tailor-<device>` to a version, or roll it back.

Before the alias moves, the version's gate verdicts are re-read (the gates.json logged when it was
registered, cross-checked against its tags) and its registered file is downloaded and re-hashed
against its `sha256` tag. Who may move `champion` at all is the server's decision (see
tailor/server.py); this module refuses what the server cannot know: failed gates, changed files.

Every attempt, refused or not, is appended to an audit log (JSONL, O_APPEND + fsync, one line per
attempt); every alias change is also recorded as an `audit.<ms>` tag on the version it moved to, so
the registry itself carries the champion's history and `--rollback` can replay it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tailor import tracking
from tailor.hashing import sha256_file

AUDIT_ENV = "TAILOR_AUDIT_LOG"
ALIAS = tracking.CHAMPION


class PromotionRefused(RuntimeError):
    """A promotion that must not happen; the message names the gate, the hash or the server's refusal."""


def audit_path(root: Path) -> Path:
    """TAILOR_AUDIT_LOG, else `registry_audit.jsonl` next to mlflow.db (outside artifacts/, not DVC-tracked)."""
    return Path(os.environ.get(AUDIT_ENV) or root / "registry_audit.jsonl")


def append_audit(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, appended atomically (O_APPEND, single write) and fsynced before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def gate_verdicts(v: dict[str, Any], tmp: Path) -> dict[str, str]:
    """name -> "pass"/"fail": from the gates.json logged at registration, which must agree with the
    version's `gate.*` tags; versions registered before that file was logged fall back to the tags."""
    tags = v["tags"]
    tagged = {k[len("gate."):]: val for k, val in tags.items() if k.startswith("gate.")}
    f = tracking.run_artifact(tags["evidence_run_id"], "gates/gates.json", tmp) if tags.get("evidence_run_id") else None
    if f is None:
        if not tagged:
            raise PromotionRefused("no gate verdicts registered with this version")
        return tagged
    logged = json.loads(f.read_text())
    # "indicative" (too few items to tell) is not a pass either: gates.json says why
    verdicts = {g["name"]: g.get("verdict") or ("pass" if g["passed"] else "fail") for g in logged["gates"]}
    if tagged and tagged != verdicts:
        raise PromotionRefused(f"gate verdicts in the logged gates.json {verdicts} differ from the version's tags {tagged}")
    for g in logged["gates"]:
        if not g["passed"]:
            how = "is only indicative" if verdicts[g["name"]] == "indicative" else "failed"
            raise PromotionRefused(f"gate {g['name']} {how}: {g.get('reason', '')}".rstrip(": "))
    return verdicts


def _artifact_sha256(path: Path, fmt: str | None) -> str:
    """sha256 of a registered artifact: one file, or a folder of the format's files in its order."""
    if not path.is_dir():
        return sha256_file(path)
    from tailor.formats import backend

    if fmt is None:
        raise PromotionRefused(f"{path.name}: a multi-file artifact without a format tag")
    return backend(fmt).sha256(path)


def verify(name: str, version: str) -> dict[str, Any]:
    """Re-read the gates and re-hash the registered file; raises PromotionRefused naming what failed."""
    try:
        v = tracking.version(name, version)
    except Exception as e:  # noqa: BLE001
        if tracking.is_permission_denied(e):
            raise
        raise PromotionRefused(f"{name} has no version {version!r}") from None
    with tempfile.TemporaryDirectory(prefix="tailor-promote-") as tmp:
        gates = gate_verdicts(v, Path(tmp) / "gates")
        failed = [g for g, verdict in gates.items() if verdict != "pass"]
        if failed:
            raise PromotionRefused(f"gate {failed[0]} failed")
        want = v["tags"].get("sha256")
        if not want:
            raise PromotionRefused("no sha256 registered with this version")
        got = _artifact_sha256(tracking.download(v["source"], Path(tmp) / "file"), v["tags"].get("format"))
    if got != want:
        raise PromotionRefused(f"hash mismatch: {v['source']} has sha256 {got[:16]}..., registered {want[:16]}...")
    return {"gates": gates, "sha256": got}


def history(name: str) -> list[dict[str, Any]]:
    """Every recorded champion move of `name`, oldest first (from the versions' `audit.*` tags)."""
    events = []
    for v in tracking.versions(name):
        for k, val in v["tags"].items():
            if k.startswith("audit."):
                events.append(json.loads(val))
    return sorted(events, key=lambda e: e["ms"])


def _previous_champion(name: str) -> tuple[str | None, str | None]:
    """(current, previous) champion by replaying the history: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for e in history(name):
        if e["action"] == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != e["to"]:
            stack.append(e["to"])
    current = tracking.aliases(name).get(ALIAS)
    if not stack or stack[-1] != current:
        return current, None  # moved outside `tailor promote`: no trustworthy history to roll back along
    return current, (stack[-2] if len(stack) > 1 else None)


def move(name: str, version: str | None, *, root: Path, reason: str = "", rollback: bool = False) -> dict[str, Any]:
    """Promote `version` (or roll back to the previous champion): verify, move the alias, record it."""
    now = time.time()
    record: dict[str, Any] = {"ms": int(now * 1000), "when": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                              "who": tracking.whoami(), "action": "rollback" if rollback else "promote",
                              "model": name, "alias": ALIAS, "reason": reason, "from": None,
                              "to": None if version is None else str(version)}
    log = audit_path(root)
    try:
        current = tracking.aliases(name).get(ALIAS)
        if rollback:
            current, version = _previous_champion(name)
            record["from"] = current
            if version is None:
                raise PromotionRefused(f"{name} has no previous champion to roll back to")
        record |= {"from": current, "to": str(version)}
        record |= verify(name, str(version))
        try:
            tracking.set_alias(name, ALIAS, str(version))
        except Exception as e:  # noqa: BLE001 - the server's refusal, named as such
            if tracking.is_permission_denied(e):
                raise PromotionRefused(f"the server refused {record['who']}: {str(e).splitlines()[0][:200]}") from None
            raise
    except PromotionRefused as e:
        append_audit(log, record | {"outcome": "refused", "why": str(e)})
        raise
    record["outcome"] = "moved"
    tracking.set_version_tags(name, str(version), {f"audit.{record['ms']}": json.dumps(record, sort_keys=True)})
    append_audit(log, record)
    return record
