"""Where in a sequence a compressed file loses to the base: mean next-token NLL (nats) by token position, on
the two held-out sets of reports/bench/kquant_table.md, measured from the GGUF files in llama.cpp.

    python benchmarks/position_gap.py [--work $TMPDIR/kquanttable] [--rows tailor-k@4.0,tailor-k@4.0+emb]
                                      [--out reports/bench/position_gap.json]

Why: issue 19's <= 4.0 row meets the wiki target and misses the BoolQ-passage one. The wiki items are single
sentences (every predicted token sits at position < 32), the passages run to 256 tokens, so the two sets measure
different context lengths; this table says at which positions the gap is. Each text is scored alone from
position 0, as kquant_table's perplexities are (tailor.export.llamacpp.perplexity), one thread. Reads the files
kquant_table's workspace holds (rows/<id>/model.gguf, the base's included).

`--shard DIR` (a calibrate output: train/val.safetensors) also scores the first `--shard-seqs` sequences of its
training and validation shards (`--shard-tokens` each): a gap much smaller on the sequences the fine-tune trained on
than on the held-out ones is memorization, not compression loss (issue 19, session 16: the full profile's fine-tune
draws 1000 x 32 sequences from a 3,600-sequence shard, ~8.9 epochs).
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


def shard_sets(shard: Path, n: int, tokens: int) -> dict[str, list[list[int]]]:
    """The first `n` sequences (first `tokens` tokens) of a calibrate output's train and val shards, as token-id
    lists: {"shard_train": ..., "shard_val": ...}. SystemExit naming the file if one is missing."""
    from safetensors.torch import load_file

    out = {}
    for split in ("train", "val"):
        f = shard / f"{split}.safetensors"
        if not f.is_file():
            raise SystemExit(f"position_gap: --shard {shard}: no {f.name} (a calibrate output has train and val)")
        out[f"shard_{split}"] = load_file(f)["input_ids"][:n, :tokens].tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "kquanttable"), help="kquant_table's workspace")
    ap.add_argument("--rows", default="tailor-k@4.0,tailor-k@4.0+emb,tailor-k@3.0+emb")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench" / "position_gap.json"))
    ap.add_argument("--shard", type=Path, default=None, help="a calibrate output: also its train and val sequences")
    ap.add_argument("--shard-seqs", type=int, default=16)
    ap.add_argument("--shard-tokens", type=int, default=256)
    a = ap.parse_args()
    from benchmarks import kquant_table as kt
    from benchmarks import seed_table as st
    from tailor.export import llamacpp

    work = Path(a.work)
    evalset = kt.table_evalset(st.Ctx(work, None))
    sets = ["wiki", "passages"]
    if a.shard:
        shard = shard_sets(a.shard, a.shard_seqs, a.shard_tokens)
        evalset, sets = {**evalset, **shard}, sets + list(shard)
    rows = {}
    for rid in ["base"] + a.rows.split(","):
        f = work / "rows" / rid / "model.gguf"
        if not f.is_file():
            raise SystemExit(f"position_gap: {f}: no such file (kquant_table builds the workspace)")
        rows[rid] = {s: bucket_means(llamacpp.token_nlls(f, evalset[s], n_threads=1)) for s in sets}
        print(f"position_gap: {rid}: " + json.dumps({s: {k: round(v['nll'], 3) for k, v in b.items()} for s, b in rows[rid].items()}),
              flush=True)
    res = {"what": __doc__.splitlines()[0], "edges": list(EDGES),
           "evalset_sha256": kt.evalset_sha256({k: evalset[k] for k in evalset if not k.startswith("shard_")}),
           "shard": {"dir": str(a.shard), "seqs": a.shard_seqs, "tokens": a.shard_tokens} if a.shard else None,
           "nll": rows, "gap_vs_base": gaps(rows)}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["gap_vs_base"], indent=1))


if __name__ == "__main__":
    main()
