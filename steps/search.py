"""search (per device): sensitivity table on the supernet, then MIP, NSGA-II and Gumbel-softmax search
at the device's budget, every candidate scored on the supernet (KL to the base model) and costed
exactly in the device's format; the best (optionally fairness-aware) wins. Every candidate is an
MLflow child run."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from steps._common import artifact_dir, base_model_tags, load_shard, main_for, report_dir, staged_dir, write_csv, write_json
from tailor import tracking
from tailor.config import ConfigError, Params, RunnerParams
from tailor.devices import budget_bytes, cost
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_max
from tailor.export.gguf_vocab import tokenizer_gguf
from tailor.models.base import base_dir, cache_dir, load_base, load_model_dir, sha256_file, slice_config
from tailor.models.model import TailorConfig
from tailor.search import fairness, fanout, gumbel, latency, mip, nsga, plots, sensitivity
from tailor.search.fanout import ScoreJob
from tailor.search.sampled import Candidate, NoFeasibleSubnet, pareto, propose, score, seeds, shrink_to_fit
from tailor.train import pick_device


def device_space(params: Params, device: str, model, meta: dict, by_importance: bool = True) -> SearchSpace:
    """The device's search space on the supernet that wrote `meta` (its space.json). by_importance=False:
    layers drop in the default order (`SearchSpace.build`'s) instead of the supernet's importance order."""
    prof = params.device(device)
    trained = meta["formats"].get(prof.format, [])
    bits = [b for b in trained if b in prof.choices]
    untrained = [c for c in prof.choices if c not in trained]
    if untrained:  # never a narrower search than the profile asks for, silently
        key = "allowed_types" if prof.allowed_types is not None else "allowed_bits"
        raise ConfigError(f"devices.{device}.{key}: {untrained} not trained by the supernet on the {prof.format} grid "
                          f"(it trained {meta['formats']}); the supernet stage does not depend on `devices`: re-run it "
                          "(`dvc repro -f supernet`) after changing a device's choices")
    return SearchSpace.build(arch_of(model), bits, [prof.embed_bits], meta["min_ffn_frac"], meta["min_kv_groups"],
                             meta["max_drop_frac"], meta["drop_order"] if by_importance else None)


def latency_space(params: Params, device: str, model, meta: dict | None = None) -> SearchSpace:
    """The space the latency model's subnets are drawn from: the device's, with layers dropped in the default
    order. A subnet's decode time depends on how many layers it keeps and at which widths and types, not on
    which layers they are (all have one shape) nor on the weights; so these subnets calibrate the latency model
    of any supernet, and with no importance order in them they are known before the supernet has trained
    (`latency_only`). meta: the supernet's space.json; None: what the supernet stage will write (params)."""
    sp = params.supernet
    meta = meta or {"formats": params.supernet_formats(), "min_ffn_frac": sp.min_ffn_frac,
                    "min_kv_groups": sp.min_kv_groups, "max_drop_frac": sp.max_drop_frac}
    return device_space(params, device, model, meta, by_importance=False)


def latency_only(params: Params, devices: list[str]) -> str:
    """`python -m steps.search --latency-only --devices a,b`, not a DVC stage: export and time each device's
    latency subnets (`latency_space`) into the latency cache from the base model, which the search stages then
    read instead of timing them. The nightly flow starts it right after calibrate, so that on a GPU machine this
    CPU work (session 20's phone search waited 81 s for it) runs beside the supernet's GPU training. Where the
    supernet trains on the CPU (`supernet.device`) it does nothing: timings taken beside a CPU training run would
    be slow, and cached. Unknown device names are refused (ConfigError) before anything runs. Returns what it
    did, for the log."""
    profs = {d: params.device(d) for d in devices}  # every name checked first
    if pick_device(params.supernet.device).type != "cuda":
        return "the supernet trains on the CPU: the search stages time their latency subnets themselves"
    n = params.search.latency_configs
    if not n or not devices:
        return "nothing to time (latency_configs: 0, or no device)"
    cfg = TailorConfig.from_pretrained(base_dir(params.model.source))  # the shape, without loading the weights
    k = params.model.n_layers
    shape = SimpleNamespace(config=slice_config(cfg, k) if k is not None and k < cfg.num_hidden_layers else cfg)
    model = tok = None
    done = []
    for device, prof in profs.items():
        space = latency_space(params, device, shape)
        per_type = prof.allowed_types is not None
        if latency.is_cached(cache_dir() / "latency", space, prof.format, n, seeds(space), per_type,
                             params.search.latency_threads):
            done.append(f"{device} cached")
            continue
        if model is None:
            model, tok = load_base(params.model.source, params.model.n_layers, device="cpu")
        template = tokenizer_gguf(base_dir(params.model.source)) if prof.format == "gguf" else None
        t0 = time.perf_counter()
        out = latency.run(model, space, prof.format, tok, n, seeds(space), cache_dir() / "latency",
                          gguf_template=template, per_type=per_type, threads=params.search.latency_threads)
        what = "cached" if out["cached"] else f"{len(out['points'])} subnets timed"
        done.append(f"{device} {what} ({time.perf_counter() - t0:.1f} s)")
    return "latency subnets: " + ", ".join(done)


class Scorer:
    """Scores subnets on the supernet once each (by config hash) and keeps every candidate.

    `many` scores a batch: in this process, or fanned out on the Dask cluster of params.yaml's `runner`
    (tailor.search.fanout: the workers load the supernet and the teacher logits once, from files)."""

    def __init__(self, model, space: SearchSpace, prof, val, teacher, overhead: float | None,
                 fan: tuple[ScoreJob, RunnerParams] | None = None, type_cost: dict[str, float] | None = None,
                 batch_size: int = 8):
        self.model, self.space, self.prof, self.val, self.teacher = model, space, prof, val, teacher
        self.batch_size = batch_size  # sequences a forward; `teacher` is chunked alike
        self.overhead, self.fan, self.type_cost = overhead, fan, type_cost
        self.seen: dict[str, Candidate] = {}
        self.seconds = 0.0

    def _candidate(self, cfg, origin: str) -> Candidate:
        c = cost(cfg, self.space.arch, self.prof, self.overhead, self.type_cost)
        return Candidate(cfg, c.nbytes, c.bits_per_param, c.latency_s, origin=origin)

    def __call__(self, cfg, origin: str) -> Candidate:
        if cfg.hash in self.seen:
            return self.seen[cfg.hash]
        cand = self._candidate(cfg, origin)
        t0 = time.perf_counter()
        score(self.model, cand, self.prof.format, self.val, self.teacher, self.batch_size)
        self.seconds += time.perf_counter() - t0
        self.seen[cfg.hash] = cand
        return cand

    def many(self, cfgs: list, origin: str) -> list[Candidate]:
        if self.fan is None:
            return [self(c, origin) for c in cfgs]
        new = list({c.hash: self._candidate(c, origin) for c in cfgs if c.hash not in self.seen}.values())
        t0 = time.perf_counter()
        job, runner = self.fan
        fanout.score_candidates(job, new, runner.kind, runner.workers, runner.address)
        self.seconds += time.perf_counter() - t0
        self.seen.update((c.config.hash, c) for c in new)
        return [self.seen[c.hash] for c in cfgs]

    @property
    def candidates(self) -> list[Candidate]:
        return list(self.seen.values())


LATENCY_WAIT_S = 900.0  # the latency child's time before it is ended and this process measures instead


def fans_out(runner: RunnerParams, dev) -> bool:
    """Whether the search scores its candidate batches on the Dask cluster of `runner`. A running cluster
    (`address`): yes. A throwaway local one: only where its workers add compute, on the CPU (their own
    cores) or on several GPUs (one each). On one GPU they would queue on the device this process holds,
    after each loaded the supernet and the teacher logits: on an H200 the MIP's 5 subnets took 37.7 s
    that way (reports/bench/pipeline.json, session 18)."""
    if runner.kind != "dask":
        return False
    if runner.address is not None:
        return True
    return torch.device(dev).type != "cuda" or torch.cuda.device_count() > 1


def run(params: Params, device: str, supernet_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    prof, sp = params.device(device), params.search
    dev = pick_device(params.supernet.device)
    model = load_model_dir(supernet_dir / "model").to(dev)
    meta = json.loads((supernet_dir / "space.json").read_text())
    space = device_space(params, device, model, meta)
    arch = arch_of(model)
    budget = budget_bytes(prof, arch)
    if not cost(space.min(), arch, prof).fits:
        raise NoFeasibleSubnet(f"devices.{device}: budget {budget:,} B is below the smallest subnet "
                               f"({cost(space.min(), arch, prof).nbytes:,} B in {prof.format})")
    t_setup = time.perf_counter()
    base_files = base_dir(params.model.source)  # the converted base: tokenizer files and the tokenizer GGUF
    template = tokenizer_gguf(base_files) if prof.format == "gguf" and sp.latency_configs else None
    per_type = prof.allowed_types is not None  # a profile that names its types also learns each type's decode cost
    lat_space = latency_space(params, device, model, meta)
    # left by the flow's early `latency_only`
    lat_cached = latency.is_cached(cache_dir() / "latency", lat_space, prof.format, sp.latency_configs, seeds(lat_space),
                                   per_type, sp.latency_threads)
    # on a GPU machine the latency subnets are exported and timed by a child on the CPU, beside the GPU work below
    lat_bg = (latency.Background(supernet_dir / "model", base_files, lat_space, prof.format,
                                 sp.latency_configs, seeds(lat_space), cache_dir() / "latency", template, per_type,
                                 sp.latency_threads)
              if sp.latency_configs and torch.device(dev).type == "cuda" and not lat_cached else None)
    base, tok = load_base(params.model.source, params.model.n_layers, device=dev)
    val = load_shard(data_dir / "val.safetensors")[: sp.val_seqs]
    teacher = teacher_logits(base, val, sp.score_batch)
    t0 = time.perf_counter()
    phases = {"setup": t0 - t_setup}  # seconds of each phase: where a search's time goes (metrics `phase_seconds`)

    # (0) the sensitivity table, cached by what it depends on (not the budget)
    sens_val = val[: sp.sens_seqs, : sp.sens_tokens]
    key = sensitivity.cache_key(sha256_file(supernet_dir / "model" / "model.safetensors"), prof.format, space,
                                prof.embed_bits, sens_val)
    table, cached = sensitivity.load_or_measure(cache_dir() / "sensitivity", key, model, space, prof.format,
                                                prof.embed_bits, sens_val, teacher_logits(base, sens_val))
    phases["sensitivity"] = time.perf_counter() - t0
    t_lat = time.perf_counter()
    # the latency model's per-layer overhead, calibrated on the real runtime on this machine
    # then `run` reads the cache entry the child (or the flow's early job) left, or measures; the two waits
    # together at most LATENCY_WAIT_S
    lat_child = lat_bg.wait(LATENCY_WAIT_S) if lat_bg else ("cached before the search" if lat_cached else None)
    lat = (latency.run(model, lat_space, prof.format, tok, sp.latency_configs, seeds(lat_space), cache_dir() / "latency",
                       gguf_template=template, per_type=per_type, threads=sp.latency_threads,
                       wait_s=max(0.0, LATENCY_WAIT_S - (time.perf_counter() - t_lat))) if sp.latency_configs else None)
    overhead = lat["layer_overhead_us"] / 1e6 if lat else None
    phases["latency"] = time.perf_counter() - t_lat
    type_cost = latency.type_cost_s(lat)
    fan_dir = tempfile.TemporaryDirectory(prefix="tailor-fanout-") if fans_out(params.runner, dev) else None
    fan = None
    if fan_dir is not None:  # workers read these files: a shared filesystem when `runner.address` is remote
        inputs = fanout.write_inputs(Path(fan_dir.name) / "inputs.safetensors", val.cpu(), [t.cpu() for t in teacher])
        # a local cluster scores where this stage runs (on a GPU machine, one worker per GPU); a remote
        # cluster's machines may have none, so its workers score on their CPUs
        where = str(dev) if params.runner.address is None else "cpu"
        fan = (fanout.ScoreJob(str(supernet_dir / "model"), str(inputs), prof.format, batch_size=sp.score_batch,
                               device=where), params.runner)
    scorer = Scorer(model, space, prof, val, teacher, overhead, fan, type_cost, sp.score_batch)
    per_strategy: dict[str, dict] = {}

    def best_of(cands: list[Candidate]) -> Candidate | None:
        fit = [c for c in cands if c.nbytes <= budget and math.isfinite(c.kl)]  # NaN KL: never chosen
        return min(fit, key=lambda c: c.kl) if fit else None

    mip_seeds = []
    for strategy in sp.strategies:
        ts, n0 = time.perf_counter(), len(scorer.seen)
        if strategy == "mip":
            mip_seeds = mip.solutions(table, space, prof.format, prof.embed_bits, budget)
            mine = scorer.many(mip_seeds, "mip")
        elif strategy == "nsga":
            if not mip_seeds:
                mip_seeds = mip.solutions(table, space, prof.format, prof.embed_bits, budget)
            mine = []

            def evaluate(cfg):
                c = cost(cfg, arch, prof, overhead, type_cost)
                if not c.fits:  # infeasible: the table's estimate ranks it, no forward pass spent
                    return table.predict(cfg), c.nbytes, c.latency_s
                cand = scorer(cfg, "nsga")
                mine.append(cand)
                return cand.kl, cand.nbytes, cand.latency_s

            nsga.run(space, prof.embed_bits, evaluate, budget, sp.n_candidates, sp.seed, mip_seeds)
        elif strategy == "gumbel":
            res = gumbel.search(model, space, prof.format, prof.embed_bits, budget, val, teacher, sp.gumbel_steps, sp.seed,
                                batch_size=sp.score_batch)
            cfg = res.config
            if not cost(cfg, arch, prof).fits:
                cfg = shrink_to_fit(cfg, space, prof, torch.Generator().manual_seed(sp.seed))
            mine = [scorer(cfg, "gumbel")]
        else:  # "sampled": structured seeds + random subnets repaired to fit
            mine = scorer.many([c.config for c in propose(space, prof, sp.n_candidates, sp.seed)], "sampled")
        best = best_of(mine)
        per_strategy[strategy] = {"best_kl": best.kl if best else None, "best_hash": best.config.hash if best else None,
                                  "best_bytes": best.nbytes if best else None, "n_evaluated": len(mine),
                                  "new_candidates": len(scorer.seen) - n0, "seconds": round(time.perf_counter() - ts, 2)}
    if fan_dir is not None:
        fan_dir.cleanup()
    cands = scorer.candidates
    blind = best_of(cands)
    if blind is None:
        raise NoFeasibleSubnet(f"devices.{device}: no strategy found a subnet under {budget:,} B")

    # fairness: worst-group stereotype rise of the best-KL candidates, measured beside the base model
    t_fair = time.perf_counter()
    fair = fairness_compare(params, model, base, tok, cands, budget, data_dir, prof.format, blind)
    phases["fairness"] = time.perf_counter() - t_fair
    chosen = fair["aware_candidate"] if sp.fairness.enabled else blind
    set_max(model)
    with staged_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(chosen.config.to_json())
        write_json(tmp / "candidates.json", [dict(c.row(), config=c.config.to_dict()) for c in cands])
        write_json(tmp / "sensitivity.json", table.to_dict())
    seconds = time.perf_counter() - t0
    metrics = {"n_candidates": len(cands), "chosen_hash": chosen.config.hash, "bytes": chosen.nbytes,
               "budget_bytes": budget, "bits_per_param": round(chosen.bits_per_param, 4), "kl": chosen.kl,
               "val_loss": chosen.val_loss, "predicted_latency_ms": round(chosen.latency_s * 1e3, 3),
               "kept_layers": len(chosen.config.kept), "chosen_by": chosen.origin, "strategies": per_strategy,
               "fairness": {k: v for k, v in fair.items() if not k.endswith("_candidate")},
               "sensitivity": {"cached": cached, "seconds": table.seconds, "entries": len(table.bits) + len(table.drop)
                               + len(table.kv) + len(table.ffn), "key": key},
               "latency_mape": lat["latency_mape"] if lat else None,
               "latency_model": ({k: v for k, v in lat.items() if k != "points"} | {"background": lat_child})
               if lat else None,
               "search_seconds": round(seconds, 2),
               "phase_seconds": {k: round(v, 2) for k, v in phases.items()}
               | {f"strategy.{k}": v["seconds"] for k, v in per_strategy.items()},
               "candidates_per_s": round(len(cands) / scorer.seconds, 3) if scorer.seconds else None}
    return {"metrics": metrics, "candidates": cands, "best": chosen, "table": table, "space": space,
            "latency_points": lat["points"] if lat else []}


def fairness_compare(params: Params, model, base, tok, cands: list[Candidate], budget: int, data_dir: Path,
                     fmt: str, blind: Candidate) -> dict:
    """Fairness-blind (least KL) vs fairness-aware (least KL + weight x worst-group rise) choice among the
    `top_k` best-KL candidates under the budget, both with their KL and worst-group delta."""
    from tailor.elastic.supernet import set_active

    fp = params.search.fairness
    pairs = fairness.load_pairs(data_dir / "eval" / "crows_pairs.jsonl", fp.per_group, params.search.seed)
    ids, mask = fairness.encode(tok, pairs)
    groups = [p["group"] for p in pairs]
    base_share = fairness.group_shares(base, ids, mask, groups)
    top = sorted((c for c in cands if c.nbytes <= budget), key=lambda c: c.kl)[: fp.top_k]
    rows = {}
    for c in top:
        set_active(model, c.config, fmt)
        g, d = fairness.worst_delta(fairness.group_shares(model, ids, mask, groups), base_share)
        rows[c.config.hash] = (c, g, d)
    aware = min(rows.values(), key=lambda r: r[0].kl + fp.weight * max(0.0, r[2]))
    b = rows[blind.config.hash]
    return {"enabled": fp.enabled, "weight": fp.weight, "pairs": len(pairs), "measured": len(rows),
            "blind": {"hash": blind.config.hash, "kl": blind.kl, "worst_group": b[1], "worst_group_delta": round(b[2], 4),
                      "bytes": blind.nbytes},
            "aware": {"hash": aware[0].config.hash, "kl": aware[0].kl, "worst_group": aware[1],
                      "worst_group_delta": round(aware[2], 4), "bytes": aware[0].nbytes},
            "aware_candidate": aware[0]}


def main() -> None:
    def stage(params: Params, device: str | None) -> None:
        with tracking.stage_run("search", device, params=params.search.model_dump(), tags=base_model_tags()) as tr:
            out = run(params, device, artifact_dir("supernet"), artifact_dir("calibrate"), artifact_dir("search", device))
            rep = report_dir("search", device)
            rows = [dict(c.row(), chosen=c is out["best"]) for c in out["candidates"]]
            write_csv(rep / "candidates.csv", [{k: r[k] for k in ("config_hash", "nbytes", "bits_per_param", "kl",
                                                                  "val_loss", "latency_s", "origin")} for r in rows])
            front = pareto(out["candidates"])
            write_csv(rep / "pareto.csv", [{"nbytes": c.nbytes, "kl": c.kl, "origin": c.origin} for c in front])
            plots.pareto_png(out["candidates"], front, out["best"], out["metrics"]["budget_bytes"], rep / "pareto.png")
            plots.heatmap_png(out["best"].config, out["space"].arch, rep / "bits.png")
            if out["latency_points"]:
                # a point's weights per type as one cell ("Q4_K=884736 Q8_0=2654208"): no commas inside
                write_csv(rep / "latency.csv", [{**{k: v for k, v in p.items() if k != "type_weights"},
                                                 "type_weights": " ".join(f"{t}={n}" for t, n in p.get("type_weights", {}).items())}
                                                for p in out["latency_points"]])
            else:  # calibration switched off (latency_configs: 0): an empty table, the stage's outs stay whole
                (rep / "latency.csv").write_text("config_hash,weight_bytes,layers,measured_ms,predicted_ms_loo\n")
            write_json(rep / "metrics.json", out["metrics"])
            tr.log_metrics(out["metrics"])
            tr.set_tags({"chosen_hash": out["metrics"]["chosen_hash"], "chosen_by": out["metrics"]["chosen_by"]})
            tr.log_candidates(rows)
            for f in ("pareto.png", "bits.png"):
                tr.log_artifact(rep / f)

    main_for("search", stage, per_device=True)


if __name__ == "__main__":
    if "--latency-only" in sys.argv[1:]:
        sys.argv.remove("--latency-only")
        ap = argparse.ArgumentParser(prog="python -m steps.search --latency-only", add_help=False, allow_abbrev=False)
        ap.add_argument("--devices", default="", help="comma-separated device names")
        args, sys.argv[1:] = ap.parse_known_args(sys.argv[1:])
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        main_for("search", lambda params, _: logging.getLogger("tailor.search").info(
            "search --latency-only: %s", latency_only(params, [d.strip() for d in args.devices.split(",") if d.strip()])))
    else:
        main()
