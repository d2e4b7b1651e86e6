"""tailor.parallel: results in input order whatever the engine, bad runners refused by name, state built
once per process; the `runner` section of params.yaml validated with errors naming the key."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from tailor import parallel
from tailor.config import ConfigError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[2]


def test_local_runner_is_a_plain_loop_in_order():
    seen = []
    out = parallel.map_candidates(lambda x: seen.append(x) or x * x, [3, 1, 2], runner="local")
    assert out == [9, 1, 4] and seen == [3, 1, 2]
    assert parallel.map_candidates(abs, [], runner="dask", workers=2) == []  # nothing to do: no cluster


def test_dask_runner_keeps_input_order_on_two_workers():
    pytest.importorskip("dask.distributed")
    items = list(range(-6, 6))
    # functools.partial of a builtin: picklable by reference, like a library function would be.
    assert parallel.map_candidates(functools.partial(pow, 3), items, runner="dask", workers=2) == [3 ** x for x in items]


@pytest.mark.parametrize("runner, workers, match", [("ray", 2, "runner: unknown kind 'ray'"),
                                                    ("local", 0, "runner.workers: must be at least 1")])
def test_bad_runner_is_refused_by_name(runner, workers, match):
    with pytest.raises(ValueError, match=match):
        parallel.map_candidates(abs, [1], runner=runner, workers=workers)


def test_process_cache_builds_once_and_drops_the_oldest():
    parallel.clear_cache()
    built = []

    def build(k):
        built.append(k)
        return object()

    a = parallel.process_cache("a", lambda: build("a"))
    assert parallel.process_cache("a", lambda: build("a")) is a and built == ["a"]
    parallel.process_cache("b", lambda: build("b"))
    parallel.process_cache("c", lambda: build("c"))  # evicts "a" (least recently used)
    parallel.process_cache("a", lambda: build("a"))
    assert built == ["a", "b", "c", "a"]
    parallel.clear_cache()


def test_runner_defaults_to_local_and_bad_values_name_the_key():
    assert load_params(ROOT / "params.yaml").runner.kind == "local"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    ok = parse_params({**raw, "runner": {"kind": "dask", "workers": 3, "address": "tcp://10.0.0.5:8786"}})
    assert (ok.runner.kind, ok.runner.workers, ok.runner.address) == ("dask", 3, "tcp://10.0.0.5:8786")
    cases = [({"kind": "ray"}, "runner.kind: Input should be 'local' or 'dask'"),
             ({"workers": 0}, "runner.workers: Input should be greater than 0"),
             ({"kind": "local", "address": "tcp://h:8786"}, "runner: Value error, address is only used with kind 'dask'"),
             ({"kind": "dask", "address": "h:8786"}, "runner: Value error, address must be a scheduler URL"),
             ({"nodes": 4}, "runner.nodes: unknown key")]
    for section, msg in cases:
        with pytest.raises(ConfigError, match="^params.yaml: " + msg.replace("(", r"\(").replace(")", r"\)")):
            parse_params({**raw, "runner": section})


@pytest.mark.parametrize("asked, gpus, slot, runs_on", [
    ("cuda", 2, 0, "cuda:0"), ("cuda", 2, 1, "cuda:1"), ("cuda", 2, 3, "cuda:1"),  # worker i -> GPU i mod G
    ("cuda", 1, 1, "cuda"),          # one GPU: every worker shares it
    ("cuda", 2, None, "cuda"),       # not a numbered local worker (this process, a remote cluster's)
    ("cuda:0", 2, 1, "cuda:0"), ("cpu", 2, 1, "cpu")])  # an explicit device is kept
def test_worker_device_spreads_local_workers_over_the_gpus(monkeypatch, asked, gpus, slot, runs_on):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(parallel, "worker_slot", lambda: slot)
    assert parallel.worker_device(asked) == runs_on


def test_local_cluster_workers_have_slots_zero_to_n():
    """What `worker_device` relies on: in a task on a LocalCluster's worker i (as map_candidates runs
    them) the slot is i, 0..n-1; outside a worker there is none."""
    pytest.importorskip("dask.distributed")
    from dask.distributed import Client, LocalCluster

    assert parallel.worker_slot() is None
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        addrs = list(client.scheduler_info()["workers"])
        slots = client.gather([client.submit(parallel.worker_slot, workers=[a], pure=False) for a in addrs])
        assert sorted(slots) == [0, 1]
