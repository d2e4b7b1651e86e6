"""evaluate (per device): lm-eval tasks and bias slices of the compressed model beside the base model,
with paired bootstrap CIs, and the release gates.

`python -m steps.evaluate --base-only` is not a DVC stage: it fills the base model's result cache (what every
evaluate stage reads first), and the nightly flow starts it right after calibrate when `runner.base_eval` says
so, so that the base's suite runs beside supernet, search and finetune instead of inside the first evaluate."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import sys
import json
import os
import time
from pathlib import Path

from steps._common import artifact_dir, base_model_tags, main_for, report_dir, write_json
from tailor import tracking
from tailor.config import Params
from tailor.eval.gates import check
from tailor.eval.harness import ModelRef, SuiteResult, run_suite_sharded, suite_options, suite_parts, validate_eval_dir
from tailor.eval.slices import compare
from tailor.models.base import base_dir, cache_dir, sha256_file
from tailor.train import pick_device


def _base_cache(params: Params, eval_dir: Path) -> Path:
    """Base results are a pure function of the base model and the eval sets: cache them across devices."""
    h = hashlib.sha256()
    for f in sorted(eval_dir.glob("*.jsonl")):
        h.update(sha256_file(f).encode())
    opts = suite_options(params.evaluate) | {"batch_size": None, "batch_tokens": None}  # batching: same scores
    h.update(json.dumps([params.model.n_layers, (base_dir(params.model.source) / "source.json").read_text(), opts],
                        sort_keys=True).encode())
    return cache_dir() / "eval-base" / f"{h.hexdigest()[:20]}.json"


def base_suite(params: Params, eval_dir: Path, dev) -> SuiteResult:
    """The base model's suite on eval_dir, from the content cache or scored now and cached.

    One process scores a cache entry at a time (an flock beside it): the flow's early `--base-only` run and
    the per-device evaluate stages may all arrive at once, and whoever comes later waits and reads the
    result instead of scoring the base again. The OS drops the lock when its holder dies."""
    cached = _base_cache(params, eval_dir)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached.is_file():
            try:
                return SuiteResult.from_dict(json.loads(cached.read_text()))
            except (ValueError, KeyError, TypeError) as e:  # cut short (a power loss): score it again
                logging.getLogger("tailor.evaluate").warning("%s: unreadable base result (%s): scoring the base again",
                                                             cached, e)
        result = run_suite_sharded(ModelRef(source=params.model.source, n_layers=params.model.n_layers), eval_dir,
                                   str(dev), params.evaluate.shards, **suite_options(params.evaluate))
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict()))
        os.replace(tmp, cached)
        return result


def base_only(params: Params) -> str:
    """`--base-only`: score the base's suite into the cache now, unless `runner.base_eval` keeps it in the
    stage (in-stage, or auto without CUDA). Returns what it did, for the log."""
    import torch

    mode = params.runner.base_eval
    if mode == "in-stage" or (mode == "auto" and not torch.cuda.is_available()):
        return f"runner.base_eval {mode}: left to the evaluate stage"
    eval_dir = artifact_dir("calibrate") / "eval"
    validate_eval_dir(eval_dir, suite_parts(eval_dir, suite_options(params.evaluate)["tasks"]))
    dev = pick_device("auto")
    base_suite(params, eval_dir, dev)
    return f"base suite cached ({_base_cache(params, eval_dir).name}) on {dev}"


def run(params: Params, device: str, model_dir: Path, eval_dir: Path) -> dict:
    ev = params.evaluate
    validate_eval_dir(eval_dir, suite_parts(eval_dir, suite_options(ev)["tasks"]))  # before any model loads
    dev = pick_device("auto")
    t = [time.perf_counter()]

    def lap() -> float:  # seconds since the previous lap (metrics `phase_seconds`: where the stage's time went)
        now = time.perf_counter()
        t.append(now)
        return round(now - t[-2], 2)

    base = base_suite(params, eval_dir, dev)
    phases = {"base": lap()}  # read from the cache, or waited for the flow's early run, or scored here
    # the model loads (and its tokenizer is checked: another model's is refused) where the suite runs
    comp = run_suite_sharded(ModelRef(model_dir=str(model_dir)), eval_dir, str(dev), ev.shards, **suite_options(ev))
    phases["suite"] = lap()
    metrics, slices = compare(base, comp, ev.bootstrap, ev.seed)
    phases["compare"] = lap()
    gates = check(metrics, slices, ev.gates)
    metrics["gates_passed"] = gates["passed"]
    metrics["gates_verdict"] = gates["verdict"]  # pass / fail / indicative (too few items to tell)
    # each shard's scoring (lm-eval's requests and forwards) beside the suite's whole wall time, and before it
    # each shard's start (spawn and imports) and model load (with its CUDA context)
    metrics.update(phase_seconds=phases, suite_seconds=comp.meta.get("shard_seconds", [comp.meta.get("seconds")]),
                   shard_start_seconds=comp.meta.get("shard_start_seconds", []),
                   shard_load_seconds=comp.meta.get("shard_load_seconds", []))
    return {"metrics": metrics, "slices": slices, "gates": gates}


def main() -> None:
    def stage(params: Params, device: str | None) -> None:
        with tracking.stage_run("evaluate", device, params=params.evaluate.model_dump(), tags=base_model_tags()) as tr:
            out = run(params, device, artifact_dir("finetune", device), artifact_dir("calibrate") / "eval")
            rep = report_dir("evaluate", device)
            write_json(rep / "slices.json", out["slices"])
            write_json(rep / "gates.json", out["gates"])
            write_json(rep / "metrics.json", out["metrics"])
            tr.log_metrics(out["metrics"])
            tr.set_tags({f"gate.{g['name']}": g["verdict"] for g in out["gates"]["gates"]}
                        | {f"gate.{g['name']}.reason": g["reason"][:5000] for g in out["gates"]["gates"]}
                        | {"gates_passed": out["gates"]["passed"], "gates_verdict": out["gates"]["verdict"]})
            tr.log_artifact(rep / "slices.json")

    main_for("evaluate", stage, per_device=True)


if __name__ == "__main__":
    if "--base-only" in sys.argv[1:]:
        sys.argv.remove("--base-only")
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        main_for("evaluate", lambda params, _: logging.getLogger("tailor.evaluate").info(
            "evaluate --base-only: %s", base_only(params)))
    else:
        main()
