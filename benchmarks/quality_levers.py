"""Issue #19's ablation: which lever bought what, at each budget, from the measured tables (nothing is run here).

    python benchmarks/quality_levers.py [--out reports/bench/quality_levers.json]

Reads reports/bench/seed_table_gpu.json (the Q4_0-grid rows at the full profile's fine-tune budget, its recipe
sweep, PIQA on all 1,500 items) and reports/bench/kquant_table.json (the K-grid rows, scored in llama.cpp on
the same items, their PIQA-1500 runs). Each lever is one change between two measured rows of the same byte
budget, everything else equal; every number is copied from those files with its source. Writes
quality_levers.json and .md beside --out: the ablation table, each budget's best row against #19's targets,
and the levers not yet measured.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "reports" / "bench"

# (budget, lever, session, before, after): a row is (table, id[, recipe]); table "seed" = seed_table_gpu.json,
# "seed-recipe" = its recipe sweep (held-out KL and PyTorch wiki perplexity only), "k" = kquant_table.json,
# "k11" = kquant_table_s11.json (the table as session 11 left it: its tailor-k rows were rebuilt since)
LEVERS = [
    ("<= 4.0", "fine-tune recipe: constant 1e-5 -> cosine 3e-4", 5,
     ("seed-recipe", "tailor@4.0", "constant-1e-05"), ("seed-recipe", "tailor@4.0", "cosine-3e-04")),
    ("<= 4.0", "grid: Q4_0 / Q5_1 / Q8_0 -> llama.cpp K-quants + IQ4_NL (search and QAT on it)", 11,
     ("seed", "tailor@4.0"), ("k11", "tailor-k@4.0")),
    ("<= 4.0", "search on a 331-step K-grid supernet instead of a 60-step one, fine-tuned", 15,
     ("k11", "tailor-k@4.0"), ("k", "tailor-k@4.0")),
    ("<= 4.0", "QAT of the tied embedding too (finetune.train_embeddings)", 15,
     ("k", "tailor-k@4.0"), ("k", "tailor-k@4.0+emb")),
    ("<= 4.0", "subnet ranked on the base's own weights (no supernet) and fine-tuned from them; embedding QAT", 16,
     ("k", "tailor-k@4.0+emb"), ("k", "tailor-k@4.0+emb+bw")),
    ("<= 4.0", "the pipeline's order: a 326-step supernet's subnet fine-tuned from the supernet's weights; embedding QAT",
     16, ("k", "tailor-k@4.0+emb"), ("k", "tailor-k@4.0+emb+sn")),
    ("<= 4.0", "distillation data: every corpus document left after val and calib (7,365 sequences) instead of the "
     "3,600-sequence shard; same subnet, start and tokens as +bw", 17,
     ("k", "tailor-k@4.0+emb+bw"), ("k", "tailor-k@4.0+emb+data+bw")),
    ("<= 4.0", "distillation data: the shard plus 3,600 sequences sampled from the base (7,200, half generated); "
     "same subnet, start and tokens as +bw", 17,
     ("k", "tailor-k@4.0+emb+bw"), ("k", "tailor-k@4.0+emb+gen+bw")),
    ("<= 3.0", "fine-tune recipe: constant 1e-5 -> cosine 3e-4", 5,
     ("seed-recipe", "tailor@3.0", "constant-1e-05"), ("seed-recipe", "tailor@3.0", "cosine-3e-04")),
    ("<= 3.0", "grid: Q4_0 / Q5_1 / Q8_0 -> llama.cpp K-quants + IQ4_NL (search and QAT on it)", 11,
     ("seed", "tailor@3.0"), ("k11", "tailor-k@3.0")),
    ("<= 3.0", "both at once: the 331-step supernet's search and QAT of the tied embedding", 15,
     ("k11", "tailor-k@3.0"), ("k", "tailor-k@3.0+emb")),
    ("<= 3.0", "the pipeline's order: a 326-step supernet's subnet fine-tuned from the supernet's weights; embedding QAT",
     16, ("k", "tailor-k@3.0+emb"), ("k", "tailor-k@3.0+emb+sn")),
    ("<= 3.0", "both at once: the subnet ranked on the base's own weights (started from them) and every corpus "
     "document (7,365 sequences) as distillation data", 17,
     ("k", "tailor-k@3.0+emb"), ("k", "tailor-k@3.0+emb+data+bw")),
    ("4.61 (uniform)", "every layer matrix Q4_0 -> IQ4_NL (same bytes)", 11,
     ("seed", "qat4"), ("k11", "iq4nl-qat")),
]
NOT_MEASURED = [
    "more fine-tune tokens for the rows that cut structure (every row so far: 1,000 x 32 x 512 = 16.4 M tokens; "
    "`kquant_gpu.py --rows tailor-k@4.0+emb+data+2x`); on the 7,365-sequence data that is ~8.7 epochs, as 1x was on "
    "the shard",
    "<= 3.0: the base-weights search (+bw) and the 7,365-sequence data (+data) apart (only both at once were "
    "fine-tuned)",
    "<= 3.0: the 331-step supernet's search without embedding QAT (only both at once were fine-tuned)",
]
TARGETS = {"<= 4.0": {"wiki": 0.03, "passages": 0.03, "piqa": 0.98}, "<= 3.0": {"wiki": 0.10, "passages": 0.10}}


def load(bench: Path = BENCH) -> dict[str, Any]:
    seed = json.loads((bench / "seed_table_gpu.json").read_text())
    k = json.loads((bench / "kquant_table.json").read_text())
    k11 = bench / "kquant_table_s11.json"
    s14, s16 = bench / "kquant_gpu_s14.json", bench / "kquant_gpu_s16.json"
    return {"seed": seed, "k": k, "k11": json.loads(k11.read_text()) if k11.is_file() else None,
            "pre": json.loads(s14.read_text()).get("kl_before_cpu") if s14.is_file() else None,
            "s16": json.loads(s16.read_text()).get("search") if s16.is_file() else None}


# session 16's three searches (kquant_gpu_s16.json "search"): (lever, (run, start weights) before, after); a run's
# rows record where a fine-tune of their subnet starts (kl_before_from), on 64 x 512 validation tokens
S16_STARTS = [
    ("subnet ranked on the base's own weights (no supernet) instead of a 326-step supernet's; start: base (16)",
     ("B_supernet", "base"), ("A_base_weights", "base")),
    ("every searched layer holds its 3 KV groups (ranked on the base's weights; start: base) (16)",
     ("A_base_weights", "base"), ("C_base_weights_kv3", "base")),
    ("the 326-step supernet's subnet started from the supernet's weights (+sn) instead of the base's (16)",
     ("B_supernet", "base"), ("B_supernet", "supernet")),
]


def pre_finetune(src: dict[str, Any]) -> list[dict[str, Any]]:
    """Levers measured only on the validation KL before fine-tuning (the issue's first check, not a row):
    each budget's subnet from session 11's search beside session 14's, both cut from the permuted base."""
    pre = src.get("pre") or {}
    out = [{"budget": f"<= {rid.split('@')[1]}", "lever": "search on a 331-step K-grid supernet instead of a 60-step one (14)",
             "before": v["s11_search_60_step_supernet"], "after": v["s14_search_331_step_supernet"],
             "verdict": "better" if v["s14_search_331_step_supernet"] < v["s11_search_60_step_supernet"] else "worse"}
            for rid, v in pre.items() if rid.startswith("tailor-k@")]
    runs = src.get("s16") or {}
    for lever, (run_b, w_b), (run_a, w_a) in S16_STARTS if runs else ():
        for rid in ("tailor-k@4.0", "tailor-k@3.0"):
            b = runs[run_b]["rows"][rid]["kl_before_from"][w_b]
            a = runs[run_a]["rows"][rid]["kl_before_from"][w_a]
            out.append({"budget": f"<= {rid.split('@')[1]}", "lever": lever, "before": b, "after": a,
                        "verdict": "better" if a < b else "worse"})
    return out


def metrics(src: dict[str, Any], ref: tuple) -> dict[str, Any]:
    """What one measured row says: held-out KL after its fine-tune, llama.cpp perplexities, PIQA-1500 vs base.
    Raises KeyError naming the row when a table does not have it."""
    table, rid = ref[0], ref[1]
    if table == "seed-recipe":
        hit = [r for r in src["seed"]["recipes"] if r["id"] == rid and r["recipe"] == ref[2]]
        if not hit:
            raise KeyError(f"seed_table_gpu.json recipes: no {rid} at {ref[2]}")
        return {"kl": hit[0]["kl_after"], "wiki_torch": hit[0]["torch_ppl_wiki"], "source": f"seed_table_gpu.json recipes {ref[2]}"}
    name = {"seed": "seed_table_gpu.json", "k": "kquant_table.json", "k11": "kquant_table_s11.json"}[table]
    d = src[table]
    row = None if d is None else next((r for r in d["rows"] if r["id"] == rid), None)
    if row is None:
        raise KeyError(f"{name}: no row {rid}")
    kl = (row.get("build") or {}).get("kl_after") if table == "seed" else (row.get("gpu") or {}).get("kl_after")
    piqa = d.get("piqa_all", {}).get(rid, {})
    ratio = piqa.get("ratio", (piqa.get("vs_base") or {}).get("ratio"))
    ci = piqa.get("ci95", (piqa.get("vs_base") or {}).get("ci95"))
    return {"kl": kl, "bpp": row["bits_per_param"], "wiki": row["ppl_wiki"], "passages": row["ppl_boolq_passages"],
            "piqa1500": ratio, "piqa1500_ci95": ci,
            "source": f"{name} {rid}"}


def piqa_bases(src: dict[str, Any]) -> dict[str, float]:
    """The base accuracy each table's PIQA-1500 ratios are against (the same base file can score an item apart
    on two CPUs: llama.cpp's float sums differ)."""
    names = {"seed": "seed_table_gpu.json", "k11": "kquant_table_s11.json", "k": "kquant_table.json"}
    out = {}
    for key, name in names.items():
        runs = (src.get(key) or {}).get("piqa_all") or {}
        acc = runs.get("base", {}).get("acc") if key != "seed" else next(
            (r.get("base_acc") for r in runs.values() if isinstance(r, dict) and r.get("base_acc") is not None), None)
        if acc is not None:
            out[name] = acc
    return out


def base(src: dict[str, Any]) -> dict[str, float]:
    row = next(r for r in src["k"]["rows"] if r["id"] == "base")
    return {"wiki": row["ppl_wiki"], "passages": row["ppl_boolq_passages"]}


def verdict(before: dict, after: dict) -> str:
    """Better / worse / mixed on the numbers both rows have (lower KL and perplexity, higher PIQA are better)."""
    signs = []
    for key, higher_better in (("kl", False), ("wiki", False), ("wiki_torch", False), ("passages", False), ("piqa1500", True)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            continue
        signs.append((b > a) == higher_better if b != a else None)
    signs = [s for s in signs if s is not None]
    if not signs:
        return "no change"
    return "better" if all(signs) else "worse" if not any(signs) else "mixed"


def ablation(src: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for budget, lever, session, b, a in LEVERS:
        before, after = metrics(src, b), metrics(src, a)
        out.append({"budget": budget, "lever": lever, "session": session, "before": before, "after": after,
                    "verdict": verdict(before, after)})
    return out


def target_rows(rows: list[dict[str, Any]], budget: str) -> list[dict[str, Any]]:
    """The rows of kquant_table.json that a lever at `budget` ends on, in lever order, each once: the latest
    table's candidates for the targets (an older table's rows were rebuilt since)."""
    seen, out = set(), []
    for r in rows:
        a = r["after"]
        if r["budget"] == budget and a["source"].startswith("kquant_table.json ") and a["source"] not in seen:
            seen.add(a["source"])
            out.append(a)
    return out


def row_targets(budget: str, row: dict[str, Any], ref: dict[str, float], q4km: dict[str, Any]) -> list[dict[str, Any]]:
    """One row against its budget's #19 targets (TARGETS; at <= 4.0 also below Q4_K_M's perplexities), with gaps."""
    out = []
    for key, limit in TARGETS[budget].items():
        if key == "piqa":
            got = row.get("piqa1500")
            out.append({"budget": budget, "target": f"PIQA (1,500 items) >= {limit:.0%} of base", "row": row["source"],
                        "got": got, "met": None if got is None else got >= limit,
                        "gap": None if got is None else round(limit - got, 4)})
        else:
            rel = row[key] / ref[key] - 1
            out.append({"budget": budget, "target": f"{key} perplexity within +{limit:.0%} of base", "row": row["source"],
                        "got": round(rel, 4), "met": rel <= limit, "gap": round(rel - limit, 4)})
    if budget == "<= 4.0":
        for key, name in (("wiki", "ppl_wiki"), ("passages", "ppl_boolq_passages")):
            rel = row[key] / q4km[name] - 1
            out.append({"budget": budget, "target": f"{key} perplexity below llama.cpp Q4_K_M's ({q4km[name]:.2f})",
                        "row": row["source"], "got": round(rel, 4), "met": rel < 0, "gap": round(rel, 4)})
    return out


def targets(src: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every latest-table row of each budget (target_rows) against #19's targets."""
    ref = base(src)
    q4km = next(r for r in src["k"]["rows"] if r["id"] == "q4_k_m")  # llama.cpp's mix, same session and items
    return [t for budget in TARGETS for row in target_rows(rows, budget) for t in row_targets(budget, row, ref, q4km)]


def fmt_md(res: dict[str, Any]) -> str:
    ref = res["base"]

    def ppl(m: dict, key: str) -> str:
        if m.get(key) is None:
            return f"{m['wiki_torch']:.1f} (PyTorch)" if key == "wiki" and m.get("wiki_torch") else "-"
        return f"{m[key]:.2f} ({m[key] / ref[key] - 1:+.1%})"

    def piqa(m: dict) -> str:
        if m.get("piqa1500") is None:
            return "-"
        lo, hi = m["piqa1500_ci95"]
        return f"{m['piqa1500']:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["# Quality levers (issue #19): which lever bought what", "",
             f"From {', '.join(res['sources'])}; nothing re-run. Base (F16): wiki {ref['wiki']:.1f}, BoolQ passages "
             f"{ref['passages']:.2f}. Perplexities in llama.cpp on the seed table's items (PyTorch where only the recipe "
             "sweep measured it); KL: held-out, to the base, after the row's fine-tune; PIQA on all 1,500 items "
             "against the base's, paired 95% interval.", "",
             "| budget | lever (session) | row before -> after | KL | wiki ppl | BoolQ-passage ppl | PIQA 1500 / base | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["ablation"]:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['budget']} | {r['lever']} ({r['session']}) | {b['source']} -> {a['source']} | "
                     f"{b['kl']:.3f} -> {a['kl']:.3f} | {ppl(b, 'wiki')} -> {ppl(a, 'wiki')} | "
                     f"{ppl(b, 'passages')} -> {ppl(a, 'passages')} | {piqa(b)} -> {piqa(a)} | {r['verdict']} |")
    bases = res.get("piqa_bases") or {}
    if len(set(bases.values())) > 1:
        lines += ["", "PIQA ratios are each against its own table's base run: " + ", ".join(
            f"{k} {v:.4f}" for k, v in bases.items()) + " (the base F16 file scored in different sessions: an item apart), so a "
            "lever across two tables carries that much (~0.001 of the ratio) besides its own effect."]
    lines += ["", "## Against the targets (every row of the latest table at each budget)"]
    for budget in dict.fromkeys(t["budget"] for t in res["targets"]):
        ts = [t for t in res["targets"] if t["budget"] == budget]
        names = list(dict.fromkeys(t["target"] for t in ts))
        lines += ["", f"{budget} bits/param: each cell is the row's value, then met or the gap.", "",
                  "| row | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for row in dict.fromkeys(t["row"] for t in ts):
            cells = []
            for name in names:
                t = next(x for x in ts if x["row"] == row and x["target"] == name)
                piqa = "PIQA" in name
                if t["got"] is None:
                    cells.append("-")
                    continue
                got = f"{t['got']:.3f}" if piqa else f"{t['got']:+.1%}"
                cells.append(f"{got} **met**" if t["met"] else f"{got} (misses by {abs(t['gap']):.3f})" if piqa
                             else f"{got} (misses by {t['gap']:.1%})")
            lines.append(f"| {row.removeprefix('kquant_table.json ')} | " + " | ".join(cells) + " |")
    if res.get("pre_finetune"):
        lines += ["", "## Measured before fine-tuning only (validation KL of the subnet cut from the base; not a row)", "",
                  "| budget | lever (session) | KL before -> after | verdict |", "|---|---|---|---|"]
        lines += [f"| {r['budget']} | {r['lever']} | {r['before']:.3f} -> {r['after']:.3f} | {r['verdict']} |"
                  for r in res["pre_finetune"]]
    lines += ["", "## Not measured yet", ""] + [f"- {x}" for x in res["not_measured"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BENCH / "quality_levers.json"))
    ap.add_argument("--bench", default=str(BENCH), help="where seed_table_gpu.json and kquant_table.json are")
    a = ap.parse_args()
    src = load(Path(a.bench))
    rows = ablation(src)
    res = {"sources": ["seed_table_gpu.json", "kquant_table.json"] + (["kquant_table_s11.json"] if src.get("k11") else [])
           + (["kquant_gpu_s14.json"] if src.get("pre") else []) + (["kquant_gpu_s16.json"] if src.get("s16") else []),
           "base": base(src), "ablation": rows,
           "targets": targets(src, rows), "pre_finetune": pre_finetune(src), "piqa_bases": piqa_bases(src),
           "not_measured": NOT_MEASURED}
    out = Path(a.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(fmt_md(res))
    print(fmt_md(res))


if __name__ == "__main__":
    main()
