"""flows/nightly.py `task_runner`: a local Dask cluster's stages get a share of the cores, not Dask's pins."""
import copy
import os

import pytest

from tailor.config import RunnerParams

pytest.importorskip("prefect_dask")


@pytest.fixture
def sixteen_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))


def test_worker_env_shares_the_cores_unless_the_user_set_a_count(sixteen_cores):
    from flows.nightly import worker_env

    assert worker_env(2, {}) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "OPENBLAS_NUM_THREADS": "8"}
    assert worker_env(40, {})["OMP_NUM_THREADS"] == "1"  # more workers than cores: still one each
    assert worker_env(4, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def test_local_cluster_replaces_dasks_one_thread_pins(sixteen_cores, monkeypatch):
    import dask

    from flows.nightly import task_runner

    monkeypatch.setattr(dask.config, "config", copy.deepcopy(dask.config.config))  # undone after the test
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert dask.config.get("distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS") == 1  # Dask's own default
    tr = task_runner(RunnerParams(kind="dask", workers=4))
    assert tr.cluster_kwargs["env"]["OMP_NUM_THREADS"] == "4"
    # no pin left for the nanny to write into this process's environment before it spawns a worker
    assert dask.config.get("distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS") is None
    assert task_runner(RunnerParams(kind="local")) is None
