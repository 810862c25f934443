"""Checkpoints: atomic writes, exact round trips, resumed runs equal to whole ones."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeGrid, array_record, random_arrays, record_arrays, train_reply
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from inprocess_app import run_app, server_round

from flwr_noise import NoiseSpec, NoisyStrategy
from flwr_noise_app.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    capture_rng_state,
    capture_strategy_state,
    load_checkpoint,
    restore_rng_state,
    restore_strategy_state,
    save_checkpoint,
)
from flwr_noise_app.federation import RoundOutcome, run_rounds
from flwr_noise_app.results import ResultsWriter, load_results
from flwr_noise_app.run_folder import RunFolder

# -- The file -----------------------------------------------------------------


def assert_same_arrays(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert (got[name].dtype, got[name].shape) == (array.dtype, array.shape)
        assert got[name].data == array.data, name  # byte for byte


def model_arrays() -> ArrayRecord:
    """A torch state dict with float, integer and buffer tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model(torch.randn(5, 4))  # BatchNorm running stats and batch count change
    return ArrayRecord(model.state_dict())


def test_round_trip_is_exact(tmp_path: Path) -> None:
    np.random.seed(3)
    random.seed(3)
    state = {
        "0.m_t": {"w": np.arange(6, dtype=np.float64).reshape(2, 3)},
        "1.momentum_vector": [np.ones(2, np.float32), np.zeros((1, 2))],
        "1.clipping_norm": 0.25,
        "1.current_arrays": model_arrays(),
    }
    saved = Checkpoint(
        server_round=7,
        arrays=model_arrays(),
        config={"seed": 3, "model": "mlp", "noise-relative": True},
        rng_state=capture_rng_state(),
        strategy_state=state,
    )

    path = save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)

    assert path == tmp_path / CHECKPOINT_FILE
    assert loaded.server_round == 7
    assert loaded.config == saved.config
    assert_same_arrays(loaded.arrays, saved.arrays)
    assert loaded.strategy_state["1.clipping_norm"] == 0.25
    assert_same_arrays(loaded.strategy_state["1.current_arrays"], model_arrays())
    np.testing.assert_array_equal(
        loaded.strategy_state["0.m_t"]["w"], state["0.m_t"]["w"]
    )
    vectors = loaded.strategy_state["1.momentum_vector"]
    assert [v.dtype for v in vectors] == [np.float32, np.float64]
    # The random state comes back: the same numbers follow.
    expected = (random.random(), np.random.random())
    restore_rng_state(loaded.rng_state)
    assert (random.random(), np.random.random()) == expected


