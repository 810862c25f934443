"""A tiny Flower App: NoisyStrategy(FedAvg) and ClientApps of which one lies.

Every ClientApp returns the model it received plus ``0.25 * (partition + 1)``
with ``num-examples = 16``; the one of the last partition also corrupts its
reply as ``hostile-kind`` says. All values are dyadic, so the honest average
is exact whatever order the replies arrive in: after round r every weight is
``r * mean(honest shifts)``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_noise import NoisyStrategy

SHAPES = {"w": (3, 4), "b": (4,)}
NUM_NODES = 3

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = NoisyStrategy(
        FedAvg(
            fraction_evaluate=0.0,
            min_train_nodes=NUM_NODES,
            min_available_nodes=NUM_NODES,
        )
    )
    initial = ArrayRecord(
        {name: Array(np.zeros(shape, np.float32)) for name, shape in SHAPES.items()}
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    final = {name: array.numpy() for name, array in result.arrays.items()}
    summary = {
        "final": {name: array.tolist() for name, array in final.items()},
        "dtypes": {name: str(array.dtype) for name, array in final.items()},
        "train_metrics": {
            str(server_round): dict(metrics)
            for server_round, metrics in result.train_metrics_clientapp.items()
        },
    }
    Path(str(context.run_config["out-file"])).write_text(json.dumps(summary))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    received = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    shift = np.float32(0.25 * (partition + 1))
    arrays = ArrayRecord(
        {name: Array(value + shift) for name, value in received.items()}
    )
    metrics = {"num-examples": 16, "train-loss": 1.0}
    if partition == int(context.node_config["num-partitions"]) - 1:
        kind = str(context.run_config["hostile-kind"])
        if kind == "lying-dtype":
            wide = (received["w"] + shift).astype(np.float64)
            arrays["w"] = Array(
                dtype="float32",
                shape=wide.shape,
                stype="numpy.ndarray",
                data=_npy(wide),
            )
        elif kind == "num-examples-nan":
            metrics["num-examples"] = float("nan")
        elif kind == "extra-metric-key":
            metrics["surprise"] = 1.0
        elif kind == "short-bytes":
            data = _npy(received["w"] + shift)[:-8]
            arrays["w"] = Array(
                dtype="float32", shape=SHAPES["w"], stype="numpy.ndarray", data=data
            )
        else:
            raise ValueError(f"hostile-kind={kind!r} is not allowed")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)
