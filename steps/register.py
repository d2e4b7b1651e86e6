"""register (per device): the exported file becomes a version of the MLflow registered model
`tailor-<device>` with alias `candidate`, tagged with everything needed to reproduce and audit it."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from steps._common import artifact_dir, base_model_tags, main_for, report_dir, write_json
from tailor import tracking
from tailor.config import ConfigError, Params
from tailor.formats import backend



def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def git_sha(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty(root: Path) -> bool:
    """Uncommitted changes to tracked files: `tailor reproduce` checks out the commit, not them."""
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return True


def run(params: Params, device: str, export_dir: Path, root: Path = Path(".")) -> dict:
    prof = params.device(device)
    be = backend(prof.format)
    files = be.files(export_dir)  # the whole artifact: an ONNX model over 2 GB keeps its weights beside it
    file = files[0]
    exp_metrics = json.loads((report_dir("export", device) / "metrics.json").read_text())
    gates = json.loads((report_dir("evaluate", device) / "gates.json").read_text())
    ev = json.loads((report_dir("evaluate", device) / "metrics.json").read_text())
    sha = be.sha256(export_dir)
    if sha != exp_metrics["sha256"]:
        raise ConfigError(f"{file}: sha256 {sha[:12]} differs from what export measured ({exp_metrics['sha256'][:12]})")
    subnet = json.loads((export_dir / "subnet.json").read_text())
    tags = {"git_sha": git_sha(root), "git_dirty": str(git_dirty(root)), "dvc_lock_md5": _md5(root / "dvc.lock"), "params_md5": _md5(root / "params.yaml"),
            "sha256": sha, "gates_passed": str(gates["passed"]),
            **{f"gate.{g['name']}": g.get("verdict") or ("pass" if g["passed"] else "fail") for g in gates["gates"]},
            "profile": params.profile, "format": prof.format, "runtime": prof.runtime, **base_model_tags(),
            "subnet_hash": hashlib.sha256(json.dumps(subnet, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16],
            "metrics": json.dumps({k: ev.get(k) for k in ("ppl", "ppl_base", "piqa", "piqa_base")}
                                  | {"file_bytes": exp_metrics["file_bytes"], "runtime_ppl": exp_metrics["runtime_ppl"]})}
    # Evidence logged beside the file: the gates promotion re-reads, and the dvc.lock that
    # `tailor reproduce` checks out (its md5 is the dvc_lock_md5 tag).
    evidence = {"gates": report_dir("evaluate", device) / "gates.json"}
    if (root / "dvc.lock").is_file():
        evidence["repro"] = root / "dvc.lock"
    return {"file": file, "files": files, "tags": tags, "evidence": evidence}


def main() -> None:
    def stage(params: Params, device: str | None) -> None:
        out = run(params, device, artifact_dir("export", device))
        name = tracking.registered_name(params.register.model_prefix, device)
        with tracking.stage_run("register", device, tags=base_model_tags()) as tr:
            version, created = tracking.register(name, tr, out["files"], out["tags"], params.register.alias,
                                                 evidence=out["evidence"])
            tr.set_tags({"registered_model": name, "version": version})
        write_json(report_dir("register", device) / "metrics.json",
                   {"version": int(version), "created": created, "sha256": out["tags"]["sha256"],
                    "gates_passed": out["tags"]["gates_passed"] == "True"})
        print(f"registered {name} version {version} (alias {params.register.alias})")
        # The auditor's page for this version. The version is registered already: a report that cannot
        # be written (evaluation reports missing) is said in one line, not a failed registration.
        from tailor.report import write_report
        from tailor.report.audit import ReportError
        try:
            print(f"audit report: {write_report(Path('.'), device)}")
        except ReportError as e:
            print(f"audit report not written: {e}")

    main_for("register", stage, per_device=True)


if __name__ == "__main__":
    main()
