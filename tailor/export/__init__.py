"""Export backends: one writer and one runtime module per format."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def runtime_versions() -> dict[str, str | None]:
    """Versions of the device runtimes on this machine (what a timing or parity result depends on)."""
    out = {}
    for pkg in ("llama-cpp-python", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def runtime_threads() -> int:
    """CPU threads the device runtimes (llama.cpp, onnxruntime) run on in this process: torch's intra-op thread
    count, which is the physical core count unless OMP_NUM_THREADS or torch.set_num_threads says otherwise (the
    flow's Dask runner gives each stage its share of the cores that way: flows/nightly.py worker_env).

    Not os.cpu_count(): both runtimes spin their threads at barriers, and a process that takes every core of a
    machine other stages share collapses. On the H200 run of session 21 the phone's llama.cpp perplexity of 500
    short documents took 310 s on 16 threads beside the evaluate shards, where 2 threads on an idle 2-core
    machine take 37 s (reports/bench/pipeline.json, attempt s21-a)."""
    import torch

    return max(1, torch.get_num_threads())
