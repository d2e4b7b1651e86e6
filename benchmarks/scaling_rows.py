"""The rows of benchmarks/scaling_shapes.py: scaling efficiency against the one-GPU rows, the compact
summary, gathering one device call's row files (`collect`, between rows: no torch import, so it costs
no time of the call) and merging them into reports/bench/scaling.json (`combine`).

    python benchmarks/scaling_rows.py collect ROW_DIR --status ROW_DIR/status --out OUT/rows.json
    python benchmarks/scaling_rows.py combine rows.json [--key shapes] [--note TEXT]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _write(path: str, row: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, p)


def _pair_key(r: dict) -> tuple:
    if r["kind"] == "e2e":
        return (r["kind"], r["shape"], r["layers"], r["per_gpu_batch"], r["seq"], r["kd_chunk"], r["checkpointing"])
    if r["kind"] == "blockwise":
        return (r["kind"], r["shape"], r["layers"], r["seqs"], r["seq"], r["batch"], r["block_steps"])
    return (r["kind"], r.get("name"))


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Each multi-GPU row's scaling efficiency: its per-GPU rate over the one-GPU row of the same
    shape, per-GPU batch and loss path (e2e: student tokens/s per GPU; blockwise: blocks/s per GPU)."""
    metric = {"e2e": "student_tokens_per_s_per_gpu", "blockwise": "blocks_per_s_per_gpu"}
    one = {_pair_key(r): r for r in rows if r.get("world") == 1 and metric.get(r.get("kind")) in r}
    out = []
    for r in rows:
        r = dict(r)
        m = metric.get(r.get("kind"))
        base = one.get(_pair_key(r)) if m and m in r else None
        if base is not None and r.get("world", 1) > 1 and m in r:
            r["baseline"] = base["name"]
            r["scaling_efficiency"] = round(r[m] / base[m], 4)
        out.append(r)
    return out


def summary(rows: list[dict]) -> str:
    lines = []
    for r in with_efficiency(rows):
        if "error" in r and not any(k in r for k in ("student_tokens_per_s", "blocks_per_s", "runs")):
            lines.append(f"{r.get('name', '?'):<16} ERROR {r['error'][:150]}")
            continue
        if r.get("kind") == "e2e":
            prof = r.get("profile_rank0", {}).get("kernel_share", {})
            lines.append(f"{r['name']:<16} w{r['world']} {r['parallel']:<5} b{r['per_gpu_batch']}/gpu  "
                         f"{r['student_tokens_per_s_per_gpu']:>9.0f} tok/s/gpu  eff {r.get('scaling_efficiency', '-')}  "
                         f"mfu {r.get('mfu', '-')}  peak {r.get('peak_mem_gb')} GB  step {r['step_s']:.3f}s"
                         + (f"  comm {prof.get('comm')} kern/step {r['profile_rank0'].get('kernel_time_of_step')}" if prof else ""))
        elif r.get("kind") == "blockwise":
            lines.append(f"{r['name']:<16} w{r['world']} {r['layers']} blocks  {r['blocks_per_s_per_gpu']:.4f} blocks/s/gpu  "
                         f"eff {r.get('scaling_efficiency', '-')}  wall {r['wall_s']:.1f}s  exchange {r['exchange_s']:.1f}s  "
                         f"walk_io {[x['walk_io_s'] for x in r['ranks']]}  peak {r.get('peak_mem_gb')} GB")
        elif r.get("kind") == "fanout":
            for run in r["runs"]:
                lines.append(f"{r['name']:<16} {run['workers']} worker(s) {run['candidates_per_s']:.2f} cand/s  "
                             f"eff {run.get('efficiency_vs_1')}  cold {run['cold_s']:.1f}s  gpus {run['worker_devices']}")
            if "local" in r:
                lines.append(f"{r['name']:<16} local loop {r['local']['candidates_per_s']:.2f} cand/s")
        if "error" in r:
            lines.append(f"{'':<16} (then) ERROR {r['error'][:150]}")
    return "\n".join(lines)


def collect(row_dir: str, status: str | None, out: str, quiet: bool = False) -> None:
    """Gather the rows of one device call (row files under `row_dir`, one `name rc seconds` line per row in
    `status`) into one file: a row whose command failed or timed out without writing gets an error
    row with its log's tail (`<name>.log` beside it)."""
    d = Path(row_dir)
    rows, seen = [], set()
    for line in (Path(status).read_text().splitlines() if status and Path(status).is_file() else []):
        name, rc, secs = line.split()[:3]
        seen.add(name)
        f = d / f"{name}.json"
        r = json.loads(f.read_text()) if f.is_file() else {"name": name}
        r["rc"], r["command_s"] = int(rc), float(secs)
        if int(rc) != 0:
            log = d / f"{name}.log"
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            oom = "out of memory" in tail.lower() or "OutOfMemoryError" in tail
            r["error"] = ("out of memory" if oom else f"timed out (rc {rc})" if int(rc) in (124, 137)
                          else "skipped: too little of the call's time left" if int(rc) == 125 else f"exit {rc}")
            r["log_tail"] = tail
        rows.append(r)
    for f in sorted(d.glob("*.json")):  # rows whose status line is missing (a command still running when cut)
        if f.stem not in seen:
            rows.append(json.loads(f.read_text()))
    _write(out, {"rows": with_efficiency(rows)})
    if not quiet:
        print(summary(rows), flush=True)


def combine(files: list[str], out: str, key: str, note: str | None) -> None:
    """Merge device calls' rows.json into `out` under `key` (other keys kept): device, torch, the rows
    with their scaling efficiencies."""
    rows = [r for f in files for r in json.loads(Path(f).read_text())["rows"]]
    rows = with_efficiency(rows)
    dev = next((r["device"] for r in rows if r.get("device")), None)
    res = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
    res[key] = {"device": f"{dev} x{max((r.get('gpus_visible') or 0) for r in rows)}" if dev else None,
                "torch": next((r["torch"] for r in rows if r.get("torch")), None),
                "what": ("supernet training and search at the Llama-3.2-1B and Llama-3.1-8B shapes (random weights) on 1 "
                         "and 2 GPUs (benchmarks/scaling_shapes.py via run_scaling_x2.sh): scaling efficiency = per-GPU "
                         "rate over the 1-GPU row of the same per-GPU batch"),
                **({"note": note} if note else {}),
                "rows": [{k: v for k, v in r.items() if k != "log_tail"} for r in rows]}
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(summary(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("collect", help="gather one call's row files into rows.json and print the summary")
    p.add_argument("row_dir")
    p.add_argument("--status", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("combine", help="merge rows.json files into reports/bench/scaling.json")
    p.add_argument("files", nargs="+")
    p.add_argument("--combined-out", default="reports/bench/scaling.json")
    p.add_argument("--key", default="shapes")
    p.add_argument("--note", default=None)
    a = ap.parse_args()
    if a.cmd == "collect":
        collect(a.row_dir, a.status, a.out, a.quiet)
    else:
        combine(a.files, a.combined_out, a.key, a.note)


if __name__ == "__main__":
    main()
