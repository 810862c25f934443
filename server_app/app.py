"""ServerApp: FedAvg wrapped in NoisyStrategy, configured by the run config.

Every run config key is validated before anything trains; each round's global
and local accuracy and the noise injected go to
`<results-dir>/<run-name>/results.json` (with a CSV and a plot beside it).
"""

from __future__ import annotations

import random
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_noise.config import AppConfig
from flwr_noise.federation import RoundRecorder, discover_partition_ids
from flwr_noise.results import ResultsWriter
from flwr_noise.strategy import NoisyStrategy
from flwr_noise.tasks.data import load_dataset
from flwr_noise.tasks.models import build_model
from flwr_noise.tasks.training import evaluate, get_device

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated experiment described by the run config."""
    config = AppConfig.from_run_config(context.run_config)
    # Flower samples clients with Python's `random`: seed it, or runs differ.
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    data = load_dataset(config.dataset, config.data_dir, split_seed=config.seed)
    device = get_device()
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    model = build_model(
        config.model, data.input_shape, data.num_classes, seed=config.seed
    ).to(device)

    def evaluate_global(arrays: ArrayRecord) -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, x_test, y_test)

    partition_of_node = discover_partition_ids(grid)
    writer = ResultsWriter(config.results_dir, config.run_name, config.to_dict())
    writer.update_info(data_source=data.source, nodes=len(partition_of_node))
    strategy: NoisyStrategy
    recorder = RoundRecorder(
        evaluate_global,
        on_round=writer.add_round,
        round_noise=lambda server_round: strategy.round_noise.get(server_round, {}),
    )
    strategy = NoisyStrategy(
        FedAvg(
            fraction_train=config.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=1,
            train_metrics_aggr_fn=recorder.aggregate_train_metrics,
        ),
        local=config.local_spec(),
        broadcast=config.broadcast_spec(),
        aggregation=config.aggregation_spec(),
        client_key_fn=partition_of_node.__getitem__,
        local_steps=config.local_steps,
    )
    with writer:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=config.num_server_rounds,
            train_config=ConfigRecord(),
            evaluate_fn=recorder.evaluate,
        )
    log(INFO, "flwr-noise: results written to %s", writer.run_dir)
