"""weight_noise_mod, weight_noise_from_message and noise_metrics (ClientApp side)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fakes import (
    FakeGrid,
    array_record,
    error_reply,
    make_context,
    random_arrays,
    record_arrays,
    train_message,
    train_reply,
)
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from flwr_noise.hook import WeightNoise
from flwr_noise.mod import (
    noise_metrics,
    weight_noise,
    weight_noise_from_message,
    weight_noise_mod,
)
from flwr_noise.sampling import NoiseReport, perturb_arrays
from flwr_noise.seeding import numpy_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.strategy import (
    LOCAL_PREFIX,
    RECEIVED_PREFIX,
    UPDATE_PREFIX,
    NoisyStrategy,
)

LARGE_SHAPES = {"w": (300, 300), "b": (300,)}
NODE_ID = 1003
PARTITION_ID = 2
RECEIVED_PURPOSE = "received"
UPDATE_PURPOSE = "update"


def spec_config(
    server_round: int = 2,
    local: NoiseSpec | None = None,
    update: NoiseSpec | None = None,
    received: NoiseSpec | None = None,
) -> dict[str, object]:
    config: dict[str, object] = {"server-round": server_round, "lr": 0.1}
    if local is not None:
        config.update(local.to_config(LOCAL_PREFIX))
    if received is not None:
        config.update(received.to_config(RECEIVED_PREFIX))
    if update is not None:
        config.update(update.to_config(UPDATE_PREFIX))
    return config


class InnerApp:
    """Records what it received; replies with fixed 'trained' arrays."""

    def __init__(self, trained: dict[str, np.ndarray] | None = None) -> None:
        self.trained = trained
        self.calls: list[tuple[dict[str, np.ndarray], dict[str, object]]] = []
        self.reply: Message | None = None

    def __call__(self, msg: Message, ctxt: Context) -> Message:
        received = record_arrays(next(iter(msg.content.array_records.values())))
        config = dict(next(iter(msg.content.config_records.values())))
        self.calls.append((received, config))
        self.reply = train_reply(msg, self.trained or received, 10, {"loss": 0.5})
        return self.reply


@pytest.mark.parametrize("message_type", [MessageType.EVALUATE, MessageType.QUERY])
def test_non_train_messages_pass_through_untouched(message_type: str) -> None:
    sent = random_arrays(LARGE_SHAPES)
    update = NoiseSpec(std=0.1, seed=0)
    config = spec_config(
        local=NoiseSpec(std=0.1, seed=0),
        received=NoiseSpec(std=0.1, seed=0),
        update=update,
    )
    msg = train_message(NODE_ID, sent, config, message_type=message_type)
    inner = InnerApp()

    out = weight_noise_mod(msg, make_context(NODE_ID, PARTITION_ID), inner)

    assert out is inner.reply
    received, seen_config = inner.calls[0]
    for name, value in sent.items():
        np.testing.assert_array_equal(received[name], value)
        np.testing.assert_array_equal(record_arrays(out.content["arrays"])[name], value)
    assert seen_config == config
    assert dict(out.content["metrics"]) == {"num-examples": 10, "loss": 0.5}


@pytest.mark.parametrize(
    "config",
    [spec_config(), spec_config(local=NoiseSpec(std=0.1, seed=0))],
    ids=["no-spec", "local-spec-only"],
)
def test_train_message_without_mod_noise_passes_through_untouched(
    config: dict[str, object],
) -> None:
    sent = random_arrays(LARGE_SHAPES)
    msg = train_message(NODE_ID, sent, config)
    # Records the mod would refuse if it had noise to add: none is asked for.
    msg.content["more-arrays"] = array_record(random_arrays({"w": (3,)}))
    msg.content["more-config"] = ConfigRecord({"x": 1})
    content_before = dict(msg.content.items())
    seen: list[Message] = []

    def inner(received: Message, ctxt: Context) -> Message:
        seen.append(received)
        return train_reply(received, record_arrays(received.content["arrays"]))

    out = weight_noise_mod(msg, make_context(NODE_ID, PARTITION_ID), inner)

    assert seen == [msg]
    assert dict(msg.content.items()) == content_before
    assert dict(msg.content["config"]) == config
    np.testing.assert_array_equal(record_arrays(msg.content["arrays"])["w"], sent["w"])
    assert not out.has_error()
    assert dict(out.content["metrics"]) == {"num-examples": 10}


def test_received_arrays_are_perturbed_once_and_config_is_untouched() -> None:
    sigma = 0.04
    received_spec = NoiseSpec(std=sigma, seed=5, exclude=(r"^b$",))
    local = NoiseSpec(std=0.5, seed=5)
    sent = random_arrays(LARGE_SHAPES)
    config = spec_config(server_round=3, local=local, received=received_spec)
    msg = train_message(NODE_ID, sent, config)
    inner = InnerApp()

    out = weight_noise_mod(msg, make_context(NODE_ID, PARTITION_ID), inner)

    assert len(inner.calls) == 1
    received, seen_config = inner.calls[0]
    # The local spec is noise during training: passed on for weight_noise().
    assert seen_config == config
    np.testing.assert_array_equal(received["b"], sent["b"])
    diff = received["w"].astype(np.float64) - sent["w"]
    assert abs(diff.mean()) < 5 * sigma / math.sqrt(diff.size)
    assert diff.std() == pytest.approx(sigma, rel=0.02)
    # Exactly the client's own stream: (seed, partition id, round, purpose).
    rng = numpy_generator(
        5, client=PARTITION_ID, server_round=3, purpose=RECEIVED_PURPOSE
    )
    expected, _ = perturb_arrays(sent, received_spec, sigma, rng)
    np.testing.assert_array_equal(received["w"], expected["w"])

    metrics = out.content["metrics"]
    assert metrics["noise-received-sigma"] == sigma
    assert metrics["noise-received-l2"] == pytest.approx(np.linalg.norm(diff), rel=1e-6)
    applications = metrics["noise-received-applications"]
    assert applications == 1 and isinstance(applications, int)
    assert metrics["num-examples"] == 10
    assert "noise-update-sigma" not in metrics
    assert not any(key.startswith("noise-local") for key in metrics)


def test_local_spec_is_noise_during_training_also_behind_the_mod() -> None:
    local = NoiseSpec(std=0.1, seed=0)
    sent = {"weight": np.zeros((2, 3), np.float32)}
    msg = train_message(NODE_ID, sent, spec_config(local=local))
    steps = 4
    received: list[np.ndarray] = []

    def inner(msg: Message, ctxt: Context) -> Message:
        model = torch.nn.Linear(3, 2, bias=False)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        received.append(model.weight.detach().numpy().copy())
        with weight_noise(model, msg, ctxt) as noise:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            for _ in range(steps):
                optimizer.step()
        return train_reply(
            msg, {"weight": model.weight.detach().numpy()}, 10, noise.metrics()
        )

    out = weight_noise_mod(msg, make_context(NODE_ID, PARTITION_ID), inner)

    np.testing.assert_array_equal(received[0], sent["weight"])
    assert out.content["metrics"]["noise-local-applications"] == steps
    assert "noise-received-sigma" not in out.content["metrics"]


def test_update_noise_is_added_to_the_reply() -> None:
    sigma = 0.03
    update = NoiseSpec(std=sigma, seed=9, schedule="exponential", decay=0.5)
    trained = random_arrays(LARGE_SHAPES, seed=3)
    msg = train_message(
        NODE_ID, random_arrays(LARGE_SHAPES), spec_config(2, update=update)
    )
    inner = InnerApp(trained)

    out = weight_noise_mod(msg, make_context(NODE_ID, PARTITION_ID), inner)

    # The inner app sees the received model and the update spec unchanged.
    assert NoiseSpec.from_config(inner.calls[0][1], UPDATE_PREFIX) == update
    sent_back = record_arrays(out.content["arrays"])
    diff = np.concatenate(
        [(sent_back[k].astype(np.float64) - trained[k]).ravel() for k in trained]
    )
    scheduled = sigma * 0.5  # round 2: t = 1
    assert diff.std() == pytest.approx(scheduled, rel=0.02)
    assert abs(diff.mean()) < 5 * scheduled / math.sqrt(diff.size)
    metrics = out.content["metrics"]
    assert metrics["noise-update-sigma"] == pytest.approx(scheduled)
    assert metrics["noise-update-l2"] == pytest.approx(np.linalg.norm(diff), rel=1e-6)
    assert metrics["loss"] == 0.5


def test_error_from_the_inner_app_is_passed_through() -> None:
    config = spec_config(received=NoiseSpec(std=0.1, seed=0), update=NoiseSpec(std=0.1))
    msg = train_message(NODE_ID, random_arrays(LARGE_SHAPES), config)
    replies: list[Message] = []

    def failing(msg: Message, ctxt: Context) -> Message:
        replies.append(error_reply(msg, "out of memory"))
        return replies[0]

    out = weight_noise_mod(msg, make_context(NODE_ID, PARTITION_ID), failing)
    assert out is replies[0]
    assert out.error.reason == "out of memory"


def test_several_array_records_get_an_error_reply() -> None:
    config = spec_config(received=NoiseSpec(std=0.1, seed=0))
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), config)
    msg.content["more-arrays"] = array_record(random_arrays({"w": (3,)}))
    inner = InnerApp()
    out = weight_noise_mod(msg, make_context(NODE_ID), inner)
    assert out.has_error()
    assert out.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "ArrayRecord" in out.error.reason
    assert inner.calls == []
    assert out.metadata.dst_node_id == msg.metadata.src_node_id


def test_several_config_records_with_a_spec_get_an_error_reply() -> None:
    config = spec_config(update=NoiseSpec(std=0.1, seed=0))
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), config)
    msg.content["more-config"] = ConfigRecord(dict(config))  # type: ignore[arg-type]
    inner = InnerApp()
    out = weight_noise_mod(msg, make_context(NODE_ID), inner)
    assert out.has_error()
    assert "ConfigRecord" in out.error.reason
    assert inner.calls == []


def test_invalid_spec_gets_an_error_reply_naming_the_key() -> None:
    config = spec_config(received=NoiseSpec(std=0.1, seed=0))
    config["noise.received.distribution"] = "cauchy"
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), config)
    inner = InnerApp()
    out = weight_noise_mod(msg, make_context(NODE_ID), inner)
    assert out.has_error()
    assert "noise.received.distribution" in out.error.reason
    assert inner.calls == []


def test_weight_noise_from_message_without_or_with_disabled_spec() -> None:
    model = torch.nn.Linear(3, 2)
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), spec_config())
    assert weight_noise_from_message(model, msg, make_context(NODE_ID)) is None
    disabled = spec_config(local=NoiseSpec(std=0.0))
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), disabled)
    assert weight_noise_from_message(model, msg, make_context(NODE_ID)) is None


def test_weight_noise_from_message_builds_a_working_hook() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 100)
    local = NoiseSpec(std=0.05, seed=4)
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), spec_config(4, local))
    noise = weight_noise_from_message(model, msg, make_context(NODE_ID, PARTITION_ID))

    assert isinstance(noise, WeightNoise)
    assert noise.spec == local
    assert noise.client == PARTITION_ID
    assert noise.server_round == 4
    assert noise.purpose == "local"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    noise.attach(optimizer)
    before = model.weight.detach().clone()
    optimizer.step()
    change = (model.weight.detach() - before).double()
    assert change.std().item() == pytest.approx(0.05, rel=0.05)
    assert noise.report().applications == 1

    # Without a partition id the node id is the client key.
    fallback = weight_noise_from_message(model, msg, make_context(NODE_ID))
    assert fallback is not None and fallback.client == NODE_ID
    assert weight_noise_from_message(model, msg).client == NODE_ID


def test_weight_noise_from_message_needs_the_round() -> None:
    config = spec_config(local=NoiseSpec(std=0.1))
    del config["server-round"]
    msg = train_message(NODE_ID, random_arrays({"w": (3,)}), config)
    with pytest.raises(ValueError, match="server-round"):
        weight_noise_from_message(torch.nn.Linear(2, 2), msg)


def test_noise_metrics_names_and_values() -> None:
    report = NoiseReport(sigma=0.1, l2_norm=2.5, numel=10, applications=3)
    assert noise_metrics(report) == {
        "noise-local-sigma": 0.1,
        "noise-local-l2": 2.5,
        "noise-local-applications": 3,
    }
    assert isinstance(noise_metrics(report)["noise-local-applications"], int)
    assert set(noise_metrics(report, "noise-x")) == {
        "noise-x-sigma",
        "noise-x-l2",
        "noise-x-applications",
    }
    with pytest.raises(TypeError, match="report="):
        noise_metrics({"sigma": 0.1})  # type: ignore[arg-type]


def test_reply_without_metric_record_gets_one() -> None:
    config = spec_config(update=NoiseSpec(std=0.1, seed=0))
    msg = train_message(NODE_ID, random_arrays({"w": (4,)}), config)

    def no_metrics(msg: Message, ctxt: Context) -> Message:
        arrays = msg.content["arrays"]
        return Message(RecordDict({"arrays": arrays}), reply_to=msg)

    out = weight_noise_mod(msg, make_context(NODE_ID), no_metrics)
    assert out.content["metrics"]["noise-update-sigma"] == 0.1


class WeightOnly(torch.nn.Module):
    """A model whose only parameter is called ``w``, like the fake arrays."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(shape))


