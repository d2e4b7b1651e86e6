"""The nightly deployment's home: a process work pool, and the deployment applied into it.

A worker (`prefect worker start --pool tailor`) runs each scheduled flow run in a subprocess whose
working directory is the project root; the deployment's concurrency limit of 1 (flows/nightly.py)
keeps two nightly runs from interleaving on one registry and one DVC workspace."""
from __future__ import annotations

from pathlib import Path

POOL = "tailor"


def ensure_pool(name: str = POOL) -> None:
    """Create the process work pool unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as c:
        try:
            c.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def apply(dep, root: Path, pool: str = POOL):
    """Apply `dep` (a RunnerDeployment of the nightly flow) into `pool`; returns the deployment id."""
    ensure_pool(pool)
    # The worker loads flows/nightly.py:nightly relative to its working directory: the project root.
    dep.job_variables = {**(dep.job_variables or {}), "working_dir": str(Path(root).resolve())}
    return dep.apply(work_pool_name=pool)
