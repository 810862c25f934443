"""End to end: the bundled App on a real SuperLink and two SuperNodes over gRPC.

Everything runs on loopback ports chosen free for this test; every process is
stopped when the test ends, also when it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flower_processes import (
    FINISHED_COMPLETED,
    assert_complete_results,
    deployment,
    format_config_overrides,
    run_details,
    run_flwr,
    tagged_processes,
)

pytestmark = pytest.mark.slow

NUM_SUPERNODES = 2


def test_app_runs_on_superlink_and_supernodes_over_grpc(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: dict[str, bool | int | float | str],
    tmp_path: Path,
) -> None:
    with deployment(tmp_path, NUM_SUPERNODES, env=flower_env) as running:
        assert len(tagged_processes(flower_env)) >= 1 + NUM_SUPERNODES
        result = run_flwr(
            app_dir,
            [
                running.connection_name,
                "--stream",
                "--run-config",
                format_config_overrides(tiny_run_config),
            ],
            running.env,
        )
        context = f"{result.output}\n{running.log_tails()}"
        assert result.returncode == 0, context
        details = run_details(running.env, result.run_id, running.connection_name)
        assert details["status"] == FINISHED_COMPLETED, (details, context)

    assert tagged_processes(flower_env) == [], "processes outlived the deployment"
    assert_complete_results(
        Path(str(tiny_run_config["results-dir"])),
        run_config=tiny_run_config,
        app_dir=app_dir,
        context=context,
    )
