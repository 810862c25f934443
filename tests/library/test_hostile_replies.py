"""One hostile client among honest ones: its reply counts for nothing, and nothing more.

Table-driven, for both wrappers. The Message-API cases run whole federations
through Flower's own ``Strategy.start`` on a fake Grid; the legacy cases drive
``configure_fit`` / ``aggregate_fit`` round by round. Every case asserts that
the run completes, that the bad reply is dropped, logged with its sender and
counted in ``replies-dropped``, and that the global model equals, bit for bit,
what the wrapped FedAvg makes of the honest replies alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from fakes import (
    FakeClientProxy,
    FakeGrid,
    array_record,
    client_manager,
    error_reply,
    npy_bytes,
    random_arrays,
    raw_array,
    record_arrays,
    spoofed,
    train_message,
    train_reply,
)
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import (
    fitres_to_recorddict,
    recorddict_to_fitres,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg

from flwr_noise import NoiseSpec, NoisyStrategy
from flwr_noise.legacy import NoisyLegacyStrategy

NODES = (1001, 1002, 1003, 1004)
HOSTILE = 1005
SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,)}
ROUNDS = 2
W = "fc.weight"

# --- Message API --------------------------------------------------------------


def honest_reply(instruction: Message) -> Message:
    """What an honest ClientApp sends: the model it got, shifted by its node."""
    node = instruction.metadata.dst_node_id
    received = record_arrays(instruction.content["arrays"])
    shift = np.float32(0.01 * (node - 1000))
    trained = {name: value + shift for name, value in received.items()}
    return train_reply(
        instruction, trained, node - 990, {"train-loss": float(node - 1000)}
    )


def received_weight(instruction: Message) -> np.ndarray:
    return record_arrays(instruction.content["arrays"])[W]


def with_array(instruction: Message, array: Array, name: str = W) -> Message:
    reply = honest_reply(instruction)
    reply.content["arrays"][name] = array
    return reply


def with_metrics(instruction: Message, **changes: object) -> Message:
    reply = honest_reply(instruction)
    metrics = dict(reply.content["metrics"])
    for key, value in changes.items():
        if value is DELETE:
            del metrics[key]
        else:
            metrics[key] = value
    reply.content["metrics"] = MetricRecord(metrics)  # type: ignore[arg-type]
    return reply


def with_records(instruction: Message, **records: object) -> Message:
    reply = honest_reply(instruction)
    content = RecordDict(
        {
            key: (reply.content[value] if isinstance(value, str) else value)
            for key, value in records.items()
        }
    )
    return Message(content, reply_to=instruction)


DELETE = object()


def _lying(instruction: Message, data: bytes, **declared: object) -> Message:
    weight = received_weight(instruction)
    fields = {"dtype": "float32", "shape": weight.shape, **declared}
    return with_array(instruction, raw_array(data, **fields))  # type: ignore[arg-type]


HostileFn = Callable[[Message], "Message | list[Message] | None"]

# name -> (what the hostile node answers, replies dropped per round)
MESSAGE_CASES: dict[str, tuple[HostileFn, int]] = {
    "nan": (lambda m: with_array(m, Array(received_weight(m) * np.nan)), 1),
    "inf": (lambda m: with_array(m, Array(received_weight(m) + np.inf)), 1),
    "stype-not-numpy": (
        lambda m: _lying(m, npy_bytes(received_weight(m)), stype="torch.Tensor"),
        1,
    ),
    "undecodable-bytes": (lambda m: _lying(m, b"\x93NUMPY not really"), 1),
    "short-bytes": (lambda m: _lying(m, npy_bytes(received_weight(m))[:-8]), 1),
    "lying-dtype-float64": (
        lambda m: _lying(m, npy_bytes(received_weight(m).astype(np.float64))),
        1,
    ),
    "lying-shape": (
        lambda m: _lying(m, npy_bytes(received_weight(m).reshape(3, 4))),
        1,
    ),
    "pickled-objects": (
        lambda m: _lying(
            m, npy_bytes(np.array([1, "x"], dtype=object), allow_pickle=True)
        ),
        1,
    ),
    "int-dtype": (
        lambda m: with_array(m, Array(received_weight(m).astype(np.int32))),
        1,
    ),
    "wrong-shape": (lambda m: with_array(m, Array(received_weight(m).ravel())), 1),
    "missing-array": (
        lambda m: with_records(
            m,
            arrays=ArrayRecord({W: Array(received_weight(m))}),
            metrics="metrics",
        ),
        1,
    ),
    "extra-array": (
        lambda m: with_array(m, Array(np.zeros(3, np.float32)), name="extra"),
        1,
    ),
    "num-examples-zero": (lambda m: with_metrics(m, **{"num-examples": 0}), 1),
    "num-examples-negative": (lambda m: with_metrics(m, **{"num-examples": -40}), 1),
    "num-examples-nan": (
        lambda m: with_metrics(m, **{"num-examples": float("nan")}),
        1,
    ),
    "num-examples-inf": (
        lambda m: with_metrics(m, **{"num-examples": float("inf")}),
        1,
    ),
    "num-examples-huge": (lambda m: with_metrics(m, **{"num-examples": 1e300}), 1),
    "num-examples-missing": (
        lambda m: with_metrics(m, **{"num-examples": DELETE}),
        1,
    ),
    "num-examples-list": (lambda m: with_metrics(m, **{"num-examples": [5, 5]}), 1),
    "metric-list-for-number": (
        lambda m: with_metrics(m, **{"train-loss": [0.1, 0.2]}),
        1,
    ),
    "extra-metric-key": (lambda m: with_metrics(m, **{"surprise": 1.0}), 1),
    "missing-metric-key": (lambda m: with_metrics(m, **{"train-loss": DELETE}), 1),
    "two-array-records": (
        lambda m: with_records(m, arrays="arrays", more="arrays", metrics="metrics"),
        1,
    ),
    "two-metric-records": (
        lambda m: with_records(m, arrays="arrays", metrics="metrics", m2="metrics"),
        1,
    ),
    "no-array-record": (lambda m: with_records(m, metrics="metrics"), 1),
    "array-record-under-other-key": (
        lambda m: with_records(m, weights="arrays", metrics="metrics"),
        1,
    ),
    "duplicate-replies": (lambda m: [honest_reply(m), honest_reply(m)], 2),
    "reply-from-unasked-node": (
        lambda m: spoofed(honest_reply(m), src_node_id=4242),
        1,
    ),
    "reply-to-another-message": (
        lambda m: spoofed(honest_reply(m), reply_to="not-the-message-sent"),
        1,
    ),
}


def honest_federation(initial: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The global model after each round with the honest nodes alone."""
    arrays, models = array_record(initial), []
    for server_round in range(1, ROUNDS + 1):
        replies = [
            honest_reply(train_message(node, arrays, {"server-round": server_round}))
            for node in NODES
        ]
        arrays, _ = FedAvg().aggregate_train(server_round, replies)
        models.append(record_arrays(arrays))
    return models


