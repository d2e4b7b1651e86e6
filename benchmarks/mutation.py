"""Mutation testing summary: reads mutmut's results under mutants/ and writes reports/bench/mutation.json.

Run it through `make mutation` (mutmut pinned there) or benchmarks/run_mutation_device.sh (the same run
on a 32-core machine); scope and test selection are pyproject's [tool.mutmut]. A mutant is one small edit
of a line (a flipped comparison, a changed constant, a removed call); it is killed when a selected test
turns red. Mutants no selected test reaches count as surviving: no test would notice the edit. Kill rate =
killed / (killed + survived + no tests + timeout + suspicious); mutants caught only by a timeout are
listed apart. A run cut short leaves mutants "not checked": they are counted apart, outside the rate,
and `complete` is false.

    python benchmarks/mutation.py [--mutants DIR] [--out FILE] [--diffs FILE] [--run-info JSON]
    python benchmarks/mutation.py --merge A.json B.json ... [--out FILE]

--merge combines runs over parts of the scope (e.g. a re-run of the files a change touched): each file's
row comes from the last report that checked any of its mutants, with that report's `run` under
`measured_in`; totals, `below_80pct` and the survivors are recomputed from the rows kept.

--diffs writes each surviving mutant's diff (as `mutmut show` prints it), grouped by file.
"""
from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections import Counter
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mutmut's exit codes (mutmut/stats.py); 2 is a run interrupted, -9 the runner's kill past the CPU limit
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -9: "timeout", 2: "not checked",
          None: "not checked"}
NOT_COUNTED = ("skipped", "not checked")
SURVIVING = ("survived", "no tests")


def _rate(killed: int, checked: int) -> float | None:
    return round(killed / checked, 4) if checked else None