def test_mod_and_strategy_together_over_a_fake_grid() -> None:
    node_to_partition = {1001: 0, 1002: 1, 1003: 2}
    strategy = NoisyStrategy(
        FedAvg(min_available_nodes=3),
        local=NoiseSpec(std=0.02, seed=1, schedule_unit="round"),
        update=NoiseSpec(std=0.01, seed=1),
        client_key_fn=node_to_partition.__getitem__,
    )
    steps = 3
    seen_configs: list[dict[str, object]] = []

    def inner(msg: Message, ctxt: Context) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"num-examples": 5, "loss": 1.0})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        seen_configs.append(dict(msg.content["config"]))
        model = WeightOnly((50, 40))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        with weight_noise(model, msg, ctxt) as noise:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            for _ in range(steps):
                optimizer.step()
        trained = {"w": model.w.detach().numpy()}
        return train_reply(msg, trained, 10, noise.metrics())

    def client_app(msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        context = make_context(node_id, node_to_partition[node_id])
        return weight_noise_mod(msg, context, inner)

    initial = random_arrays({"w": (50, 40)})
    result = strategy.start(
        grid=FakeGrid(node_to_partition, reply_fn=client_app),
        initial_arrays=array_record(initial),
        num_rounds=2,
    )

    assert len(seen_configs) == 6
    assert all(LOCAL_PREFIX + "std" in config for config in seen_configs)
    for server_round in (1, 2):
        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["noise-local-sigma"] == pytest.approx(0.02)
        assert metrics["noise-local-applications"] == steps
        assert metrics["noise-update-sigma"] == pytest.approx(0.01)
        assert metrics["noise-update-applications"] == 1
        assert "noise-received-sigma" not in metrics
        assert metrics["replies-dropped"] == 0
    # The model moved by the clients' noise only (the inner app trains nothing).
    change = record_arrays(result.arrays)["w"] - initial["w"]
    assert 0 < np.abs(change).max() < 1.0
