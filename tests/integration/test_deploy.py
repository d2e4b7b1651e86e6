"""`tailor deploy` creates the nightly deployment with the cron schedule from params.yaml."""
import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_deploy_registers_the_cron_schedule():
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from tailor.cli import app
    from tailor.config import load_params

    cron = load_params(ROOT / "params.yaml").schedule.cron
    with prefect_test_harness():
        result = CliRunner().invoke(app, ["deploy", "--params", str(ROOT / "params.yaml")])
        assert result.exit_code == 0, result.output

        async def read():
            async with get_client() as c:
                dep = await c.read_deployment_by_name("tailor-nightly/nightly")
                return [s.schedule.cron for s in dep.schedules]

        assert asyncio.run(read()) == [cron]
