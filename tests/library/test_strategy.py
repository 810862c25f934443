"""NoisyStrategy: delegation, local/broadcast/aggregation noise, reply filtering."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
from fakes import (
    FakeGrid,
    array_record,
    error_reply,
    random_arrays,
    record_arrays,
    train_reply,
)
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from flwr_noise.sampling import perturb_arrays
from flwr_noise.seeding import AGGREGATE_CLIENT, numpy_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.strategy import (
    LOCAL_PREFIX,
    LOCAL_START_STEP_KEY,
    RECEIVED_PREFIX,
    UPDATE_PREFIX,
    NoisyStrategy,
)

SMALL_SHAPES = {"fc1.weight": (5, 3), "fc1.bias": (5,), "fc2.weight": (2, 5)}
LARGE_SHAPES = {"w": (300, 300)}
NODE_IDS = (1001, 1002, 1003, 1004)

STRATEGY_FACTORIES: dict[str, Callable[[], Strategy]] = {
    "FedAvg": lambda: FedAvg(),
    "FedAdam": lambda: FedAdam(),
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedMedian": lambda: FedMedian(),
}


def configure(
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    grid: FakeGrid,
    config: ConfigRecord | None = None,
) -> list[Message]:
    # FedAvg samples nodes with `random`: seed it so that two strategies
    # given the same inputs pick the same nodes in the same order.
    random.seed(server_round)
    config = ConfigRecord({"lr": 0.1}) if config is None else config
    return list(strategy.configure_train(server_round, arrays, config, grid))


def replies_to(messages: list[Message], step: float = 0.01) -> list[Message]:
    """Deterministic client replies: what was received plus a per-node shift."""
    replies = []
    for index, message in enumerate(messages):
        received = record_arrays(message.content["arrays"])
        trained = {
            name: (value + step * (index + 1)).astype(value.dtype)
            for name, value in received.items()
        }
        replies.append(
            train_reply(message, trained, 10 + index, {"train-loss": 1.0 + index})
        )
    return replies


def plain_content(content: RecordDict) -> dict[str, dict[str, object]]:
    plain: dict[str, dict[str, object]] = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            plain[key] = record_arrays(record)
        else:
            plain[key] = dict(record)
    return plain


def assert_same_content(first: RecordDict, second: RecordDict) -> None:
    a, b = plain_content(first), plain_content(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            left, right = a[key][name], b[key][name]
            if isinstance(left, np.ndarray):
                assert left.dtype == right.dtype
                np.testing.assert_array_equal(left, right)
            else:
                assert left == right, (key, name)


def assert_same_arrays(first: ArrayRecord, second: ArrayRecord) -> None:
    a, b = record_arrays(first), record_arrays(second)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


OFF_SPECS = {
    "none": {},
    "std0": {
        "local": NoiseSpec(std=0.0, seed=1),
        "broadcast": NoiseSpec(std=0.0, seed=1),
        "aggregation": NoiseSpec(std=0.0, seed=1),
        "update": NoiseSpec(std=0.0, seed=1),
    },
}


@pytest.mark.parametrize("off", OFF_SPECS, ids=list(OFF_SPECS))
@pytest.mark.parametrize("name", STRATEGY_FACTORIES, ids=list(STRATEGY_FACTORIES))
def test_all_noise_off_is_identical_to_the_wrapped_strategy(
    name: str, off: str
) -> None:
    make = STRATEGY_FACTORIES[name]
    base, wrapped = make(), NoisyStrategy(make(), **OFF_SPECS[off])
    grid = FakeGrid(NODE_IDS)
    base_arrays = wrapped_arrays = array_record(random_arrays(SMALL_SHAPES))
    for server_round in (1, 2):
        base_messages = configure(base, server_round, base_arrays, grid)
        wrapped_messages = configure(wrapped, server_round, wrapped_arrays, grid)
        assert len(base_messages) == len(wrapped_messages) == len(NODE_IDS)
        for ours, theirs in zip(wrapped_messages, base_messages, strict=True):
            assert ours.metadata.dst_node_id == theirs.metadata.dst_node_id
            assert ours.metadata.message_type == theirs.metadata.message_type
            assert_same_content(ours.content, theirs.content)

        base_arrays, base_metrics = base.aggregate_train(
            server_round, replies_to(base_messages)
        )
        wrapped_arrays, wrapped_metrics = wrapped.aggregate_train(
            server_round, replies_to(wrapped_messages)
        )
        assert base_arrays is not None and wrapped_arrays is not None
        assert_same_arrays(wrapped_arrays, base_arrays)
        assert dict(wrapped_metrics) == dict(base_metrics)


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps what it built, to check it is never modified."""

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.built_contents = [message.content for message in messages]
        self.built_snapshot = [plain_content(message.content) for message in messages]
        return messages


