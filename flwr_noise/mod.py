"""ClientApp side of the server-driven noise: a context manager, a mod, helpers.

:class:`flwr_noise.NoisyStrategy` sends its specs to the clients in every
train message, as flat ``ConfigRecord`` entries beside ``server-round``:

- ``local`` (``noise.local.*``): noise after every optimizer step of local
  training, on every client path. Apply it with one line around the
  unchanged training call::

      with weight_noise(model, msg, context) as noise:
          train_loss = train(model, trainloader, epochs, lr, device)
      metrics.update(noise.metrics())

  or, with the optimizer in hand, ``weight_noise_from_message(model, msg,
  context).attach(optimizer)``. The server also sends
  ``noise.local.start-step``, the schedule time of this round's first step,
  so a decaying ``"step"`` schedule continues across rounds by itself.
- ``received`` (``noise.received.*``): noise added once to the model the
  client receives, by ``ClientApp(mods=[weight_noise_mod])``;
- ``update`` (``noise.update.*``): noise added once, by the mod, to the
  model the client sends back.

A spec that comes over the wire is untrusted: a bad one gives the mod an
error reply and the functions a ``ValueError`` / ``TypeError`` naming the
key; it never crashes the SuperNode.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from logging import ERROR, INFO
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from flwr_noise.hook import WeightNoise
from flwr_noise.sampling import NoiseReport, perturb_arrays
from flwr_noise.seeding import numpy_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.step_noise import StepNoise, noise_metrics
from flwr_noise.strategy import (
    LOCAL_PREFIX,
    LOCAL_START_STEP_KEY,
    RECEIVED_PREFIX,
    SERVER_ROUND_KEY,
    UPDATE_PREFIX,
    decode_arrays,
    first_non_finite,
    noise_metric_prefix,
)
from flwr_noise.validation import check_integer, is_integer, not_allowed

__all__ = [
    "DEFAULT_METRICS_KEY",
    "PARTITION_ID_KEY",
    "StepNoise",
    "add_noise_once",
    "client_key",
    "noise_metrics",
    "server_round_of",
    "weight_noise",
    "weight_noise_from_message",
    "weight_noise_mod",
]

# The node config key of the client's partition: the stable client key.
PARTITION_ID_KEY = "partition-id"
# Key of the MetricRecord the mod creates when the reply has none.
DEFAULT_METRICS_KEY = "metrics"
_MOD_NAME = "weight_noise_mod"


def client_key(msg: Message, context: Context | None = None) -> int | str:
    """Return the client key of this client's noise streams.

    Parameters
    ----------
    msg : Message
        The message received from the ServerApp.
    context : Context | None (default: None)
        The ClientApp's context.

    Returns
    -------
    int | str
        ``context.node_config["partition-id"]`` when present (stable across
        runs), else the node id the message was sent to.

    Raises
    ------
    TypeError
        If the partition id is neither an int nor a str.

    """
    if context is not None and PARTITION_ID_KEY in context.node_config:
        partition_id = context.node_config[PARTITION_ID_KEY]
        if isinstance(partition_id, str) or is_integer(partition_id):
            return partition_id
        raise not_allowed(
            f"node_config[{PARTITION_ID_KEY!r}]",
            partition_id,
            "an int >= 0 or a str",
            TypeError,
        )
    return msg.metadata.dst_node_id


def server_round_of(config: ConfigRecord) -> int:
    """Return the round a train config carries under ``server-round``.

    Raises
    ------
    ValueError, TypeError
        If it is missing or not an int >= 0; the message names the key.

    """
    label = f"ConfigRecord[{SERVER_ROUND_KEY!r}]"
    if SERVER_ROUND_KEY not in config:
        raise ValueError(
            f"{label} is missing: expected the round as an int >= 0 beside the "
            "noise spec (Flower's strategies and NoisyStrategy put it there)"
        )
    return check_integer(label, config[SERVER_ROUND_KEY], low=0)


def spec_from_wire(config: Mapping[str, Any], prefix: str) -> NoiseSpec:
    """Build the spec the server sent under ``prefix``; any failure names the key.

    ``NoiseSpec.from_config`` names the key in its ``TypeError`` /
    ``ValueError``; anything else a hostile value raises (e.g. an
    ``OverflowError`` from a regular expression) becomes a ``ValueError``
    naming the prefix of the spec's keys.
    """
    try:
        return NoiseSpec.from_config(config, prefix)
    except (TypeError, ValueError):
        raise
    except Exception as error:  # pylint: disable=broad-exception-caught
        entries = {
            key: value for key, value in config.items() if key.startswith(prefix)
        }
        raise not_allowed(
            f"ConfigRecord entries under {prefix!r}",
            entries,
            f"a valid NoiseSpec ({type(error).__name__}: {error})",
        ) from error


def _config_holding_spec(msg: Message, prefix: str) -> ConfigRecord | None:
    holding = {
        name: config
        for name, config in msg.content.config_records.items()
        if NoiseSpec.in_config(config, prefix)
    }
    if len(holding) > 1:
        raise not_allowed(
            f"ConfigRecords with {prefix + 'std'!r}",
            list(holding),
            "at most one ConfigRecord holding a noise spec under this prefix",
        )
    return next(iter(holding.values()), None)


@dataclass(frozen=True)
class _LocalNoise:
    """The local noise a train message asks for, read and checked."""

    spec: NoiseSpec
    client: int | str
    server_round: int
    start_step: int

    def session(self, model: torch.nn.Module) -> StepNoise:
        return StepNoise(
            model,
            self.spec,
            client=self.client,
            server_round=self.server_round,
            start_step=self.start_step,
        )


def _local_noise_of(
    msg: Message, context: Context | None, prefix: str, start_step: int | None
) -> _LocalNoise | None:
    """Return the enabled local spec of ``msg`` and its stream, or None."""
    config = _config_holding_spec(msg, prefix)
    if config is None:
        return None
    spec = spec_from_wire(config, prefix)
    if not spec.enabled:
        return None
    if start_step is None:
        start_step = check_integer(
            f"ConfigRecord[{LOCAL_START_STEP_KEY!r}]",
            config.get(LOCAL_START_STEP_KEY, 0),
            low=0,
        )
    return _LocalNoise(
        spec=spec,
        client=client_key(msg, context),
        server_round=server_round_of(config),
        start_step=start_step,
    )


def weight_noise_from_message(
    model: torch.nn.Module,
    msg: Message,
    context: Context | None = None,
    *,
    prefix: str = LOCAL_PREFIX,
    start_step: int | None = None,
) -> WeightNoise | None:
    """Build the :class:`WeightNoise` for the local spec the server sent.

    Per-step local noise in your own training loop is then::

        noise = weight_noise_from_message(model, msg, context)
        if noise is not None:
            noise.attach(optimizer)

    Build it after the model is on its device and holds the received weights.
    If the optimizer is created inside your training function, use
    :func:`weight_noise` instead. With an anticorrelated spec, remove the
    handle ``attach`` returned before the model is sent back: that removes the
    last draw, which is still pending in the weights (``weight_noise`` does it
    on exit).

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained.
    msg : Message
        The train message received from the ServerApp.
    context : Context | None (default: None)
        The ClientApp's context; its ``node_config["partition-id"]`` is the
        client key of the noise stream (else the message's destination node
        id, which changes between runs).
    prefix : str (default: "noise.local.")
        The prefix of the spec's entries in the ConfigRecord.
    start_step : int | None (default: None)
        Schedule time of this round's first step (``schedule_unit="step"``);
        ``None`` takes the ``noise.local.start-step`` the server sent (0 when
        absent), so a decaying schedule continues across rounds.

    Returns
    -------
    WeightNoise | None
        ``None`` if the message carries no spec under ``prefix`` or the spec
        is disabled, else a ``WeightNoise`` on the stream of (seed, client key,
        ``server-round``, ``"local"``).

    Raises
    ------
    ValueError, TypeError
        If the spec's entries, ``server-round`` or ``noise.local.start-step``
        are missing or invalid; the message names the key.

    """
    local = _local_noise_of(msg, context, prefix, start_step)
    if local is None:
        return None
    return local.session(model).weight_noise_for(model)


@contextmanager
def weight_noise(
    model: torch.nn.Module,
    msg: Message,
    context: Context | None = None,
    *,
    prefix: str = LOCAL_PREFIX,
    start_step: int | None = None,
) -> Iterator[StepNoise]:
    """Add the server's local noise after every optimizer step inside the block.

    One line around an unchanged training call, whatever optimizer it
    creates::

        with weight_noise(model, msg, context) as noise:
            train_loss = train(model, trainloader, epochs, lr, device)
        metrics.update(noise.metrics())

    Inside the block, every ``step()`` of any torch optimizer whose parameter
    groups hold parameters of ``model`` (also one created inside ``train``)
    is followed by one application of the ``local`` spec the server sent
    (:class:`WeightNoise`, built at the first such step). Other optimizers
    and other threads are left alone. On exit, also on an exception, the
    noise stops and no pending anticorrelated draw stays in the weights. A
    no-op when the server sent no local noise.

    Parameters
    ----------
    model : torch.nn.Module
        The model the block trains.
    msg : Message
        The train message received from the ServerApp.
    context : Context | None (default: None)
        The ClientApp's context; ``node_config["partition-id"]`` keys the
        noise stream (stable across runs), else the node id.
    prefix : str (default: "noise.local.")
        The prefix of the spec's entries in the ConfigRecord.
    start_step : int | None (default: None)
        As in :func:`weight_noise_from_message`: ``None`` takes the
        ``noise.local.start-step`` the server sent.

    Yields
    ------
    StepNoise
        ``noise.report()`` is what was added (a :class:`NoiseReport`),
        ``noise.metrics()`` its ``noise-local-*`` reply metrics (``{}`` when
        the server sent no local noise), ``noise.noise`` the ``WeightNoise``
        (``None`` until the first step).

    Raises
    ------
    ValueError, TypeError
        On entry, if the spec, ``server-round`` or ``noise.local.start-step``
        the server sent is invalid (the message names the key), or ``model``
        is not a ``torch.nn.Module``.

    """
    if not isinstance(model, torch.nn.Module):
        raise not_allowed("model", model, "a torch.nn.Module", TypeError)
    local = _local_noise_of(msg, context, prefix, start_step)
    session = StepNoise(model, None) if local is None else local.session(model)
    with session:
        yield session


def _error_reply(msg: Message, reason: str) -> Message:
    log(ERROR, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
    )


def _multi_record_error(
    msg: Message, record_type: type, inspected: Message | None = None
) -> Message:
    """Error reply to ``msg``: ``inspected`` (default ``msg``) has not one record."""
    content = (msg if inspected is None else inspected).content
    names = [
        name for name, record in content.items() if isinstance(record, record_type)
    ]
    error = not_allowed(f"{record_type.__name__}s", names, "exactly one")
    return _error_reply(msg, f"{_MOD_NAME}: {error}")


# (prefix, stream purpose, older purpose name) of the noise added once per round.
_ONCE_KINDS = {
    "received": RECEIVED_PREFIX,
    "update": UPDATE_PREFIX,
}


def add_noise_once(
    arrays: Mapping[str, np.ndarray],
    spec: NoiseSpec,
    *,
    kind: str,
    client: int | str,
    server_round: int,
) -> tuple[dict[str, np.ndarray], NoiseReport]:
    """Return ``arrays`` with the ``received`` or ``update`` noise added once.

    The client side of the once-per-round kinds (the mod, the legacy client):
    the stream is (seed, client key, round, kind), the schedule time
    ``server_round - 1``, whatever the unit.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The weights, never modified.
    spec : NoiseSpec
        The spec the server sent.
    kind : str
        ``"received"`` or ``"update"``.
    client : int | str
        The client key.
    server_round : int
        The round.

    Returns
    -------
    tuple[dict[str, np.ndarray], NoiseReport]
        The perturbed copy (arrays without noise are the same objects) and
        what was added.

    Raises
    ------
    ValueError
        If applying the spec fails or makes a weight non-finite (e.g. a std
        the dtype cannot hold); the message names the spec's ``std`` key.

    """
    prefix = _ONCE_KINDS[kind]
    std_key = f"{prefix}std"
    try:
        rng = numpy_generator(
            spec.seed,
            client=client,
            server_round=server_round,
            purpose=kind,
        )
        sigma = spec.sigma_at(max(server_round - 1, 0))
        perturbed, report = perturb_arrays(arrays, spec, sigma, rng)
        non_finite = first_non_finite(perturbed)
    except Exception as error:  # pylint: disable=broad-exception-caught
        raise not_allowed(
            std_key,
            spec.std,
            "a noise spec under this prefix that applies to the received arrays "
            f"({type(error).__name__}: {error})",
        ) from error
    if non_finite is not None:
        raise not_allowed(
            std_key,
            spec.std,
            f"a std the weights' dtype can hold (array {non_finite!r} became "
            "non-finite)",
        )
    log(
        INFO,
        "flwr-noise: %s noise (sigma %.4g, L2 norm %.4g) added",
        kind,
        sigma,
        report.l2_norm,
    )
    return perturbed, report


def _add_metrics(
    msg: Message, out_msg: Message, added: dict[str, float | int]
) -> Message:
    """Return ``out_msg`` with ``added`` in its MetricRecord (or an error reply)."""
    metric_records = out_msg.content.metric_records
    if len(metric_records) > 1:
        return _multi_record_error(msg, MetricRecord, out_msg)
    if metric_records:
        next(iter(metric_records.values())).update(added)
    else:
        out_msg.content[DEFAULT_METRICS_KEY] = MetricRecord(added)
    return out_msg


# pylint: disable=too-many-arguments
def _add_noise_once(
    msg: Message,
    target: Message,
    spec: NoiseSpec,
    kind: str,
    client: int | str,
    server_round: int,
    added: dict[str, float | int],
) -> Message | None:
    """Perturb the ArrayRecord of ``target``; put its metrics into ``added``.

    Returns the error reply to ``msg`` if that fails, else ``None``.
    """
    if len(target.content.array_records) != 1:
        return _multi_record_error(msg, ArrayRecord, target)
    key, record = next(iter(target.content.array_records.items()))
    arrays = decode_arrays(record)
    try:
        perturbed, report = add_noise_once(
            arrays, spec, kind=kind, client=client, server_round=server_round
        )
    except ValueError as error:
        return _error_reply(msg, f"{_MOD_NAME}: {error}")
    target.content[key] = ArrayRecord(
        {
            name: array if perturbed[name] is arrays[name] else Array(perturbed[name])
            for name, array in record.items()
        }
    )
    added.update(noise_metrics(report, noise_metric_prefix(kind)))
    return None


# pylint: disable=too-many-return-statements
def weight_noise_mod(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Client mod that applies the once-per-round noise :class:`NoisyStrategy` sends.

    It operates on messages of type ``MessageType.TRAIN`` (and
    ``"train.<action>"``); evaluate and query messages, and train messages
    that ask for no noise, pass through untouched. On a train message whose
    ConfigRecord holds

    - a received spec (``noise.received.*``): adds it once to the received
      ArrayRecord (stream purpose ``"received"``) before calling the inner
      app;
    - an update spec (``noise.update.*``): adds it to the ArrayRecord of the
      inner app's reply (purpose ``"update"``), unless the reply is an error.

    Both are applied once per round, with schedule time ``server_round - 1``.
    The ``local`` spec (``noise.local.*``) is noise during training and is
    left to the training function (:func:`weight_noise`): the mod passes it
    on untouched. What was added goes into the reply's MetricRecord:
    ``noise-received-sigma``, ``noise-received-l2``,
    ``noise-received-applications`` (an int), and the same for ``update``.
    The client key is ``node_config["partition-id"]`` when present, else the
    node id.

    A spec that cannot be read or applied (wrong types, out of range, a
    std whose noise overflows the weights, ...), or a message with several
    ArrayRecords or ConfigRecords where one is needed, gets an error reply
    (``MOD_FAILED_PRECONDITION``) that names the key; the inner app is then
    not called.

    Examples
    --------
    ::

        app = ClientApp(mods=[weight_noise_mod])

    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, ctxt)
    holding = [
        config
        for config in msg.content.config_records.values()
        if NoiseSpec.in_config(config, RECEIVED_PREFIX)
        or NoiseSpec.in_config(config, UPDATE_PREFIX)
    ]
    if not holding:
        return call_next(msg, ctxt)
    if len(holding) > 1:
        return _multi_record_error(msg, ConfigRecord)
    config = holding[0]

    try:
        received = (
            spec_from_wire(config, RECEIVED_PREFIX)
            if NoiseSpec.in_config(config, RECEIVED_PREFIX)
            else None
        )
        update = (
            spec_from_wire(config, UPDATE_PREFIX)
            if NoiseSpec.in_config(config, UPDATE_PREFIX)
            else None
        )
        server_round = server_round_of(config)
        client = client_key(msg, ctxt)
    except (TypeError, ValueError) as error:
        return _error_reply(msg, f"{_MOD_NAME}: {error}")
    received = received if received is not None and received.enabled else None
    update = update if update is not None and update.enabled else None

    added: dict[str, float | int] = {}
    if received is not None:
        failed = _add_noise_once(
            msg, msg, received, "received", client, server_round, added
        )
        if failed is not None:
            return failed

    out_msg = call_next(msg, ctxt)
    if out_msg.has_error():
        return out_msg

    if update is not None:
        failed = _add_noise_once(
            msg, out_msg, update, "update", client, server_round, added
        )
        if failed is not None:
            return failed

    return _add_metrics(msg, out_msg, added) if added else out_msg
