"""A legacy-API Flower simulation with NoisyLegacyStrategy and NoisyNumPyClient.

Two simulated clients train a small MLP on halves of scikit-learn's bundled
digits for two rounds (``flwr.simulation.run_simulation``, Ray backend, in this
process). The server asks for local and aggregation noise; the clients apply
the local noise during their own training loop.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flower_processes import (
    PROCESS_TAG_VARIABLE,
    stop_tagged_processes,
    tagged_processes,
)
from flwr.client import Client, ClientApp
from flwr.common import (
    Context,
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import (
    History,
    Server,
    ServerApp,
    ServerAppComponents,
    ServerConfig,
    SimpleClientManager,
)
from flwr.server.strategy import FedAvg
from sklearn.datasets import load_digits

from flwr_noise.legacy import NoisyLegacyStrategy, NoisyNumPyClient
from flwr_noise.spec import NoiseSpec

pytestmark = pytest.mark.slow

NUM_CLIENTS = 2
NUM_ROUNDS = 2
LOCAL_STEPS = 10
BATCH_SIZE = 32
LOCAL_SPEC = NoiseSpec(std=0.01, seed=0)
AGGREGATION_SPEC = NoiseSpec(std=0.001, seed=0)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


def get_weights(model: torch.nn.Module) -> NDArrays:
    return [value.detach().cpu().numpy() for value in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: NDArrays) -> None:
    keys = model.state_dict().keys()
    model.load_state_dict(
        {
            key: torch.from_numpy(np.copy(w))
            for key, w in zip(keys, weights, strict=True)
        }
    )


def client_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data[partition_id::NUM_CLIENTS] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[partition_id::NUM_CLIENTS], dtype=torch.long)
    return x, y


class DigitsClient(NoisyNumPyClient):
    """An ordinary NumPyClient training loop; only the base class is noisy."""

    def __init__(self, partition_id: int) -> None:
        super().__init__(
            build_model(), partition_id=partition_id, local_steps=LOCAL_STEPS
        )
        self.x, self.y = client_data(partition_id)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        batches = torch.Generator().manual_seed(int(config["server-round"]))
        loss = torch.tensor(0.0)
        for _ in range(LOCAL_STEPS):
            index = torch.randint(len(self.x), (BATCH_SIZE,), generator=batches)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                self.model(self.x[index]), self.y[index]
            )
            loss.backward()
            optimizer.step()
        return get_weights(self.model), len(self.x), {"train-loss": float(loss)}


def client_fn(context: Context) -> Client:
    torch.set_num_threads(1)
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


class HistoryServer(Server):
    """Flower's legacy Server, keeping the History the ServerApp discards."""

    history: History | None = None

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        history, elapsed = super().fit(num_rounds, timeout)
        self.history = history
        return history, elapsed


@pytest.fixture
def simulation_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Offline settings, and a tag that Ray's processes inherit.

    On teardown the test fails if any process started during it is still
    running a while after the simulation (they are killed either way).
    """
    env = {PROCESS_TAG_VARIABLE: uuid.uuid4().hex}
    monkeypatch.setenv(PROCESS_TAG_VARIABLE, env[PROCESS_TAG_VARIABLE])
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # run_simulation overwrites PYTHONPATH (for Ray's workers): restore it after.
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    yield env
    deadline = time.monotonic() + 20.0
    while (alive := tagged_processes(env)) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = stop_tagged_processes(env)
    assert not alive, f"processes still running after the simulation: {alive}"
    assert not survivors, f"processes survived SIGKILL: {survivors}"


def test_legacy_simulation_with_local_and_aggregation_noise(
    simulation_env: dict[str, str],
) -> None:
    # Imported here: it imports Ray, which collecting the fast tests can skip.
    from flwr.simulation import run_simulation

    initial = get_weights(build_model())
    strategy = NoisyLegacyStrategy(
        FedAvg(
            fraction_evaluate=0.0,
            min_fit_clients=NUM_CLIENTS,
            min_available_clients=NUM_CLIENTS,
            initial_parameters=ndarrays_to_parameters(initial),
        ),
        local=LOCAL_SPEC,
        aggregation=AGGREGATION_SPEC,
        array_names=list(build_model().state_dict()),
    )
    server = HistoryServer(client_manager=SimpleClientManager(), strategy=strategy)

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(
            server=server, config=ServerConfig(num_rounds=NUM_ROUNDS)
        )

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": NUM_CLIENTS, "include_dashboard": False},
        },
    )

    assert server.history is not None, "the ServerApp did not finish its rounds"
    fit_metrics = server.history.metrics_distributed_fit
    assert fit_metrics["replies-received"] == [(1, NUM_CLIENTS), (2, NUM_CLIENTS)]
    assert fit_metrics["replies-dropped"] == [(1, 0), (2, 0)]
    # Reported by the clients: the local noise was applied during their fit.
    assert fit_metrics["noise-local-sigma"] == [
        (1, pytest.approx(LOCAL_SPEC.std)),
        (2, pytest.approx(LOCAL_SPEC.std)),
    ]
    assert all(l2 > 0 for _, l2 in fit_metrics["noise-local-l2"])
    assert fit_metrics["noise-aggregation-sigma"] == [
        (1, pytest.approx(AGGREGATION_SPEC.std)),
        (2, pytest.approx(AGGREGATION_SPEC.std)),
    ]
    assert [r for r, l2 in fit_metrics["noise-aggregation-l2"] if l2 > 0] == [1, 2]

    final = parameters_to_ndarrays(server.parameters)
    assert [w.shape for w in final] == [w.shape for w in initial]
    assert all(np.isfinite(w).all() for w in final)
    assert any(not np.array_equal(w, w0) for w, w0 in zip(final, initial, strict=True))
