"""End to end: `flwr run . --stream` simulations of the bundled App.

`flwr run .` against the default local connection starts a managed local
SuperLink (simulation runtime) in the background; the `flower_env` fixture
confines it to the test's folder and stops it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from flower_processes import (
    FINISHED_COMPLETED,
    CommandResult,
    assert_complete_results,
    format_config_overrides,
    results_files,
    run_details,
    run_flwr,
)

pytestmark = pytest.mark.slow

# Flower 1.39 gives each simulated ClientApp 2 CPUs by default, so on a 2-core
# machine the two clients would train one after the other.
FEDERATION_CONFIG = "num-supernodes=2 client-resources-num-cpus=1"


def run_simulation(
    app_dir: Path,
    env: dict[str, str],
    run_config: Mapping[str, bool | int | float | str],
) -> CommandResult:
    return run_flwr(
        app_dir,
        [
            "--stream",
            "--run-config",
            format_config_overrides(run_config),
            "--federation-config",
            FEDERATION_CONFIG,
        ],
        env,
    )


def test_simulation_writes_complete_results(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: dict[str, bool | int | float | str],
) -> None:
    result = run_simulation(app_dir, flower_env, tiny_run_config)

    assert result.returncode == 0, result.output
    details = run_details(flower_env, result.run_id)
    assert details["status"] == FINISHED_COMPLETED, (details, result.output)
    assert_complete_results(
        Path(str(tiny_run_config["results-dir"])),
        run_config=tiny_run_config,
        app_dir=app_dir,
        context=result.output,
    )


def test_bad_config_value_fails_the_run_with_one_clear_line(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: dict[str, bool | int | float | str],
) -> None:
    run_config = {**tiny_run_config, "model": "resnet"}

    result = run_simulation(app_dir, flower_env, run_config)

    # `flwr run --stream` exits 0 even when the run fails: ask the SuperLink.
    details = run_details(flower_env, result.run_id)
    assert details["status"] == "finished:failed", (details, result.output)
    reason = str(details["status-details"])
    assert "\n" not in reason.strip(), reason
    assert "model" in reason and "resnet" in reason, reason
    assert any(
        "model" in line and "resnet" in line and "Error" in line
        for line in result.output.splitlines()
    ), result.output
    for path in results_files(Path(str(run_config["results-dir"]))):
        assert json.loads(path.read_text())["status"] != "complete", path


def test_misspelled_key_is_refused_by_flower_before_the_app_runs(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: dict[str, bool | int | float | str],
) -> None:
    """What Flower 1.39 does with a key [tool.flwr.app.config] lacks (README).

    The SuperLink refuses to start the run; `flwr run` prints only "Invalid
    run configuration." and the key is named in the SuperLink's log alone.
    `python -m flwr_noise_app.config` names it beforehand.
    """
    run_config = {**tiny_run_config, "local-noize-std": 0.1}

    result = run_simulation(app_dir, flower_env, run_config)

    assert result.returncode != 0, result.output
    assert "Invalid run configuration" in result.output, result.output
    assert "local-noize-std" not in result.output, result.output
    log = Path(flower_env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
    assert "Key 'local-noize-std' is not present" in log.read_text(), log
    assert not Path(str(run_config["results-dir"])).exists()