def assert_unmodified(recording: RecordingFedAvg) -> None:
    for content, snapshot in zip(
        recording.built_contents, recording.built_snapshot, strict=True
    ):
        current = plain_content(content)
        assert current.keys() == snapshot.keys()
        assert current["config"] == snapshot["config"]
        for name, value in snapshot["arrays"].items():
            np.testing.assert_array_equal(current["arrays"][name], value)


def test_local_and_update_specs_reach_every_message_and_round_trip() -> None:
    local = NoiseSpec(
        std=0.03,
        distribution="laplace",
        schedule="polynomial",
        gamma=0.7,
        schedule_unit="round",
        exclude=(r"\.bias$",),
        seed=11,
    )
    update = NoiseSpec(std=0.002, mode="multiplicative", seed=None)
    recording = RecordingFedAvg()
    strategy = NoisyStrategy(recording, local=local, update=update)
    arrays = array_record(random_arrays(SMALL_SHAPES))
    caller_config = ConfigRecord({"lr": 0.1})
    messages = configure(strategy, 3, arrays, FakeGrid(NODE_IDS), caller_config)

    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODE_IDS)
    configs = [message.content["config"] for message in messages]
    for config in configs:
        assert NoiseSpec.from_config(config, LOCAL_PREFIX) == local
        assert NoiseSpec.from_config(config, UPDATE_PREFIX) == update
        assert config["server-round"] == 3
        assert config["lr"] == 0.1
    # Flower's wrapper pattern: the specs travel in the config passed into the
    # wrapped configure_train, whose messages are returned as they are; the
    # caller's config (Strategy.start reuses it every round) stays clean.
    assert [m.content for m in messages] == recording.built_contents
    assert dict(caller_config) == {"lr": 0.1}
    # Without broadcast noise every client gets the global model unchanged.
    for message in messages:
        assert_same_arrays(message.content["arrays"], arrays)
    info = strategy.round_noise[3]
    assert info["noise-local-sigma"] == pytest.approx(local.sigma_at(2))
    assert info["noise-update-sigma"] == pytest.approx(update.sigma_at(2))


def test_a_decaying_step_schedule_needs_local_steps_and_sends_the_start_step() -> None:
    local = NoiseSpec(std=0.1, schedule="inverse-sqrt", schedule_unit="step")
    with pytest.raises(ValueError, match="local_steps=None is not allowed"):
        NoisyStrategy(FedAvg(), local=local)
    arrays = array_record(random_arrays(SMALL_SHAPES))
    with_steps = NoisyStrategy(FedAvg(), local=local, local_steps=8)
    for message in configure(with_steps, 2, arrays, FakeGrid(NODE_IDS)):
        assert message.content["config"][LOCAL_START_STEP_KEY] == 8
    assert with_steps.round_noise[2]["noise-local-sigma"] == pytest.approx(
        0.1 / math.sqrt(9)
    )
    # A constant or per-round schedule needs no local_steps and sends no start.
    for spec in (NoiseSpec(std=0.1), dataclasses.replace(local, schedule_unit="round")):
        strategy = NoisyStrategy(FedAvg(), local=spec)
        for message in configure(strategy, 2, arrays, FakeGrid(NODE_IDS)):
            assert LOCAL_START_STEP_KEY not in message.content["config"]
        assert strategy.round_noise[2]["noise-local-sigma"] == pytest.approx(
            spec.sigma_at(1)
        )


