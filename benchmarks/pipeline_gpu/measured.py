"""Issue #18 item 5: read back a whole `tailor run` measured on the GPU machine (stage.sh `poll` returns
reports.tgz: reports/, dvc.lock, params.yaml, the flow's log, the GPU's load every 5 s, the start and end
clocks) and write what it measured: reports/bench/pipeline.json `gpu_full.run` and reports/bench/pipeline_gpu.md.

    python3 benchmarks/pipeline_gpu/measured.py --tgz DIR/reports.tgz --label s18-a [--machine "one NVIDIA H200 ..."]

Stage times are the flow's own ("TARGET: done in X s", Prefect's log, one line a stage), placed on the run's
clock by the line's time stamp, so overlapping branches (runner dask) and the base model's early evaluate
suite show as they ran. A stage that never logged "done" did not finish: the run is then marked incomplete."""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "reports" / "bench" / "pipeline.json"
REPORT = ROOT / "reports" / "bench" / "pipeline_gpu.md"  # the latest attempt
TARGET_MIN = 20.0

_STAMP = r"(?P<hms>\d\d:\d\d:\d\d)(?:\.\d+)?"
_DONE = re.compile(_STAMP + r" \|.*? - (?P<target>[\w@.-]+): done in (?P<s>[\d.]+) s\s*$")
_SKIP = re.compile(_STAMP + r" \|.*? - (?P<target>[\w@.-]+): unchanged, skipped\s*$")
_EARLY = re.compile(_STAMP + r" \|.*? - (?P<target>base-eval|latency) \(early\): .*\((?P<s>[\d.]+) s\)\s*$")
_ANY = re.compile(_STAMP + r" \|")
# the flow's own verdicts; a traceback alone is not one (Dask's shutdown logs a harmless CommClosedError)
# nor is an early side job's failure: the stages then did its work themselves
_FAILED = re.compile(r"(?<!\(early\)) failed \(exit \d+\)|Flow run .* - Finished in state (Failed|Crashed)")
_COMPLETED = re.compile(r"Flow run .* - Finished in state Completed\(\)")


def clock_s(hms: str) -> int:
    """HH:MM:SS -> seconds since midnight."""
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def since(hms: str, start_hms: str) -> int:
    """Seconds from start_hms to hms on the same local clock (a run that passes midnight wraps once)."""
    return (clock_s(hms) - clock_s(start_hms)) % 86400


def parse_log(text: str, start_hms: str) -> dict:
    """The flow's log -> stages [{target, start_s, end_s, seconds}] in order of finishing, skipped targets,
    the end of the last log line (s since start), and whether the flow reported a failure.

    start_s = end_s - seconds: the stage's own time ("done in" is measured around its `dvc repro`), ended at
    the line's stamp (whole seconds: +-1 s). The early side jobs (the base model's evaluate suite, the latency
    subnets' timing) are logged only when the flow collects them at the end; they start as calibrate ends
    (flows/nightly.py `EarlyJob`)."""
    stages, skipped, last, early = [], [], 0, {}
    for line in text.splitlines():
        if m := _DONE.search(line):
            end, s = since(m["hms"], start_hms), float(m["s"])
            stages.append({"target": m["target"], "start_s": round(max(0.0, end - s), 1), "end_s": end, "seconds": s})
        elif m := _EARLY.search(line):  # logged when the flow collects it, at the end: it started after calibrate
            early[f"{m['target']} (early)"] = float(m["s"])
        elif m := _SKIP.search(line):
            skipped.append(m["target"])
        if m := _ANY.match(line):
            last = max(last, since(m["hms"], start_hms))
    at = next((s["end_s"] for s in stages if s["target"] == "calibrate"), 0)
    stages += [{"target": t, "start_s": float(at), "end_s": round(at + e, 1), "seconds": e} for t, e in early.items()]
    return {"stages": stages, "skipped": skipped, "last_line_s": last, "failed": bool(_FAILED.search(text)),
            "flow_completed": bool(_COMPLETED.search(text))}


