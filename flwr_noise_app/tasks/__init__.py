"""Reference tasks: models, datasets with partitioning, and train/eval loops."""

from flwr_noise_app.tasks.data import (
    DATASETS,
    PARTITION_SCHEMES,
    DataNotFoundError,
    TaskData,
    client_data,
    load_dataset,
    partition_indices,
)
from flwr_noise_app.tasks.models import MODELS, build_model, count_parameters
from flwr_noise_app.tasks.training import (
    evaluate,
    get_device,
    make_optimizer,
    train_steps,
)

__all__ = [
    "DATASETS",
    "MODELS",
    "PARTITION_SCHEMES",
    "DataNotFoundError",
    "TaskData",
    "build_model",
    "client_data",
    "count_parameters",
    "evaluate",
    "get_device",
    "load_dataset",
    "make_optimizer",
    "partition_indices",
    "train_steps",
]
