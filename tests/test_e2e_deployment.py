"""End to end: the bundled App on a real SuperLink and two SuperNodes over gRPC.

Everything runs on loopback ports chosen free for each test; every process is
stopped when the test ends, also when it fails. The second test deploys with
the scripts of examples/deployment/, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_processes import (
    FINISHED_COMPLETED,
    CommandResult,
    ComponentCommands,
    Deployment,
    assert_complete_results,
    deployment,
    format_config_overrides,
    run_command,
    run_details,
    run_flwr,
    started_process,
    stop_tagged_processes,
    tagged_processes,
)
from flwr.common.config import parse_config_args

NUM_SUPERNODES = 2
RunConfig = dict[str, bool | int | float | str]


def example_scripts(app_dir: Path) -> Path:
    return app_dir / "examples" / "deployment"


def venv_assignment() -> str:
    return f"FLWR_NOISE_VENV={Path(sys.executable).parent.parent}"


def example_script_commands(scripts: Path, num_supernodes: int) -> ComponentCommands:
    """Start the components with start-superlink.sh and start-supernode.sh."""
    return ComponentCommands(
        superlink=lambda fleet_address, control_port: [
            "env",
            venv_assignment(),
            f"FLEET_API_ADDRESS={fleet_address}",
            f"CONTROL_API_PORT={control_port}",
            str(scripts / "start-superlink.sh"),
        ],
        supernode=lambda fleet_address, runtime_port, index: [
            "env",
            venv_assignment(),
            f"SUPERNODE_PORT={runtime_port}",
            str(scripts / "start-supernode.sh"),
            fleet_address,
            str(index),
            str(num_supernodes),
        ],
    )


def assert_run_completed(
    result: CommandResult, running: Deployment, connection: str
) -> str:
    """Check that the run finished well; return the context for failure messages."""
    context = f"{result.output}\n{running.log_tails()}"
    assert result.returncode == 0, context
    details = run_details(running.env, result.run_id, connection)
    assert details["status"] == FINISHED_COMPLETED, (details, context)
    return context


@pytest.mark.slow
def test_app_runs_on_superlink_and_supernodes_over_grpc(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: RunConfig,
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
        context = assert_run_completed(result, running, running.connection_name)

    assert tagged_processes(flower_env) == [], "processes outlived the deployment"
    assert_complete_results(
        Path(str(tiny_run_config["results-dir"])),
        run_config=tiny_run_config,
        app_dir=app_dir,
        num_clients=NUM_SUPERNODES,
        context=context,
    )


@pytest.mark.slow
def test_example_scripts_deploy_and_run_the_app(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: RunConfig,
    tmp_path: Path,
) -> None:
    scripts = example_scripts(app_dir)
    run_config = {**tiny_run_config, "num-server-rounds": 1}
    commands = example_script_commands(scripts, NUM_SUPERNODES)

    with deployment(
        tmp_path, NUM_SUPERNODES, env=flower_env, commands=commands
    ) as running:
        # run.sh writes its own connection, flwr-noise-deployment.
        result = run_command(
            [
                "env",
                venv_assignment(),
                str(scripts / "run.sh"),
                running.control_address,
                "--run-config",
                format_config_overrides(run_config),
            ],
            running.env,
            tmp_path,
            timeout_s=300.0,
        )
        context = assert_run_completed(result, running, "flwr-noise-deployment")

    assert_complete_results(
        Path(str(run_config["results-dir"])),
        run_config=run_config,
        app_dir=app_dir,
        num_clients=NUM_SUPERNODES,
        context=context,
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ["127.0.0.1:9092", "0"],
        ["127.0.0.1:9092", "2", "2"],
        ["127.0.0.1:9092", "first", "2"],
        ["127.0.0.1:9092", "0", "0"],
        ["127.0.0.1:9092", "0", "2", "/no/such/folder"],
    ],
)
def test_start_supernode_script_rejects_bad_arguments(
    app_dir: Path, arguments: list[str]
) -> None:
    script = example_scripts(app_dir) / "start-supernode.sh"

    result = subprocess.run(
        ["bash", str(script), *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith(("usage:", "error:")), result.stderr


def test_config_overrides_read_back_the_same_through_flowers_parser() -> None:
    overrides: RunConfig = {
        "num-server-rounds": 2,
        "learning-rate": 0.05,
        "local-noise-std": 1e-5,
        "noise-relative": True,
        "results-dir": "/tmp/a folder/results",
        "data-dir": "",
    }

    assert parse_config_args([format_config_overrides(overrides)]) == overrides


def test_stopping_the_tag_reaches_processes_that_left_the_group(
    flower_env: dict[str, str], tmp_path: Path
) -> None:
    # `setsid` puts the second sleep in a session of its own, as Flower does
    # with the SuperExec and the managed local SuperLink.
    command = ["bash", "-c", "setsid sleep 300 & wait"]
    with started_process("detaching", command, flower_env, tmp_path) as process:
        deadline = time.monotonic() + 30
        while not any(  # `sleep` runs once `setsid` has left the session
            Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
            for pid in tagged_processes(flower_env)
        ):
            assert process.is_running() and time.monotonic() < deadline
            time.sleep(0.05)
    detached = tagged_processes(flower_env)
    assert len(detached) == 1, "stopping the group should leave the setsid child"

    assert stop_tagged_processes(flower_env) == []
    assert tagged_processes(flower_env) == []
