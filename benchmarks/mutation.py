"""Mutation testing summary: reads mutmut's results under mutants/ and writes reports/bench/mutation.json.

Run it through `make mutation` (mutmut pinned there; scope and test selection in pyproject's
[tool.mutmut]). A mutant is one small edit of a line (a flipped comparison, a changed constant, a
removed call); it is killed when a selected test turns red. Mutants no selected test reaches count as
surviving: no test would notice the edit. Kill rate = killed / (killed + survived + no tests + timeout +
suspicious); mutants caught only by a timeout are listed apart.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def summarise(mutants: Path) -> dict:
    files, survivors = {}, []
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(STATUS.get(c, "suspicious") for c in codes.values())
        checked = sum(v for k, v in counts.items() if k not in ("skipped", "not checked"))
        rel = meta.relative_to(mutants).as_posix().removesuffix(".meta")
        files[rel] = dict(sorted(counts.items())) | {
            "total": len(codes), "kill_rate": round(counts["killed"] / checked, 4) if checked else None}
        survivors += [k for k, c in codes.items() if STATUS.get(c) in ("survived", "no tests")]
    killed = sum(f.get("killed", 0) for f in files.values())
    checked = sum(f["total"] - f.get("skipped", 0) - f.get("not checked", 0) for f in files.values())
    pending = sum(f.get("not checked", 0) for f in files.values())
    return {"tool": "mutmut", "version": _version(), "complete": pending == 0, "not_checked": pending,
            "files": files, "killed": killed, "checked": checked,
            "kill_rate": round(killed / checked, 4) if checked else None, "survivors": survivors}


def _version() -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "--version"], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip().splitlines()[-1] if out.returncode == 0 else "unknown"


def main() -> None:
    out = summarise(ROOT / "mutants")
    dest = ROOT / "reports" / "bench" / "mutation.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"mutation: {out['killed']}/{out['checked']} killed ({out['kill_rate']:.1%}) -> {dest}")


if __name__ == "__main__":
    main()
