"""NoisyStrategy: weight noise around any Flower Message-API strategy.

The wrapper adds noise at three places of a round and sends one spec to the
clients:

- ``local``: sent to every client in its train ``ConfigRecord`` (under
  ``noise.local.``), applied during local training by the client
  (:class:`flwr_noise.WeightNoise`) or once to the received model by
  :func:`flwr_noise.weight_noise_mod`;
- ``update``: sent under ``noise.update.``; :func:`flwr_noise.weight_noise_mod`
  adds it to the model a client sends back;
- ``broadcast``: each selected client receives its own, independently
  perturbed copy of the global model;
- ``aggregation``: noise added to the aggregate, once per round.

It also protects the wrapped strategy: replies whose arrays are not finite or
do not match the arrays sent (keys, shapes, dtypes) are dropped before they
reach the wrapped ``aggregate_train``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.run import Run

from flwr_noise.sampling import NoiseReport, perturb_arrays
from flwr_noise.seeding import AGGREGATE_CLIENT, numpy_generator
from flwr_noise.spec import ConfigValue, NoiseSpec

LOCAL_PREFIX = "noise.local."
UPDATE_PREFIX = "noise.update."
# Noise added once to the model a client receives (weight_noise_mod).
RECEIVED_PREFIX = "noise.received."
# The schedule time of this round's first local step (schedule_unit="step"),
# so that a client continues a decaying schedule without arithmetic.
LOCAL_START_STEP_KEY = "noise.local.start-step"
# Flower's strategies put the round into the train config under this key.
SERVER_ROUND_KEY = "server-round"
# Used when a message carries no ConfigRecord to add the specs to.
DEFAULT_CONFIG_KEY = "config"

# Metric keys: "noise-<kind>-sigma" and "noise-<kind>-l2".
REPLIES_RECEIVED_KEY = "replies-received"
REPLIES_FAILED_KEY = "replies-failed"
REPLIES_DROPPED_KEY = "replies-dropped"

ArraySignature = dict[str, tuple[tuple[int, ...], str]]


def noise_metric_prefix(kind: str) -> str:
    """Return the metric key prefix of one kind of noise, e.g. ``noise-local``."""
    return f"noise-{kind}"


def noise_metric_key(kind: str, quantity: str) -> str:
    """Return the metric key of one noise quantity, e.g. ``noise-local-sigma``.

    Parameters
    ----------
    kind : str
        Where the noise was added: ``"local"``, ``"broadcast"``,
        ``"aggregation"``, ``"update"``, ``"received"``.
    quantity : str
        ``"sigma"``, ``"l2"`` or ``"applications"``.

    """
    return f"{noise_metric_prefix(kind)}-{quantity}"


def find_record_key(
    content: RecordDict, record_type: type, preferred_key: str | None = None
) -> str | None:
    """Return the key of the record of ``record_type`` in ``content``.

    Parameters
    ----------
    content : RecordDict
        A message's content.
    record_type : type
        ``ArrayRecord``, ``ConfigRecord`` or ``MetricRecord``.
    preferred_key : str | None (default: None)
        The key a strategy stores that record under (e.g. FedAvg's
        ``arrayrecord_key``); used when present.

    Returns
    -------
    str | None
        ``preferred_key`` if ``content`` holds a record of that type under it,
        else the key of the only record of that type, ``None`` if there is none.

    Raises
    ------
    ValueError
        If there are several records of that type and none under
        ``preferred_key``.

    """
    keys = [key for key, record in content.items() if isinstance(record, record_type)]
    if preferred_key is not None and preferred_key in keys:
        return preferred_key
    if len(keys) > 1:
        raise ValueError(
            f"the message holds {len(keys)} {record_type.__name__}s {keys} and "
            f"none under key {preferred_key!r}: expected exactly one, or one "
            "under the strategy's key"
        )
    return keys[0] if keys else None


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return the arrays of an ``ArrayRecord`` as a name -> ndarray dict."""
    return {name: array.numpy() for name, array in record.items()}


