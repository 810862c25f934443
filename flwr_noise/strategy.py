"""NoisyStrategy: weight noise around any Flower Message-API strategy.

The wrapper follows Flower's strategy-wrapper pattern (e.g.
``DifferentialPrivacyClientSideFixedClipping``): the specs the clients apply
travel in the ``config`` it passes into the wrapped strategy's
``configure_train``; messages are rewritten only for broadcast noise, which
gives every client its own copy of the model. What both wrappers share (reply
checks, noise on arrays, metrics, round bookkeeping) is
:class:`flwr_noise.rounds.NoiseRounds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
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

from flwr_noise.replies import (
    NO_WEIGHT,
    ArraySignature,
    ReplyView,
    first_non_finite,
    metric_kind,
    signature_mismatch,
)
from flwr_noise.rounds import (
    LOCAL_PREFIX,
    LOCAL_START_STEP_KEY,
    RECEIVED_PREFIX,
    REPLIES_DROPPED_KEY,
    REPLIES_FAILED_KEY,
    REPLIES_RECEIVED_KEY,
    ROUND_FAILED_KEY,
    SERVER_ROUND_KEY,
    UPDATE_PREFIX,
    NoiseWrapper,
    enabled_or_none,
    measured_keys,
    noise_metric_key,
    noise_metric_prefix,
)
from flwr_noise.sampling import NoiseReport, perturb_arrays
from flwr_noise.spec import NoiseSpec

__all__ = [
    "LOCAL_PREFIX",
    "LOCAL_START_STEP_KEY",
    "RECEIVED_PREFIX",
    "REPLIES_DROPPED_KEY",
    "REPLIES_FAILED_KEY",
    "REPLIES_RECEIVED_KEY",
    "ROUND_FAILED_KEY",
    "SERVER_ROUND_KEY",
    "UPDATE_PREFIX",
    "ArraySignature",
    "NoisyStrategy",
    "decode_arrays",
    "enabled_or_none",
    "find_record_key",
    "first_non_finite",
    "noise_metric_key",
    "noise_metric_prefix",
    "perturb_array_record",
    "signature_mismatch",
]

# Measured by the clients when they report them; else the server's nominal sigma.
_CLIENT_REPORTED_KEYS = measured_keys(("local", "update", "received"))


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


def _encode_like(
    record: ArrayRecord,
    decoded: Mapping[str, np.ndarray],
    perturbed: Mapping[str, np.ndarray],
) -> ArrayRecord:
    """Return ``perturbed`` as an ArrayRecord, reusing the untouched Arrays."""
    return ArrayRecord(
        {
            name: array if perturbed[name] is decoded[name] else Array(perturbed[name])
            for name, array in record.items()
        }
    )


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
        ``decode_arrays(record)``, when the caller already has it.

    Returns
    -------
    tuple[ArrayRecord, NoiseReport]
        A new ``ArrayRecord`` with the same keys in the same order (arrays that
        got no noise are carried over as they are) and the noise report.

    """
    arrays = decode_arrays(record) if decoded is None else decoded
    perturbed, report = perturb_arrays(arrays, spec, sigma, rng)
    return _encode_like(record, arrays, perturbed), report


def _declared_signature(record: ArrayRecord) -> ArraySignature:
    return {name: (tuple(array.shape), array.dtype) for name, array in record.items()}


def _model_records(
    messages: Iterable[Message], preferred: str | None
) -> list[tuple[RecordDict, str, ArrayRecord]]:
    """Return each message's own copy of its content, and the model's key and record.

    FedAvg shares one RecordDict among all messages: the shared one is never
    modified.
    """
    targets = []
    for message in messages:
        content = RecordDict(dict(message.content.items()))
        key = find_record_key(content, ArrayRecord, preferred)
        if key is None:
            raise ValueError(
                f"the train message to node {message.metadata.dst_node_id} "
                "holds no ArrayRecord: broadcast noise needs the model in it"
            )
        record = content[key]
        assert isinstance(record, ArrayRecord)
        targets.append((content, key, record))
    return targets


def _reply_view(reply: Message, weight_key: str | None, order: str) -> ReplyView:
    """Return what :class:`~flwr_noise.replies.ReplyScreen` checks of a reply.

    Parameters
    ----------
    reply : Message
        A non-error train reply.
    weight_key : str | None
        The wrapped strategy's ``weighted_by_key`` (``None``: it weights
        replies by nothing).
    order : str
        The sender's client key, as a str.

    Returns
    -------
    ReplyView
        Its ArrayRecord (exactly one expected) and weight (one MetricRecord
        expected when ``weight_key`` is set), and its structure: record keys,
        metric keys and the kinds of their values.

    """
    array_records = reply.content.array_records
    metric_records = reply.content.metric_records
    problem = None
    weight: Any = NO_WEIGHT
    if len(array_records) != 1:
        problem = f"it holds {len(array_records)} ArrayRecords: expected one"
    elif weight_key is not None:
        if len(metric_records) != 1:
            problem = (
                f"it holds {len(metric_records)} MetricRecords: expected one "
                f"with {weight_key!r}"
            )
        else:
            weight = next(iter(metric_records.values())).get(weight_key)
    structure = (
        tuple(sorted(array_records)),
        tuple(
            (key, tuple(sorted((name, metric_kind(v)) for name, v in rec.items())))
            for key, rec in sorted(metric_records.items())
        ),
    )
    return ReplyView(
        node=reply.metadata.src_node_id,
        order=order,
        decode=lambda: decode_arrays(next(iter(array_records.values()))),
        weight=weight,
        weight_label=str(weight_key),
        structure=structure,
        problem=problem,
        reply_to=reply.metadata.reply_to_message_id,
    )


