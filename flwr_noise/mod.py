"""ClientApp side of the server-driven noise: a Flower mod and helpers.

:class:`flwr_noise.NoisyStrategy` sends the ``local`` spec to the clients in
every train message (ConfigRecord entries under ``noise.local.``) and the
``update`` spec under ``noise.update.``. Two ways to apply them:

- in your own training loop, one line per round::

      noise = weight_noise_from_message(model, msg, context)
      if noise is not None:
          noise.attach(optimizer)  # noise after every optimizer step

- without touching the training function: ``ClientApp(mods=[weight_noise_mod])``
  adds the local spec once to the received model and the update spec to the
  model sent back.
"""

from __future__ import annotations

import numbers
from logging import ERROR, INFO

import torch
from flwr.app import (
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
from flwr_noise.sampling import NoiseReport
from flwr_noise.seeding import numpy_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.strategy import (
    LOCAL_PREFIX,
    SERVER_ROUND_KEY,
    UPDATE_PREFIX,
    noise_metric_prefix,
    perturb_array_record,
)

# The node config key of the client's partition: the stable client key.
PARTITION_ID_KEY = "partition-id"
# Key of the MetricRecord the mod creates when the reply has none.
DEFAULT_METRICS_KEY = "metrics"
_MOD_NAME = "weight_noise_mod"


def noise_metrics(report: NoiseReport, prefix: str = "noise-local") -> dict[str, float]:
    """Return a noise report as entries for a reply's ``MetricRecord``.

    Parameters
    ----------
    report : NoiseReport
        E.g. ``WeightNoise.report()`` after local training.
    prefix : str (default: "noise-local")
        Key prefix: ``"noise-local"`` gives ``noise-local-sigma``,
        ``noise-local-l2`` and ``noise-local-applications``.

    Returns
    -------
    dict[str, float]
        ``{prefix-sigma: sigma of the last application, prefix-l2: L2 norm of
        all the noise added, prefix-applications: number of applications}``.

    Examples
    --------
    ::

        metrics = MetricRecord({"num-examples": n, **noise_metrics(noise.report())})

    """
    if not isinstance(report, NoiseReport):
        raise TypeError(
            f"report={report!r} is not allowed: expected a flwr_noise.NoiseReport"
        )
    return {
        f"{prefix}-sigma": float(report.sigma),
        f"{prefix}-l2": float(report.l2_norm),
        f"{prefix}-applications": float(report.applications),
    }


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
        if isinstance(partition_id, str) or (
            isinstance(partition_id, numbers.Integral)
            and not isinstance(partition_id, bool)
        ):
            return partition_id
        raise TypeError(
            f"node_config[{PARTITION_ID_KEY!r}]={partition_id!r} is not allowed: "
            "expected an int >= 0 or a str"
        )
    return msg.metadata.dst_node_id


def server_round_of(config: ConfigRecord) -> int:
    """Return the round a train config carries under ``server-round``."""
    server_round = config.get(SERVER_ROUND_KEY)
    if (
        not isinstance(server_round, numbers.Integral)
        or isinstance(server_round, bool)
        or server_round < 0
    ):
        raise ValueError(
            f"ConfigRecord[{SERVER_ROUND_KEY!r}]={server_round!r} is not allowed: "
            "expected the round as an int >= 0 beside the noise spec (Flower's "
            "strategies and NoisyStrategy put it there)"
        )
    return int(server_round)


def _config_holding_spec(msg: Message, prefix: str) -> ConfigRecord | None:
    holding = [
        config
        for config in msg.content.config_records.values()
        if NoiseSpec.in_config(config, prefix)
    ]
    if len(holding) > 1:
        raise ValueError(
            f"the message holds {len(holding)} ConfigRecords with a noise spec "
            f"under prefix {prefix!r}: expected at most one"
        )
    return holding[0] if holding else None


def weight_noise_from_message(
    model: torch.nn.Module,
    msg: Message,
    context: Context | None = None,
    *,
    prefix: str = LOCAL_PREFIX,
    start_step: int = 0,
) -> WeightNoise | None:
    """Build the :class:`WeightNoise` for the local spec the server sent.

    Per-step local noise in your own training loop is then::

        noise = weight_noise_from_message(model, msg, context)
        if noise is not None:
            noise.attach(optimizer)

    Build it after the model is on its device and holds the received weights.
    Do not combine it with ``weight_noise_mod`` for the same spec: the mod
    applies the local spec itself and removes it from the config the training
    function sees, so this function then returns ``None``.

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
    start_step : int (default: 0)
        Optimizer steps taken in earlier rounds, e.g.
        ``(server_round - 1) * local_steps``, so that a ``"step"`` schedule
        continues across rounds (a ClientApp keeps no state between rounds).

    Returns
    -------
    WeightNoise | None
        ``None`` if the message carries no spec under ``prefix`` or the spec
        is disabled, else a ``WeightNoise`` on the stream of (seed, client key,
        ``server-round``, ``"local"``).

    Raises
    ------
    ValueError
        If the spec's entries are incomplete or invalid, or ``server-round``
        is missing.

    """
    config = _config_holding_spec(msg, prefix)
    if config is None:
        return None
    spec = NoiseSpec.from_config(config, prefix)
    if not spec.enabled:
        return None
    return WeightNoise(
        model,
        spec,
        client=client_key(msg, context),
        server_round=server_round_of(config),
        start_step=start_step,
        purpose="local",
    )


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
    count = sum(isinstance(record, record_type) for record in content.values())
    return _error_reply(
        msg,
        f"{_MOD_NAME} expects exactly one {record_type.__name__}, but found "
        f"{count} {record_type.__name__}(s).",
    )


def _perturb_single_array_record(
    msg: Message, spec: NoiseSpec, client: int | str, server_round: int, purpose: str
) -> NoiseReport:
    """Replace the message's only ArrayRecord by a perturbed copy."""
    key, record = next(iter(msg.content.array_records.items()))
    rng = numpy_generator(
        spec.seed, client=client, server_round=server_round, purpose=purpose
    )
    # Applied once per round: schedule time server_round - 1, whatever the unit.
    sigma = spec.sigma_at(max(server_round - 1, 0))
    msg.content[key], report = perturb_array_record(record, spec, sigma, rng)
    log(
        INFO,
        "%s: %s noise (sigma %.4g, L2 norm %.4g) added",
        _MOD_NAME,
        purpose,
        sigma,
        report.l2_norm,
    )
    return report


# pylint: disable=too-many-return-statements
def weight_noise_mod(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Client mod that applies the noise :class:`NoisyStrategy` sends.

    It operates on messages of type ``MessageType.TRAIN`` (and
    ``"train.<action>"``); evaluate and query messages pass through untouched.
    On a train message whose ConfigRecord holds

    - a local spec (``noise.local.*``): adds it once to the received
      ArrayRecord (stream purpose ``"mod-received"``) and removes the
      ``noise.local.*`` entries from the ConfigRecord before calling the inner
      app, so a training function that builds its own ``WeightNoise`` from
      the message (:func:`weight_noise_from_message`) does not add it twice;
    - an update spec (``noise.update.*``): adds it to the ArrayRecord of the
      inner app's reply (purpose ``"mod-update"``), unless the reply is an
      error.

    Both are applied once per round, with schedule time ``server_round - 1``.
    What was added goes into the reply's MetricRecord: ``noise-received-sigma``,
    ``noise-received-l2``, ``noise-update-sigma``, ``noise-update-l2``, ... .
    The client key is ``node_config["partition-id"]`` when present, else the
    node id. A train message with several ArrayRecords or ConfigRecords, or an
    invalid spec, gets an error reply (``MOD_FAILED_PRECONDITION``).

    Examples
    --------
    ::

        app = ClientApp(mods=[weight_noise_mod])

    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if len(msg.content.array_records) > 1:
        return _multi_record_error(msg, ArrayRecord)
    if len(msg.content.config_records) > 1:
        return _multi_record_error(msg, ConfigRecord)
    if not msg.content.config_records:
        return call_next(msg, ctxt)
    config_key, config = next(iter(msg.content.config_records.items()))
    has_local = NoiseSpec.in_config(config, LOCAL_PREFIX)
    has_update = NoiseSpec.in_config(config, UPDATE_PREFIX)
    if not (has_local or has_update):
        return call_next(msg, ctxt)

    try:
        local = NoiseSpec.from_config(config, LOCAL_PREFIX) if has_local else None
        update = NoiseSpec.from_config(config, UPDATE_PREFIX) if has_update else None
        server_round = server_round_of(config)
        client = client_key(msg, ctxt)
    except (TypeError, ValueError) as error:
        return _error_reply(msg, f"{_MOD_NAME}: {error}")
    local = local if local is not None and local.enabled else None
    update = update if update is not None and update.enabled else None
    if local is not None and len(msg.content.array_records) != 1:
        return _multi_record_error(msg, ArrayRecord)

    if has_local:
        msg.content[config_key] = ConfigRecord(
            {k: v for k, v in config.items() if not k.startswith(LOCAL_PREFIX)}
        )
    added_metrics: dict[str, float] = {}
    if local is not None:
        report = _perturb_single_array_record(
            msg, local, client, server_round, "mod-received"
        )
        added_metrics.update(noise_metrics(report, noise_metric_prefix("received")))

    out_msg = call_next(msg, ctxt)
    if out_msg.has_error():
        return out_msg

    if update is not None:
        if len(out_msg.content.array_records) != 1:
            return _multi_record_error(msg, ArrayRecord, out_msg)
        report = _perturb_single_array_record(
            out_msg, update, client, server_round, "mod-update"
        )
        added_metrics.update(noise_metrics(report, noise_metric_prefix("update")))

    if added_metrics:
        metric_records = out_msg.content.metric_records
        if len(metric_records) > 1:
            return _multi_record_error(msg, MetricRecord, out_msg)
        if metric_records:
            next(iter(metric_records.values())).update(added_metrics)
        else:
            out_msg.content[DEFAULT_METRICS_KEY] = MetricRecord(added_metrics)
    return out_msg
