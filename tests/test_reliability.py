"""Failing clients and failed rounds: the run goes on, the global model stays finite.

The App runs in this process (tests/inprocess_app.py): the real ServerApp and
three real ClientApps over a FakeGrid, with faults injected into the replies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeGrid, array_record, random_arrays, record_arrays, train_reply
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from inprocess_app import DEFAULT_NODE_IDS, partition_of, run_app, server_round

from flwr_noise import NoiseSpec, NoisyStrategy
from flwr_noise_app.checkpoint import load_checkpoint
from flwr_noise_app.federation import (
    ROUND_FAILED,
    ROUND_OK,
    RoundOutcome,
    partition_key_fn,
    run_rounds,
)
from flwr_noise_app.results import load_results


def tiny_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "num-server-rounds": 3,
        "local-steps": 2,
        "batch-size": 16,
        "model": "mlp",
        "results-dir": str(tmp_path),
        "run-name": "run",
        **overrides,
    }


def finished_rounds(tmp_path: Path) -> list[dict[str, Any]]:
    results = load_results(tmp_path / "run")
    assert results["status"] == "complete", results
    assert [entry["round"] for entry in results["rounds"]] == [1, 2, 3]
    return results["rounds"]


def assert_final_model_is_finite(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.server_round == 3
    for array in checkpoint.arrays.values():
        assert np.isfinite(array.numpy()).all()


def with_content(instruction: Message, **records: Any) -> Message:
    return Message(RecordDict(records), reply_to=instruction)


def error_reply(instruction: Message) -> Message:
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=instruction)


def test_a_client_sending_nan_is_dropped_and_the_model_stays_finite(
    tmp_path: Path,
) -> None:
    def nan_from_partition_1(instruction: Message, reply: Message) -> Message:
        if server_round(instruction) is None:
            return reply  # the partition id query
        if partition_of(instruction, DEFAULT_NODE_IDS) != 1:
            return reply
        arrays = record_arrays(reply.content["arrays"])
        nan_arrays = {
            name: np.full_like(array, np.nan) for name, array in arrays.items()
        }
        return with_content(
            instruction,
            arrays=array_record(nan_arrays),
            metrics=reply.content["metrics"],
        )

    run_app(tiny_config(tmp_path), fault=nan_from_partition_1)

    for entry in finished_rounds(tmp_path):
        assert entry["round_status"] == ROUND_OK
        assert entry["replies_received"] == 3
        assert entry["replies_dropped"] == 1
        assert entry["replies_failed"] == 0
        assert entry["num_replies"] == 2
        assert math.isfinite(entry["global_loss"])
    assert_final_model_is_finite(tmp_path)


def test_a_client_app_that_raises_becomes_an_error_reply_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    # Partition 5 of 3 does not exist: that ClientApp raises a ValueError in
    # every train message (its query still reports the partition id).
    bad_node = DEFAULT_NODE_IDS[2]
    run_app(tiny_config(tmp_path), node_configs={bad_node: {"partition-id": 5}})

    for entry in finished_rounds(tmp_path):
        assert entry["round_status"] == ROUND_OK
        assert entry["replies_received"] == 3
        assert entry["replies_failed"] == 1
        assert entry["replies_dropped"] == 0
        assert entry["num_replies"] == 2


@pytest.mark.parametrize("what", ["every client raises", "no reply comes"])
def test_a_round_without_usable_replies_fails_and_keeps_the_model(
    tmp_path: Path, what: str
) -> None:
    def round_2_lost(instruction: Message, reply: Message) -> Message | None:
        if server_round(instruction) != 2:
            return reply
        return error_reply(instruction) if what == "every client raises" else None

    run_app(tiny_config(tmp_path), fault=round_2_lost)

    first, second, third = finished_rounds(tmp_path)
    assert first["round_status"] == third["round_status"] == ROUND_OK
    assert second["round_status"] == ROUND_FAILED
    assert second["round_failure"] == "no usable train replies"
    assert second["num_replies"] == 0
    assert second["local_accuracy_mean"] is None  # NaN is stored as null
    assert second["replies_received"] == (3 if what == "every client raises" else 0)
    assert second["replies_failed"] == (3 if what == "every client raises" else 0)
    # The previous global model was kept, and evaluated again.
    assert second["global_loss"] == first["global_loss"]
    assert second["global_accuracy"] == first["global_accuracy"]
    assert third["num_replies"] == 3
    assert_final_model_is_finite(tmp_path)


def test_a_dead_node_is_waited_for_round_timeout_seconds_at_most(
    tmp_path: Path,
) -> None:
    dead_node = DEFAULT_NODE_IDS[1]

    def dies_after_round_1(instruction: Message, reply: Message) -> Message | None:
        round_number = server_round(instruction)
        dead = instruction.metadata.dst_node_id == dead_node
        return None if dead and round_number and round_number > 1 else reply

    grid = run_app(
        tiny_config(tmp_path, **{"round-timeout": 7.5}), fault=dies_after_round_1
    )

    replies = [entry["replies_received"] for entry in finished_rounds(tmp_path)]
    assert replies == [3, 2, 2]
    # The first send is the partition id query; every round waits round-timeout.
    assert grid.timeouts[1:] and set(grid.timeouts[1:]) == {7.5}


def test_a_reply_without_its_weight_is_dropped_alone(tmp_path: Path) -> None:
    def no_num_examples_in_round_2(instruction: Message, reply: Message) -> Message:
        if server_round(instruction) != 2:
            return reply
        if partition_of(instruction, DEFAULT_NODE_IDS) != 0:
            return reply
        return with_content(
            instruction,
            arrays=reply.content["arrays"],
            metrics=MetricRecord({"local-accuracy": 0.5, "local-loss": 1.0}),
        )

    run_app(tiny_config(tmp_path), fault=no_num_examples_in_round_2)

    rounds = finished_rounds(tmp_path)
    assert [entry["round_status"] for entry in rounds] == [ROUND_OK] * 3
    assert [entry["num_replies"] for entry in rounds] == [3, 2, 3]
    assert rounds[1]["replies_dropped"] == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_overflowing_aggregate_is_never_the_global_model(tmp_path: Path) -> None:
    # Finite replies near float32's largest value: multiplicative aggregation
    # noise pushes the aggregate past it, so every aggregate holds Inf.
    def near_float32_max(instruction: Message, reply: Message) -> Message:
        if server_round(instruction) is None:
            return reply  # the partition id query
        arrays = record_arrays(reply.content["arrays"])
        huge = {name: np.full_like(array, 3.3e38) for name, array in arrays.items()}
        return with_content(
            instruction,
            arrays=array_record(huge),
            metrics=reply.content["metrics"],
        )

    config = tiny_config(
        tmp_path,
        **{"noise-mode": "multiplicative", "aggregation-noise-std": 1.0},
    )
    run_app(config, fault=near_float32_max)

    rounds = finished_rounds(tmp_path)
    for entry in rounds:
        assert entry["round_status"] == ROUND_FAILED
        assert "not finite" in entry["round_failure"]
        assert entry["num_replies"] == 3  # the clients' replies were valid
    # The initial model was kept throughout.
    assert len({entry["global_loss"] for entry in rounds}) == 1
    assert_final_model_is_finite(tmp_path)


# run_rounds and partition keys, without the App.

SHAPES = {"w": (3, 2), "b": (2,)}


def echo_client(instruction: Message) -> Message:
    arrays = record_arrays(instruction.content["arrays"])
    return train_reply(instruction, {k: v + 1.0 for k, v in arrays.items()})


def test_run_rounds_starts_at_any_round_and_reports_each_outcome() -> None:
    trained_rounds: set[int | None] = set()

    def client(instruction: Message) -> Message:
        trained_rounds.add(server_round(instruction))
        return echo_client(instruction)

    grid = FakeGrid(reply_fn=client)
    outcomes: list[RoundOutcome] = []
    start = array_record(random_arrays(SHAPES))

    final = run_rounds(
        NoisyStrategy(FedAvg()),
        grid,
        start,
        first_round=3,
        num_rounds=5,
        train_config=ConfigRecord(),
        on_round=outcomes.append,
    )

    assert [outcome.server_round for outcome in outcomes] == [3, 4, 5]
    assert all(outcome.status == ROUND_OK for outcome in outcomes)
    assert trained_rounds - {None} == {3, 4, 5}
    expected = {k: v + 3.0 for k, v in random_arrays(SHAPES).items()}
    for name, array in record_arrays(final).items():
        np.testing.assert_allclose(array, expected[name], rtol=1e-6)


def test_partition_key_fn_falls_back_to_the_node_id_for_unknown_nodes() -> None:
    client_key = partition_key_fn({1001: 0, 1002: 1})
    assert client_key(1002) == 1
    assert client_key(2001) == "node-2001"
    # NoisyStrategy can key noise streams and sort replies by either kind.
    strategy = NoisyStrategy(
        FedAvg(), broadcast=NoiseSpec(std=0.1, seed=0), client_key_fn=client_key
    )
    grid = FakeGrid([1001, 2001], reply_fn=echo_client)
    outcomes: list[RoundOutcome] = []
    run_rounds(
        strategy,
        grid,
        array_record(random_arrays(SHAPES)),
        num_rounds=1,
        on_round=outcomes.append,
    )
    assert outcomes[0].status == ROUND_OK


def test_outcome_arrays_are_the_kept_model_when_no_reply_comes() -> None:
    start = array_record(random_arrays(SHAPES))
    outcomes: list[RoundOutcome] = []
    final = run_rounds(
        NoisyStrategy(FedAvg()),
        FakeGrid(),
        start,
        num_rounds=2,
        on_round=outcomes.append,
    )
    assert [outcome.status for outcome in outcomes] == [ROUND_FAILED, ROUND_FAILED]
    assert isinstance(final, ArrayRecord)
    assert final is start and all(outcome.arrays is start for outcome in outcomes)
