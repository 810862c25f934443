"""Server-side plumbing of the reference App: who is who, and what each round did.

Flower gives every SuperNode a random node id on every run, so anything that
must be reproducible (noise streams, the order replies are averaged in) is keyed
by the partition id each ClientApp reports instead. `discover_partition_ids`
asks every node for it once, before training starts. `run_rounds` runs the
rounds as `Strategy.start` does, but from any round (to resume a run), with a
guard that never lets a non-finite aggregate become the global model, and
reports each round's outcome. `RoundRecorder` gathers one round's client
metrics (the locally trained models, before averaging), the replies the
strategy counted and the global model's evaluation into the round entry that
`results.py` writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from flwr_noise.mod import PARTITION_ID_KEY
from flwr_noise.strategy import decode_arrays, first_non_finite

LOCAL_ACCURACY_KEY = "local-accuracy"
LOCAL_LOSS_KEY = "local-loss"
ROUND_OK = "ok"
ROUND_FAILED = "failed"


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

    Raises
    ------
    RuntimeError
        If no node is connected, or none reported its partition id (e.g. every
        ClientApp failed on a bad node config); the message has the first
        node's error.

    """
    node_ids = _wait_for_nodes(grid, min_nodes, timeout)
    if not node_ids:
        raise RuntimeError(f"no SuperNode connected within {timeout:g} s")
    queries = [
        Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    mapping: dict[int, int] = {}
    errors: list[str] = []
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            log(
                WARNING,
                "Node %d did not report its partition id: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            errors.append(reply.error.reason)
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        mapping[reply.metadata.src_node_id] = int(metrics[PARTITION_ID_KEY])
    if not mapping:
        first_error = errors[0] if errors else f"no reply within {timeout:g} s"
        raise RuntimeError(
            f"none of the {len(node_ids)} SuperNodes reported its partition id; "
            f"the first said: {first_error}"
        )
    return mapping


def partition_key_fn(
    partition_of_node: Mapping[int, int],
) -> Callable[[int], int | str]:
    """Return a ``client_key_fn`` for ``NoisyStrategy``: node id -> partition id.

    A node that did not report a partition id (it failed the query, or
    connected later, e.g. a SuperNode that restarted with a new node id) gets
    the key ``"node-<id>"``, so its replies are still used, with noise streams
    of its own.
    """

    def client_key(node_id: int) -> int | str:
        return partition_of_node.get(node_id, f"node-{node_id}")

    return client_key


def _wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    return sorted(node_ids)


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    """What one round did to the global model.

    Attributes
    ----------
    server_round : int
        The round, from 1.
    arrays : ArrayRecord
        The global model after the round: the new aggregate, or the previous
        global model when the round failed.
    train_metrics : MetricRecord | None
        The strategy's aggregated train metrics (``None`` when it had none).
    failure : str | None
        Why the round kept the previous global model: no usable replies, an
        aggregation error, or a non-finite aggregate; ``None`` when it did not.

    """

    server_round: int
    arrays: ArrayRecord
    train_metrics: MetricRecord | None = None
    failure: str | None = None

    @property
    def status(self) -> str:
        """``"ok"``, or ``"failed"`` when the previous global model was kept."""
        return ROUND_OK if self.failure is None else ROUND_FAILED


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    num_rounds: int,
    first_round: int = 1,
    timeout: float = 3600.0,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    on_round: Callable[[RoundOutcome], None] | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round`` to ``num_rounds``, as ``Strategy.start`` does.

    Each round makes the same calls as Flower's ``Strategy.start``:
    ``configure_train``, ``grid.send_and_receive``, ``aggregate_train``, then
    the same for federated evaluation. Differences: it starts at any round
    (to resume a run from its checkpoint), and a round that yields no new
    global model keeps the previous one and says why instead of stopping the
    run: no usable replies (all failed, were dropped, or none came within
    ``timeout``), an ``AggregationError`` / ``InconsistentMessageReplies``
    of the strategy, or an aggregate with NaN or Inf (e.g. aggregation noise
    that overflowed), so the global model is never non-finite.

    Parameters
    ----------
    strategy : Strategy
        The strategy.
    grid : Grid
        The Grid of the running ServerApp.
    arrays : ArrayRecord
        The global model before ``first_round``.
    num_rounds : int
        The last round.
    first_round : int (default: 1)
        The first round to run; rounds before it are done.
    timeout : float (default: 3600.0)
        Seconds to wait for the replies of each ``send_and_receive``; a node
        that has not answered by then is left out of the round.
    train_config, evaluate_config : ConfigRecord | None (default: None)
        Sent to the nodes (an empty ``ConfigRecord`` when ``None``).
    on_round : Callable[[RoundOutcome], None] | None (default: None)
        Called after every round (e.g. record the results, save a checkpoint).

    Returns
    -------
    ArrayRecord
        The global model after the last round.

    """
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    log(INFO, "Starting %s, rounds %s to %s:", strategy, first_round, num_rounds)
    strategy.summary()
    for server_round in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, train_config, grid),
            timeout=timeout,
        )
        failure: str | None = None
        metrics: MetricRecord | None = None
        try:
            aggregate, metrics = strategy.aggregate_train(server_round, replies)
        except (AggregationError, InconsistentMessageReplies) as error:
            aggregate, failure = None, f"aggregation failed: {error}"
        if aggregate is None:
            failure = (
                failure
                or getattr(strategy, "round_failures", {}).get(server_round)
                or "no usable train replies"
            )
        elif (name := first_non_finite(decode_arrays(aggregate))) is not None:
            failure = f"the aggregate's array {name!r} holds NaN or Inf"
        else:
            arrays = aggregate
        if failure is not None:
            log(
                WARNING,
                "Round %s failed (%s): the previous global model is kept",
                server_round,
                failure,
            )
        if metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)

        evaluate_replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
            timeout=timeout,
        )
        evaluate_metrics = strategy.aggregate_evaluate(server_round, evaluate_replies)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
        if on_round is not None:
            on_round(RoundOutcome(server_round, arrays, metrics, failure))
    return arrays


class RoundRecorder:
    """Collect what each round did into the round entries of the results file.

    Pass `aggregate_train_metrics` to the strategy as its train-metrics
    aggregation function and `record_round` as `on_round` of `run_rounds`:
    the strategy calls the first while aggregating a round and `run_rounds`
    the second right after, so the recorder joins the two, the strategy's
    reply counts (`round_noise`) and the global model's evaluation into one
    entry per round.

    Parameters
    ----------
    evaluate_global : Callable[[ArrayRecord], tuple[float, float]]
        Returns (loss, accuracy) of the global model on held-out data.
    on_round : Callable[[dict[str, Any]], None]
        Receives each finished round's entry (e.g. a results writer).
    round_noise : Callable[[int], Mapping[str, float]]
        What the strategy injected in a round (sigma, L2 norm per place) and
        the replies it counted (``NoisyStrategy.round_noise``: received,
        failed, dropped).

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

    def record_round(self, outcome: RoundOutcome) -> None:
        """Evaluate the round's global model and emit the round's entry.

        The entry has ``round_status`` (``"ok"`` or ``"failed"``: the previous
        global model was kept, and is the one evaluated) and ``round_failure``
        (why, or ``None``), ``num_replies`` (replies averaged) and the
        strategy's ``replies_received`` / ``replies_failed`` /
        ``replies_dropped``.
        """
        loss, accuracy = self._evaluate_global(outcome.arrays)
        entry: dict[str, Any] = {
            "round": outcome.server_round,
            "global_accuracy": accuracy,
            "global_loss": loss,
            "round_status": outcome.status,
            "round_failure": outcome.failure,
        }
        entry.update(_local_summary(self._client_metrics))
        for key, value in self._round_noise(outcome.server_round).items():
            # What the clients measured wins over the server's nominal value.
            entry.setdefault(_snake(key), value)
        self._client_metrics = []
        self._on_round(entry)


def _local_summary(client_metrics: Iterable[MetricRecord]) -> dict[str, Any]:
    """Mean, min and max of the clients' local-model accuracy; mean noise."""
    metrics = list(client_metrics)
    # A client that did not report them (not the bundled ClientApp) is skipped.
    accuracies = [
        float(m[LOCAL_ACCURACY_KEY]) for m in metrics if LOCAL_ACCURACY_KEY in m
    ]
    losses = [float(m[LOCAL_LOSS_KEY]) for m in metrics if LOCAL_LOSS_KEY in m]
    nan = math.nan
    summary: dict[str, Any] = {
        "num_replies": len(metrics),
        "local_accuracy_mean": sum(accuracies) / len(accuracies) if accuracies else nan,
        "local_accuracy_min": min(accuracies, default=nan),
        "local_accuracy_max": max(accuracies, default=nan),
        "local_loss_mean": sum(losses) / len(losses) if losses else nan,
    }
    noise_keys = sorted({k for m in metrics for k in m if k.startswith("noise-")})
    for key in noise_keys:
        values = [float(m[key]) for m in metrics if key in m]
        summary[_snake(key)] = sum(values) / len(values)
    return summary


def _snake(key: str) -> str:
    return key.replace("-", "_")