def perturb_array_record(
    record: ArrayRecord,
    spec: NoiseSpec,
    sigma: float,
    rng: np.random.Generator,
    decoded: Mapping[str, np.ndarray] | None = None,
) -> tuple[ArrayRecord, NoiseReport]:
    """Return a perturbed copy of ``record`` (which is never modified).

    Parameters
    ----------
    record : ArrayRecord
        The arrays to perturb.
    spec : NoiseSpec
        Distribution, mode, relative scaling and parameter filters.
    sigma : float
        The already scheduled standard deviation.
    rng : np.random.Generator
        The noise stream.
    decoded : Mapping[str, np.ndarray] | None (default: None)
        ``decode_arrays(record)``, when the caller already has it (saves
        decoding the same record once per client).

    Returns
    -------
    tuple[ArrayRecord, NoiseReport]
        A new ``ArrayRecord`` with the same keys in the same order (arrays that
        got no noise are carried over as they are) and the noise report.

    """
    arrays = decode_arrays(record) if decoded is None else decoded
    perturbed, report = perturb_arrays(arrays, spec, sigma, rng)
    new_record = ArrayRecord(
        {
            name: array if perturbed[name] is arrays[name] else Array(perturbed[name])
            for name, array in record.items()
        }
    )
    return new_record, report


def _signature(record: ArrayRecord) -> ArraySignature:
    return {name: (tuple(array.shape), array.dtype) for name, array in record.items()}


def signature_mismatch(expected: ArraySignature, got: ArraySignature) -> str | None:
    """Say how a reply's arrays differ from those sent, or ``None`` if they match."""
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    if missing or unexpected:
        return (
            f"its arrays' keys differ from those sent (missing {missing}, "
            f"unexpected {unexpected})"
        )
    for name, (shape, dtype) in expected.items():
        if got[name] != (shape, dtype):
            got_shape, got_dtype = got[name]
            return (
                f"array {name!r} has shape {got_shape} and dtype {got_dtype}, "
                f"but shape {shape} and dtype {dtype} were sent"
            )
    return None


def first_non_finite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Return the name of the first array holding NaN or Inf, else ``None``."""
    for name, array in arrays.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return name
    return None


def enabled_or_none(name: str, spec: NoiseSpec | None) -> NoiseSpec | None:
    """Check a wrapper's spec argument; ``None`` when it is absent or off."""
    if spec is None:
        return None
    if not isinstance(spec, NoiseSpec):
        raise TypeError(
            f"{name}={spec!r} is not allowed: expected a flwr_noise.NoiseSpec or None"
        )
    return spec if spec.enabled else None


