"""flwr_noise.legacy: NoisyLegacyStrategy (legacy Strategy API) and NoisyNumPyClient."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from fakes import FakeClientProxy
from fakes import client_manager as make_client_manager
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import (
    fitins_to_recorddict,
    recorddict_to_fitins,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from flwr_noise.hook import WeightNoise
from flwr_noise.legacy import (
    CLIENT_KEY_CONFIG_KEY,
    NoisyLegacyStrategy,
    NoisyNumPyClient,
    NoisyStrategy,
    spec_from_legacy_config,
    spec_to_legacy_config,
)
from flwr_noise.mod import add_noise_once
from flwr_noise.sampling import perturb_arrays
from flwr_noise.seeding import numpy_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.strategy import LOCAL_PREFIX, LOCAL_START_STEP_KEY, RECEIVED_PREFIX

CIDS = ("11", "12", "13", "14")
SMALL_SHAPES = ((5, 3), (5,), (2, 5))
NOISE_KEYS = {
    "noise-broadcast-sigma",
    "noise-broadcast-l2",
    "noise-aggregation-sigma",
    "noise-aggregation-l2",
}
REPLY_KEYS = {"replies-received", "replies-failed", "replies-dropped"}


def client_manager(cids: tuple[str, ...] = CIDS) -> SimpleClientManager:
    return make_client_manager(cids)


def random_ndarrays(shapes=SMALL_SHAPES, seed: int = 0) -> NDArrays:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def fedavg(**kwargs: object) -> FedAvg:
    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {"lr": 0.1, "epochs": server_round}

    def average_loss(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        total = sum(n for n, _ in metrics)
        return {"loss": sum(n * float(m["loss"]) for n, m in metrics) / total}

    return FedAvg(
        on_fit_config_fn=fit_config,
        fit_metrics_aggregation_fn=average_loss,
        **kwargs,
    )


def configure(
    strategy: Strategy,
    server_round: int,
    parameters: Parameters,
    manager: SimpleClientManager | None = None,
) -> dict[str, tuple[ClientProxy, FitIns]]:
    # FedAvg samples clients with `random`: seed it so that two strategies
    # given the same inputs pick the same clients.
    random.seed(server_round)
    instructions = strategy.configure_fit(
        server_round, parameters, manager or client_manager()
    )
    return {client.cid: (client, fit_ins) for client, fit_ins in instructions}


def fit_res(arrays: NDArrays, num_examples: int = 10, **metrics: Scalar) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=num_examples,
        metrics={"loss": 1.0, **metrics},
    )


def results_for(
    instructions: dict[str, tuple[ClientProxy, FitIns]], step: float = 0.01
) -> list[tuple[ClientProxy, FitRes]]:
    """Every client returns what it received plus (index + 1) * step."""
    results = []
    for index, (client, fit_ins) in enumerate(instructions.values()):
        arrays = parameters_to_ndarrays(fit_ins.parameters)
        shifted = [array + np.float32((index + 1) * step) for array in arrays]
        results.append(
            (client, fit_res(shifted, num_examples=10 + index, loss=float(index)))
        )
    return results


def decoded(parameters: Parameters | None) -> NDArrays:
    assert parameters is not None
    return parameters_to_ndarrays(parameters)


def assert_same_arrays(left: NDArrays, right: NDArrays) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


# --- NoisyLegacyStrategy ------------------------------------------------------


def test_alias_and_delegation() -> None:
    assert NoisyStrategy is NoisyLegacyStrategy
    initial = ndarrays_to_parameters(random_ndarrays())
    strategy = NoisyLegacyStrategy(
        FedAvg(initial_parameters=initial, evaluate_fn=lambda r, a, c: (float(r), {}))
    )
    assert strategy.initialize_parameters(client_manager()) is initial
    assert strategy.evaluate(3, initial) == (3.0, {})


@pytest.mark.parametrize(
    "specs",
    [{}, {"local": NoiseSpec(), "broadcast": NoiseSpec(), "aggregation": NoiseSpec()}],
    ids=["no-specs", "disabled-specs"],
)
def test_all_noise_off_equals_the_wrapped_strategy(specs: dict[str, NoiseSpec]) -> None:
    parameters = ndarrays_to_parameters(random_ndarrays())
    wrapped = NoisyLegacyStrategy(fedavg(), **specs)
    base = fedavg()
    for server_round in (1, 2):
        noisy_instructions = configure(wrapped, server_round, parameters)
        base_instructions = configure(base, server_round, parameters)
        assert noisy_instructions.keys() == base_instructions.keys()
        for cid, (_, fit_ins) in noisy_instructions.items():
            base_ins = base_instructions[cid][1]
            assert fit_ins.parameters.tensors == base_ins.parameters.tensors
            assert fit_ins.config == {**base_ins.config, "server-round": server_round}

        results = results_for(base_instructions)
        noisy_parameters, noisy_metrics = wrapped.aggregate_fit(
            server_round, results, []
        )
        base_parameters, base_metrics = base.aggregate_fit(server_round, results, [])
        assert_same_arrays(decoded(noisy_parameters), decoded(base_parameters))
        assert noisy_metrics == base_metrics


def test_configure_fit_does_not_modify_the_wrapped_instructions() -> None:
    parameters = ndarrays_to_parameters(random_ndarrays())
    tensors_before = list(parameters.tensors)
    shared_config = {"lr": 0.1}
    base = FedAvg(on_fit_config_fn=lambda _: shared_config)
    strategy = NoisyLegacyStrategy(
        base,
        local=NoiseSpec(std=0.1, seed=0),
        broadcast=NoiseSpec(std=0.1, seed=0),
    )
    configure(strategy, 1, parameters)
    assert parameters.tensors == tensors_before
    assert shared_config == {"lr": 0.1}


def test_local_spec_and_round_in_every_fit_config() -> None:
    spec = NoiseSpec(
        std=0.05,
        distribution="laplace",
        schedule="exponential",
        decay=0.9,
        exclude=("bias",),
        seed=7,
    )
    strategy = NoisyLegacyStrategy(
        fedavg(),
        local=spec,
        client_key_fn=lambda client: int(client.cid) - 10,
        local_steps=5,
    )
    parameters = ndarrays_to_parameters(random_ndarrays())
    instructions = configure(strategy, 3, parameters)
    assert len(instructions) == len(CIDS)
    for cid, (_, sent) in instructions.items():
        # What a client receives: the FitIns after Flower's legacy conversion,
        # which accepts only scalars.
        fit_ins = recorddict_to_fitins(fitins_to_recorddict(sent, True), True)
        assert NoiseSpec.in_config(fit_ins.config, LOCAL_PREFIX)
        assert spec_from_legacy_config(fit_ins.config) == spec
        assert fit_ins.config["server-round"] == 3
        assert fit_ins.config[CLIENT_KEY_CONFIG_KEY] == int(cid) - 10
        assert fit_ins.config["lr"] == 0.1
        assert fit_ins.config[LOCAL_START_STEP_KEY] == 10
        # Local noise alone leaves the model sent untouched.
        assert fit_ins.parameters.tensors == parameters.tensors


def test_legacy_config_round_trip_and_errors() -> None:
    spec = NoiseSpec(std=0.1, include=("fc", "conv"), exclude=(r"\.bias$",), seed=None)
    config = spec_to_legacy_config(spec, "noise.x.")
    assert all(
        isinstance(value, bool | bytes | float | int | str) for value in config.values()
    )
    assert spec_from_legacy_config(config, "noise.x.") == spec
    config["noise.x.include"] = "fc"
    with pytest.raises(ValueError, match="noise.x.include"):
        spec_from_legacy_config(config, "noise.x.")
    config["noise.x.include"] = "[1]"
    with pytest.raises(TypeError, match="noise.x.include"):
        spec_from_legacy_config(config, "noise.x.")


def test_default_client_key_is_the_cid() -> None:
    strategy = NoisyLegacyStrategy(FedAvg(), local=NoiseSpec(std=0.1, seed=0))
    instructions = configure(strategy, 1, ndarrays_to_parameters(random_ndarrays()))
    for cid, (_, fit_ins) in instructions.items():
        assert fit_ins.config[CLIENT_KEY_CONFIG_KEY] == cid


def test_broadcast_copies_differ_per_client_with_the_right_std() -> None:
    sigma = 0.05
    spec = NoiseSpec(std=sigma, seed=3)
    global_arrays = [np.zeros((300, 300), np.float32), np.arange(4, dtype=np.int64)]
    parameters = ndarrays_to_parameters(global_arrays)
    strategy = NoisyLegacyStrategy(fedavg(), broadcast=spec)
    instructions = configure(strategy, 2, parameters)

    copies = {
        cid: decoded(fit_ins.parameters) for cid, (_, fit_ins) in instructions.items()
    }
    noises = [copy[0].astype(np.float64) for copy in copies.values()]
    for noise in noises:
        assert abs(noise.mean()) < 4 * sigma / 300
        assert noise.std() == pytest.approx(sigma, rel=0.02)
    for first in range(len(noises)):
        for second in range(first + 1, len(noises)):
            assert (
                abs(np.corrcoef(noises[first].ravel(), noises[second].ravel())[0, 1])
                < 0.02
            )
    for copy in copies.values():
        np.testing.assert_array_equal(copy[1], global_arrays[1])  # ints untouched

    # Each copy is the documented stream: (seed, client key, round, "broadcast").
    named = {"arr_0": global_arrays[0], "arr_1": global_arrays[1]}
    for cid, copy in copies.items():
        rng = numpy_generator(3, client=cid, server_round=2, purpose="broadcast")
        expected, _ = perturb_arrays(named, spec, sigma, rng)
        assert_same_arrays(copy, list(expected.values()))

    _, metrics = strategy.aggregate_fit(2, results_for(instructions), [])
    assert metrics["noise-broadcast-sigma"] == sigma
    norms = [np.linalg.norm(noise) for noise in noises]
    assert metrics["noise-broadcast-l2"] == pytest.approx(np.mean(norms), rel=1e-5)


def test_broadcast_is_reproducible_and_follows_the_schedule() -> None:
    spec = NoiseSpec(std=0.1, schedule="exponential", decay=0.5, seed=1)
    parameters = ndarrays_to_parameters([np.zeros((100, 100), np.float32)])
    first = configure(NoisyLegacyStrategy(FedAvg(), broadcast=spec), 3, parameters)
    second = configure(NoisyLegacyStrategy(FedAvg(), broadcast=spec), 3, parameters)
    for cid, (_, fit_ins) in first.items():
        assert fit_ins.parameters.tensors == second[cid][1].parameters.tensors
        noise = decoded(fit_ins.parameters)[0]
        assert noise.std() == pytest.approx(spec.sigma_at(2), rel=0.05)


@pytest.mark.parametrize("distribution", ["gaussian", "uniform", "laplace"])
def test_aggregation_noise_statistics_and_reported_l2(distribution: str) -> None:
    sigma = 0.02
    spec = NoiseSpec(std=sigma, distribution=distribution, seed=5)
    parameters = ndarrays_to_parameters([np.zeros((400, 500), np.float32)])
    wrapped = NoisyLegacyStrategy(fedavg(), aggregation=spec)
    base = fedavg()
    results = results_for(configure(base, 1, parameters))
    configure(wrapped, 1, parameters)

    noisy, metrics = wrapped.aggregate_fit(1, results, [])
    clean, base_metrics = base.aggregate_fit(1, results, [])
    noise = decoded(noisy)[0].astype(np.float64) - decoded(clean)[0]
    assert abs(noise.mean()) < 4 * sigma / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma, rel=0.02)
    assert metrics["noise-aggregation-sigma"] == sigma
    assert metrics["noise-aggregation-l2"] == pytest.approx(
        np.linalg.norm(noise), rel=1e-5
    )
    assert metrics["loss"] == base_metrics["loss"]
    assert metrics["replies-received"] == len(results)
    assert metrics["replies-dropped"] == 0
    assert metrics["replies-failed"] == 0
    assert set(metrics) == {"loss"} | REPLY_KEYS | {
        "noise-aggregation-sigma",
        "noise-aggregation-l2",
    }


def test_aggregation_noise_uses_the_round_schedule() -> None:
    spec = NoiseSpec(std=0.1, schedule="polynomial", gamma=1.0, seed=0)
    parameters = ndarrays_to_parameters([np.zeros((10, 10), np.float32)])
    strategy = NoisyLegacyStrategy(FedAvg(), aggregation=spec)
    results = results_for(configure(strategy, 4, parameters))
    _, metrics = strategy.aggregate_fit(4, results, [])
    assert metrics["noise-aggregation-sigma"] == pytest.approx(spec.sigma_at(3))
    assert strategy.round_noise[4]["noise-aggregation-sigma"] == pytest.approx(
        spec.sigma_at(3)
    )


def test_array_names_select_arrays_and_skip_statistics() -> None:
    names = ["fc.weight", "fc.bias", "bn.running_mean", "bn.num_batches_tracked"]
    arrays = [
        np.zeros((50, 50), np.float32),
        np.zeros(50, np.float32),
        np.zeros(50, np.float32),
        np.array(3, np.int64),
    ]
    spec = NoiseSpec(std=0.1, exclude=("bias$",), seed=0)
    strategy = NoisyLegacyStrategy(fedavg(), broadcast=spec, array_names=names)
    for _, fit_ins in configure(strategy, 1, ndarrays_to_parameters(arrays)).values():
        weight, bias, running_mean, count = decoded(fit_ins.parameters)
        assert np.all(weight != 0)
        assert_same_arrays([bias, running_mean, count], arrays[1:])

    unnamed = NoisyLegacyStrategy(
        fedavg(), broadcast=NoiseSpec(std=0.1, exclude=("arr_1",))
    )
    for _, fit_ins in configure(
        unnamed, 1, ndarrays_to_parameters(arrays[:2])
    ).values():
        weight, bias = decoded(fit_ins.parameters)
        assert np.all(weight != 0) and np.all(bias == 0)


def test_array_names_accepts_state_dict_keys() -> None:
    model = torch.nn.Linear(2, 1)
    strategy = NoisyLegacyStrategy(FedAvg(), array_names=model.state_dict().keys())
    assert strategy.array_names == ("weight", "bias")


def test_array_names_must_match_the_parameters() -> None:
    strategy = NoisyLegacyStrategy(
        fedavg(), broadcast=NoiseSpec(std=0.1), array_names=["only.one"]
    )
    with pytest.raises(
        ValueError, match="array_names has 1 names but the parameters hold 3"
    ):
        configure(strategy, 1, ndarrays_to_parameters(random_ndarrays()))


def broken_results() -> dict[str, FitRes]:
    arrays = random_ndarrays()
    with_nan = [array.copy() for array in arrays]
    with_nan[1][2] = np.nan
    with_inf = [array.copy() for array in arrays]
    with_inf[0][0, 0] = -np.inf
    reshaped = [arrays[0].reshape(3, 5), *arrays[1:]]
    return {
        "nan": fit_res(with_nan),
        "inf": fit_res(with_inf),
        "shape": fit_res(reshaped),
        "count": fit_res(arrays[:2]),
        "dtype": fit_res([array.astype(np.float64) for array in arrays]),
    }


@pytest.mark.parametrize("noise_on", [False, True], ids=["noise-off", "noise-on"])
def test_broken_results_are_dropped_and_counted(
    noise_on: bool, caplog: pytest.LogCaptureFixture
) -> None:
    parameters = ndarrays_to_parameters(random_ndarrays())
    specs = {"local": NoiseSpec(std=0.1, seed=0)} if noise_on else {}
    wrapped = NoisyLegacyStrategy(fedavg(), **specs)
    base = fedavg()
    good = results_for(configure(wrapped, 1, parameters))[:2]
    bad = [
        (FakeClientProxy(f"bad-{kind}"), res) for kind, res in broken_results().items()
    ]
    results = [good[0], *bad, good[1]]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        aggregated, metrics = wrapped.aggregate_fit(1, results, [])
    expected, expected_metrics = base.aggregate_fit(1, good, [])

    assert_same_arrays(decoded(aggregated), decoded(expected))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for client, _ in bad:
        assert any(f"client {client.cid}" in warning for warning in warnings)
    if noise_on:
        assert metrics["replies-received"] == len(results)
        assert metrics["replies-dropped"] == len(bad)
        assert metrics["loss"] == expected_metrics["loss"]
    else:
        assert metrics == {
            **expected_metrics,
            "replies-received": len(results),
            "replies-failed": 0,
            "replies-dropped": len(bad),
        }


def test_broken_results_are_dropped_without_configure_fit() -> None:
    arrays = random_ndarrays()
    strategy = NoisyLegacyStrategy(fedavg(), aggregation=NoiseSpec(std=0.0))
    nan_arrays = [array.copy() for array in arrays]
    nan_arrays[0][0, 0] = np.nan
    results = [
        (FakeClientProxy("ok"), fit_res(arrays)),
        (FakeClientProxy("nan"), fit_res(nan_arrays)),
    ]
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    assert_same_arrays(decoded(aggregated), arrays)


def test_all_results_dropped_gives_no_parameters_but_counts() -> None:
    strategy = NoisyLegacyStrategy(fedavg(), aggregation=NoiseSpec(std=0.1, seed=0))
    configure(strategy, 1, ndarrays_to_parameters(random_ndarrays()))
    results = [(FakeClientProxy(kind), res) for kind, res in broken_results().items()]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert parameters is None
    assert metrics["replies-dropped"] == len(results)
    assert "noise-aggregation-l2" not in metrics


class RecordingFedAvg(FedAvg):
    """FedAvg that records what aggregate_fit was given."""

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[override]
        self.seen = (list(results), failures)
        return super().aggregate_fit(server_round, results, failures)


@pytest.mark.parametrize("accept_failures", [True, False])
def test_failures_are_passed_through(accept_failures: bool) -> None:
    parameters = ndarrays_to_parameters(random_ndarrays())
    recording = RecordingFedAvg(accept_failures=accept_failures)
    strategy = NoisyLegacyStrategy(recording, aggregation=NoiseSpec(std=0.1, seed=0))
    results = results_for(configure(strategy, 1, parameters))
    error_res = FitRes(
        status=Status(code=Code.FIT_NOT_IMPLEMENTED, message="no"),
        parameters=Parameters(tensors=[], tensor_type=""),
        num_examples=0,
        metrics={},
    )
    failures: list[tuple[ClientProxy, FitRes] | BaseException] = [
        TimeoutError("slow client"),
        (FakeClientProxy("99"), error_res),
    ]
    aggregated, metrics = strategy.aggregate_fit(1, results, failures)
    seen_results, seen_failures = recording.seen
    assert seen_failures is failures
    assert [client.cid for client, _ in seen_results] == [c.cid for c, _ in results]
    assert metrics["replies-failed"] == 2
    assert (aggregated is None) == (not accept_failures)


def test_local_metrics_are_the_weighted_mean_of_the_client_reports() -> None:
    strategy = NoisyLegacyStrategy(FedAvg(), local=NoiseSpec(std=0.1, seed=0))
    instructions = configure(strategy, 1, ndarrays_to_parameters(random_ndarrays()))
    arrays = random_ndarrays()
    reports = [(10, 0.1, 2.0), (30, 0.05, 4.0)]
    results = [
        (client, fit_res(arrays, n, **{"noise-local-sigma": s, "noise-local-l2": l2}))
        for (client, _), (n, s, l2) in zip(instructions.values(), reports, strict=False)
    ]
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["noise-local-sigma"] == pytest.approx((10 * 0.1 + 30 * 0.05) / 40)
    assert metrics["noise-local-l2"] == pytest.approx((10 * 2.0 + 30 * 4.0) / 40)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"strategy": object()}, TypeError, "strategy="),
        ({"local": 0.1}, TypeError, "local="),
        ({"broadcast": {"std": 0.1}}, TypeError, "broadcast="),
        ({"client_key_fn": "cid"}, TypeError, "client_key_fn="),
        ({"array_names": "fc.weight"}, TypeError, "array_names="),
        ({"array_names": ["a", 1]}, TypeError, "array_names="),
        ({"array_names": ["a", "a"]}, ValueError, "array_names="),
    ],
)
def test_bad_arguments_are_rejected(
    kwargs: dict[str, object], error: type[Exception], field: str
) -> None:
    arguments: dict[str, object] = {"strategy": FedAvg(), **kwargs}
    strategy = arguments.pop("strategy")
    with pytest.raises(error, match=field):
        NoisyLegacyStrategy(strategy, **arguments)  # type: ignore[arg-type]


# --- NoisyNumPyClient ---------------------------------------------------------


def local_config(spec: NoiseSpec, server_round: int = 1, **extra: Scalar) -> dict:
    return {**spec_to_legacy_config(spec), "server-round": server_round, **extra}


def model_weights(model: torch.nn.Module) -> NDArrays:
    return [
        value.detach().cpu().numpy().copy() for value in model.state_dict().values()
    ]


def parameter_values(model: torch.nn.Module) -> NDArrays:
    return [value.detach().cpu().numpy().copy() for value in model.parameters()]


class StepClient(NoisyNumPyClient):
    """Trains a tiny model with lr=0, so that only the noise changes it."""

    def __init__(self, steps: int = 5, **kwargs: object) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
        )
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.steps = steps
        self.unrelated = torch.nn.Parameter(torch.zeros(7))

    def fit(self, parameters, config):  # type: ignore[override]
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)
        other = torch.optim.SGD([self.unrelated], lr=0.0)
        for _ in range(self.steps):
            optimizer.zero_grad()
            self.model(torch.ones(4, 4)).sum().backward()
            optimizer.step()
            other.step()
        return model_weights(self.model), 4, {"train-loss": 0.5}


def test_client_noise_once_per_optimizer_step() -> None:
    spec = NoiseSpec(std=0.1, seed=0)
    client = StepClient(steps=7, partition_id=2)
    before = model_weights(client.model)
    after, num_examples, metrics = client.fit([], local_config(spec))
    assert num_examples == 4
    assert metrics["train-loss"] == 0.5
    assert metrics["noise-local-applications"] == 7
    assert metrics["noise-local-sigma"] == 0.1

    # The same noise, applied 7 times by hand, gives the same weights.
    reference = StepClient()
    noise = WeightNoise(reference.model, spec, client=2, server_round=1)
    for _ in range(7):
        noise.perturb()
    assert_same_arrays(
        parameter_values(client.model), parameter_values(reference.model)
    )
    assert metrics["noise-local-l2"] == pytest.approx(noise.report().l2_norm, rel=1e-5)

    names = list(client.model.state_dict())
    for name, old, new in zip(names, before, after, strict=True):
        if "running" in name or "num_batches" in name:
            continue  # BatchNorm statistics move with the forward passes
        assert not np.array_equal(old, new), name
    # The optimizer of other parameters gets no noise.
    assert torch.count_nonzero(client.unrelated) == 0


def test_client_noise_follows_include_and_exclude() -> None:
    spec = NoiseSpec(std=0.1, exclude=(r"^2\.",), seed=0)
    client = StepClient(partition_id=0)
    before = dict(client.model.named_parameters())
    before = {name: value.detach().clone() for name, value in before.items()}
    client.fit([], local_config(spec))
    for name, value in client.model.named_parameters():
        changed = not torch.equal(value, before[name])
        assert changed == (not name.startswith("2.")), name


def test_client_without_spec_trains_unchanged() -> None:
    client = StepClient()
    reference = StepClient()
    after, _, metrics = client.fit([], {"server-round": 1})
    expected, _, _ = reference.fit([], {})
    assert_same_arrays(after, expected)
    assert metrics == {"train-loss": 0.5}

    _, _, metrics = StepClient().fit([], local_config(NoiseSpec(std=0.0)))
    assert metrics == {"train-loss": 0.5}


def test_client_hook_is_removed_after_fit() -> None:
    client = StepClient(partition_id=0)
    client.fit([], local_config(NoiseSpec(std=0.1, seed=0)))
    optimizer = torch.optim.SGD(client.model.parameters(), lr=0.0)
    before = model_weights(client.model)
    optimizer.step()
    assert_same_arrays(model_weights(client.model), before)


def test_client_hook_is_removed_when_fit_raises() -> None:
    class FailingClient(StepClient):
        def fit(self, parameters, config):  # type: ignore[override]
            super().fit(parameters, config)
            raise RuntimeError("training diverged")

    client = FailingClient(partition_id=0)
    with pytest.raises(RuntimeError, match="training diverged"):
        client.fit([], local_config(NoiseSpec(std=0.1, seed=0)))
    before = model_weights(client.model)
    torch.optim.SGD(client.model.parameters(), lr=0.0).step()
    assert_same_arrays(model_weights(client.model), before)


def test_client_subclass_calling_super_fit_adds_noise_once_per_step() -> None:
    class ChildClient(StepClient):
        def fit(self, parameters, config):  # type: ignore[override]
            return super().fit(parameters, config)

    _, _, metrics = ChildClient(steps=3, partition_id=0).fit(
        [], local_config(NoiseSpec(std=0.1, seed=0))
    )
    assert metrics["noise-local-applications"] == 3


def run_client(
    make: Callable[[], StepClient], spec: NoiseSpec, **config: Scalar
) -> NDArrays:
    return make().fit([], local_config(spec, **config))[0]


def test_client_key_is_the_partition_id_else_the_server_sent_key() -> None:
    spec = NoiseSpec(std=0.1, seed=0)
    by_partition = run_client(lambda: StepClient(partition_id=3), spec)
    by_config = run_client(StepClient, spec, **{CLIENT_KEY_CONFIG_KEY: 3})
    other_partition = run_client(lambda: StepClient(partition_id=4), spec)
    partition_wins = run_client(
        lambda: StepClient(partition_id=3), spec, **{CLIENT_KEY_CONFIG_KEY: "node-9"}
    )
    assert_same_arrays(by_partition, by_config)
    assert_same_arrays(by_partition, partition_wins)
    assert not np.array_equal(by_partition[0], other_partition[0])

    attribute_client = StepClient()
    attribute_client.partition_id = 3
    assert_same_arrays(attribute_client.fit([], local_config(spec))[0], by_partition)

    with pytest.raises(ValueError, match="partition_id"):
        StepClient().fit([], local_config(spec))


def test_client_step_schedule_continues_across_rounds() -> None:
    spec = NoiseSpec(std=0.1, schedule="exponential", decay=0.5, seed=0)
    client = StepClient(steps=3, partition_id=0, local_steps=3)
    _, _, metrics = client.fit([], local_config(spec, server_round=2))
    # Steps 3, 4, 5 of the run: the last one has sigma_at(5).
    assert metrics["noise-local-sigma"] == pytest.approx(spec.sigma_at(5))

    _, _, restarted = StepClient(steps=3, partition_id=0).fit(
        [], local_config(spec, server_round=2)
    )
    assert restarted["noise-local-sigma"] == pytest.approx(spec.sigma_at(2))


def test_client_needs_a_model() -> None:
    class NoModelClient(NoisyNumPyClient):
        def fit(self, parameters, config):  # type: ignore[override]
            parameter = torch.nn.Parameter(torch.zeros(2))
            torch.optim.SGD([parameter], lr=0.1).step()
            return [], 0, {}

    with pytest.raises(TypeError, match="NoModelClient.model=None"):
        NoModelClient(partition_id=0).fit([], local_config(NoiseSpec(std=0.1)))


def test_client_bad_arguments_and_bad_spec() -> None:
    with pytest.raises(TypeError, match="model="):
        NoisyNumPyClient(model="net")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local_steps="):
        NoisyNumPyClient(local_steps=0)
    config = local_config(NoiseSpec(std=0.1))
    config["noise.local.distribution"] = "cauchy"
    with pytest.raises(ValueError, match="noise.local.distribution"):
        StepClient(partition_id=0).fit([], config)


def test_noisy_client_works_through_to_client() -> None:
    client = StepClient(steps=2, partition_id=1).to_client()
    spec = NoiseSpec(std=0.1, seed=0)
    res = client.fit(FitIns(ndarrays_to_parameters([]), local_config(spec)))
    assert res.status.code == Code.OK
    assert res.metrics["noise-local-applications"] == 2


def test_received_spec_travels_and_the_round_kinds_count_rounds() -> None:
    received = NoiseSpec(
        std=0.2, schedule="exponential", decay=0.5, exclude=("arr_1",), seed=3
    )
    strategy = NoisyLegacyStrategy(fedavg(), received=received)
    instructions = configure(strategy, 3, ndarrays_to_parameters(random_ndarrays()))
    for _, sent in instructions.values():
        fit_ins = recorddict_to_fitins(fitins_to_recorddict(sent, True), True)
        assert spec_from_legacy_config(fit_ins.config, RECEIVED_PREFIX) == received
        assert fit_ins.config["server-round"] == 3
        assert not NoiseSpec.in_config(fit_ins.config, LOCAL_PREFIX)
    # Applied once per round: t = server_round - 1 whatever schedule_unit says.
    assert strategy.round_noise[3]["noise-received-sigma"] == pytest.approx(0.05)


def test_a_decaying_step_schedule_without_local_steps_is_refused() -> None:
    spec = NoiseSpec(std=0.1, schedule="polynomial")
    with pytest.raises(ValueError, match="local_steps=None is not allowed"):
        NoisyLegacyStrategy(fedavg(), local=spec)


class ReceivingClient(StepClient):
    """Records the parameters fit receives, then steps like StepClient."""

    def fit(self, parameters, config):  # type: ignore[override]
        self.received = [array.copy() for array in parameters]
        return super().fit(parameters, config)


def test_client_adds_the_received_noise_once_to_the_parameters() -> None:
    spec = NoiseSpec(std=0.05, seed=3, exclude=(r"running|num_batches",))
    client = ReceivingClient(steps=1, partition_id=2)
    sent = model_weights(client.model)
    config = {**spec_to_legacy_config(spec, RECEIVED_PREFIX), "server-round": 3}

    _, _, metrics = client.fit(sent, config)

    names = list(client.model.state_dict())
    expected, report = add_noise_once(
        dict(zip(names, sent, strict=True)),
        spec,
        kind="received",
        client=2,
        server_round=3,
    )
    assert_same_arrays(client.received, list(expected.values()))
    assert not np.array_equal(client.received[0], sent[0])
    # Statistics are not perturbed: selected by the state_dict names.
    for name, got, original in zip(names, client.received, sent, strict=True):
        if "running" in name or "num_batches" in name:
            np.testing.assert_array_equal(got, original)
    assert metrics["noise-received-sigma"] == pytest.approx(0.05)
    assert metrics["noise-received-l2"] == pytest.approx(report.l2_norm)
    assert metrics["noise-received-applications"] == 1
    assert "noise-local-applications" not in metrics


def test_client_continues_the_schedule_from_the_server_sent_start_step() -> None:
    spec = NoiseSpec(std=0.1, schedule="exponential", decay=0.5, seed=0)
    config = local_config(spec, server_round=4, **{LOCAL_START_STEP_KEY: 9})
    _, _, metrics = StepClient(steps=3, partition_id=0).fit([], config)
    # Steps 9, 10, 11: no local_steps needed on the client.
    assert metrics["noise-local-sigma"] == pytest.approx(spec.sigma_at(11))


@pytest.mark.parametrize(
    ("prefix", "entries", "key"),
    [
        (RECEIVED_PREFIX, {"std": 1e300, "distribution": "uniform"}, "std"),
        (RECEIVED_PREFIX, {"std": float("nan")}, "std"),
        (LOCAL_PREFIX, {"include": '["a{99999999999}"]'}, ""),
        (LOCAL_PREFIX, {"mode": 7}, "mode"),
    ],
)
def test_client_hostile_spec_raises_naming_the_key(
    prefix: str, entries: dict[str, object], key: str
) -> None:
    config = {**spec_to_legacy_config(NoiseSpec(std=0.1), prefix), "server-round": 1}
    config.update({prefix + name: value for name, value in entries.items()})
    client = ReceivingClient(partition_id=0)
    with pytest.raises((TypeError, ValueError), match=re.escape(prefix + key)):
        client.fit(model_weights(client.model), config)