class _ClientKeyOrderedGrid(Grid):
    """A Grid that lists its nodes in client-key order; all else is the grid's.

    Flower's strategies sample nodes with ``random.sample`` over
    ``grid.get_node_ids()``, whose order follows the node ids, random on every
    run. Listing them by a stable client key makes a seeded ``random`` pick the
    same clients every run. Every other attribute (also those that later
    Flower versions add to ``Grid``) is the wrapped grid's.
    """

    _OWN = frozenset({"get_node_ids", "get_nodes", "_grid", "_key", "_OWN"})

    def __init__(self, grid: Grid, client_key: Callable[[int], int | str]) -> None:
        object.__setattr__(self, "_grid", grid)
        object.__setattr__(self, "_key", client_key)

    def __getattribute__(self, name: str) -> Any:
        if name in _ClientKeyOrderedGrid._OWN or (
            name.startswith("__") and name.endswith("__")
        ):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_grid"), name)

    def get_node_ids(self) -> Iterable[int]:
        """List the node ids in client-key order."""
        return sorted(self._grid.get_node_ids(), key=lambda node: str(self._key(node)))

    def get_nodes(self) -> Iterable[Any]:
        """List the nodes in client-key order."""
        return sorted(
            self._grid.get_nodes(), key=lambda node: str(self._key(node.node_id))
        )


# Every attribute is delegated: whatever Grid declares abstract is the grid's.
_ClientKeyOrderedGrid.__abstractmethods__ = frozenset()