@pytest.mark.parametrize("unit", ["step", "round"])
def test_once_per_round_kinds_count_rounds_whatever_the_unit(unit: str) -> None:
    spec = NoiseSpec(std=0.2, schedule="exponential", decay=0.5, schedule_unit=unit)
    strategy = NoisyStrategy(
        FedAvg(), broadcast=spec, aggregation=spec, received=spec, update=spec
    )
    arrays = array_record(random_arrays(SMALL_SHAPES))
    messages = configure(strategy, 3, arrays, FakeGrid(NODE_IDS))
    strategy.aggregate_train(3, replies_to(messages))
    info = strategy.round_noise[3]
    for kind in ("broadcast", "aggregation", "received", "update"):
        assert info[f"noise-{kind}-sigma"] == pytest.approx(0.05), kind
    for message in messages:
        assert NoiseSpec.from_config(message.content["config"], RECEIVED_PREFIX) == spec


def broadcast_diffs(messages: list[Message], sent: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    return {
        message.metadata.dst_node_id: record_arrays(message.content["arrays"])[
            "w"
        ].astype(np.float64)
        - sent["w"]
        for message in messages
    }


def test_broadcast_copies_are_independent_per_client_and_round() -> None:
    sigma = 0.05
    spec = NoiseSpec(std=sigma, seed=7)
    sent = random_arrays(LARGE_SHAPES, seed=1)
    sent["bn.running_mean"] = np.ones(8, dtype=np.float32)
    sent["steps"] = np.arange(4, dtype=np.int64)
    arrays = array_record(sent)
    recording = RecordingFedAvg()
    strategy = NoisyStrategy(recording, broadcast=spec)
    grid = FakeGrid(NODE_IDS)

    round1 = configure(strategy, 1, arrays, grid)
    assert_unmodified(recording)
    diffs1 = broadcast_diffs(round1, sent)
    round2 = configure(strategy, 2, arrays, grid)
    diffs2 = broadcast_diffs(round2, sent)

    # The input arrays are not modified.
    assert_same_arrays(arrays, array_record(sent))
    norms = []
    for message in round1:
        received = record_arrays(message.content["arrays"])
        assert list(received) == list(sent)
        assert received["w"].dtype == np.float32
        np.testing.assert_array_equal(
            received["bn.running_mean"], sent["bn.running_mean"]
        )
        np.testing.assert_array_equal(received["steps"], sent["steps"])
        diff = diffs1[message.metadata.dst_node_id]
        assert abs(diff.mean()) < 5 * sigma / math.sqrt(diff.size)
        assert diff.std() == pytest.approx(sigma, rel=0.02)
        norms.append(float(np.linalg.norm(diff)))

    nodes = list(NODE_IDS)
    streams = [diffs1[node].ravel() for node in nodes] + [
        diffs2[node].ravel() for node in nodes
    ]
    correlations = np.corrcoef(np.stack(streams))
    off_diagonal = correlations[~np.eye(len(streams), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.02

    info = strategy.round_noise[1]
    assert info["noise-broadcast-sigma"] == sigma
    assert info["noise-broadcast-l2"] == pytest.approx(np.mean(norms), rel=1e-6)


def test_broadcast_noise_is_reproducible_from_seed_and_client_keys() -> None:
    spec = NoiseSpec(std=0.05, seed=7, schedule="exponential", decay=0.5)
    sent = random_arrays(SMALL_SHAPES, seed=2)
    arrays = array_record(sent)
    # Two runs: different node ids, same partitions behind them.
    run_a = {11: 0, 12: 1, 13: 2}
    run_b = {27: 2, 25: 0, 26: 1}

    def received_by_partition(node_to_partition: dict[int, int], seed: int):  # type: ignore[no-untyped-def]
        strategy = NoisyStrategy(
            FedAvg(min_available_nodes=3),
            broadcast=dataclasses.replace(spec, seed=seed),
            client_key_fn=node_to_partition.__getitem__,
        )
        messages = configure(strategy, 3, arrays, FakeGrid(node_to_partition))
        assert strategy.round_noise[3]["noise-broadcast-sigma"] == 0.05 * 0.25
        return {
            node_to_partition[m.metadata.dst_node_id]: record_arrays(
                m.content["arrays"]
            )
            for m in messages
        }

    first = received_by_partition(run_a, seed=7)
    # Exactly the stream of (seed, partition, round, "broadcast"), t = round - 1.
    for partition in range(3):
        rng = numpy_generator(7, client=partition, server_round=3, purpose="broadcast")
        expected, _ = perturb_arrays(sent, spec, spec.sigma_at(2), rng)
        for name in sent:
            np.testing.assert_array_equal(first[partition][name], expected[name])
    second = received_by_partition(run_b, seed=7)
    other_seed = received_by_partition(run_a, seed=8)
    for partition in range(3):
        for name in sent:
            np.testing.assert_array_equal(
                first[partition][name], second[partition][name]
            )
        assert not np.array_equal(first[partition]["fc1.weight"], sent["fc1.weight"])
        assert not np.array_equal(
            first[partition]["fc1.weight"], other_seed[partition]["fc1.weight"]
        )


@pytest.mark.parametrize("name", STRATEGY_FACTORIES, ids=list(STRATEGY_FACTORIES))
def test_aggregation_noise_is_added_to_the_wrapped_aggregate(name: str) -> None:
    sigma = 0.02
    make = STRATEGY_FACTORIES[name]
    base = make()
    wrapped = NoisyStrategy(make(), aggregation=NoiseSpec(std=sigma, seed=3))
    grid = FakeGrid(NODE_IDS)
    arrays = array_record(random_arrays(LARGE_SHAPES, seed=4))
    base_arrays, base_metrics = base.aggregate_train(
        1, replies_to(configure(base, 1, arrays, grid))
    )
    noisy_arrays, metrics = wrapped.aggregate_train(
        1, replies_to(configure(wrapped, 1, arrays, grid))
    )
    assert base_arrays is not None and noisy_arrays is not None
    diff = record_arrays(noisy_arrays)["w"].astype(np.float64) - record_arrays(
        base_arrays
    )["w"].astype(np.float64)
    assert abs(diff.mean()) < 5 * sigma / math.sqrt(diff.size)
    assert diff.std() == pytest.approx(sigma, rel=0.02)

    # Exactly the server's stream: (seed, AGGREGATE_CLIENT, round, "aggregation").
    rng = numpy_generator(
        3, client=AGGREGATE_CLIENT, server_round=1, purpose="aggregation"
    )
    expected, _ = perturb_arrays(
        record_arrays(base_arrays), NoiseSpec(std=sigma), sigma, rng
    )
    np.testing.assert_array_equal(record_arrays(noisy_arrays)["w"], expected["w"])

    assert metrics is not None
    for key, value in base_metrics.items():
        assert metrics[key] == value
    assert metrics["noise-aggregation-sigma"] == sigma
    assert metrics["noise-aggregation-l2"] == pytest.approx(
        np.linalg.norm(diff), rel=1e-6
    )
    assert metrics["replies-received"] == len(NODE_IDS)
    assert metrics["replies-dropped"] == 0
    assert metrics["replies-failed"] == 0
    assert wrapped.round_noise[1]["noise-aggregation-sigma"] == sigma


class NoMetricsFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        arrays, _ = super().aggregate_train(server_round, replies)
        return arrays, None


def test_metrics_created_when_the_wrapped_strategy_returns_none() -> None:
    strategy = NoisyStrategy(NoMetricsFedAvg(), aggregation=NoiseSpec(std=0.01, seed=0))
    arrays = array_record(random_arrays(SMALL_SHAPES))
    aggregated, metrics = strategy.aggregate_train(
        1, replies_to(configure(strategy, 1, arrays, FakeGrid(NODE_IDS)))
    )
    assert aggregated is not None
    assert isinstance(metrics, MetricRecord)
    assert metrics["noise-aggregation-sigma"] == 0.01
    assert metrics["replies-received"] == len(NODE_IDS)


def test_clients_reported_local_sigma_wins_over_the_nominal_one() -> None:
    strategy = NoisyStrategy(FedAvg(), local=NoiseSpec(std=0.1, seed=0))
    messages = configure(
        strategy, 1, array_record(random_arrays(SMALL_SHAPES)), FakeGrid(NODE_IDS)
    )
    replies = [
        train_reply(
            message,
            record_arrays(message.content["arrays"]),
            10,
            {"noise-local-sigma": 0.05},
        )
        for message in messages
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["noise-local-sigma"] == pytest.approx(0.05)
    assert strategy.round_noise[1]["noise-local-sigma"] == 0.1


BAD_REPLIES: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "nan": lambda a: {**a, "fc1.bias": np.full_like(a["fc1.bias"], np.nan)},
    "inf": lambda a: {**a, "fc2.weight": np.full_like(a["fc2.weight"], -np.inf)},
    "shape": lambda a: {**a, "fc1.weight": np.zeros((3, 5), np.float32)},
    "dtype": lambda a: {**a, "fc1.bias": a["fc1.bias"].astype(np.float64)},
    "keys": lambda a: {k: v for k, v in a.items() if k != "fc2.weight"},
}


@pytest.mark.parametrize("name", STRATEGY_FACTORIES, ids=list(STRATEGY_FACTORIES))
@pytest.mark.parametrize("noise_on", [False, True], ids=["noise-off", "noise-on"])
def test_error_replies_pass_and_broken_replies_are_dropped(
    name: str, noise_on: bool, caplog: pytest.LogCaptureFixture
) -> None:
    make = STRATEGY_FACTORIES[name]
    node_ids = list(range(2001, 2001 + 2 + 1 + len(BAD_REPLIES)))
    grid = FakeGrid(node_ids)
    arrays = array_record(random_arrays(SMALL_SHAPES))
    specs = {"local": NoiseSpec(std=0.1, seed=0)} if noise_on else {}
    wrapped = NoisyStrategy(make(), **specs)
    messages = configure(wrapped, 1, arrays, grid)
    good, error, bad = messages[:2], messages[2], messages[3:]
    replies = replies_to(good)
    replies.append(error_reply(error))
    bad_nodes = []
    for message, corrupt in zip(bad, BAD_REPLIES.values(), strict=True):
        received = record_arrays(message.content["arrays"])
        replies.append(train_reply(message, corrupt(received), 10, {"train-loss": 1.0}))
        bad_nodes.append(message.metadata.dst_node_id)
    random.Random(0).shuffle(replies)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        aggregated, metrics = wrapped.aggregate_train(1, replies)

    base = make()
    base_messages = configure(base, 1, arrays, grid)
    expected_arrays, expected_metrics = base.aggregate_train(
        1, replies_to(base_messages[:2])
    )
    assert aggregated is not None and expected_arrays is not None
    assert_same_arrays(aggregated, expected_arrays)
    assert metrics is not None
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value)
    info = wrapped.round_noise[1]
    assert info["replies-received"] == len(messages)
    assert info["replies-failed"] == 1
    assert info["replies-dropped"] == len(BAD_REPLIES)
    if noise_on:
        assert metrics["replies-dropped"] == len(BAD_REPLIES)
        assert metrics["replies-received"] == len(messages)
    else:
        assert dict(metrics) == {
            **dict(expected_metrics),
            "replies-received": len(messages),
            "replies-failed": 1,
            "replies-dropped": len(BAD_REPLIES),
        }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for node in bad_nodes:
        assert any(f"node {node}" in warning for warning in warnings)


def test_all_replies_bad_gives_no_arrays() -> None:
    strategy = NoisyStrategy(FedAvg(), aggregation=NoiseSpec(std=0.1, seed=0))
    messages = configure(
        strategy, 1, array_record(random_arrays(SMALL_SHAPES)), FakeGrid(NODE_IDS)
    )
    replies = [error_reply(messages[0])] + [
        train_reply(m, BAD_REPLIES["nan"](record_arrays(m.content["arrays"])))
        for m in messages[1:]
    ]
    aggregated, metrics = strategy.aggregate_train(1, replies)
    assert aggregated is None
    assert metrics is not None
    assert metrics["replies-dropped"] == len(NODE_IDS) - 1
    assert strategy.round_noise[1]["replies-dropped"] == len(NODE_IDS) - 1


def test_evaluate_and_summary_are_delegated() -> None:
    base, wrapped = (
        FedAvg(),
        NoisyStrategy(FedAvg(), broadcast=NoiseSpec(std=1.0, seed=0)),
    )
    arrays = array_record(random_arrays(SMALL_SHAPES))
    grid = FakeGrid(NODE_IDS)
    random.seed(0)
    theirs = list(base.configure_evaluate(1, arrays, ConfigRecord(), grid))
    random.seed(0)
    ours = list(wrapped.configure_evaluate(1, arrays, ConfigRecord(), grid))
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.metadata.message_type == MessageType.EVALUATE
        assert_same_content(mine.content, other.content)
    wrapped.summary()


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="strategy="):
        NoisyStrategy(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="broadcast="):
        NoisyStrategy(FedAvg(), broadcast=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local_steps="):
        NoisyStrategy(FedAvg(), local_steps=0)


def client_app(message: Message) -> Message:
    """A ClientApp for FakeGrid: one fake 'training' step, metrics with noise."""
    if message.metadata.message_type == MessageType.EVALUATE:
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 1.0})}),
            reply_to=message,
        )
    received = record_arrays(message.content["arrays"])
    trained = {name: value * 0.5 for name, value in received.items()}
    return train_reply(message, trained, 10)


