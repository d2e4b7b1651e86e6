"""Engine-agnostic fan-out of independent jobs (search candidates): a plain loop, or a Dask cluster.

`map_candidates(fn, items, runner, workers)` returns `[fn(x) for x in items]` in input order whichever
engine runs it, so a caller's result (the chosen subnet) cannot depend on the engine. With Dask, `fn`
must be picklable: a top-level function, or a `functools.partial` of one over small picklable
arguments (paths, not tensors). Workers load heavy state once per process through `process_cache`.

The library stays free of orchestration: this is Dask's own API (dask.distributed), no Prefect.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RUNNERS = ("local", "dask")
_CACHE_SIZE = 2  # a worker scores one supernet at a time; two leaves room for a switch without reloading
_cache: OrderedDict[Hashable, Any] = OrderedDict()


def process_cache(key: Hashable, build: Callable[[], T]) -> T:
    """`build()` once per process for `key` (e.g. a supernet loaded from its directory), then reused.

    Dask ships the function to every call but keeps worker processes alive, so a model loaded here is
    loaded once per worker, not once per candidate. Least recently used entries are dropped."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = build()
    _cache[key] = value
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def clear_cache() -> None:
    _cache.clear()


def worker_slot() -> int | None:
    """This process's worker number in a Dask LocalCluster (its workers are named 0, 1, ...); None
    outside a Dask worker or on a worker named otherwise (e.g. a remote cluster's)."""
    try:
        from dask.distributed import get_worker
        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


def worker_device(device: str) -> str:
    """The device a job asked as `device` runs on in this process: plain "cuda" in worker i of a local
    cluster on a machine of G GPUs is `cuda:{i mod G}`, so one worker per GPU spreads over all of them
    (without this every worker would share GPU 0). Anything else (cpu, an explicit cuda:N, a worker
    that is not a numbered local one, such as one dask-cuda pins with CUDA_VISIBLE_DEVICES) is kept."""
    if device != "cuda":
        return device
    import torch

    gpus, slot = torch.cuda.device_count(), worker_slot()
    return f"cuda:{slot % gpus}" if gpus > 1 and slot is not None else device


def map_candidates(fn: Callable[[T], R], items: Sequence[T], runner: str = "local", workers: int = 2,
                   address: str | None = None) -> list[R]:
    """`[fn(x) for x in items]`, run by `runner`: 'local' (this process, in order) or 'dask'.

    'dask' connects to the scheduler at `address` when given (a shared cluster), else starts a
    throwaway LocalCluster of `workers` single-threaded processes (processes, not threads: torch
    holds the GIL in Python glue and each worker gets its own model copy)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner: unknown kind {runner!r} (known: {', '.join(RUNNERS)})")
    if workers < 1:
        raise ValueError(f"runner.workers: must be at least 1, got {workers}")
    items = list(items)
    if runner == "local" or not items:
        return [fn(x) for x in items]
    return _dask_map(fn, items, workers, address)


def _dask_map(fn: Callable[[T], R], items: list[T], workers: int, address: str | None) -> list[R]:
    from dask.distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            return _gather(client, fn, items)
    # dashboard off: no port to collide with other engineers' clusters, and no bokeh needed.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        return _gather(client, fn, items)


def _gather(client, fn: Callable[[T], R], items: list[T]) -> list[R]:
    # pure=False: identical items are still evaluated (and counted) each; gather keeps input order.
    futures = client.map(fn, items, pure=False)
    return client.gather(futures)
