"""`tailor deploy` creates the nightly deployment with the cron schedule from params.yaml."""
import asyncio
from pathlib import Path

import pytest
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
            return [s.schedule.cron for s in dep.schedules], limit

    assert asyncio.run(read()) == ([cron], 1)