class _ClientKeyOrderedGrid(Grid):
    """A Grid that lists its nodes in client-key order.

    Flower's strategies sample nodes with ``random.sample`` over
    ``grid.get_node_ids()``, whose order follows the node ids, random on every
    run. Listing them by a stable client key makes a seeded ``random`` pick the
    same clients every run.
    """

    def __init__(self, grid: Grid, client_key: Callable[[int], int | str]) -> None:
        self._grid = grid
        self._client_key = client_key

    def get_node_ids(self) -> Iterable[int]:
        """List the node ids in client-key order."""
        return sorted(
            self._grid.get_node_ids(),
            key=lambda node_id: str(self._client_key(node_id)),
        )

    # The rest delegates to the wrapped Grid.
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class NoisyStrategy(Strategy):
    """Strategy wrapper that injects weight noise into federated training.

    Wraps any ``flwr.serverapp.strategy.Strategy`` (FedAvg, FedAdam, FedProx,
    FedMedian, ...) and delegates everything to it; the noise is added around
    the wrapped strategy's ``configure_train`` and ``aggregate_train``.
    Evaluation is delegated untouched. A spec that is ``None`` or disabled
    (``std == 0``) is off; with every spec off the wrapper changes neither the
    messages nor the metrics (it still drops broken replies, see below).

    Broadcast and aggregation noise are applied once per round, so their
    schedule time is ``t = server_round - 1``. Every client and round draws
    its own stream: ``seeding.numpy_generator(spec.seed, client=client key,
    server_round=server_round, purpose="broadcast")``; the aggregate uses the
    client key ``seeding.AGGREGATE_CLIENT`` and purpose ``"aggregation"``.

    Replies: error replies go to the wrapped strategy untouched. A reply whose
    ArrayRecord holds NaN or Inf, or whose keys, shapes or dtypes differ from
    the arrays sent in this round, is dropped with a WARNING naming the node.

    Metrics: when any spec is on, the round's aggregated MetricRecord gets
    ``noise-<kind>-sigma`` / ``noise-<kind>-l2`` entries for what was injected
    (``broadcast``: mean L2 norm over the clients; ``local`` and ``update``:
    the nominal sigma of the round, added only if the clients did not report
    it themselves) and ``replies-received``, ``replies-failed`` (error
    replies), ``replies-dropped``. The same values, for every round, are in
    :attr:`round_noise`.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap.
    local : NoiseSpec | None (default: None)
        Noise the clients add during local training; sent to them as flat
        ``ConfigRecord`` entries under ``noise.local.``.
    broadcast : NoiseSpec | None (default: None)
        Noise on each client's copy of the global model.
    aggregation : NoiseSpec | None (default: None)
        Noise on the aggregated model.
    update : NoiseSpec | None (default: None)
        Noise the clients' ``weight_noise_mod`` adds to the model they send
        back; sent under ``noise.update.``.
    client_key_fn : Callable[[int], int | str] | None (default: None)
        Maps a node id to the client key of its noise streams (e.g. its
        partition id, stable across runs); ``None`` uses the node id. When
        given, replies are aggregated in the order of their client keys, so
        that a seeded run reproduces bit for bit whatever order they arrive in.
    local_steps : int | None (default: None)
        Optimizer steps per client per round. Only used to report the
        round-start sigma of a ``local`` spec with ``schedule_unit="step"``
        and a decaying schedule; without it that sigma is not reported.

    Examples
    --------
    ::

        strategy = NoisyStrategy(
            FedAvg(fraction_train=1.0),
            local=NoiseSpec(std=0.01, seed=0),
            aggregation=NoiseSpec(std=0.001, seed=0),
        )
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=5)

    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        *,
        local: NoiseSpec | None = None,
        broadcast: NoiseSpec | None = None,
        aggregation: NoiseSpec | None = None,
        update: NoiseSpec | None = None,
        client_key_fn: Callable[[int], int | str] | None = None,
        local_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"strategy={strategy!r} is not allowed: expected an instance of "
                "flwr.serverapp.strategy.Strategy"
            )
        if client_key_fn is not None and not callable(client_key_fn):
            raise TypeError(
                f"client_key_fn={client_key_fn!r} is not allowed: expected a "
                "callable node id -> int | str, or None"
            )
        if local_steps is not None and (
            not isinstance(local_steps, numbers.Integral)
            or isinstance(local_steps, bool)
            or local_steps < 1
        ):
            raise ValueError(
                f"local_steps={local_steps!r} is not allowed: expected an int >= 1 "
                "or None"
            )
        self.strategy = strategy
        self.local = enabled_or_none("local", local)
        self.broadcast = enabled_or_none("broadcast", broadcast)
        self.aggregation = enabled_or_none("aggregation", aggregation)
        self.update = enabled_or_none("update", update)
        self.client_key_fn = client_key_fn
        self.local_steps = local_steps
        # Per round: what was injected and how many replies were used.
        self.round_noise: dict[int, dict[str, float]] = {}
        self._sent_signatures: dict[int, ArraySignature] = {}

    def __repr__(self) -> str:
        """Return a string representation of the strategy."""
        return f"NoisyStrategy({self.strategy!r})"

    @property
    def active(self) -> bool:
        """Whether any noise is on."""
        return any(
            spec is not None
            for spec in (self.local, self.broadcast, self.aggregation, self.update)
        )

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Noise (flwr-noise):")
        for kind in ("local", "broadcast", "aggregation", "update"):
            log(INFO, "\t│\t├── %s: %s", kind, getattr(self, kind) or "off")
        self.strategy.summary()

    def client_key(self, node_id: int) -> int | str:
        """Return the client key of the noise streams of ``node_id``."""
        return node_id if self.client_key_fn is None else self.client_key_fn(node_id)

    def _local_round_start_sigma(self, server_round: int) -> float | None:
        spec = self.local
        if spec is None:
            return None
        if spec.schedule_unit == "round":
            return spec.sigma_at(server_round - 1)
        if spec.schedule == "constant":
            return spec.std
        if self.local_steps is None:
            return None
        return spec.sigma_at((server_round - 1) * self.local_steps)

    def _client_side_sigmas(self, server_round: int) -> dict[str, float]:
        """Nominal sigmas of the noise the clients add this round (local, update)."""
        entries: dict[str, float] = {}
        local_sigma = self._local_round_start_sigma(server_round)
        if local_sigma is not None:
            entries[noise_metric_key("local", "sigma")] = local_sigma
        if self.update is not None:
            entries[noise_metric_key("update", "sigma")] = self.update.sigma_at(
                server_round - 1
            )
        return entries

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training, with each client's noise."""
        if self.client_key_fn is not None:
            grid = _ClientKeyOrderedGrid(grid, self.client_key)
        messages = list(
            self.strategy.configure_train(server_round, arrays, config, grid)
        )
        self._sent_signatures[server_round] = _signature(arrays)
        round_info = self._client_side_sigmas(server_round)
        self.round_noise[server_round] = round_info

        spec_entries: dict[str, ConfigValue] = {}
        if self.local is not None:
            spec_entries.update(self.local.to_config(LOCAL_PREFIX))
        if self.update is not None:
            spec_entries.update(self.update.to_config(UPDATE_PREFIX))
        if not spec_entries and self.broadcast is None:
            return messages

        broadcast_sigma = (
            0.0 if self.broadcast is None else self.broadcast.sigma_at(server_round - 1)
        )
        broadcast_norms: list[float] = []
        decoded_records: dict[int, dict[str, np.ndarray]] = {}
        for message in messages:
            # FedAvg and friends share one RecordDict among all messages: every
            # message gets its own copy, the shared one is never modified.
            content = RecordDict(dict(message.content.items()))
            if spec_entries:
                self._add_config_entries(content, spec_entries, server_round)
            if self.broadcast is not None:
                broadcast_norms.append(
                    self._perturb_broadcast(
                        content,
                        message.metadata.dst_node_id,
                        server_round,
                        broadcast_sigma,
                        decoded_records,
                    )
                )
            message.content = content

        if self.broadcast is not None:
            round_info[noise_metric_key("broadcast", "sigma")] = broadcast_sigma
            round_info[noise_metric_key("broadcast", "l2")] = (
                float(np.mean(broadcast_norms)) if broadcast_norms else 0.0
            )
        return messages

    def _add_config_entries(
        self,
        content: RecordDict,
        entries: Mapping[str, ConfigValue],
        server_round: int,
    ) -> None:
        key = find_record_key(
            content, ConfigRecord, getattr(self.strategy, "configrecord_key", None)
        )
        config = ConfigRecord(dict(content[key]) if key is not None else {})
        config.update(entries)
        # The clients key their noise streams by round: make sure it is there.
        config.setdefault(SERVER_ROUND_KEY, server_round)
        content[key if key is not None else DEFAULT_CONFIG_KEY] = config

    def _perturb_broadcast(
        self,
        content: RecordDict,
        node_id: int,
        server_round: int,
        sigma: float,
        decoded_records: dict[int, dict[str, np.ndarray]],
    ) -> float:
        spec = self.broadcast
        assert spec is not None
        key = find_record_key(
            content, ArrayRecord, getattr(self.strategy, "arrayrecord_key", None)
        )
        if key is None:
            raise ValueError(
                f"the train message to node {node_id} holds no ArrayRecord: "
                "broadcast noise needs the model in the message"
            )
        record = content[key]
        assert isinstance(record, ArrayRecord)
        decoded = decoded_records.get(id(record))
        if decoded is None:
            decoded = decoded_records[id(record)] = decode_arrays(record)
        rng = numpy_generator(
            spec.seed,
            client=self.client_key(node_id),
            server_round=server_round,
            purpose="broadcast",
        )
        content[key], report = perturb_array_record(record, spec, sigma, rng, decoded)
        return report.l2_norm

    def _reply_problem(
        self, reply: Message, expected: ArraySignature | None
    ) -> str | None:
        """Return why a (non-error) reply must be dropped, or None."""
        try:
            key = find_record_key(
                reply.content,
                ArrayRecord,
                getattr(self.strategy, "arrayrecord_key", None),
            )
        except ValueError as error:
            return str(error)
        if key is None:
            return "it holds no ArrayRecord"
        record = reply.content[key]
        assert isinstance(record, ArrayRecord)
        if expected is not None:
            mismatch = signature_mismatch(expected, _signature(record))
            if mismatch is not None:
                return mismatch
        non_finite = first_non_finite(decode_arrays(record))
        if non_finite is not None:
            return f"array {non_finite!r} holds NaN or Inf"
        return None

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies, then add the aggregation noise."""
        replies = list(replies)
        expected = self._sent_signatures.pop(server_round, None)
        kept: list[Message] = []
        failed = 0
        for reply in replies:
            if reply.has_error():
                failed += 1
                kept.append(reply)
                continue
            problem = self._reply_problem(reply, expected)
            if problem is not None:
                log(
                    WARNING,
                    "NoisyStrategy: dropping the train reply of node %s in round "
                    "%s: %s",
                    reply.metadata.src_node_id,
                    server_round,
                    problem,
                )
                continue
            kept.append(reply)

        if self.client_key_fn is not None:
            # Replies arrive in completion order; averaging them in client-key
            # order makes a seeded run reproduce bit for bit.
            kept.sort(
                key=lambda reply: str(self.client_key(reply.metadata.src_node_id))
            )
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)

        round_info = self.round_noise.setdefault(server_round, {})
        round_info[REPLIES_RECEIVED_KEY] = len(replies)
        round_info[REPLIES_FAILED_KEY] = failed
        round_info[REPLIES_DROPPED_KEY] = len(replies) - len(kept)
        if arrays is not None and self.aggregation is not None:
            arrays, report = self._perturb_aggregate(arrays, server_round)
            round_info[noise_metric_key("aggregation", "sigma")] = (
                self.aggregation.sigma_at(server_round - 1)
            )
            round_info[noise_metric_key("aggregation", "l2")] = report.l2_norm

        if arrays is None or not self.active:
            return arrays, metrics
        metrics = MetricRecord() if metrics is None else metrics
        client_reported = self._client_side_sigmas(server_round)
        for key, value in round_info.items():
            if key in client_reported and key in metrics:
                continue
            metrics[key] = value if isinstance(value, int) else float(value)
        return arrays, metrics

    def _perturb_aggregate(
        self, arrays: ArrayRecord, server_round: int
    ) -> tuple[ArrayRecord, NoiseReport]:
        spec = self.aggregation
        assert spec is not None
        rng = numpy_generator(
            spec.seed,
            client=AGGREGATE_CLIENT,
            server_round=server_round,
            purpose="aggregation",
        )
        sigma = spec.sigma_at(server_round - 1)
        new_arrays, report = perturb_array_record(arrays, spec, sigma, rng)
        log(
            INFO,
            "NoisyStrategy: aggregation noise (sigma %.4g, L2 norm %.4g) added",
            sigma,
            report.l2_norm,
        )
        return new_arrays, report

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated evaluation (delegated)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate MetricRecords in the received Messages (delegated)."""
        return self.strategy.aggregate_evaluate(server_round, replies)
