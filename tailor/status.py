"""`tailor status`: the last nightly runs with their stages, and where each device's aliases point."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tailor import tracking


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


def collect(devices: list[str], prefix: str, limit: int = 5) -> dict[str, Any]:
    """Plain data for the CLI (and tests): runs newest first; per device, alias -> version + key tags."""
    runs = []
    for r in tracking.nightly_runs(limit):
        seconds = (r["end_time"] - r["start_time"]) / 1000 if r["end_time"] else None
        runs.append({"run_id": r["run_id"], "started": _when(r["start_time"]), "status": r["status"],
                     "profile": r["profile"], "seconds": seconds,
                     "stages": [{"name": s["name"], "state": "skipped" if s["skipped"] else s["status"].lower()}
                                for s in r["stages"]]})
    models = {}
    for d in devices:
        name = tracking.registered_name(prefix, d)
        entry = {}
        for alias, version in sorted(tracking.aliases(name).items()):
            tags = tracking.version(name, version)["tags"]
            entry[alias] = {"version": version, "gates_passed": tags.get("gates_passed", "?"),
                            "sha256": tags.get("sha256", "")[:12], "git_sha": tags.get("git_sha", "")[:10]}
        models[name] = entry
    return {"runs": runs, "models": models}