def gpu_load(csv_text: str) -> dict | None:
    """nvidia-smi `timestamp, utilization.gpu [%], memory.used [MiB]` every 5 s -> mean / median busy %, peak GB."""
    util, mem = [], []
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            util.append(float(parts[1].split()[0]))
            mem.append(float(parts[2].split()[0]))
        except ValueError:
            continue
    if not util:
        return None
    return {"samples": len(util), "mean_util_pct": round(statistics.fmean(util), 1),
            "median_util_pct": statistics.median(util), "share_above_50pct": round(sum(u > 50 for u in util) / len(util), 3),
            "peak_memory_gb": round(max(mem) * 2**20 / 1e9, 1)}


def expected_targets(dvc_yaml: dict, devices: list[str]) -> list[str]:
    return [t for name, st in dvc_yaml["stages"].items()
            for t in ([f"{name}@{d}" for d in devices] if "foreach" in st else [name])]


def device_results(files: dict[str, bytes], devices: list[str], done: set[str]) -> dict:
    """Per device: what the run shipped (search, finetune, evaluate, export metrics it wrote). Only stages
    this run finished count: the working copy also holds the metrics of whatever run was committed."""
    out = {}
    for d in devices:
        def read(stage: str) -> dict:
            raw = files.get(f"reports/{stage}/{d}/metrics.json") if f"{stage}@{d}" in done else None
            return json.loads(raw) if raw else {}
        se, ft, ev, ex = read("search"), read("finetune"), read("evaluate"), read("export")
        out[d] = {"bits_per_param": se.get("bits_per_param"), "kl_before": ft.get("kl_before"), "kl_after": ft.get("kl_after"),
                  "ppl": ev.get("ppl"), "ppl_base": ev.get("ppl_base"), "piqa": ev.get("piqa"),
                  "piqa_base": ev.get("piqa_base"), "gates_verdict": ev.get("gates_verdict"),
                  "runtime_ppl": ex.get("runtime_ppl"), "file_bytes": ex.get("file_bytes"),
                  "timings": {k: v for k, v in {  # where each stage's seconds went, by its own metrics
                      "search": se.get("phase_seconds"), "finetune_train_s": ft.get("train_seconds"),
                      "export": ex.get("phase_seconds"), "export_runtime_threads": ex.get("runtime_threads"),
                      "evaluate": ev.get("phase_seconds"), "evaluate_shard_scoring_s": ev.get("suite_seconds"),
                      "evaluate_shard_start_s": ev.get("shard_start_seconds"),
                      "evaluate_shard_load_s": ev.get("shard_load_seconds"),
                      "latency_mape": se.get("latency_mape")}.items() if v is not None}}
    return out


def summarize(files: dict[str, bytes], machine: str) -> dict:
    """reports.tgz's files (path -> bytes) -> the measured run."""
    import yaml

    t0 = files["t0"].decode().split()
    params = yaml.safe_load(files["params.yaml"])
    profile = params.get("profile")
    devices = list(params.get("devices", {}))
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    log = parse_log(files["tailor_run.log"].decode("utf-8", errors="replace"), t0[1])
    done = {s["target"] for s in log["stages"]}
    missing = [t for t in expected_targets(dvc_yaml, devices) if t not in done and t not in log["skipped"]]
    rc = int(files["rc"].decode().strip()) if "rc" in files else None
    # how the end was seen: "exit" (the shell that ran `tailor run` stamped t1 and rc as it returned) or
    # "flow log" (no exit seen, but the flow logged its own completion: session 19's last poll came 2 s after
    # the flow's last line, with the process still shutting down). Then the total ends at that last line.
    ended_by = "exit" if "t1" in files else "flow log" if log["flow_completed"] and rc is None else None
    if ended_by == "flow log":
        total = log["last_line_s"]
    else:  # unfinished: how long it had run when the last poll looked (at least that long)
        stop = files.get("t1") or files.get("tpoll")
        total = int(stop.decode().split()[0]) - int(t0[0]) if stop else log["last_line_s"]
    complete = (ended_by == "flow log" or (ended_by == "exit" and rc == 0)) and not missing and not log["failed"]
    return {"profile": profile, "machine": machine, "devices": devices, "complete": complete, "ended_by": ended_by,
            "exit_code": rc,
            "missing_stages": missing, "flow_failed": log["failed"], "total_s": total,
            "total_minutes": round(total / 60, 2), "target_minutes": TARGET_MIN,
            "met": complete and total / 60 <= TARGET_MIN, "stages": log["stages"],
            "gpu": gpu_load(files.get("gpu.csv", b"").decode()), "results": device_results(files, devices, done)}


