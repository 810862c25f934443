"""ClientApp: train the received model for `local-steps` steps with local noise.

Each SuperNode reads its partition from the node config (`partition-id`,
`num-partitions`, optionally its own `data-dir`). The reply carries the
locally trained model and its accuracy on the held-out data, measured before
the server averages it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_noise import weight_noise
from flwr_noise.mod import PARTITION_ID_KEY
from flwr_noise.seeding import torch_generator
from flwr_noise_app.config import AppConfig
from flwr_noise_app.federation import LOCAL_ACCURACY_KEY, LOCAL_LOSS_KEY
from flwr_noise_app.tasks.data import client_data, load_dataset
from flwr_noise_app.tasks.models import build_model
from flwr_noise_app.tasks.training import (
    evaluate,
    get_device,
    make_optimizer,
    train_steps,
)

app = ClientApp()


class LocalTask(NamedTuple):
    """One client's data, already on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, int, int]
    num_classes: int


def _partition(context: Context, config: AppConfig) -> tuple[int, int]:
    partition_id = int(context.node_config.get(PARTITION_ID_KEY, 0))
    num_partitions = config.num_partitions or int(
        context.node_config.get("num-partitions", 1)
    )
    return partition_id, num_partitions


@lru_cache(maxsize=8)
def _local_task(
    config: AppConfig, data_dir: str, partition_id: int, num_partitions: int
) -> LocalTask:
    """Load, partition and move this client's data to the device, once a process."""
    device = get_device()
    data = load_dataset(config.dataset, data_dir, split_seed=config.seed)
    x, y = client_data(
        data,
        num_partitions,
        partition_id,
        scheme=config.partitioning,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
    )
    return LocalTask(
        x.to(device),
        y.to(device),
        data.x_test.to(device),
        data.y_test.to(device),
        data.input_shape,
        data.num_classes,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model locally, with the noise the server asked for."""
    config = AppConfig.from_run_config(context.run_config)
    partition_id, num_partitions = _partition(context, config)
    data_dir = str(context.node_config.get("data-dir", config.data_dir))
    task = _local_task(config, data_dir, partition_id, num_partitions)
    server_round = int(msg.content["config"]["server-round"])

    model = build_model(config.model, task.input_shape, task.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(task.x.device)
    # The server's local noise follows every optimizer step inside the block;
    # leaving it removes any pending anticorrelated draw from the model.
    with weight_noise(model, msg, context) as noise:
        train_loss = train_steps(
            model,
            task.x,
            task.y,
            steps=config.local_steps,
            batch_size=config.batch_size,
            optimizer=make_optimizer(model, config.learning_rate),
            generator=torch_generator(
                config.seed,
                client=partition_id,
                server_round=server_round,
                purpose="data",
            ),
        )
    local_loss, local_accuracy = evaluate(model, task.x_test, task.y_test)

    metrics = {
        "train-loss": train_loss,
        LOCAL_LOSS_KEY: local_loss,
        LOCAL_ACCURACY_KEY: local_accuracy,
        "num-examples": len(task.x),
        **noise.metrics(),
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node trains on."""
    config = AppConfig.from_run_config(context.run_config)
    partition_id, _ = _partition(context, config)
    content = RecordDict({"metrics": MetricRecord({PARTITION_ID_KEY: partition_id})})
    return Message(content=content, reply_to=msg)
