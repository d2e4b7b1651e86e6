"""Test-wide isolation: every cache and store lives in a temp dir, never in the home directory."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="tailor-tests-"))
for var, sub in (("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hf/datasets"), ("PREFECT_HOME", "prefect"),
                 ("MPLCONFIGDIR", "mpl"), ("XDG_CACHE_HOME", "xdg")):
    os.environ[var] = str(_TMP / sub)
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                  TOKENIZERS_PARALLELISM="false", GIT_PYTHON_REFRESH="quiet", DVC_SITE_CACHE_DIR=str(_TMP / "dvc-site"))
# Under pytest-xdist (`make test` runs one worker per core) each worker's torch, and the stage subprocesses it
# starts, get an equal share of the cores: intra-op threads oversubscribed across workers spin against each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# The converted base model is a pure function of the installed package: share it across tests (and
# with `make run`) in the repo's own .cache, not in the home directory.
os.environ.setdefault("TAILOR_CACHE", str(ROOT / ".cache" / "tailor"))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TAILOR_ROOT", str(tmp_path))
    return uri


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (Prefect's own testing advice).

    Prefect's logging is configured here, outside any test's captured or CliRunner streams, so its
    handlers never write to a stream a finished test has closed."""
    from prefect.logging.configuration import setup_logging
    from prefect.testing.utilities import prefect_test_harness

    setup_logging(incremental=False)
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.hookimpl(trylast=True)  # after `-m 'not slow'` deselected: the shares are of the items that run
def pytest_collection_modifyitems(config, items):
    """Spread the whole-pipeline flow tests (5-10 minutes each on two cores) over the xdist workers.

    xdist's work-stealing scheduler first gives each of the N workers a contiguous 1/N of the items; each
    flow test goes to the start of a different share, so no worker is handed two of them back to back while
    another idles at the end. Without xdist the order does not matter and is left alone."""
    if _WORKERS < 2:
        return
    heavy = [it for it in items if it.nodeid.split("::")[0].rsplit("/", 1)[-1].startswith("test_flow_")]
    rest = [it for it in items if it not in heavy]
    shares: list[list] = [[] for _ in range(_WORKERS)]
    for i, it in enumerate(heavy):
        shares[i % _WORKERS].append(it)
    per = len(items) // _WORKERS  # each worker's initial share, as the scheduler splits it (floor first)
    out = []
    for share in shares:
        take = max(0, per - len(share))
        out += share + rest[:take]
        rest = rest[take:]
    items[:] = out + rest
