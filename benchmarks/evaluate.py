"""Time the evaluate suite of the base model for a profile (default full: every task and item, MMLU
included) and record it in reports/bench/evaluate.json: seconds, items, model tokens and tokens/s per task.

Needs the calibrate eval sets of that profile (artifacts/calibrate/eval; wiki, PIQA and CrowS-Pairs are
sized by calibrate.*_docs, the other sets are written whole). On a GPU machine:

    python benchmarks/evaluate.py --profile full [--eval-dir DIR] [--batch-size 64]
    python benchmarks/evaluate.py --profile quick    # CPU: what each `make run` evaluate stage costs per model

--per-task (default) scores each task in its own run_suite call, so each task's time is its own (the
evaluate stage scores them all in one lm-eval call; the sum is close to that, plus one lm-eval setup per
task). The held-out wiki perplexity runs alone first; the other calls keep one wiki document (run_suite
always scores wiki). --whole times the stage's single call instead (no per-task split).

--scorers hflm,batched times lm-eval's HFLM and tailor.eval.scorer.BatchedHFLM on each task in the same run
(baseline and candidate side by side) and records how far apart their per-item log-likelihoods are;
--scorers batched-noshare,batched does the same for the batched scorer without and with shared contexts.

Tokens are what the model was fed: a forward pre-hook on the first decoder block adds up batch x length of
every forward pass (both scorers pad each forward to its longest request, so padding counts: it is compute
the device did).
The JSON keeps one entry per (profile, device type): a GPU run never overwrites the CPU quick entry.
Entries are written after every task, so a run cut off at its time limit still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

from tailor.config import load_params
from tailor.eval.harness import run_suite, suite_options
from tailor.models.base import load_base


class TokenCounter:
    """Counts tokens and forward calls through a model: a pre-hook on its first decoder block, which every
    scorer's forward passes through (the batched one skips the model's own forward())."""

    def __init__(self, model: torch.nn.Module):
        self.tokens = self.calls = 0
        self.handle = model.model.layers[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            self.tokens += x.numel() // x.shape[-1]  # (B, T, hidden) -> B * T
            self.calls += 1

    def take(self) -> tuple[int, int]:
        out = (self.tokens, self.calls)
        self.tokens = self.calls = 0
        return out


def _device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def _write(path: Path, key: str, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("runs", {})[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


SCORERS = ("hflm", "batched", "batched-noshare")


def _time_task(model, tok, eval_dir: Path, dev: str, opts: dict, task: str, counter: TokenCounter):
    """One task under one scorer: its timing row, and every log-likelihood it computed (item order)."""
    _sync(dev)
    if opts["scorer"] == "batched-noshare":  # the batched scorer without shared contexts: share_contexts' baseline
        opts = opts | {"scorer": "batched", "share_contexts": False}
    res = run_suite(model, tok, eval_dir, device=dev, **opts)
    _sync(dev)
    tokens, calls = counter.take()
    sec = res.meta["seconds"]
    n = res.meta["n"][task]
    row = {"seconds": sec, "cpu_seconds": res.meta["cpu_seconds"], "items": n, "model_tokens": tokens,
           "forward_calls": calls, "tokens_per_s": round(tokens / sec) if sec else None,
           "items_per_s": round(n / sec, 1) if sec else None}
    if task == "wiki":
        row["ppl"] = res.ppl()
        lls = [-w.nll for w in res.wiki]
    else:
        row["acc"] = res.acc(task)
        lls = [x for it in res.tasks[task] for x in it.ll]
    return row, lls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="full")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--eval-dir", default="artifacts/calibrate/eval")
    ap.add_argument("--base", default=None, help="a converted base model directory instead of the profile's source "
                                                 "(the GPU machine: blockwise_quality's unpacked base)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the profile's evaluate.batch_size")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: the profile's evaluate.batch_tokens")
    ap.add_argument("--tasks", default=None, help="comma list (default: the profile's evaluate.tasks)")
    ap.add_argument("--whole", action="store_true", help="one run_suite call for all tasks, as the stage does")
    ap.add_argument("--skip-wiki", action="store_true", help="per-task: leave out the wiki run (another process times it)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    ap.add_argument("--scorers", default=None, help="comma list of hflm,batched,batched-noshare (batched without "
                                                     "shared contexts): each task timed with each, side by side "
                                                     "(default: the profile's evaluate.scorer)")
    ap.add_argument("--out", default="reports/bench/evaluate.json")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.scorers:  # before minutes of model loading and wiki timing
        names = args.scorers.split(",")
        bad = [n for n in names if n not in SCORERS]
        if bad or len(set(names)) != len(names) or args.whole:
            ap.error(f"--scorers {args.scorers}: " + (f"unknown {bad} (known: {', '.join(SCORERS)})" if bad else
                     "a scorer named twice" if len(set(names)) != len(names) else "not with --whole (one call, one scorer)"))
    p = load_params(args.params, args.profile)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    opts = suite_options(p.evaluate) | ({"batch_size": args.batch_size} if args.batch_size else {})
    if args.batch_tokens:
        opts["batch_tokens"] = args.batch_tokens
    if args.tasks:
        opts["tasks"] = tuple(t for t in args.tasks.split(",") if t)
    if args.threads:
        opts["num_threads"] = args.threads
    eval_dir = Path(args.eval_dir)
    t0 = time.perf_counter()
    if args.base:
        from tailor.models.base import load_model_dir, load_tokenizer

        model = load_model_dir(Path(args.base), n_layers=p.model.n_layers).to(dev)
        tok = load_tokenizer(Path(args.base), model)
    else:
        model, tok = load_base(p.model.source, p.model.n_layers, device=dev)
    _sync(dev)
    load_s = time.perf_counter() - t0
    counter = TokenCounter(model)
    scorers = args.scorers.split(",") if args.scorers else [opts["scorer"]]
    key = f"{args.profile}/{'gpu' if dev == 'cuda' else 'cpu'}" + ("/" + "-vs-".join(scorers) if args.scorers else "")
    entry = {
        "profile": args.profile, "device": _device_name(dev), "device_type": dev,
        "gpu_count": torch.cuda.device_count() if dev == "cuda" else 0, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": version("transformers"), "lm_eval": version("lm_eval"),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch_size": opts["batch_size"], "batch_tokens": opts["batch_tokens"], "scorers": scorers, "max_length": opts["max_length"], "mode": "whole" if args.whole else "per-task",
        "eval_dir_rows": {f.stem: sum(1 for ln in f.read_text(encoding="utf-8").split("\n") if ln.strip())
                          for f in sorted(eval_dir.glob("*.jsonl"))},
        "load_s": round(load_s, 2), "tasks": {}, "status": "running",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": ("one model (the base); a device's evaluate stage scores the compressed model this way and the "
                 "base once (cached across devices). " + args.note).strip(),
    }
    out = Path(args.out)
    t_all = time.perf_counter()
    if args.whole:
        _sync(dev)
        res = run_suite(model, tok, eval_dir, device=dev, **opts)
        _sync(dev)
        tokens, calls = counter.take()
        entry["tasks"]["all"] = {"seconds": res.meta["seconds"], "items": res.meta["n"], "model_tokens": tokens,
                                 "forward_calls": calls, "tokens_per_s": round(tokens / res.meta["seconds"])}
        entry["ppl"] = res.ppl()
        entry["accuracy"] = {t: res.acc(t) for t in res.tasks}
    else:
        for task in (() if args.skip_wiki else ("wiki",)) + tuple(opts["tasks"]):
            limits = dict(opts["limits"]) | ({} if task == "wiki" else {"wiki": 1})
            one = opts | {"tasks": () if task == "wiki" else (task,), "limits": limits}
            rows, items = {}, {}
            for sc in scorers:
                rows[sc], items[sc] = _time_task(model, tok, eval_dir, dev, one | {"scorer": sc}, task, counter)
                print(f"{task:15s} {sc:8s} {rows[sc]['seconds']:8.1f} s {rows[sc]['items']:7d} items "
                      f"{rows[sc]['model_tokens']:11d} tokens {rows[sc]['tokens_per_s'] or 0:9d} tok/s", flush=True)
            row = dict(rows[scorers[-1]])
            if len(scorers) > 1:
                a, b = (items[sc] for sc in scorers[:2])
                row = {"by_scorer": rows, "speedup": round(rows[scorers[0]]["seconds"] / rows[scorers[1]]["seconds"], 2),
                       "max_abs_dll": max(abs(x - y) for x, y in zip(a, b, strict=True)),
                       "seconds": rows[scorers[-1]]["seconds"], "model_tokens": rows[scorers[-1]]["model_tokens"]}
            entry["tasks"][task] = row
            entry["suite_s"] = round(sum(r["seconds"] for r in entry["tasks"].values()), 2)
            _write(out, key, entry)
    entry["suite_s"] = round(sum(r["seconds"] for r in entry["tasks"].values()), 2)
    entry["wall_s"] = round(time.perf_counter() - t_all + load_s, 2)
    entry["model_tokens"] = sum(r["model_tokens"] for r in entry["tasks"].values())
    entry["tokens_per_s"] = round(entry["model_tokens"] / entry["suite_s"]) if entry["suite_s"] else None
    entry["status"] = "complete"
    _write(out, key, entry)
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
