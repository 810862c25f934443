"""The one core behind both strategy wrappers: reply screening, server noise, metrics.

``ReplyScreen`` is tested here without any Flower type; the wrappers only
describe their replies to it. Both wrappers, given the same model, specs and
client keys, must add the very same server-side noise: they share one core.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from fakes import (
    FakeGrid,
    array_record,
    client_manager,
    random_arrays,
    record_arrays,
    train_reply,
)
from flwr.app import ConfigRecord, Message
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg

from flwr_noise import NoiseSpec, NoisyStrategy
from flwr_noise.legacy import (
    NoisyLegacyStrategy,
    NoisyNumPyClient,
    spec_from_legacy_config,
)
from flwr_noise.replies import (
    NO_WEIGHT,
    ReplyScreen,
    ReplyView,
    array_signature,
)
from flwr_noise.rounds import RoundLog

SHAPES = {"fc1.weight": (5, 3), "fc1.bias": (5,), "fc2.weight": (2, 5)}
SENT = random_arrays(SHAPES, seed=1)


def view(
    node: int,
    arrays: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]] = SENT,
    *,
    weight: object = 10,
    structure: object = ("metrics", "loss"),
    problem: str | None = None,
    reply_to: str | None = None,
) -> ReplyView:
    decode = arrays if callable(arrays) else (lambda: arrays)
    return ReplyView(
        node=node,
        order=str(node),
        decode=decode,  # type: ignore[arg-type]
        weight=weight,
        weight_label="num-examples",
        structure=structure,  # type: ignore[arg-type]
        problem=problem,
        reply_to=reply_to,
    )


def raises() -> Mapping[str, np.ndarray]:
    raise ValueError("truncated")


def test_reply_screen_applies_every_rule_and_logs_each_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with_nan = {**SENT, "fc1.bias": np.full(5, np.nan, dtype=np.float32)}
    reshaped = {**SENT, "fc2.weight": SENT["fc2.weight"].reshape(5, 2)}
    as_float64 = {name: value.astype(np.float64) for name, value in SENT.items()}
    views: list[ReplyView | None] = [
        view(1),  # kept
        view(2, reply_to="an-old-message"),  # answers another message
        view(99),  # not asked
        view(3),  # replied twice: both dropped
        view(3),
        view(4, weight=float("nan")),
        view(5, weight=True),
        view(6, weight=2**53 + 1),
        view(7, raises),
        view(8, reshaped),
        view(10, as_float64),
        view(11, with_nan),
        view(12, problem="it holds 2 ArrayRecords: expected one"),
        view(13, structure=("metrics", "other")),  # a minority structure
        None,  # an error reply: kept, the wrapped strategy counts it
        view(14, weight=NO_WEIGHT),  # kept: the strategy weights by nothing
    ]
    asked = {node: (lambda: "") for node in range(1, 15)}
    asked[2] = lambda: "the-message"
    screen = ReplyScreen("Wrapper", sender="node")
    screen.expect(1, array_signature(SENT), asked)
    with caplog.at_level(logging.WARNING):
        dropped = screen.screen(1, views)
    reasons = {views[index].node: reason for index, reason in dropped.items()}  # type: ignore[union-attr]
    assert set(range(len(views))) - set(dropped) == {0, 14, 15}
    assert reasons[2] == "it does not answer the message sent to the node"
    assert reasons[99] == "the node was not asked to train in this round"
    assert reasons[3] == "the node sent 2 replies in this round"
    for node in (4, 5, 6):
        assert reasons[node].startswith("its weight num-examples=")
        assert reasons[node].endswith("is not a finite number in (0, 2**53]")
    assert reasons[7] == "its arrays do not decode: ValueError: truncated"
    assert reasons[8].startswith("array 'fc2.weight' decodes to shape (5, 2)")
    assert "dtype float64" in reasons[10]
    assert reasons[11] == "array 'fc1.bias' holds NaN or Inf"
    assert reasons[12] == "it holds 2 ArrayRecords: expected one"
    assert reasons[13].startswith("its records or metrics (keys, value types) differ")
    assert len(caplog.records) == len(dropped) == 13
    assert "Wrapper: round 1: dropping the reply of node 13: " in caplog.text


def test_reply_screen_tie_goes_to_last_rounds_structure_then_client_key() -> None:
    screen = ReplyScreen("Wrapper")
    # Round 1 (nothing recorded as sent): a tie goes to the first client key.
    first = [view(2, structure="b"), view(1, structure="a")]
    assert set(screen.screen(1, first)) == {0}
    # Round 2: a tie again; last round's structure "a" wins over key order.
    second = [view(1, structure="b"), view(2, structure="a")]
    assert set(screen.screen(2, second)) == {0}


def test_round_log_averages_only_what_the_clients_report_as_numbers() -> None:
    log = RoundLog("Wrapper")
    log.record(1, {"noise-local-sigma": 0.5})
    log.average_reported(
        1,
        [
            (10, {"noise-local-sigma": 0.1, "noise-local-l2": "lots"}),
            (30, {"noise-local-sigma": 0.3}),
            (50, {"noise-local-sigma": True}),
        ],
        ("noise-local-sigma", "noise-local-l2"),
    )
    assert log.noise[1] == {"noise-local-sigma": pytest.approx(0.25)}
    assert log.metrics(1, {"loss": 1.0}, (), active=False) is None
    merged = log.metrics(1, {"noise-local-sigma": 0.2}, ("noise-local-sigma",), True)
    assert merged == {"noise-local-sigma": 0.2}


def test_both_wrappers_add_the_same_server_noise() -> None:
    """Same model, specs and client keys: the same copies and aggregate noise."""
    broadcast = NoiseSpec(std=0.1, seed=3)
    aggregation = NoiseSpec(std=0.01, seed=4)
    grid = FakeGrid((1001, 1002, 1003, 1004))
    message_api = NoisyStrategy(
        FedAvg(),
        broadcast=broadcast,
        aggregation=aggregation,
        client_key_fn=lambda node: node - 1001,
    )
    messages: list[Message] = list(
        message_api.configure_train(
            1, array_record(SENT), ConfigRecord({"lr": 0.1}), grid
        )
    )
    legacy = NoisyLegacyStrategy(
        LegacyFedAvg(),
        broadcast=broadcast,
        aggregation=aggregation,
        client_key_fn=lambda client: int(client.cid) - 11,
        array_names=list(SENT),
    )
    configured = legacy.configure_fit(
        1,
        ndarrays_to_parameters(list(SENT.values())),
        client_manager(("11", "12", "13", "14")),
    )
    by_key_message = {
        message.metadata.dst_node_id - 1001: record_arrays(message.content["arrays"])
        for message in messages
    }
    by_key_legacy = {
        int(client.cid) - 11: dict(
            zip(SENT, parameters_to_ndarrays(fit_ins.parameters), strict=True)
        )
        for client, fit_ins in configured
    }
    assert set(by_key_message) == set(by_key_legacy) == {0, 1, 2, 3}
    for key, arrays in by_key_message.items():
        assert not np.array_equal(arrays["fc1.weight"], SENT["fc1.weight"])
        for name, value in arrays.items():
            np.testing.assert_array_equal(value, by_key_legacy[key][name])

    # Every client sends back the global model: the aggregate is that model.
    arrays, _ = message_api.aggregate_train(
        1, [train_reply(message, SENT) for message in messages]
    )
    parameters, _ = legacy.aggregate_fit(
        1,
        [(client, _fit_res(list(SENT.values()))) for client, _ in configured],
        [],
    )
    assert arrays is not None and parameters is not None
    legacy_aggregate = parameters_to_ndarrays(parameters)
    for (name, value), other in zip(
        record_arrays(arrays).items(), legacy_aggregate, strict=True
    ):
        np.testing.assert_allclose(value, other, rtol=0, atol=1e-6, err_msg=name)
        assert not np.allclose(value, SENT[name], rtol=0, atol=1e-6)
    for key in (
        "noise-broadcast-sigma",
        "noise-broadcast-l2",
        "noise-aggregation-sigma",
        "noise-aggregation-l2",
    ):
        # The mean over the clients' norms may be summed in another order.
        expected = pytest.approx(legacy.round_noise[1][key], rel=1e-12)
        assert message_api.round_noise[1][key] == expected, key


def _fit_res(arrays: list[np.ndarray]) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=10,
        metrics={},
    )


def test_legacy_argument_errors_use_the_one_message_format() -> None:
    with pytest.raises(
        TypeError,
        match=re.escape("local_steps='3' is not allowed: expected an int >= 1"),
    ):
        NoisyNumPyClient(local_steps="3")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=re.escape("model='net' is not allowed: expected a torch.nn.Module"),
    ):
        NoisyNumPyClient(model="net")  # type: ignore[arg-type]
    config = {"noise.local.std": 0.1, "noise.local.include": "[bias$"}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "config['noise.local.include']='[bias$' is not allowed: expected a "
            "JSON list of regular expressions"
        ),
    ):
        spec_from_legacy_config(config)
