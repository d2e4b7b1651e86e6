"""flows/nightly.py `task_runner`: a local Dask cluster's stages get a share of the cores, not Dask's pins."""
import copy
import os
from pathlib import Path

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
    dask.config.set({"distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": 1})  # Dask's own default (another
    # test in this process may have run task_runner already)
    tr = task_runner(RunnerParams(kind="dask", workers=4))
    assert tr.cluster_kwargs["env"]["OMP_NUM_THREADS"] == "4"
    # no pin left for the nanny to write into this process's environment before it spawns a worker
    assert dask.config.get("distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS") is None
    assert task_runner(RunnerParams(kind="local")) is None


def test_stage_graph_of_the_real_dvc_yaml():
    """export reads the fine-tuned model, not evaluate's reports: within a device the two run side by side;
    register reads both. Devices never wait for each other."""
    from pathlib import Path

    from flows.nightly import stage_graph, targets

    root = Path(__file__).resolve().parents[2]
    g = stage_graph(root, ["phone", "laptop"])
    assert list(g) == targets(root, ["phone", "laptop"])
    assert g["export@phone"] == ["calibrate", "finetune@phone"]
    assert g["evaluate@phone"] == ["calibrate", "finetune@phone"]
    assert set(g["register@laptop"]) >= {"evaluate@laptop", "export@laptop", "search@laptop"}
    assert g["finetune@phone"] == ["calibrate", "supernet", "search@phone"]
    assert not [u for t, us in g.items() for u in us if "@" in t and "@" in u and u.split("@")[1] != t.split("@")[1]]


def test_stage_graph_resolves_paths_as_dvc_does(tmp_path):
    """vars interpolation, `./` paths, files inside an output folder, folders holding outputs, metrics: the edges
    `dvc repro` follows (a path matcher of our own missed the first two: a stage then ran before its input)."""
    import subprocess
    import sys

    import yaml

    from flows.nightly import stage_graph

    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("devices: {p: {}, q: {}}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"vars": [{"art": "artifacts"}], "stages": {
        "a": {"cmd": "x", "outs": ["${art}/a"], "metrics": [{"rep/a.json": {"cache": False}}]},
        "b": {"foreach": "${devices}", "do": {"cmd": "x", "deps": ["./artifacts/a/model.bin"], "outs": ["art/b/${key}"]}},
        "c": {"foreach": "${devices}", "do": {"cmd": "x", "deps": ["art/b", "rep/a.json"], "outs": ["art/c/${key}"]}},
        "d": {"foreach": "${devices}", "do": {"cmd": "x", "deps": ["artifacts/a2"], "outs": ["art/d/${key}"]}}}}))
    g = stage_graph(tmp_path, ["p", "q"])
    assert g["b@p"] == ["a"]  # `${art}` and `./` resolved; a file inside an output folder
    assert g["c@q"] == ["a", "b@p", "b@q"]  # a folder holding outputs; a metrics file
    assert g["d@p"] == []  # artifacts/a2 is not inside artifacts/a