@pytest.mark.parametrize("name", ["FedAvg", "FedAdam"])
def test_start_runs_rounds_and_records_the_noise(name: str) -> None:
    strategy = NoisyStrategy(
        STRATEGY_FACTORIES[name](),
        broadcast=NoiseSpec(std=0.01, seed=0),
        aggregation=NoiseSpec(std=0.001, seed=0),
    )
    result = strategy.start(
        grid=FakeGrid(NODE_IDS, reply_fn=client_app),
        initial_arrays=array_record(random_arrays(SMALL_SHAPES)),
        num_rounds=2,
    )
    assert set(result.train_metrics_clientapp) == {1, 2}
    for server_round in (1, 2):
        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["noise-broadcast-sigma"] == 0.01
        assert metrics["noise-aggregation-sigma"] == 0.001
        assert metrics["replies-received"] == len(NODE_IDS)
    assert set(strategy.round_noise) == {1, 2}


def test_partial_sampling_picks_the_same_partitions_whatever_the_node_ids() -> None:
    arrays = array_record(random_arrays(SMALL_SHAPES))
    run_a = {101: 0, 205: 1, 150: 2, 999: 3, 120: 4, 310: 5}
    run_b = {7: 3, 3: 0, 5: 5, 1: 1, 9: 2, 8: 4}

    def sampled_partitions(node_to_partition: dict[int, int]) -> list[int]:
        strategy = NoisyStrategy(
            FedAvg(fraction_train=0.5, min_available_nodes=1, min_train_nodes=1),
            client_key_fn=node_to_partition.__getitem__,
        )
        random.seed(3)
        messages = configure(strategy, 1, arrays, FakeGrid(node_to_partition))
        return sorted(node_to_partition[m.metadata.dst_node_id] for m in messages)

    first = sampled_partitions(run_a)
    assert len(first) == 3
    assert sampled_partitions(run_b) == first
    # Without client keys the pick follows the random node ids.
    picks = set()
    for node_to_partition in (run_a, run_b):
        random.seed(3)
        messages = configure(
            NoisyStrategy(FedAvg(fraction_train=0.5, min_available_nodes=1)),
            1,
            arrays,
            FakeGrid(node_to_partition),
        )
        picks.add(
            tuple(sorted(node_to_partition[m.metadata.dst_node_id] for m in messages))
        )
    assert len(picks) == 2


def test_the_client_key_grid_is_complete_and_orders_nodes_by_client_key() -> None:
    from flwr.serverapp import Grid

    from flwr_noise.strategy import _ClientKeyOrderedGrid

    grid = FakeGrid((30, 10, 20))
    partition = {10: "c", 20: "a", 30: "b"}
    ordered = _ClientKeyOrderedGrid(grid, partition.__getitem__)
    assert isinstance(ordered, Grid)
    assert list(ordered.get_node_ids()) == [20, 30, 10]
    assert [node.node_id for node in ordered.get_nodes()] == [20, 30, 10]
    # Everything else is the wrapped grid's, whatever Grid declares.
    for name in Grid.__abstractmethods__ - {"get_node_ids"}:
        assert getattr(ordered, name) == getattr(grid, name), name
    assert ordered.node_ids is grid.node_ids
    assert ordered.run is grid.run
