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
