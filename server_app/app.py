"""ServerApp: FedAvg wrapped in NoisyStrategy, configured by the run config.

Every run config key is validated, and the run folder created (or, with
`resume`, the run to continue checked), before any node is contacted; each
round's global and local accuracy, the replies it got and the noise injected
go to `<results-dir>/<run-name>/results.json` (with a CSV and a plot beside
it), and a checkpoint to continue from goes beside them after every round.
`RunFolder` owns all of it.
"""

from __future__ import annotations

import random
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_noise.strategy import NoisyStrategy
from flwr_noise_app.config import AppConfig
from flwr_noise_app.federation import (
    RoundOutcome,
    RoundRecorder,
    discover_partition_ids,
    partition_key_fn,
    run_rounds,
)
from flwr_noise_app.run_folder import RunFolder
from flwr_noise_app.tasks.data import load_dataset
from flwr_noise_app.tasks.models import build_model
from flwr_noise_app.tasks.training import evaluate, get_device

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

    initial_arrays = ArrayRecord(model.state_dict())
    partition_of_node: dict[int, int] = {}  # filled once the nodes answered
    recorder = RoundRecorder(
        evaluate_global,
        on_round=lambda entry: folder.record_round(entry),
        round_noise=lambda server_round: strategy.round_noise.get(server_round, {}),
    )
    strategy = NoisyStrategy(
        FedAvg(
            fraction_train=config.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=config.min_nodes,
            train_metrics_aggr_fn=recorder.aggregate_train_metrics,
        ),
        local=config.local_spec(),
        broadcast=config.broadcast_spec(),
        aggregation=config.aggregation_spec(),
        client_key_fn=partition_key_fn(partition_of_node),
        local_steps=config.local_steps,
    )
    folder = RunFolder.open(config, initial_arrays, strategy)
    log(INFO, "flwr-noise: writing results to %s", folder.path)
    with folder:
        partition_of_node.update(
            discover_partition_ids(
                grid, min_nodes=config.min_nodes, timeout=config.round_timeout
            )
        )
        folder.update_info(
            data_source=data.source,
            data_dir=str(Path(config.data_dir).expanduser().absolute())
            if config.data_dir
            else "",
            nodes=len(partition_of_node),
            path=str(folder.path),
        )
        arrays = folder.start(initial_arrays)

        def finish_round(outcome: RoundOutcome) -> None:
            # Results first: a checkpoint never gets ahead of results.json.
            recorder.record_round(outcome)
            folder.save_checkpoint(outcome.server_round, outcome.arrays)

        run_rounds(
            strategy,
            grid,
            arrays,
            first_round=folder.first_round,
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(),
            on_round=finish_round,
        )
    log(INFO, "flwr-noise: results written to %s", folder.path)
