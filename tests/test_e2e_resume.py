"""End to end: a `flwr run .` simulation killed mid-run, then resumed from a checkpoint.

The first run is submitted without `--stream`; once its results.json has two
rounds, its simulation process (ServerApp and ClientApps) is killed with
SIGKILL, as a crash would. The second `flwr run . --stream` continues it with
`resume='<run folder>'` and must leave one complete results file whose rounds
are 1..4, without gap or duplicate. The `flower_env` fixture stops every
process either run started, also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from flower_processes import (
    FINISHED_COMPLETED,
    assert_complete_results,
    format_config_overrides,
    run_details,
    run_flwr,
    tagged_processes,
)
from test_e2e_simulation import FEDERATION_CONFIG, run_simulation

from flwr_noise_app.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

NUM_ROUNDS = 4
KILL_AFTER_ROUNDS = 2
# The process that runs the ServerApp (and the ClientApps) of a simulation.
SIMULATION_COMMAND = "flwr-simulation"


def recorded_rounds(results_json: Path) -> list[int]:
    """The rounds in results.json so far (none while it is not written yet)."""
    try:
        results = json.loads(results_json.read_text())
    except FileNotFoundError:
        return []
    return [entry["round"] for entry in results["rounds"]]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # it exited meanwhile
        return ""


def kill_simulations(env: Mapping[str, str]) -> list[int]:
    """SIGKILL every simulation process started with ``env``; return their ids."""
    killed = []
    for pid in tagged_processes(env):
        if SIMULATION_COMMAND in command_line(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
    return killed


def wait_for_rounds(
    results_json: Path, count: int, timeout_s: float, context: str
) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(rounds := recorded_rounds(results_json)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{results_json} has rounds {rounds} after {timeout_s}s, expected "
                f"{count}\n{context}"
            )
        time.sleep(0.1)
    return rounds


def test_killed_simulation_resumes_to_complete_results(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: dict[str, bool | int | float | str],
) -> None:
    run_config = {
        **tiny_run_config,
        "num-server-rounds": NUM_ROUNDS,
        # Rounds slow enough to be killed before the last one ends.
        "local-steps": 50,
        "run-name": "resumable",
    }
    run_dir = Path(str(run_config["results-dir"])) / "resumable"
    results_json = run_dir / "results.json"

    submitted = run_flwr(
        app_dir,
        [
            "--run-config",
            format_config_overrides(run_config),
            "--federation-config",
            FEDERATION_CONFIG,
        ],
        flower_env,
    )
    assert submitted.returncode == 0, submitted.output
    wait_for_rounds(results_json, KILL_AFTER_ROUNDS, 240, submitted.output)
    assert kill_simulations(flower_env), "found no simulation process to kill"

    interrupted = json.loads(results_json.read_text())
    done = [entry["round"] for entry in interrupted["rounds"]]
    assert interrupted["status"] == "running", "the kill came after the run's end"
    assert done == list(range(1, len(done) + 1)) and len(done) < NUM_ROUNDS
    # A kill between results.json and the checkpoint loses that round only.
    checkpointed = load_checkpoint(run_dir).server_round
    assert checkpointed in (len(done) - 1, len(done))

    resumed_config = {**run_config, "resume": str(run_dir)}
    result = run_simulation(app_dir, flower_env, resumed_config)

    assert result.returncode == 0, result.output
    details = run_details(flower_env, result.run_id)
    assert details["status"] == FINISHED_COMPLETED, (details, result.output)
    results = assert_complete_results(
        run_dir.parent,
        run_config=resumed_config,
        app_dir=app_dir,
        context=result.output,
    )
    resumes = results["info"]["resumed"]
    assert [entry["after_round"] for entry in resumes] == [checkpointed]
    assert results["rounds"][:checkpointed] == interrupted["rounds"][:checkpointed]
    assert load_checkpoint(run_dir).server_round == NUM_ROUNDS