def test_a_failed_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Checkpoint(server_round=1, arrays=model_arrays())
    save_checkpoint(tmp_path, first)

    def savez_then_crash(stream: Any, **arrays: Any) -> None:
        stream.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(np, "savez", savez_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, Checkpoint(server_round=2, arrays=model_arrays()))

    assert load_checkpoint(tmp_path).server_round == 1
    assert [path.name for path in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_missing_and_damaged_checkpoints_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not really")
    message = (
        f"checkpoint file={str(tmp_path / CHECKPOINT_FILE)!r} is not allowed: "
        f"expected a {CHECKPOINT_FILE} of format 1 written by flwr-noise"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(tmp_path)


def test_a_value_it_cannot_store_is_named(tmp_path: Path) -> None:
    state = {"strategy": {"step": 1j}}
    checkpoint = Checkpoint(server_round=1, arrays=model_arrays(), rng_state=state)
    with pytest.raises(
        TypeError, match=re.escape("checkpoint value=1j is not allowed")
    ):
        save_checkpoint(tmp_path, checkpoint)


# -- ResultsWriter(resume_after=...) --------------------------------------------


def entry(round_number: int) -> dict[str, Any]:
    return {
        "round": round_number,
        "global_accuracy": 0.5,
        "global_loss": 1.0,
        "local_accuracy_mean": float("nan"),
        "local_accuracy_min": 0.4,
        "local_accuracy_max": 0.6,
    }


def test_resumed_writer_keeps_the_checkpointed_rounds_and_appends(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError):
        with ResultsWriter(tmp_path, "run", {"seed": 0}, plot=False) as results:
            for round_number in (1, 2, 3):
                results.add_round(entry(round_number))
            raise RuntimeError("killed")  # round 3 was recorded, not checkpointed
    before = load_results(tmp_path / "run")
    assert before["status"] == "failed"

    with ResultsWriter(
        tmp_path, "run", {"seed": 0, "resume": "run"}, plot=False, resume_after=2
    ) as resumed:
        assert load_results(resumed.run_dir)["status"] == "running"
        assert [e["round"] for e in resumed.rounds] == [1, 2]
        resumed.add_round(entry(3))
        resumed.add_round(entry(4))

    after = load_results(tmp_path / "run")
    assert after["status"] == "complete" and after["error"] is None
    assert [e["round"] for e in after["rounds"]] == [1, 2, 3, 4]
    assert after["rounds"][0] == before["rounds"][0]  # NaN stayed null
    assert after["started_at"] == before["started_at"]
    assert [r["after_round"] for r in after["info"]["resumed"]] == [2]
    csv_rounds = (tmp_path / "run" / "results.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in csv_rounds] == ["1", "2", "3", "4"]


def test_resuming_needs_every_round_up_to_the_checkpoint(tmp_path: Path) -> None:
    with ResultsWriter(tmp_path, "run", {}, plot=False) as results:
        results.add_round(entry(1))
    message = (
        "results.json rounds of run 'run'=[1] is not allowed: expected rounds 1 to 2"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ResultsWriter(tmp_path, "run", {}, resume_after=2)
    with pytest.raises(FileNotFoundError):
        ResultsWriter(tmp_path, "other", {}, resume_after=0)


# -- Resuming run_rounds: stateful strategy, client sampling ------------------

NODE_IDS = (11, 12, 13, 14)
SHAPES = {"w": (4, 3), "b": (3,)}


def client(instruction: Message) -> Message:
    """A deterministic 'training' step that depends on partition and round."""
    partition = NODE_IDS.index(instruction.metadata.dst_node_id)
    rng = np.random.default_rng((partition, server_round(instruction) or 0))
    arrays = record_arrays(instruction.content["arrays"])
    trained = {
        name: (array - 0.1 * rng.normal(size=array.shape)).astype(array.dtype)
        for name, array in arrays.items()
    }
    return train_reply(instruction, trained, num_examples=10 + partition)


def make_strategy(inner: str) -> NoisyStrategy:
    wrapped = {
        "FedAdam": lambda: FedAdam(fraction_train=0.5, fraction_evaluate=0.0),
        "FedAvgM": lambda: FedAvgM(
            fraction_train=0.5, fraction_evaluate=0.0, server_momentum=0.9
        ),
    }[inner]()
    return NoisyStrategy(
        wrapped,
        broadcast=NoiseSpec(std=0.01, seed=5),
        aggregation=NoiseSpec(std=0.001, seed=5),
        client_key_fn=NODE_IDS.index,
    )


def federate(
    strategy: NoisyStrategy,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    run_dir: Path,
) -> list[RoundOutcome]:
    outcomes: list[RoundOutcome] = []

    def finish_round(outcome: RoundOutcome) -> None:
        outcomes.append(outcome)
        save_checkpoint(
            run_dir,
            Checkpoint(
                outcome.server_round,
                outcome.arrays,
                rng_state=capture_rng_state(),
                strategy_state=capture_strategy_state(strategy),
            ),
        )

    run_rounds(
        strategy,
        FakeGrid(NODE_IDS, reply_fn=client),
        arrays,
        first_round=first_round,
        num_rounds=num_rounds,
        on_round=finish_round,
    )
    return outcomes


@pytest.mark.parametrize("inner", ["FedAdam", "FedAvgM"])
def test_resumed_stateful_strategy_equals_the_whole_run(
    tmp_path: Path, inner: str
) -> None:
    initial = array_record(random_arrays(SHAPES))
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    random.seed(0)
    whole = federate(make_strategy(inner), initial, 1, 4, tmp_path / "whole")

    random.seed(0)
    strategy = make_strategy(inner)
    federate(strategy, initial, 1, 2, tmp_path / "cut")
    random.seed(12345)  # a restarted process has other random state
    checkpoint = load_checkpoint(tmp_path / "cut")
    resumed_strategy = make_strategy(inner)
    restore_strategy_state(resumed_strategy, checkpoint.strategy_state)
    restore_rng_state(checkpoint.rng_state)
    resumed = federate(
        resumed_strategy,
        checkpoint.arrays,
        3,
        4,
        tmp_path / "cut",
    )

    assert [o.server_round for o in resumed] == [3, 4]
    for got, expected in zip(resumed, whole[2:], strict=True):
        assert_same_arrays(got.arrays, expected.arrays)


def test_strategy_state_is_found_through_wrappers() -> None:
    strategy = NoisyStrategy(FedAdam())
    assert capture_strategy_state(strategy) == {}  # before the first round
    strategy.strategy.m_t = {"w": np.ones(2)}  # type: ignore[attr-defined]
    assert list(capture_strategy_state(strategy)) == ["1.m_t"]
    assert capture_strategy_state(NoisyStrategy(FedAvg())) == {}


# -- Resuming the App ---------------------------------------------------------


class Crash(Exception):
    """The ServerApp process dies."""


def app_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "num-server-rounds": 4,
        "local-steps": 2,
        "batch-size": 16,
        "model": "mlp",
        "broadcast-noise-std": 0.01,
        "aggregation-noise-std": 0.001,
        "results-dir": str(tmp_path),
        **overrides,
    }


def comparable(results: dict[str, Any]) -> list[str]:
    return [json.dumps(entry, sort_keys=True) for entry in results["rounds"]]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-round run of the App."""
    results_dir = tmp_path_factory.mktemp("whole")
    run_app(app_config(results_dir, **{"run-name": "whole"}))
    return results_dir / "whole"


@pytest.mark.parametrize(
    "crash",
    ["in round 1", "in round 3", "after the results of round 3"],
)
def test_resumed_app_run_equals_the_whole_run(
    tmp_path: Path, whole_run: Path, crash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_round = 1 if crash == "in round 1" else 3

    def crash_in_training(instruction: Message, reply: Message) -> Message:
        if server_round(instruction) == crash_round:
            raise Crash
        return reply

    save = RunFolder.save_checkpoint

    def crash_before_the_checkpoint(
        self: RunFolder, round_number: int, arrays: ArrayRecord
    ) -> Path:
        if round_number == crash_round:
            raise Crash
        return save(self, round_number, arrays)

    with monkeypatch.context() as patch:
        if crash.startswith("after"):
            patch.setattr(RunFolder, "save_checkpoint", crash_before_the_checkpoint)
        with pytest.raises(Crash):
            run_app(
                app_config(tmp_path, **{"run-name": "cut"}),
                fault=None if crash.startswith("after") else crash_in_training,
            )
    interrupted = load_results(tmp_path / "cut")
    assert interrupted["status"] == "failed"
    assert load_checkpoint(tmp_path / "cut").server_round == crash_round - 1

    # The resumed run's nodes have other ids, as after a restart.
    run_app(app_config(tmp_path, resume="cut"), node_ids=(201, 202, 203))

    resumed = load_results(tmp_path / "cut")
    assert resumed["status"] == "complete"
    assert [entry["round"] for entry in resumed["rounds"]] == [1, 2, 3, 4]
    assert resumed["info"]["resumed"][0]["after_round"] == crash_round - 1
    assert comparable(resumed) == comparable(load_results(whole_run))
    assert_same_arrays(
        load_checkpoint(tmp_path / "cut").arrays, load_checkpoint(whole_run).arrays
    )