def bar(start: float, end: float, total: float, width: int = 40) -> str:
    a, b = int(width * start / total), max(int(width * start / total) + 1, int(round(width * end / total)))
    return "." * a + "#" * (b - a) + "." * (width - b)


def markdown(run: dict) -> str:
    total = max(run["total_s"], 1)
    if run["complete"]:
        head = [f"# `tailor run --profile {run['profile']}` measured whole on {run['machine']}", "",
                f"**Total {run['total_minutes']:.1f} min** (target ≤ {run['target_minutes']:.0f}: "
                f"{'met' if run['met'] else 'missed'}), from `tailor run`'s start to "
                + ("its exit." if run.get("ended_by") == "exit" else "the flow's last log line (its exit was not seen).")]
    else:
        head = [f"# `tailor run --profile {run['profile']}` on {run['machine']}: not finished", "",
                f"**Not a total:** the run had gone {run['total_minutes']:.1f} min when it was last seen"
                + (f" (exit {run['exit_code']})" if run["exit_code"] is not None else "") + "."]
    lines = head + ([run["note"]] if run.get("note") else []) + [
        "Stage times are the flow's own, placed where they ran (`#` = running).", ""]
    if run["missing_stages"]:
        lines += [f"Not finished: {', '.join(run['missing_stages'])}.", ""]
    lines += ["| stage | start (min) | seconds | timeline |", "|---|---|---|---|"]
    for s in sorted(run["stages"], key=lambda s: (s["start_s"], s["target"])):
        lines.append(f"| {s['target']} | {s['start_s'] / 60:.1f} | {s['seconds']:.1f} | `{bar(s['start_s'], s['end_s'], total)}` |")
    if run["gpu"]:
        g = run["gpu"]
        lines += ["", f"GPU busy (nvidia-smi every 5 s, {g['samples']} samples): mean {g['mean_util_pct']}%, median "
                      f"{g['median_util_pct']}%, above 50% in {100 * g['share_above_50pct']:.0f}% of samples; peak memory "
                      f"{g['peak_memory_gb']} GB."]
    lines += ["", "| device | bits/param | KL before → after fine-tune | ppl (base) | PIQA (base) | gates | runtime ppl |",
              "|---|---|---|---|---|---|---|"]
    for d, r in run["results"].items():
        def f(x, nd=3):
            return "–" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)
        lines.append(f"| {d} | {f(r['bits_per_param'], 2)} | {f(r['kl_before'])} → {f(r['kl_after'])} | "
                     f"{f(r['ppl'], 1)} ({f(r['ppl_base'], 1)}) | {f(r['piqa'])} ({f(r['piqa_base'])}) | "
                     f"{f(r['gates_verdict'])} | {f(r['runtime_ppl'], 1)} |")
    return "\n".join(lines) + "\n"


def read_tgz(path: Path) -> dict[str, bytes]:
    files = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isfile():
                files[m.name.removeprefix("./")] = t.extractfile(m).read()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tgz", type=Path, required=True, help="reports.tgz from stage.sh poll")
    ap.add_argument("--machine", default="one NVIDIA H200 (16 CPU cores), torch 2.11")
    ap.add_argument("--label", required=True, help="names this attempt in pipeline.json (a second one replaces it)")
    ap.add_argument("--note", default="", help="what differed from the profile as committed, what happened")
    a = ap.parse_args(argv)
    if not a.tgz.is_file():
        print(f"measured: --tgz {a.tgz}: no such file", file=sys.stderr)
        return 2
    files = read_tgz(a.tgz)
    need = [n for n in ("t0", "params.yaml", "tailor_run.log") if n not in files]
    if need:
        print(f"measured: --tgz {a.tgz}: lacks {', '.join(need)} (not a stage.sh poll archive)", file=sys.stderr)
        return 2
    run = summarize(files, a.machine)
    run["label"], run["note"] = a.label, a.note
    data = json.loads(PIPELINE.read_text())
    full = data["gpu_full"]
    full["attempts"] = [r for r in full.get("attempts", []) if r.get("label") != a.label] + [run]
    if run["complete"]:  # the measured total: a finished run only
        full["run"], full["measured"] = run, True
    PIPELINE.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    REPORT.write_text(markdown(run))
    print(markdown(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