def assert_same_model(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(got[name], expected[name])


def dropping_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "dropping" in record.getMessage()
    ]


@pytest.mark.parametrize("case", MESSAGE_CASES, ids=list(MESSAGE_CASES))
def test_message_api_hostile_reply_counts_for_nothing(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    hostile, dropped = MESSAGE_CASES[case]
    initial = random_arrays(SHAPES, seed=3)

    def reply_fn(message: Message) -> Message | list[Message] | None:
        if message.metadata.dst_node_id == HOSTILE:
            return hostile(message)
        return honest_reply(message)

    strategy = NoisyStrategy(
        FedAvg(fraction_evaluate=0.0), client_key_fn=lambda node: node
    )
    grid = FakeGrid((*NODES, HOSTILE), reply_fn)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=grid, initial_arrays=array_record(initial), num_rounds=ROUNDS
        )

    assert_same_model(record_arrays(result.arrays), honest_federation(initial)[-1])
    for server_round in range(1, ROUNDS + 1):
        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["replies-dropped"] == dropped
        assert metrics["replies-failed"] == 0
        assert strategy.round_noise[server_round]["replies-dropped"] == dropped
    warnings = dropping_warnings(caplog)
    assert len(warnings) == dropped * ROUNDS
    sender = 4242 if case == "reply-from-unasked-node" else HOSTILE
    assert all(f"node {sender}:" in warning for warning in warnings)


