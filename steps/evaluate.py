"""evaluate (per device): lm-eval tasks and bias slices of the compressed model beside the base model,
with paired bootstrap CIs, and the release gates."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from steps._common import artifact_dir, base_model_tags, main_for, report_dir, write_json
from tailor import tracking
from tailor.config import Params
from tailor.eval.gates import check
from tailor.eval.harness import SuiteResult, run_suite, suite_options, suite_parts, validate_eval_dir
from tailor.eval.slices import compare
from tailor.models.base import base_dir, cache_dir, load_base, load_model_dir, load_tokenizer, sha256_file
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
    cached = _base_cache(params, eval_dir)
    if cached.is_file():
        return SuiteResult.from_dict(json.loads(cached.read_text()))
    base, tok = load_base(params.model.source, params.model.n_layers, device=dev)
    result = run_suite(base, tok, eval_dir, device=str(dev), **suite_options(params.evaluate))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    os.replace(tmp, cached)
    return result


def run(params: Params, device: str, model_dir: Path, eval_dir: Path) -> dict:
    ev = params.evaluate
    validate_eval_dir(eval_dir, suite_parts(eval_dir, suite_options(ev)["tasks"]))  # before any model loads
    dev = pick_device("auto")
    base = base_suite(params, eval_dir, dev)
    model = load_model_dir(model_dir).to(dev)
    tok = load_tokenizer(model_dir, model)  # refuses a tokenizer of another model
    comp = run_suite(model, tok, eval_dir, device=str(dev), **suite_options(ev))
    metrics, slices = compare(base, comp, ev.bootstrap, ev.seed)
    gates = check(metrics, slices, ev.gates)
    metrics["gates_passed"] = gates["passed"]
    metrics["gates_verdict"] = gates["verdict"]  # pass / fail / indicative (too few items to tell)
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
    main()
