"""llama.cpp on every core (the runners' default until session 21) against the process's share of them
(`tailor.export.runtime_threads`), on an idle machine and beside busy processes, as export@phone runs beside the
evaluate shards: the export's perplexity of the full profile's documents, and the latency model's decode timing
(the old estimator, the fastest of three 16-step means, beside the new fastest single step).

    python benchmarks/runtime_threads.py --gguf F.gguf --docs docs.json [--n-docs 500] [--share 4] [--busy 12]
        [--machine NAME] [--out reports/bench/runtime_threads.json]
    python benchmarks/runtime_threads.py --write-docs docs.json      # the full profile's 500 wiki documents,
                                                                     # tokenized by SmolLM2 (to carry elsewhere)

Why: on session 21's H200 run the phone's llama.cpp perplexity of 500 documents took 310 s on 16 threads, and
one latency subnet timed at 2.2 s a token where its neighbours took 6-12 ms. `--busy` spawns that many processes
spinning in Python (the shards' per-request Python is what shares the cores). The JSON holds one run per
`--machine` (a new run replaces that machine's) and is written after each row, so a cut-short run keeps the rows
it finished.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT_IDS = [504, 2365, 282, 260, 2260, 6099]  # any short prompt: the timing does not depend on its text


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def write_docs(out: Path, n: int) -> None:
    from tailor.models.base import base_dir, load_tokenizer

    tok = load_tokenizer(base_dir())
    src = ROOT / ".bwq/calibrate_full/eval/wiki.jsonl"  # calibrate's eval split at the full profile
    texts = [json.loads(line)["text"] for line in src.open()][:n]
    out.write_text(json.dumps([ids for ids in (tok(t)["input_ids"] for t in texts) if len(ids) >= 2]))


def old_seconds_per_token(path: Path, tok, n_threads: int) -> float:
    """The estimator until session 21: the fastest of three 16-step decode means."""
    from tailor.export import llamacpp

    return min(1.0 / llamacpp.tokens_per_s(path, tok, n_tokens=16, n_threads=n_threads) for _ in range(3))


def _save(out: Path, run: dict) -> None:
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = [r for r in runs if r["machine"] != run["machine"]] + [run]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--n-docs", type=int, default=500)
    ap.add_argument("--share", type=int, default=4, help="the stage's threads (the flow gives each of 4 workers 16/4)")
    ap.add_argument("--busy", type=int, default=12, help="spinning processes beside the busy rows")
    ap.add_argument("--machine", default=platform.node())
    ap.add_argument("--write-docs", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench/runtime_threads.json")
    a = ap.parse_args()
    if a.write_docs:
        return write_docs(a.write_docs, a.n_docs)
    from tailor.export import llamacpp

    docs = json.loads(a.docs.read_text())[: a.n_docs]
    tok = SimpleNamespace(encode=lambda text: PROMPT_IDS)
    every = os.cpu_count() or 1
    res = {"machine": a.machine, "cpu_count": every, "share": a.share, "busy_processes": a.busy,
           "n_docs": len(docs), "tokens": sum(len(d) for d in docs), "gguf_bytes": a.gguf.stat().st_size, "rows": []}
    for load in ("idle", "busy"):
        procs = []
        if load == "busy":
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(a.busy)]
            for p in procs:
                p.start()
            time.sleep(1.0)
        try:
            for threads in (every, a.share):
                t = time.perf_counter()
                ppl = llamacpp.perplexity(a.gguf, docs, n_threads=threads)
                ppl_s = time.perf_counter() - t
                new = llamacpp.seconds_per_token(a.gguf, tok, 32, n_threads=threads)
                old = old_seconds_per_token(a.gguf, tok, threads)
                res["rows"].append({"load": load, "threads": threads, "ppl_seconds": round(ppl_s, 2), "ppl": ppl,
                                    "latency_ms_new": round(new * 1e3, 3), "latency_ms_old": round(old * 1e3, 3)})
                print(json.dumps(res["rows"][-1]), flush=True)
                _save(a.out, res)
        finally:
            for p in procs:
                p.kill()


if __name__ == "__main__":
    main()