def test_an_error_reply_is_failed_not_dropped_and_the_rest_is_averaged() -> None:
    initial = random_arrays(SHAPES, seed=3)

    def reply_fn(message: Message) -> Message:
        if message.metadata.dst_node_id == HOSTILE:
            return error_reply(message)
        return honest_reply(message)

    strategy = NoisyStrategy(FedAvg(fraction_evaluate=0.0), client_key_fn=int)
    result = strategy.start(
        grid=FakeGrid((*NODES, HOSTILE), reply_fn),
        initial_arrays=array_record(initial),
        num_rounds=ROUNDS,
    )
    assert_same_model(record_arrays(result.arrays), honest_federation(initial)[-1])
    assert result.train_metrics_clientapp[1]["replies-failed"] == 1
    assert result.train_metrics_clientapp[1]["replies-dropped"] == 0


def test_a_tie_in_structure_keeps_last_rounds_structure() -> None:
    # Two honest nodes, two that add a metric key from round 2 on: a 2-2 tie
    # that round, decided for the structure all four replies had in round 1.
    nodes = (1001, 1002, 1003, 1004)

    def reply_fn(message: Message) -> Message:
        reply = honest_reply(message)
        late = message.metadata.dst_node_id in (1001, 1002)
        if late and message.content["config"]["server-round"] == 2:
            return with_metrics(message, surprise=1.0)
        return reply

    strategy = NoisyStrategy(FedAvg(fraction_evaluate=0.0), client_key_fn=int)
    result = strategy.start(
        grid=FakeGrid(nodes, reply_fn),
        initial_arrays=array_record(random_arrays(SHAPES, seed=3)),
        num_rounds=2,
    )
    assert result.train_metrics_clientapp[2]["replies-dropped"] == 2
    assert "surprise" not in result.train_metrics_clientapp[2]


