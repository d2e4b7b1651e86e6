"""When the search scores candidates on a Dask cluster: a running one always; a throwaway local one only
where its workers add compute (CPU cores, several GPUs), never on the one GPU the stage already holds."""
import torch

from steps.search import fans_out
from tailor.config import RunnerParams


def test_local_runner_never_fans_out():
    assert not fans_out(RunnerParams(kind="local"), "cpu")


def test_local_cluster_on_cpu_fans_out():
    assert fans_out(RunnerParams(kind="dask"), "cpu")
    assert fans_out(RunnerParams(kind="dask"), torch.device("cpu"))


def test_local_cluster_on_one_gpu_does_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not fans_out(RunnerParams(kind="dask"), "cuda")
    assert not fans_out(RunnerParams(kind="dask"), torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert fans_out(RunnerParams(kind="dask"), "cuda")  # one worker per GPU


def test_running_cluster_always_fans_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert fans_out(RunnerParams(kind="dask", address="tcp://h:8786"), "cuda")