def summarise(mutants: Path) -> dict:
    """Per-file counts and kill rates, the totals, and the surviving mutants' names."""
    files, survivors = {}, []
    for meta in sorted(mutants.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        if not codes:  # a file with nothing to mutate (an empty __init__.py)
            continue
        counts = Counter(STATUS.get(c, "suspicious") for c in codes.values())
        checked = sum(v for k, v in counts.items() if k not in NOT_COUNTED)
        rel = meta.relative_to(mutants).as_posix().removesuffix(".meta")
        seconds = sum(d or 0 for d in data.get("durations_by_key", {}).values())  # the mutants' test runs
        files[rel] = dict(sorted(counts.items())) | {"total": len(codes), "test_seconds": round(seconds, 1),
                                                      "kill_rate": _rate(counts["killed"], checked)}
        survivors += [k for k, c in codes.items() if STATUS.get(c, "suspicious") in SURVIVING]
    killed = sum(f.get("killed", 0) for f in files.values())
    checked = sum(f["total"] - sum(f.get(k, 0) for k in NOT_COUNTED) for f in files.values())
    pending = sum(f.get("not checked", 0) for f in files.values())
    below = sorted(f for f, v in files.items() if v["kill_rate"] is not None and v["kill_rate"] < 0.8)
    return {"tool": "mutmut", "version": _version(), "scope": _scope(), "complete": pending == 0,
            "not_checked": pending, "files": files, "below_80pct": below, "killed": killed, "checked": checked,
            "kill_rate": _rate(killed, checked), "survivors": survivors}


def diffs(mutants: Path, names: list[str], cap: int = 2000) -> str:
    """The diffs of `names` (at most `cap`), grouped by file, as `mutmut show` prints them (mutmut
    importable; it reads ./mutants, so this runs from the folder holding `mutants`)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    mutants = mutants.resolve()
    cwd = os.getcwd()
    os.chdir(mutants.parent)
    try:
        return _diffs(mutants, names, cap, get_diff_for_mutant)
    finally:
        os.chdir(cwd)


def _diffs(mutants: Path, names: list[str], cap: int, get_diff_for_mutant) -> str:
    path_of = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        rel = meta.relative_to(mutants).as_posix().removesuffix(".meta")
        path_of |= {k: rel for k in json.loads(meta.read_text())["exit_code_by_key"]}
    out, last = [], None
    for name in names[:cap]:
        path = path_of[name]
        if path != last:
            out.append(f"\n######## {path}\n")
            last = path
        try:
            out.append(f"# {name}\n{get_diff_for_mutant(name, path=path)}\n")
        except Exception as e:  # one unreadable mutant must not cost the others' diffs
            out.append(f"# {name}: no diff ({type(e).__name__}: {e})\n")
    if len(names) > cap:
        out.append(f"\n... {len(names) - cap} more surviving mutants not shown\n")
    return "".join(out)


def _module(name: str) -> str:
    """'tailor.quant.fake.x_clip__mutmut_3' -> 'tailor/quant/fake.py' (mutmut's names: module, then x_...)."""
    parts = name.split(".")
    i = next(k for k, p in enumerate(parts) if p.startswith("x"))  # mutmut prefixes functions and methods with x
    return "/".join(parts[:i]) + ".py"


def merge(reports: list[dict]) -> dict:
    """One report from several runs, later runs winning per file where they checked any of its mutants."""
    files, survivors, runs = {}, {}, []
    for r in reports:
        runs.append(r.get("run", {}))
        by_file: dict[str, list[str]] = {}
        for s in r.get("survivors", []):
            by_file.setdefault(_module(s), []).append(s)
        for f, v in r["files"].items():
            checked = v["total"] - sum(v.get(k, 0) for k in NOT_COUNTED)
            if checked or f not in files:
                files[f] = v | {"measured_in": len(runs) - 1}
                survivors[f] = by_file.get(f, [])
    killed = sum(f.get("killed", 0) for f in files.values())
    checked = sum(f["total"] - sum(f.get(k, 0) for k in NOT_COUNTED) for f in files.values())
    pending = sum(f.get("not checked", 0) for f in files.values())
    below = sorted(f for f, v in files.items() if v["kill_rate"] is not None and v["kill_rate"] < 0.8)
    return {"tool": "mutmut", "version": reports[-1].get("version"), "scope": reports[-1].get("scope"),
            "complete": pending == 0, "not_checked": pending, "files": dict(sorted(files.items())),
            "below_80pct": below, "killed": killed, "checked": checked, "kill_rate": _rate(killed, checked),
            "survivors": [s for f in sorted(survivors) for s in survivors[f]], "runs": runs}


def _scope() -> dict:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return {"only_mutate": cfg.get("only_mutate", []), "tests": cfg.get("pytest_add_cli_args_test_selection", [])}


def _version() -> str:
    try:
        return f"mutmut, version {metadata.version('mutmut')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "mutation.json")
    ap.add_argument("--diffs", type=Path, help="write the surviving mutants' diffs here")
    ap.add_argument("--max-diffs", type=int, default=2000)
    ap.add_argument("--run-info", default="{}", help="JSON object stored under 'run' (machine, children, wall)")
    ap.add_argument("--merge", type=Path, nargs="+", help="reports to combine, oldest first (no mutants/ read)")
    a = ap.parse_args(argv)
    if a.merge:
        out = merge([json.loads(p.read_text()) for p in a.merge])
    else:
        out = summarise(a.mutants)
    if run := json.loads(a.run_info):
        out["run"] = run
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    if a.diffs and not a.merge:
        if a.mutants.resolve().name != "mutants":
            raise SystemExit(f"--diffs needs the folder to be called mutants (mutmut reads ./mutants): {a.mutants}")
        a.diffs.parent.mkdir(parents=True, exist_ok=True)
        a.diffs.write_text(diffs(a.mutants, out["survivors"], a.max_diffs))
    rate = "n/a" if out["kill_rate"] is None else f"{out['kill_rate']:.1%}"
    print(f"mutation: {out['killed']}/{out['checked']} killed ({rate}), {out['not_checked']} not checked -> {a.out}")
    for f, v in out["files"].items():
        print(f"  {f}: {v['kill_rate']} of {v['total']}")


if __name__ == "__main__":
    main()