# --- Failed rounds ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_overflowing_aggregate_keeps_the_previous_model_through_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Round 1 is fine; from round 2 on the clients send weights near float32's
    # maximum, which multiplicative aggregation noise pushes to Inf.
    def reply_fn(message: Message) -> Message:
        if message.content["config"]["server-round"] == 1:
            return honest_reply(message)
        return train_reply(
            message,
            {
                name: np.full(shape, 3.3e38, np.float32)
                for name, shape in SHAPES.items()
            },
        )

    models: dict[int, dict[str, np.ndarray]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
        models[server_round] = record_arrays(arrays)

    strategy = NoisyStrategy(
        FedAvg(fraction_evaluate=0.0),
        aggregation=NoiseSpec(std=0.5, mode="multiplicative", seed=0),
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=FakeGrid(NODES, reply_fn),
            initial_arrays=array_record(random_arrays(SHAPES, seed=3)),
            num_rounds=3,
            evaluate_fn=evaluate_fn,
        )
    final = record_arrays(result.arrays)
    assert all(np.isfinite(array).all() for array in final.values())
    assert_same_model(final, models[1])
    assert_same_model(models[3], models[1])
    assert "round-failed" not in result.train_metrics_clientapp[1]
    for server_round in (2, 3):
        assert result.train_metrics_clientapp[server_round]["round-failed"] == 1
        assert "not finite" in strategy.round_failures[server_round]
    assert any("round 2 failed" in r.getMessage() for r in caplog.records)


class RaisingFedAvg(FedAvg):
    """FedAvg whose aggregation raises in round 1 only."""

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        if server_round == 1:
            raise ZeroDivisionError("weights sum to zero")
        return super().aggregate_train(server_round, replies)


def test_an_aggregation_error_fails_the_round_never_the_run() -> None:
    initial = random_arrays(SHAPES, seed=3)
    strategy = NoisyStrategy(RaisingFedAvg(fraction_evaluate=0.0), client_key_fn=int)
    result = strategy.start(
        grid=FakeGrid(NODES, honest_reply),
        initial_arrays=array_record(initial),
        num_rounds=2,
    )
    assert result.train_metrics_clientapp[1]["round-failed"] == 1
    assert "ZeroDivisionError" in strategy.round_failures[1]
    # Round 2 starts from the initial model: one honest round's worth.
    assert_same_model(record_arrays(result.arrays), honest_federation(initial)[0])


# --- Legacy API ---------------------------------------------------------------

CIDS = ("1", "2", "3", "4")
HOSTILE_CID = "9"
LegacyHostileFn = Callable[[FitIns], "list[FitRes]"]


def ok_status() -> Status:
    return Status(code=Code.OK, message="Success")


def honest_fit_res(fit_ins: FitIns, cid: str) -> FitRes:
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    shift = np.float32(0.01 * int(cid))
    res = FitRes(
        status=ok_status(),
        parameters=ndarrays_to_parameters([array + shift for array in arrays]),
        num_examples=10 + int(cid),
        metrics={"loss": float(cid)},
    )
    # As the server gets it off the wire (its metrics become a ConfigRecord).
    return recorddict_to_fitres(fitres_to_recorddict(res, True), True)


def legacy_res(
    fit_ins: FitIns,
    *,
    arrays: list[np.ndarray] | None = None,
    tensors: list[bytes] | None = None,
    tensor_type: str = "numpy.ndarray",
    num_examples: object = 12,
    metrics: object = None,
) -> list[FitRes]:
    honest = honest_fit_res(fit_ins, HOSTILE_CID)
    if arrays is not None:
        tensors = ndarrays_to_parameters(arrays).tensors
    return [
        FitRes(
            status=ok_status(),
            parameters=Parameters(
                tensors=honest.parameters.tensors if tensors is None else tensors,
                tensor_type=tensor_type,
            ),
            num_examples=num_examples,  # type: ignore[arg-type]
            metrics=honest.metrics if metrics is None else metrics,  # type: ignore[arg-type]
        )
    ]


def received(fit_ins: FitIns) -> list[np.ndarray]:
    return parameters_to_ndarrays(fit_ins.parameters)


def with_first(fit_ins: FitIns, first: np.ndarray) -> list[FitRes]:
    return legacy_res(fit_ins, arrays=[first, *received(fit_ins)[1:]])


def with_first_bytes(fit_ins: FitIns, data: bytes) -> list[FitRes]:
    tensors = ndarrays_to_parameters(received(fit_ins)).tensors
    return legacy_res(fit_ins, tensors=[data, *tensors[1:]])


LEGACY_CASES: dict[str, tuple[LegacyHostileFn, int]] = {
    "nan": (lambda f: with_first(f, received(f)[0] * np.nan), 1),
    "inf": (lambda f: with_first(f, received(f)[0] - np.inf), 1),
    "tensor-type": (lambda f: legacy_res(f, tensor_type="torch.Tensor"), 1),
    "undecodable-bytes": (lambda f: with_first_bytes(f, b"\x93NUMPY junk"), 1),
    "short-bytes": (
        lambda f: with_first_bytes(f, npy_bytes(received(f)[0])[:-8]),
        1,
    ),
    "float64-bytes": (
        lambda f: with_first(f, received(f)[0].astype(np.float64)),
        1,
    ),
    "pickled-objects": (
        lambda f: with_first_bytes(
            f, npy_bytes(np.array([1, "x"], dtype=object), allow_pickle=True)
        ),
        1,
    ),
    "int-dtype": (lambda f: with_first(f, received(f)[0].astype(np.int32)), 1),
    "wrong-shape": (lambda f: with_first(f, received(f)[0].ravel()), 1),
    "fewer-arrays": (lambda f: legacy_res(f, arrays=received(f)[:1]), 1),
    "more-arrays": (
        lambda f: legacy_res(f, arrays=[*received(f), np.zeros(2, np.float32)]),
        1,
    ),
    "num-examples-zero": (lambda f: legacy_res(f, num_examples=0), 1),
    "num-examples-negative": (lambda f: legacy_res(f, num_examples=-30), 1),
    "num-examples-nan": (lambda f: legacy_res(f, num_examples=float("nan")), 1),
    "num-examples-inf": (lambda f: legacy_res(f, num_examples=float("inf")), 1),
    "num-examples-huge": (lambda f: legacy_res(f, num_examples=10**40), 1),
    "num-examples-list": (lambda f: legacy_res(f, num_examples=[3, 4]), 1),
    "metric-str-for-number": (lambda f: legacy_res(f, metrics={"loss": "low"}), 1),
    "metric-list-for-number": (lambda f: legacy_res(f, metrics={"loss": [1.0]}), 1),
    "extra-metric-key": (
        lambda f: legacy_res(f, metrics={"loss": 1.0, "surprise": 2.0}),
        1,
    ),
    "missing-metric-key": (lambda f: legacy_res(f, metrics={}), 1),
    "metrics-not-a-dict": (lambda f: legacy_res(f, metrics=[("loss", 1.0)]), 1),
    "duplicate-results": (lambda f: legacy_res(f) + legacy_res(f), 2),
    # An honest-looking result from a client that was not configured.
    "result-from-unasked-client": (lambda f: legacy_res(f), 1),
}


def legacy_fedavg() -> LegacyFedAvg:
    def mean_loss(metrics):  # type: ignore[no-untyped-def]
        total = sum(n for n, _ in metrics)
        return {"loss": sum(n * m["loss"] for n, m in metrics) / total}

    return LegacyFedAvg(fit_metrics_aggregation_fn=mean_loss)


@pytest.mark.parametrize("case", LEGACY_CASES, ids=list(LEGACY_CASES))
def test_legacy_hostile_result_counts_for_nothing(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    hostile, dropped = LEGACY_CASES[case]
    unasked = case == "result-from-unasked-client"
    strategy = NoisyLegacyStrategy(legacy_fedavg())
    manager = client_manager((*CIDS, HOSTILE_CID) if not unasked else CIDS)
    parameters = ndarrays_to_parameters(list(random_arrays(SHAPES, seed=3).values()))
    for server_round in range(1, ROUNDS + 1):
        instructions = {
            client.cid: (client, fit_ins)
            for client, fit_ins in strategy.configure_fit(
                server_round, parameters, manager
            )
        }
        honest = [
            (instructions[cid][0], honest_fit_res(instructions[cid][1], cid))
            for cid in CIDS
        ]
        hostile_client: ClientProxy = (
            FakeClientProxy(HOSTILE_CID) if unasked else instructions[HOSTILE_CID][0]
        )
        some_fit_ins = instructions[CIDS[0]][1]
        bad = [
            (hostile_client, res)
            for res in hostile(instructions.get(HOSTILE_CID, (None, some_fit_ins))[1])
        ]
        results = [*honest[:2], *bad, *honest[2:]]
        with caplog.at_level(logging.WARNING, logger="flwr"):
            aggregated, metrics = strategy.aggregate_fit(server_round, results, [])
        expected, expected_metrics = legacy_fedavg().aggregate_fit(
            server_round, honest, []
        )
        assert aggregated is not None and expected is not None
        got, want = parameters_to_ndarrays(aggregated), parameters_to_ndarrays(expected)
        for left, right in zip(got, want, strict=True):
            assert left.dtype == right.dtype
            np.testing.assert_array_equal(left, right)
        assert metrics["loss"] == expected_metrics["loss"]
        assert metrics["replies-dropped"] == dropped
        parameters = aggregated
    warnings = dropping_warnings(caplog)
    assert len(warnings) == dropped * ROUNDS
    assert all(f"client {HOSTILE_CID}:" in warning for warning in warnings)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_legacy_overflowing_aggregate_returns_no_parameters() -> None:
    strategy = NoisyLegacyStrategy(
        legacy_fedavg(), aggregation=NoiseSpec(std=0.5, mode="multiplicative", seed=0)
    )
    parameters = ndarrays_to_parameters([np.zeros((40, 40), np.float32)])
    instructions = strategy.configure_fit(1, parameters, client_manager(CIDS))
    results = [
        (
            client,
            FitRes(
                ok_status(),
                ndarrays_to_parameters([np.full((40, 40), 3.3e38, np.float32)]),
                10,
                {"loss": 1.0},
            ),
        )
        for client, _ in instructions
    ]
    aggregated, metrics = strategy.aggregate_fit(1, results, [])
    assert aggregated is None
    assert metrics["round-failed"] == 1
    assert "not finite" in strategy.round_failures[1]


def test_legacy_aggregation_error_fails_the_round_only() -> None:
    class Raising(LegacyFedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            raise ValueError("boom")

    strategy = NoisyLegacyStrategy(Raising())
    parameters = ndarrays_to_parameters([np.zeros(3, np.float32)])
    instructions = strategy.configure_fit(1, parameters, client_manager(CIDS))
    results = [(c, honest_fit_res(f, c.cid)) for c, f in instructions]
    aggregated, metrics = strategy.aggregate_fit(1, results, [])
    assert aggregated is None
    assert metrics["round-failed"] == 1
    assert "ValueError: boom" in strategy.round_failures[1]
