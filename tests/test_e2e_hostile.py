"""End to end: one misbehaving ClientApp in a real `flwr run` simulation.

The test App in ``tests/hostile_app`` runs ``NoisyStrategy(FedAvg)`` with
Flower's own ``Strategy.start`` over three simulated SuperNodes; the ClientApp
of the last partition corrupts its reply. The run must complete, drop that
reply in every round (logged, counted in ``replies-dropped``) and end with the
exact average of the two honest replies.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from flower_processes import (
    FINISHED_COMPLETED,
    format_config_overrides,
    run_details,
    run_flwr,
)

pytestmark = pytest.mark.slow

HOSTILE_APP = Path(__file__).resolve().parent / "hostile_app"
ROUNDS = 2
# Honest shifts 0.25 and 0.5 with equal weights: 0.375 per round.
EXPECTED_WEIGHT = 0.375 * ROUNDS


def unique_app_copy(tmp_path: Path) -> Path:
    """Copy the App under a name and version of its own (see README: a running
    SuperLink keeps serving the code it loaded first for a name and version)."""
    app_dir = tmp_path / "hostile_app"
    shutil.copytree(HOSTILE_APP, app_dir)
    pyproject = app_dir / "pyproject.toml"
    tag = uuid.uuid4().hex[:8]
    text = pyproject.read_text()
    text = text.replace(
        'name = "flwr-noise-hostile-app"', f'name = "flwr-noise-hostile-app-{tag}"'
    )
    pyproject.write_text(
        text.replace('version = "1.0.0"', f'version = "1.0.{int(tag, 16) % 1000}"')
    )
    return app_dir


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("lying-dtype", "decodes to shape (3, 4) and dtype float64"),
        ("num-examples-nan", "weight num-examples=nan"),
        ("extra-metric-key", "differ from those of the other replies"),
    ],
)
def test_a_hostile_client_app_counts_for_nothing(
    kind: str, reason: str, tmp_path: Path, flower_env: dict[str, str]
) -> None:
    app_dir = unique_app_copy(tmp_path)
    out_file = tmp_path / "summary.json"
    run_config = {
        "num-server-rounds": ROUNDS,
        "hostile-kind": kind,
        "out-file": str(out_file),
    }
    args = [
        "--stream",
        "--run-config",
        format_config_overrides(run_config),
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1",
    ]
    # `flwr run` gives its local SuperLink 15 s to start, too few on a loaded
    # 2-core machine; it kills that SuperLink before it gives up, so try again.
    for _ in range(3):
        result = run_flwr(app_dir, args, flower_env)
        if "Failed to start local SuperLink within" not in result.output:
            break

    details = run_details(flower_env, result.run_id)
    assert details["status"] == FINISHED_COMPLETED, (details, result.output)
    summary = json.loads(out_file.read_text())
    assert summary["dtypes"] == {"w": "float32", "b": "float32"}
    for name, values in summary["final"].items():
        np.testing.assert_array_equal(
            np.asarray(values, np.float32),
            np.full_like(np.asarray(values, np.float32), EXPECTED_WEIGHT),
            err_msg=name,
        )
    for server_round in range(1, ROUNDS + 1):
        metrics = summary["train_metrics"][str(server_round)]
        assert metrics["replies-received"] == 3, metrics
        assert metrics["replies-dropped"] == 1, metrics
        assert "surprise" not in metrics
    drops = [
        line for line in result.output.splitlines() if "dropping the reply" in line
    ]
    assert len(drops) == ROUNDS, result.output
    assert all(reason in line for line in drops), drops
