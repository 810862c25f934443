"""Shared fixtures: the App, a tiny run config, a Flower environment that cleans up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_processes import flwr_env, stop_tagged_processes

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def app_dir() -> Path:
    """The folder of the bundled Flower App (the project root)."""
    return PROJECT_ROOT


@pytest.fixture
def tiny_run_config(tmp_path: Path) -> dict[str, bool | int | float | str]:
    """A run config of the App small enough for a 2-core CI machine.

    Its results go to ``<tmp_path>/results``.
    """
    return {
        "num-server-rounds": 2,
        "local-steps": 5,
        "batch-size": 16,
        "model": "mlp",
        "dataset": "digits",
        "seed": 0,
        "local-noise-std": 0.01,
        "results-dir": str(tmp_path / "results"),
    }


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment for Flower processes, confined to ``tmp_path``.

    On teardown every process started with it (a managed local SuperLink
    included) is stopped, and the test errors if any of them survives.
    """
    env = flwr_env(tmp_path)
    yield env
    survivors = stop_tagged_processes(env)
    assert not survivors, f"Flower processes survived the test: {survivors}"
