"""search (per device): candidates scored on the supernet by KL to the base model, costed exactly in the
device's format; the best under the budget is chosen. Every candidate is an MLflow child run."""
from __future__ import annotations

import json
from pathlib import Path


from steps._common import artifact_dir, load_shard, main_for, report_dir, staged_dir, write_csv, write_json
from tailor import tracking
from tailor.config import ConfigError, Params
from tailor.devices import budget_bytes
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of
from tailor.models.base import load_base, load_model_dir
from tailor.search.sampled import NoFeasibleSubnet, pareto, run_search
from tailor.train import pick_device


def device_space(params: Params, device: str, model, meta: dict) -> SearchSpace:
    prof = params.device(device)
    bits = [b for b in meta["bits"] if b in prof.allowed_bits]
    if not bits:
        raise ConfigError(f"devices.{device}.allowed_bits: none of {prof.allowed_bits} was trained by the supernet "
                          f"(supernet.bits = {meta['bits']})")
    return SearchSpace.build(arch_of(model), bits, [prof.embed_bits], meta["min_ffn_frac"], meta["min_kv_groups"],
                             meta["max_drop_frac"], meta["drop_order"])


def run(params: Params, device: str, supernet_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    prof, sp = params.device(device), params.search
    dev = pick_device(params.supernet.device)
    model = load_model_dir(supernet_dir / "model").to(dev)
    meta = json.loads((supernet_dir / "space.json").read_text())
    space = device_space(params, device, model, meta)
    base, _ = load_base(params.model.n_layers, device=dev)
    val = load_shard(data_dir / "val.safetensors")[: sp.val_seqs]
    teacher = teacher_logits(base, val)
    del base
    try:
        best, cands = run_search(model, space, prof, val, teacher, sp.n_candidates, sp.seed)
    except NoFeasibleSubnet as e:
        raise NoFeasibleSubnet(f"devices.{device}: {e}") from None
    arch = arch_of(model)
    with staged_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(best.config.to_json())
        write_json(tmp / "candidates.json", [dict(c.row(), config=c.config.to_dict()) for c in cands])
    metrics = {"n_candidates": len(cands), "chosen_hash": best.config.hash, "bytes": best.nbytes,
               "budget_bytes": budget_bytes(prof, arch), "bits_per_param": round(best.bits_per_param, 4),
               "kl": best.kl, "val_loss": best.val_loss, "predicted_latency_ms": round(best.latency_s * 1e3, 3),
               "kept_layers": len(best.config.kept), "strategy": "sampled"}
    return {"metrics": metrics, "candidates": cands, "best": best}


def main() -> None:
    def stage(params: Params, device: str | None) -> None:
        with tracking.stage_run("search", device, params=params.search.model_dump()) as tr:
            out = run(params, device, artifact_dir("supernet"), artifact_dir("calibrate"), artifact_dir("search", device))
            rep = report_dir("search", device)
            write_json(rep / "metrics.json", out["metrics"])
            rows = [dict(c.row(), chosen=c is out["best"]) for c in out["candidates"]]
            write_csv(rep / "candidates.csv", [{k: r[k] for k in ("config_hash", "nbytes", "bits_per_param", "kl",
                                                                  "val_loss", "latency_s", "origin")} for r in rows])
            front = {c.config.hash for c in pareto(out["candidates"])}
            write_csv(rep / "pareto.csv", [{"nbytes": r["nbytes"], "kl": r["kl"]} for r in rows
                                           if r["config_hash"] in front])
            tr.log_metrics(out["metrics"])
            tr.set_tags({"chosen_hash": out["metrics"]["chosen_hash"]})
            tr.log_candidates(rows)

    main_for("search", stage, per_device=True)


if __name__ == "__main__":
    main()
