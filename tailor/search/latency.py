"""Calibrate the latency model against the real runtime on this machine.

A handful of subnets spanning the space (bytes from small to large, depth from shallow to full) are
exported from the supernet, loaded in the device's runtime (llama.cpp or onnxruntime) and timed per
decoded token. Decode is memory bound, so the model is

    seconds/token = bytes / bandwidth + layers x per-layer overhead + fixed,

fitted by least squares (non-negative). The error reported is leave-one-out: each point predicted by
the fit on the others, so it says how well the model predicts a subnet it has not seen. The fitted
per-layer overhead then replaces the default in the device's cost model; the bandwidth stays the
device's spec-sheet figure (this host is not the device).

With several storage types (a profile that names `allowed_types`: K-quants, IQ4_NL, Q4_0 ...) bytes alone
mispredict: on a CPU a K-quant or IQ4_NL weight costs more to decode than a Q4_0 weight of the same bytes
(other dequantize-and-dot kernels; reports/bench/kquant_decode.json). There each point also carries the
weights it multiplies through per type (`type_weights`), one full-structure probe per type joins the
timed subnets, and the fit is

    seconds/token = sum over types (weights of that type x cost per weight of that type)
                    + layers x per-layer overhead + fixed,

whose per-type costs (`type_cost_ns`, this host) then price the matrices in the search's cost model
(`tailor.devices.cost(type_cost_s=...)`) instead of bytes / bandwidth.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import nnls

from tailor.arch import MATRICES, BaseArch, SubnetConfig
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, export_active
from tailor.formats import backend
from tailor.models.base import gguf_path
from tailor.quant.formats import type_name

log = logging.getLogger("tailor.search")


def spread(space: SearchSpace, fmt: str, n: int, candidates: list[SubnetConfig]) -> list[SubnetConfig]:
    """`n` configs evenly spread over bytes (from the given pool), distinct, smallest to largest."""
    arch = space.arch
    pool = sorted({c.hash: c for c in candidates}.values(), key=lambda c: c.nbytes(arch, fmt))
    if len(pool) <= n:
        return pool
    idx = np.unique(np.linspace(0, len(pool) - 1, n).round().astype(int))
    return [pool[i] for i in idx]


def probes(space: SearchSpace) -> list[SubnetConfig]:
    """One full-structure subnet per choice of the space (every matrix at it where it fits, else the next
    larger choice that does; sampled.seeds' corners): with them each type's cost per weight is identifiable."""
    from tailor.search.sampled import seeds

    arch = space.arch
    full = [c for c in seeds(space) if len(c.kept) == arch.n_layers
            and all(lc.kv_groups == arch.n_kv_heads and lc.ffn == max(space.ffn_widths()) for lc in c.layers)]
    return list({c.hash: c for c in full}.values())


def type_weights(cfg: SubnetConfig, arch: BaseArch, fmt: str) -> dict[str, int]:
    """Weights one decoded token multiplies through, per stored type: every kept matrix at its choice and
    the LM head (the tied embedding table, or the untied head) at the embedding's."""
    out: Counter[str] = Counter()
    for lc in cfg.layers:
        if lc.keep:
            for m in MATRICES:
                rows, cols = arch.matrix_shape(m, lc.kv_groups, lc.ffn)
                out[type_name(fmt, lc.bits[m])] += rows * cols
    out[type_name(fmt, cfg.embed_bits)] += arch.vocab * arch.hidden
    return dict(sorted(out.items()))


def timing_threads(threads: int | None) -> int:
    """The CPU threads a timing runs on: `threads` (`search.latency_threads`) capped at the cores this process may
    use (more threads than cores stall at llama.cpp's spinning barriers), or with None the process's share
    (`tailor.export.runtime_threads`)."""
    from tailor.export import runtime_threads

    if not threads:
        return runtime_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(threads, cores))


def seconds_per_token(path: Path, fmt: str, tokenizer: Any, n_tokens: int = 32, threads: int | None = None) -> float:
    """Seconds per decoded token of the file in its format's runtime (the backend's runner), on
    `timing_threads(threads)` CPU threads."""
    return backend(fmt).runner.seconds_per_token(path, tokenizer, n_tokens, n_threads=timing_threads(threads))