class NoisyStrategy(NoiseWrapper, Strategy):
    """Strategy wrapper that injects weight noise into federated training.

    Wraps any ``flwr.serverapp.strategy.Strategy`` (FedAvg, FedAdam, FedProx,
    FedMedian, ...) and delegates everything to it; the noise is added around
    the wrapped strategy's ``configure_train`` and ``aggregate_train``.
    Evaluation is delegated untouched. A spec that is ``None`` or disabled
    (``std == 0``) is off; with every spec off the wrapper changes neither the
    messages nor the metrics (it still drops broken replies, see below).

    ``broadcast``, ``aggregation``, ``received`` and ``update`` are applied
    once per round, so for them one step is one round: ``t = server_round -
    1`` whatever ``schedule_unit`` says. Every client and round draws its own
    stream: ``seeding.numpy_generator(spec.seed, client=client key,
    server_round=server_round, purpose="broadcast")``; the aggregate uses the
    client key ``seeding.AGGREGATE_CLIENT``.

    Reproducible broadcast noise: node ids are new in every run, so by default
    (client key = node id) the broadcast noise differs between runs. Pass
    ``client_key_fn`` mapping a node id to something stable, such as the
    partition id each node was given (``--node-config "partition-id=..."``;
    a ServerApp learns it e.g. by asking each node once with a query message),
    and the same seed gives every partition the same noise in every run, and
    replies are averaged in that order. ``received`` noise is drawn by the
    client with its partition id as key, so it is reproducible without it.

    Replies are checked on what they carry: a reply is dropped, with one
    WARNING naming the node and the reason, and counted in
    ``replies-dropped``, when its node was not asked or replied twice, it does
    not hold exactly one ArrayRecord (and, for a strategy that weights
    replies, one MetricRecord), its weight (``weighted_by_key``) is not a
    finite number in (0, 2**53], its arrays do not decode to the dtypes and
    shapes sent or are not finite, or its keys differ from most replies'
    (the rules: :class:`flwr_noise.replies.ReplyScreen`). Error replies go
    to the wrapped strategy untouched.

    A round never fails the run: if the wrapped aggregation raises, or the
    model (after aggregation noise) is not finite, ``aggregate_train``
    returns no arrays (``Strategy.start`` keeps the previous model), logs a
    WARNING and reports ``round-failed = 1``.

    Metrics: when any spec is on, or a reply was dropped, or the round failed,
    the round's MetricRecord gets ``replies-received``, ``replies-failed``
    (error replies), ``replies-dropped`` and ``noise-<kind>-sigma`` /
    ``noise-<kind>-l2``. Measured by the server: ``broadcast`` (sigma, mean
    L2 norm over the clients' copies) and ``aggregation`` (sigma, L2 norm).
    Nominal, computed by the server from the spec: ``noise-local-sigma`` (at
    the round's first step), ``noise-update-sigma``, ``noise-received-sigma``;
    when the clients report these keys themselves (``noise_metrics``), the
    wrapped strategy's aggregate of the measured values is kept instead. The
    same server values, for every round, are in :attr:`round_noise`.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap.
    local : NoiseSpec | None (default: None)
        Sent to the clients in the train config (under ``noise.local.``),
        applied after every local optimizer step (:func:`flwr_noise.weight_noise`,
        :func:`flwr_noise.weight_noise_mod`). ``t`` counts steps
        (``schedule_unit="step"``) or ``server_round - 1`` (``"round"``).
        With ``local_steps`` the config also carries ``noise.local.start-step
        = (server_round - 1) * local_steps``, where a client's step schedule
        continues.
    broadcast : NoiseSpec | None (default: None)
        Each selected client receives its own copy of the global model,
        independently perturbed by the server.
    aggregation : NoiseSpec | None (default: None)
        Added once to the aggregated model.
    update : NoiseSpec | None (default: None)
        Sent under ``noise.update.``; the clients' ``weight_noise_mod`` adds
        it once to the model they send back.
    received : NoiseSpec | None (default: None)
        Sent under ``noise.received.``; the clients' ``weight_noise_mod`` adds
        it once to the model they receive.
    client_key_fn : Callable[[int], int | str] | None (default: None)
        Maps a node id to the client key of its noise streams (e.g. its
        partition id, stable across runs); ``None`` uses the node id. When
        given, nodes are listed to the wrapped strategy's sampling, and
        replies aggregated, in client-key order, so that a seeded run
        reproduces bit for bit whatever order they arrive in.
    local_steps : int | None (default: None)
        Optimizer steps per client per round. Needed for a ``local`` spec with
        ``schedule_unit="step"`` and a decaying schedule (refused without).

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

    _name = "NoisyStrategy"

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        *,
        local: NoiseSpec | None = None,
        broadcast: NoiseSpec | None = None,
        aggregation: NoiseSpec | None = None,
        update: NoiseSpec | None = None,
        received: NoiseSpec | None = None,
        client_key_fn: Callable[[int], int | str] | None = None,
        local_steps: int | None = None,
    ) -> None:
        super().__init__()
        self._wrap(
            strategy,
            (Strategy, "flwr.serverapp.strategy.Strategy"),
            client_key_fn,
            "a callable node id -> int | str, or None",
            local=local,
            broadcast=broadcast,
            aggregation=aggregation,
            update=update,
            received=received,
            local_steps=local_steps,
        )

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        self.core.summary()
        self.strategy.summary()

    def client_key(self, node_id: int) -> int | str:
        """Return the client key of the noise streams of ``node_id``."""
        return node_id if self.client_key_fn is None else self.client_key_fn(node_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training, with each client's noise."""
        if self.client_key_fn is not None:
            grid = _ClientKeyOrderedGrid(grid, self.client_key)
        entries = self.core.client_config(
            server_round, lambda spec, prefix: spec.to_config(prefix)
        )
        if entries:
            # A copy: the caller's config (Strategy.start reuses it) stays clean.
            config = ConfigRecord({**dict(config), **entries})
        messages = list(
            self.strategy.configure_train(server_round, arrays, config, grid)
        )
        self.core.start_round(
            server_round,
            _declared_signature(arrays),
            {
                message.metadata.dst_node_id: (
                    lambda message=message: message.metadata.message_id
                )
                for message in messages
            },
        )
        if self.broadcast is not None:
            self._perturb_broadcast(server_round, messages)
        return messages

    def _perturb_broadcast(self, server_round: int, messages: list[Message]) -> None:
        targets = _model_records(
            messages, getattr(self.strategy, "arrayrecord_key", None)
        )
        copies = self.core.perturb_broadcast(
            server_round,
            [
                (self.client_key(message.metadata.dst_node_id), record)
                for message, (_, _, record) in zip(messages, targets, strict=True)
            ],
            decode_arrays,
        )
        for message, (content, key, record), (decoded, copy) in zip(
            messages, targets, copies, strict=True
        ):
            content[key] = _encode_like(record, decoded, copy)
            message.content = content

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies, then add the aggregation noise."""
        replies = list(replies)
        weight_key = getattr(self.strategy, "weighted_by_key", None)
        views = [
            None
            if reply.has_error()
            else _reply_view(
                reply, weight_key, str(self.client_key(reply.metadata.src_node_id))
            )
            for reply in replies
        ]
        kept = [replies[index] for index in self.core.screen(server_round, views)]
        if self.client_key_fn is not None:
            # Replies arrive in completion order; averaging them in client-key
            # order makes a seeded run reproduce bit for bit.
            kept.sort(
                key=lambda reply: str(self.client_key(reply.metadata.src_node_id))
            )
        arrays, metrics = self.core.aggregate(
            server_round,
            lambda: self.strategy.aggregate_train(server_round, kept),
            decode_arrays,
            lambda noisy: ArrayRecord(
                {name: Array(value) for name, value in noisy.items()}
            ),
        )
        merged = self.core.round_metrics(server_round, metrics, _CLIENT_REPORTED_KEYS)
        if merged is not None:
            metrics = MetricRecord(merged)
        return arrays, metrics

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
