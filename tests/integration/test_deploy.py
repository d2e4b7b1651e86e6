"""`tailor deploy` creates the nightly deployment with the cron schedule from params.yaml, in a process
work pool, with a concurrency limit of 1; triggered, a worker runs it to completion."""
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_deploy_registers_the_cron_schedule(prefect_harness):
    from prefect.client.orchestration import get_client

    from tailor.cli import app
    from tailor.config import load_params

    cron = load_params(ROOT / "params.yaml").schedule.cron
    result = CliRunner().invoke(app, ["deploy", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output

    async def read():
        async with get_client() as c:
            dep = await c.read_deployment_by_name("tailor-nightly/nightly")
            # The limit lives in a global concurrency limit named after the deployment.
            limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else dep.concurrency_limit
            pool = await c.read_work_pool(dep.work_pool_name)
            return [s.schedule.cron for s in dep.schedules], limit, pool.type, dep.job_variables["working_dir"]

    assert asyncio.run(read()) == ([cron], 1, "process", str(ROOT))


def _toy_project(root: Path) -> None:
    """A project with this repo's params.yaml and a one-stage dvc.yaml: the real nightly flow over a
    DAG that takes a second (the real one takes ten minutes)."""
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"calibrate": {
        "cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('ok')\"", "outs": ["out.txt"]}}}))
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "remote", "add", "-d", "local", str(root.parent / "remote")]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


def test_triggered_deployment_runs_to_completion(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    from tailor.cli import app

    result = CliRunner().invoke(app, ["deploy", "--pool", "tailor-test", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    _toy_project(tmp_path / "proj")
    run = run_deployment("tailor-nightly/nightly", parameters={"root": str(tmp_path / "proj"), "devices": ["phone"]},
                         timeout=0)

    async def work() -> str:
        async with ProcessWorker(work_pool_name="tailor-test") as worker:
            await worker.get_and_submit_flow_runs()
            deadline = time.monotonic() + 240
            async with get_client() as c:
                while time.monotonic() < deadline:
                    state = (await c.read_flow_run(run.id)).state
                    if state.is_final():
                        return state.type.value
                    await asyncio.sleep(1)
        return "TIMEOUT"

    assert asyncio.run(work()) == "COMPLETED"
    assert (tmp_path / "proj" / "out.txt").read_text() == "ok"