@torch.no_grad()
def measure(model, cfgs: list[SubnetConfig], fmt: str, tokenizer: Any, gguf_template: Path | None = None,
            threads: int | None = None) -> list[dict]:
    """Export each subnet and time it in its runtime on `threads` threads. `gguf_template`: the model's tokenizer
    GGUF."""
    be = backend(fmt)
    writer, name = be.writer, be.file_name
    arch_layers = model.config.num_hidden_layers
    arch = arch_of(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tailor-latency-") as d:
        for k, cfg in enumerate(cfgs):
            small = export_active(model, cfg, fmt)
            path = Path(d) / f"{k}-{name}"
            kw = {"template": gguf_template or gguf_path()} if be.needs_tokenizer_file else {}
            info = writer.export(small, tokenizer, path, **kw)
            s = seconds_per_token(path, fmt, tokenizer, threads=threads)
            rows.append({"config_hash": cfg.hash, "weight_bytes": int(info["weight_bytes"]), "layers": len(cfg.kept),
                         "measured_ms": s * 1e3, "of_layers": arch_layers})
            try:  # what the per-type model fits (a choice its format cannot name: the bytes model only)
                rows[-1]["type_weights"] = type_weights(cfg, arch, fmt)
            except ValueError:
                pass
            del small
            path.unlink(missing_ok=True)
            for extra in Path(d).glob(f"{k}-*"):
                extra.unlink(missing_ok=True)
    return rows


def typed(rows: list[dict]) -> list[str]:
    """The types the per-type model fits, or [] for the bytes model: every point must carry its
    `type_weights`, they must name two types at least, and leave-one-out needs more points than unknowns."""
    if not rows or any("type_weights" not in r for r in rows):
        return []
    types = sorted({t for r in rows for t, n in r["type_weights"].items() if n})
    return types if len(types) >= 2 and len(rows) >= len(types) + 3 else []


def _features(rows: list[dict], types: list[str]) -> np.ndarray:
    if types:  # weights per type, layers, 1
        return np.array([[r["type_weights"].get(t, 0) for t in types] + [r["layers"], 1.0] for r in rows], dtype=float)
    return np.array([[r["weight_bytes"], r["layers"], 1.0] for r in rows], dtype=float)


def _fit(rows: list[dict], types: list[str] = ()) -> np.ndarray:
    A = _features(rows, list(types))
    y = np.array([r["measured_ms"] / 1e3 for r in rows])
    scale = np.where(A.max(0) > 0, A.max(0), 1.0)
    coef, _ = nnls(A / scale, y)
    return coef / scale


def calibrate(rows: list[dict], per_type: bool = False) -> dict:
    """Fit (bandwidth, per-layer overhead, fixed), or with `per_type` and `typed` points (per-type cost per
    weight, per-layer overhead, fixed; else the bytes model), and the leave-one-out MAPE."""
    types = typed(rows) if per_type else []
    coef = _fit(rows, types)
    errs = []
    for k in range(len(rows)):
        c = _fit(rows[:k] + rows[k + 1:], types)
        r = rows[k]
        pred = float(c @ _features([r], types)[0])
        errs.append(abs(pred - r["measured_ms"] / 1e3) / (r["measured_ms"] / 1e3))
        r["predicted_ms_loo"] = round(pred * 1e3, 4)
    out = {"host_bandwidth_gbs": None if types else (round(1 / coef[0] / 1e9, 2) if coef[0] > 0 else None),
           "layer_overhead_us": round(coef[-2] * 1e6, 3), "fixed_us": round(coef[-1] * 1e6, 3),
           "latency_mape": round(float(np.mean(errs)), 4), "n_configs": len(rows), "points": rows}
    if types:
        out["type_cost_ns"] = {t: round(float(c) * 1e9, 5) for t, c in zip(types, coef)}
    return out


def type_cost_s(lat: dict | None) -> dict[str, float] | None:
    """Seconds per weight per type from a calibration (None when it fitted the bytes model)."""
    if not lat or not lat.get("type_cost_ns"):
        return None
    return {t: ns / 1e9 for t, ns in lat["type_cost_ns"].items()}


def cache_key(fmt: str, cfgs: list[SubnetConfig], threads: int | None = None) -> str:
    """Decode time depends on the structure and bit-widths, the runtime, the machine and the threads the
    runtime runs on (`timing_threads`), not on the weight values: measurements are reused across supernets
    and budgets."""
    import hashlib
    import json
    import platform

    from tailor.export import runtime_versions
    blob = json.dumps({"fmt": fmt, "cfgs": [c.hash for c in cfgs], "rt": runtime_versions(),
                       "host": [platform.machine(), platform.processor(), os.cpu_count()],
                       "threads": timing_threads(threads)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def timed_configs(space: SearchSpace, fmt: str, n: int, pool: list[SubnetConfig], per_type: bool) -> list[SubnetConfig]:
    """The subnets `run` times: `n` spread over `pool`, and with `per_type` one probe per type (`probes`)."""
    cfgs = spread(space, fmt, n, pool)
    if per_type:
        cfgs += [c for c in probes(space) if c.hash not in {x.hash for x in cfgs}]
    return cfgs


def cache_path(cache: Path, fmt: str, cfgs: list[SubnetConfig], threads: int | None = None) -> Path:
    return Path(cache) / f"{cache_key(fmt, cfgs, threads)}.json"


def _store(path: Path, rows: list[dict]) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a child and its parent may both write: never one file
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)


def measured_once(path: Path, measure_rows: Callable[[], list[dict]],
                  wait_s: float | None = None) -> tuple[list[dict], bool]:
    """(rows, cached): the cache entry at `path`, or `measure_rows()` stored there. One process measures an entry
    at a time (an flock beside it): the flow's early `--latency-only` job, a search's background child and the
    search itself may all ask for it, and whoever comes later waits and reads it instead of timing the same
    subnets again on a CPU the first one is timing on. The OS drops the lock when its holder dies.
    wait_s: the longest wait for another holder (None: no limit); after it this process measures anyway (a hung
    holder must not hang a search), and the entry is replaced whole (`_store`)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        if not _flock(lock, wait_s):
            log.warning("%s: still being measured by another process after %.0f s: measuring here", path, wait_s)
        if path.is_file():
            try:
                return json.loads(path.read_text()), True
            except ValueError:  # cut short by a power loss (_store replaces atomically, but a disk may not): again
                pass
        rows = measure_rows()
        _store(path, rows)
        return rows, False


def _flock(f: Any, wait_s: float | None) -> bool:
    """An exclusive flock on `f`, waiting at most wait_s (None: as long as it takes); False if it timed out."""
    if wait_s is None:
        fcntl.flock(f, fcntl.LOCK_EX)
        return True
    end = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.2)


def is_cached(cache: Path, space: SearchSpace, fmt: str, n: int, pool: list[SubnetConfig], per_type: bool,
              threads: int | None = None) -> bool:
    """Whether `run` would find its timings in `cache` (the same subnets, runtime, host and threads)."""
    return cache_path(cache, fmt, timed_configs(space, fmt, n, pool, per_type), threads).is_file()


@torch.no_grad()
def run(model, space: SearchSpace, fmt: str, tokenizer: Any, n: int, pool: list[SubnetConfig],
        cache: Path | None = None, gguf_template: Path | None = None, per_type: bool = False,
        wait_s: float | None = None, threads: int | None = None) -> dict:
    """Time `n` subnets spread over `pool` (and with `per_type`, one probe per type: `probes`) on `threads` CPU
    threads (None: `tailor.export.runtime_threads()`) and fit.
    wait_s: the longest wait for another process measuring the same cache entry (`measured_once`)."""
    cfgs = timed_configs(space, fmt, n, pool, per_type)
    if cache:
        rows, cached = measured_once(cache_path(cache, fmt, cfgs, threads),
                                     lambda: measure(model, cfgs, fmt, tokenizer, gguf_template, threads), wait_s)
    else:
        rows, cached = measure(model, cfgs, fmt, tokenizer, gguf_template, threads), False
    out = calibrate([{k: v for k, v in r.items() if k != "predicted_ms_loo"} for r in rows], per_type)
    out["cached"] = cached
    return out


class Background:
    """`run`'s exports and timings in a child process, into `run`'s cache, so that a GPU machine's search
    scores its sensitivity table on the GPU while the CPU exports and times the subnets (on the H200 12 of
    them took ~140 s with the GPU idle: reports/bench/pipeline.json, session 18). Timing depends on the
    structure, the runtime and the host, not on the weights, so the child may load the supernet itself, on
    the CPU. `run` afterwards finds the cache entry; if the child failed or ran past `wait`'s timeout, `run`
    measures in the calling process as it always did: only the overlap is lost.

    Spawned, not forked: a fork of a process that holds a CUDA context is unsafe."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, space: SearchSpace, fmt: str, n: int,
                 pool: list[SubnetConfig], cache: Path, gguf_template: Path | None = None, per_type: bool = False,
                 threads: int | None = None):
        import multiprocessing

        self.proc = multiprocessing.get_context("spawn").Process(
            target=_measure_into_cache, daemon=True,
            args=(str(model_dir), str(tokenizer_dir), space, fmt, n, pool, str(cache),
                  str(gguf_template) if gguf_template else None, per_type, threads))
        self.proc.start()

    def wait(self, timeout_s: float) -> str:
        """Join the child: "ok", "exit N" or "timed out" (then killed)."""
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            return "timed out"
        return "ok" if self.proc.exitcode == 0 else f"exit {self.proc.exitcode}"


def _measure_into_cache(model_dir: str, tokenizer_dir: str, space: SearchSpace, fmt: str, n: int,
                        pool: list[SubnetConfig], cache: str, gguf_template: str | None, per_type: bool,
                        threads: int | None = None) -> None:
    from transformers import AutoTokenizer

    from tailor.models.base import load_model_dir

    cfgs = timed_configs(space, fmt, n, pool, per_type)

    def measure_rows() -> list[dict]:  # loads the model only when the entry is missing
        return measure(load_model_dir(Path(model_dir)), cfgs, fmt, AutoTokenizer.from_pretrained(tokenizer_dir),
                       Path(gguf_template) if gguf_template else None, threads)

    measured_once(cache_path(Path(cache), fmt, cfgs, threads), measure_rows)
