"""Which cut of a searched subnet costs what, and at which token positions: KL(base || subnet) by position, before
any fine-tune, for the subnet as searched and with one kind of cut restored at a time (KV groups, FFN widths,
both), each with its weight bytes. CPU, float32; writes reports/bench/cut_attribution.json.

    python benchmarks/cut_attribution.py --base DIR --importance F --val F --search search.json [--row tailor-k@4.0]
                                         [--seqs 12] [--out reports/bench/cut_attribution.json]

--base: the converted base directory (blockwise_quality unpack), --importance: the supernet stage's importance
order (kquant_gpu writes kq/importance.safetensors), --val: the calibrate stage's val.safetensors, --search: a
kquant_gpu search.json holding the row's config. Each subnet is cut from the permuted base as kquant_gpu's
fine-tunes start (export_active on the phone's GGUF grid, fake-quantized); the KL is per token, averaged in
position buckets over --seqs validation sequences.

Why: issue 19's <= 4.0 row loses most at long context after its fine-tune (benchmarks/position_gap.py); this
says whether its KV-group cuts or its FFN cuts cost the late positions, and what each costs per byte.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EDGES = (0, 16, 32, 64, 128, 256, 512)
KINDS = ("searched", "kv", "ffn", "structure")  # what is restored to the base's: nothing, KV groups, FFN, both


def restored(config: dict[str, Any], kind: str, kv_groups: int, ffn: int) -> dict[str, Any]:
    """`config` (a SubnetConfig dict) with its cuts of `kind` undone on every kept layer: "kv" sets every
    layer's KV groups to `kv_groups`, "ffn" its FFN width to `ffn`, "structure" both, "searched" nothing. Bits,
    dropped layers and the embedding are left as they are. ValueError on another kind."""
    if kind not in KINDS:
        raise ValueError(f"cut_attribution: kind {kind!r} is not one of {', '.join(KINDS)}")
    c = copy.deepcopy(config)
    for lc in c["layers"]:
        if kind in ("kv", "structure"):
            lc["kv_groups"] = kv_groups
        if kind in ("ffn", "structure"):
            lc["ffn"] = ffn
    return c


def per_mb(kl: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """KL removed per MB spent restoring, for each restored kind against "searched"; None where the restore
    adds no bytes (the subnet had no cut of that kind)."""
    s = kl["searched"]
    out: dict[str, float | None] = {}
    for k, v in kl.items():
        if k != "searched":
            mb = (v["weight_bytes"] - s["weight_bytes"]) / 1e6
            out[k] = round((s["all"] - v["all"]) / mb, 4) if mb else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--importance", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--search", type=Path, required=True)
    ap.add_argument("--row", default="tailor-k@4.0")
    ap.add_argument("--seqs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "cut_attribution.json")
    a = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from benchmarks import seed_table_gpu as sg
    from benchmarks.kquant_gpu import search_rows
    from tailor.arch import SubnetConfig
    from tailor.elastic import importance
    from tailor.elastic.supernet import arch_of, export_active
    from tailor.models.base import load_model_dir

    torch.set_num_threads(1)
    model = load_model_dir(a.base).eval()
    importance.permute_(model, sg.load_importance(a.importance))
    arch = arch_of(model)
    rows = search_rows(a.search)  # a search.json, or a device record holding one (kquant_gpu_s14.json)
    if a.row not in rows or "config" not in rows[a.row]:
        raise SystemExit(f"cut_attribution: {a.search}: no config for row {a.row}")
    val = load_file(a.val)["input_ids"][: a.seqs].long()
    res: dict[str, Any] = {"what": __doc__.splitlines()[0], "row": a.row, "search": str(a.search), "seqs": list(val.shape),
                           "edges": list(EDGES), "kl": {}}
    with torch.no_grad():
        t = [torch.log_softmax(model(val[i: i + 1]).logits.float(), -1) for i in range(len(val))]
        pos = torch.arange(val.shape[1])
        for kind in KINDS:
            cfg = SubnetConfig.from_dict(restored(rows[a.row]["config"], kind, arch.n_kv_heads, arch.ffn))
            student = export_active(model, cfg, "gguf").eval()
            kl = torch.stack([(t[i].exp() * (t[i] - torch.log_softmax(student(val[i: i + 1]).logits.float(), -1))).sum(-1)[0]
                              for i in range(len(val))])  # [N, T]
            row = {f"{lo}-{hi}": round(float(kl[:, (pos >= lo) & (pos < hi)].mean()), 4)
                   for lo, hi in zip(EDGES, EDGES[1:]) if ((pos >= lo) & (pos < hi)).any()}
            row.update(all=round(float(kl.mean()), 4), weight_bytes=cfg.nbytes(arch, "gguf"))
            res["kl"][kind] = row
            print(f"cut_attribution: {kind}: {json.dumps(row)}", flush=True)
    res["per_mb"] = per_mb(res["kl"])
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["per_mb"]))


if __name__ == "__main__":
    main()
