"""Server-side plumbing of the reference App: who is who, and what each round did.

Flower gives every SuperNode a random node id on every run, so anything that
must be reproducible (noise streams, the order replies are averaged in) is keyed
by the partition id each ClientApp reports instead. `discover_partition_ids`
asks every node for it once, before training starts. `RoundRecorder` gathers
one round's client metrics (the locally trained models, before averaging) and
the global model's evaluation into the round entry that `results.py` writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from flwr_noise.mod import PARTITION_ID_KEY

LOCAL_ACCURACY_KEY = "local-accuracy"
LOCAL_LOSS_KEY = "local-loss"


def discover_partition_ids(
    grid: Grid, *, min_nodes: int = 1, timeout: float = 120.0
) -> dict[int, int]:
    """Ask every connected node for its partition id.

    Parameters
    ----------
    grid : Grid
        The Grid of the running ServerApp.
    min_nodes : int (default: 1)
        Wait until at least this many nodes are connected.
    timeout : float (default: 120.0)
        Seconds to wait for the nodes' replies.

    Returns
    -------
    dict[int, int]
        Node id -> partition id, for every node that answered.

    """
    node_ids = _wait_for_nodes(grid, min_nodes, timeout)
    queries = [
        Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            log(
                WARNING,
                "Node %d did not report its partition id: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        mapping[reply.metadata.src_node_id] = int(metrics[PARTITION_ID_KEY])
    return mapping


def _wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    return sorted(node_ids)


class RoundRecorder:
    """Collect what each round did into the round entries of the results file.

    Pass `aggregate_train_metrics` to the strategy as its train-metrics
    aggregation function and `evaluate` as `evaluate_fn` of `Strategy.start`:
    Flower calls the first while aggregating a round and the second right after,
    so the recorder joins the two into one entry per round.

    Parameters
    ----------
    evaluate_global : Callable[[ArrayRecord], tuple[float, float]]
        Returns (loss, accuracy) of the global model on held-out data.
    on_round : Callable[[dict[str, Any]], None]
        Receives each finished round's entry (e.g. a results writer).
    round_noise : Callable[[int], Mapping[str, float]]
        What the strategy injected in a round (sigma, L2 norm per place).

    """

    def __init__(
        self,
        evaluate_global: Callable[[ArrayRecord], tuple[float, float]],
        on_round: Callable[[dict[str, Any]], None],
        round_noise: Callable[[int], Mapping[str, float]],
    ) -> None:
        self._evaluate_global = evaluate_global
        self._on_round = on_round
        self._round_noise = round_noise
        self._client_metrics: list[MetricRecord] = []

    def aggregate_train_metrics(
        self, records: list[RecordDict], weighting_metric_name: str
    ) -> MetricRecord:
        """Aggregate client train metrics as FedAvg does, and remember them."""
        self._client_metrics = [
            next(iter(record.metric_records.values())) for record in records
        ]
        return aggregate_metricrecords(records, weighting_metric_name)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate the global model and emit the round's entry (round 0 too)."""
        loss, accuracy = self._evaluate_global(arrays)
        entry: dict[str, Any] = {
            "round": server_round,
            "global_accuracy": accuracy,
            "global_loss": loss,
        }
        if server_round > 0:
            entry.update(_local_summary(self._client_metrics))
            for key, value in self._round_noise(server_round).items():
                # What the clients measured wins over the server's nominal value.
                entry.setdefault(_snake(key), value)
            self._client_metrics = []
            self._on_round(entry)
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def _local_summary(client_metrics: Iterable[MetricRecord]) -> dict[str, Any]:
    """Mean, min and max of the clients' local-model accuracy; mean noise."""
    metrics = list(client_metrics)
    accuracies = [float(m[LOCAL_ACCURACY_KEY]) for m in metrics]
    losses = [float(m[LOCAL_LOSS_KEY]) for m in metrics]
    nan = math.nan
    summary: dict[str, Any] = {
        "num_replies": len(metrics),
        "local_accuracy_mean": sum(accuracies) / len(accuracies) if metrics else nan,
        "local_accuracy_min": min(accuracies, default=nan),
        "local_accuracy_max": max(accuracies, default=nan),
        "local_loss_mean": sum(losses) / len(losses) if metrics else nan,
    }
    noise_keys = sorted({k for m in metrics for k in m if k.startswith("noise-")})
    for key in noise_keys:
        values = [float(m[key]) for m in metrics if key in m]
        summary[_snake(key)] = sum(values) / len(values)
    return summary


def _snake(key: str) -> str:
    return key.replace("-", "_")
