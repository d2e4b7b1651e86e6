"""Where in a sequence a compressed file loses to the base: mean next-token NLL (nats) by token position, on
the two held-out sets of reports/bench/kquant_table.md, measured from the GGUF files in llama.cpp.

    python benchmarks/position_gap.py [--work $TMPDIR/kquanttable] [--rows tailor-k@4.0,tailor-k@4.0+emb]
                                      [--out reports/bench/position_gap.json]

Why: issue 19's <= 4.0 row meets the wiki target and misses the BoolQ-passage one. The wiki items are single
sentences (every predicted token sits at position < 32), the passages run to 256 tokens, so the two sets measure
different context lengths; this table says at which positions the gap is. Each text is scored alone from
position 0, as kquant_table's perplexities are (tailor.export.llamacpp.perplexity), one thread. Reads the files
kquant_table's workspace holds (rows/<id>/model.gguf, the base's included).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EDGES = (0, 16, 32, 64, 128, 256)  # buckets [a, b) of the position predicting the next token (context: position + 1 tokens)


def bucket_means(nlls: list[np.ndarray], edges: tuple[int, ...] = EDGES) -> dict[str, dict[str, float]]:
    """Mean NLL per position bucket over sequences: nlls[i][t] is the NLL of token t+1 of sequence i given
    tokens 0..t (so position t = context length - 1). Empty buckets are left out. Returns
    {"a-b": {"nll": mean, "tokens": count}, ..., "all": {...}}."""
    cat = np.concatenate(nlls)
    pos = np.concatenate([np.arange(len(x)) for x in nlls])
    out = {}
    for a, b in zip(edges, edges[1:]):
        m = (pos >= a) & (pos < b)
        if m.any():
            out[f"{a}-{b}"] = {"nll": float(cat[m].mean()), "tokens": int(m.sum())}
    out["all"] = {"nll": float(cat.mean()), "tokens": int(cat.size)}
    return out


def gaps(rows: dict[str, dict], base: str = "base") -> dict[str, dict[str, dict[str, float]]]:
    """Each row's bucket NLL minus the base's (nats; > 0: the row predicts worse there), per set."""
    return {rid: {s: {k: round(v["nll"] - rows[base][s][k]["nll"], 4) for k, v in by.items()} for s, by in r.items()}
            for rid, r in rows.items() if rid != base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "kquanttable"), help="kquant_table's workspace")
    ap.add_argument("--rows", default="tailor-k@4.0,tailor-k@4.0+emb,tailor-k@3.0+emb")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench" / "position_gap.json"))
    a = ap.parse_args()
    from benchmarks import kquant_table as kt
    from benchmarks import seed_table as st
    from tailor.export import llamacpp

    work = Path(a.work)
    evalset = kt.table_evalset(st.Ctx(work, None))
    rows = {}
    for rid in ["base"] + a.rows.split(","):
        f = work / "rows" / rid / "model.gguf"
        if not f.is_file():
            raise SystemExit(f"position_gap: {f}: no such file (kquant_table builds the workspace)")
        rows[rid] = {s: bucket_means(llamacpp.token_nlls(f, evalset[s], n_threads=1)) for s in ("wiki", "passages")}
        print(f"position_gap: {rid}: " + json.dumps({s: {k: round(v['nll'], 3) for k, v in b.items()} for s, b in rows[rid].items()}),
              flush=True)
    res = {"what": __doc__.splitlines()[0], "edges": list(EDGES), "evalset_sha256": kt.evalset_sha256(evalset),
           "nll": rows, "gap_vs_base": gaps(rows)}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["gap_vs_base"], indent=1))


if __name__ == "__main__":
    main()
