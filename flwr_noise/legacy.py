"""Weight noise for Flower projects on the legacy strategy and NumPyClient API.

Server side, :class:`NoisyLegacyStrategy` (also importable as
``NoisyStrategy``) wraps any ``flwr.server.strategy.Strategy`` (FedAvg,
FedProx, FedAdam, ...)::

    strategy = NoisyLegacyStrategy(
        FedAvg(...),
        local=NoiseSpec(std=0.01, seed=0),
        aggregation=NoiseSpec(std=0.001, seed=0),
        array_names=list(model.state_dict()),  # optional, see below
    )

Client side, a ``NumPyClient`` becomes a :class:`NoisyNumPyClient` by
changing its base class and setting ``self.model``; its ``fit`` is left as it
is::

    class FlowerClient(NoisyNumPyClient):  # was: NumPyClient
        def __init__(self, model, trainloader, partition_id):
            self.model = model  # the torch.nn.Module that fit trains
            self.partition_id = partition_id  # stable noise stream (optional)
            self.trainloader = trainloader

        def fit(self, parameters, config):
            ...  # the usual training loop, any optimizer

The conventions are those of the Message-API :class:`flwr_noise.NoisyStrategy`:
the local spec travels in the fit config as flat entries under
``noise.local.``, the round under ``server-round``, and the metrics have the
same names. One difference: legacy configs carry only scalars, so the list
entries ``include`` / ``exclude`` travel as JSON strings
(:func:`spec_to_legacy_config`, :func:`spec_from_legacy_config`).

Legacy ``Parameters`` carry no array names. Include/exclude patterns of the
specs match ``arr_0``, ``arr_1``, ... unless the strategy is given
``array_names`` (e.g. ``list(model.state_dict())``, in the order in which the
client sends the arrays); with them, patterns can name layers, and
normalization statistics (names ending in ``running_mean``, ``running_var``,
``num_batches_tracked``) are never perturbed on the server.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.supercore import log

from flwr_noise.mod import add_noise_once, server_round_of, spec_from_wire
from flwr_noise.replies import ReplyView, array_signature, metric_kind
from flwr_noise.rounds import (
    LOCAL_PREFIX,
    LOCAL_START_STEP_KEY,
    RECEIVED_PREFIX,
    SERVER_ROUND_KEY,
    NoiseWrapper,
    measured_keys,
)
from flwr_noise.spec import NoiseSpec
from flwr_noise.step_noise import StepNoise, noise_metrics
from flwr_noise.validation import check_integer, not_allowed

# A NumPyClient does not know its node id: the strategy sends each client the
# key of its noise streams beside the local spec.
CLIENT_KEY_CONFIG_KEY = "noise-client-key"
# The only serialization the server can decode to add noise and check replies.
NUMPY_TENSOR_TYPE = "numpy.ndarray"
# Client-reported metrics that the strategy averages into the round's metrics.
_CLIENT_REPORTED_KEYS = measured_keys(("local",))
_WRAPPED_FIT_MARK = "__flwr_noise_local_noise__"

ClientKeyFn = Callable[[ClientProxy], int | str]


def _list_keys(prefix: str) -> list[str]:
    """Keys of the spec entries that ``NoiseSpec.to_config`` writes as lists."""
    defaults = NoiseSpec().to_config(prefix)
    return [key for key, value in defaults.items() if isinstance(value, list)]


def spec_to_legacy_config(
    spec: NoiseSpec, prefix: str = LOCAL_PREFIX
) -> dict[str, Scalar]:
    """Return a spec as flat entries of a legacy ``FitIns`` config.

    The legacy API only carries ``Scalar`` values (bool, bytes, float, int,
    str), so the list entries of :meth:`NoiseSpec.to_config` (``include``,
    ``exclude``) travel as JSON strings; everything else is unchanged.
    """
    return {
        key: json.dumps(value) if isinstance(value, list) else value
        for key, value in spec.to_config(prefix).items()
    }


def spec_from_legacy_config(
    config: Mapping[str, Any], prefix: str = LOCAL_PREFIX
) -> NoiseSpec:
    """Build a spec from the entries written by :func:`spec_to_legacy_config`.

    Raises
    ------
    ValueError
        If an entry is missing or invalid (including a list entry that is not
        a JSON list); the message names the full key.
    TypeError
        If an entry has the wrong type; the message names the full key.

    """
    record = dict(config)
    for key in _list_keys(prefix):
        value = record.get(key)
        if not isinstance(value, str):
            continue
        try:
            record[key] = json.loads(value)
        except json.JSONDecodeError:
            raise not_allowed(
                f"config[{key!r}]",
                value,
                "a JSON list of regular expressions, e.g. '[\"bias$\"]'",
            ) from None
    return spec_from_wire(record, prefix)


def _decode(parameters: Parameters, what: str) -> NDArrays:
    if parameters.tensor_type != NUMPY_TENSOR_TYPE:
        raise not_allowed(
            f"{what}.tensor_type",
            parameters.tensor_type,
            f"{NUMPY_TENSOR_TYPE!r} (flwr.common.ndarrays_to_parameters)",
        )
    return parameters_to_ndarrays(parameters)


def _checked_names(array_names: Iterable[str]) -> tuple[str, ...]:
    expected = "a sequence of distinct str (e.g. list(model.state_dict())) or None"
    if isinstance(array_names, str | bytes) or not isinstance(array_names, Iterable):
        raise not_allowed("array_names", array_names, expected, TypeError)
    names = tuple(array_names)
    if not all(isinstance(name, str) for name in names):
        raise not_allowed("array_names", array_names, expected, TypeError)
    if len(set(names)) != len(names):
        raise not_allowed("array_names", array_names, expected)
    return names


def _fit_res_view(
    client: ClientProxy,
    fit_res: FitRes,
    order: str,
    decode: Callable[[Parameters], Mapping[str, np.ndarray]],
) -> ReplyView:
    """Return what :class:`~flwr_noise.replies.ReplyScreen` checks of a FitRes."""
    metrics = fit_res.metrics if isinstance(fit_res.metrics, Mapping) else {}
    return ReplyView(
        node=client.cid,
        order=order,
        decode=lambda: decode(fit_res.parameters),
        weight=fit_res.num_examples,
        weight_label="num_examples",
        structure=tuple(
            sorted((str(key), metric_kind(value)) for key, value in metrics.items())
        ),
        problem=None
        if isinstance(fit_res.metrics, Mapping)
        else "its metrics are not a mapping",
    )


class NoisyLegacyStrategy(NoiseWrapper, Strategy):
    """Legacy-API strategy wrapper that injects weight noise into training.

    Wraps any ``flwr.server.strategy.Strategy`` and delegates everything to it;
    the noise is added around the wrapped ``configure_fit`` and
    ``aggregate_fit``. ``initialize_parameters`` and evaluation are delegated
    untouched. A spec that is ``None`` or disabled (``std == 0``) is off.
    Everything but the conversion to and from ``Parameters`` is shared with
    :class:`flwr_noise.NoisyStrategy` (:class:`flwr_noise.rounds.NoiseRounds`),
    whose docstring tells what each kind of noise does, what its schedule
    time counts, which replies are dropped and which metrics are nominal.

    Every ``FitIns`` config gets ``server-round`` (legacy strategies do not
    send it); with ``local`` on also the spec (flat entries under
    ``noise.local.``), ``noise.local.start-step`` when ``local_steps`` is
    given, and ``noise-client-key``, the client key of the receiving client,
    for a :class:`NoisyNumPyClient` that has no partition id; with
    ``received`` on, that spec under ``noise.received.``. Every client gets
    its own ``FitIns``: the wrapped strategy's configs and parameters are
    never modified.

    Replies: a ``FitRes`` that :class:`flwr_noise.replies.ReplyScreen`
    refuses (``num_examples`` is its weight) is dropped (removed from
    ``results``) with a WARNING naming the client, before the wrapped
    ``aggregate_fit`` runs; ``failures`` are passed through as they are. If
    the wrapped aggregation raises, or the model after aggregation noise is
    not finite, the round returns no parameters (Flower keeps the previous
    model) with ``round-failed = 1``.

    Metrics: when any spec is on (or a result was dropped, or the round
    failed), the round's fit metrics get ``noise-<kind>-sigma`` /
    ``noise-<kind>-l2`` for the kinds that are on; ``noise-local-sigma`` /
    ``noise-local-l2`` are the ``num_examples``-weighted mean of what the kept
    clients reported (kept when the wrapped strategy's metrics already have
    them), else the nominal sigma; and ``replies-received`` (FitRes
    received), ``replies-failed`` (``len(failures)``), ``replies-dropped``.
    The same values, per round, are in :attr:`round_noise`.

    Parameters
    ----------
    strategy : flwr.server.strategy.Strategy
        The strategy to wrap.
    local : NoiseSpec | None (default: None)
        Noise the clients add after every local optimizer step (see
        :class:`NoisyNumPyClient`).
    broadcast : NoiseSpec | None (default: None)
        Noise on each client's copy of the global model.
    aggregation : NoiseSpec | None (default: None)
        Noise on the aggregated model.
    received : NoiseSpec | None (default: None)
        Noise a client adds once to the model it receives.
    client_key_fn : Callable[[ClientProxy], int | str] | None (default: None)
        Maps a client to the client key of its broadcast stream (and of its
        local stream, if the client has no partition id); ``None`` uses
        ``client_proxy.cid``, which changes between runs: map it to something
        stable (e.g. a partition id) for broadcast noise reproducible across
        runs.
    array_names : Sequence[str] | None (default: None)
        Names of the arrays in ``Parameters``, in order, for the specs'
        ``include`` / ``exclude`` patterns; ``None`` names them ``arr_0``,
        ``arr_1``, ... . With a model's ``state_dict`` keys, normalization
        statistics are recognized by name and never perturbed.
    local_steps : int | None (default: None)
        Optimizer steps per client per round; needed for a ``local`` spec
        with ``schedule_unit="step"`` and a decaying schedule.

    Examples
    --------
    ::

        strategy = NoisyLegacyStrategy(
            FedAvg(min_fit_clients=2, min_available_clients=2),
            local=NoiseSpec(std=0.01, seed=0),
            aggregation=NoiseSpec(std=0.001, seed=0),
        )
        app = ServerApp(
            server_fn=lambda context: ServerAppComponents(
                strategy=strategy, config=ServerConfig(num_rounds=5)
            )
        )

    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        *,
        local: NoiseSpec | None = None,
        broadcast: NoiseSpec | None = None,
        aggregation: NoiseSpec | None = None,
        received: NoiseSpec | None = None,
        client_key_fn: ClientKeyFn | None = None,
        array_names: Sequence[str] | None = None,
        local_steps: int | None = None,
    ) -> None:
        super().__init__()
        self._wrap(
            strategy,
            (Strategy, "flwr.server.strategy.Strategy"),
            client_key_fn,
            "a callable ClientProxy -> int | str, or None",
            sender="client",
            local=local,
            broadcast=broadcast,
            aggregation=aggregation,
            update=None,
            received=received,
            local_steps=local_steps,
        )
        self.array_names: tuple[str, ...] | None = (
            None if array_names is None else _checked_names(array_names)
        )

    def client_key(self, client: ClientProxy) -> int | str:
        """Return the client key of the noise streams of ``client``."""
        if self.client_key_fn is None:
            return client.cid
        return self.client_key_fn(client)

    def _arrays(self, parameters: Parameters, what: str) -> dict[str, np.ndarray]:
        """Decode ``parameters`` (called ``what`` in errors) as name -> array.

        The names are ``array_names``, else ``arr_0``, ``arr_1``, ... .
        """
        arrays = _decode(parameters, what)
        if self.array_names is None:
            return {f"arr_{index}": array for index, array in enumerate(arrays)}
        if len(self.array_names) != len(arrays):
            raise ValueError(
                f"array_names has {len(self.array_names)} names but the "
                f"parameters hold {len(arrays)} arrays: expected one name per "
                "array, in order"
            )
        return dict(zip(self.array_names, arrays, strict=True))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Initialize the global model parameters (delegated)."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Configure the next round of training, with each client's noise."""
        instructions = self.strategy.configure_fit(
            server_round, parameters, client_manager
        )
        global_arrays = self._arrays(parameters, "parameters")
        self.core.start_round(
            server_round,
            array_signature(global_arrays),
            {client.cid: str for client, _ in instructions},
        )
        # Legacy strategies do not send the round; the clients need it.
        entries: dict[str, Scalar] = {
            SERVER_ROUND_KEY: server_round,
            **self.core.client_config(server_round, spec_to_legacy_config),
        }
        fit_parameters = [fit_ins.parameters for _, fit_ins in instructions]
        if self.broadcast is not None:
            copies = self.core.perturb_broadcast(
                server_round,
                [
                    (self.client_key(client), params)
                    for (client, _), params in zip(
                        instructions, fit_parameters, strict=True
                    )
                ],
                # Strategies share the global Parameters among the clients.
                lambda params: (
                    global_arrays
                    if params is parameters
                    else self._arrays(params, "FitIns")
                ),
            )
            fit_parameters = [
                ndarrays_to_parameters(list(copy.values())) for _, copy in copies
            ]
        configured: list[tuple[ClientProxy, FitIns]] = []
        for (client, fit_ins), params in zip(instructions, fit_parameters, strict=True):
            config = {**fit_ins.config, **entries}
            if self.local is not None:
                config[CLIENT_KEY_CONFIG_KEY] = self.client_key(client)
            configured.append((client, FitIns(params, config)))
        return configured

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate the valid results, then add the aggregation noise."""
        views = [
            _fit_res_view(
                client,
                fit_res,
                str(self.client_key(client)),
                lambda params: self._arrays(params, "FitRes"),
            )
            for client, fit_res in results
        ]
        failed = len(failures)
        kept = [
            results[index] for index in self.core.screen(server_round, views, failed)
        ]
        parameters, metrics = self.core.aggregate(
            server_round,
            lambda: self.strategy.aggregate_fit(server_round, kept, failures),
            lambda params: self._arrays(params, "aggregated parameters"),
            lambda noisy: ndarrays_to_parameters(list(noisy.values())),
        )
        if self.local is not None:
            self.core.log.average_reported(
                server_round,
                [(fit_res.num_examples, fit_res.metrics) for _, fit_res in kept],
                _CLIENT_REPORTED_KEYS,
            )
        merged = self.core.round_metrics(server_round, metrics, _CLIENT_REPORTED_KEYS)
        if merged is not None:
            return parameters, merged
        return parameters, {} if metrics is None else metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Configure the next round of evaluation (delegated)."""
        return self.strategy.configure_evaluate(
            server_round, parameters, client_manager
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Aggregate evaluation results (delegated)."""
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate the global model on the server (delegated)."""
        return self.strategy.evaluate(server_round, parameters)


NoisyStrategy = NoisyLegacyStrategy


def _with_metrics(result: Any, added: Mapping[str, float | int]) -> Any:
    """Return a ``fit`` result with ``added`` in its metrics (if it has any)."""
    if added and isinstance(result, tuple) and len(result) == 3:
        new_parameters, num_examples, metrics = result
        if isinstance(metrics, dict):
            return new_parameters, num_examples, {**metrics, **added}
    return result


def _state_arrays(model: Any) -> list[np.ndarray] | None:
    if not isinstance(model, torch.nn.Module):
        return None
    return [
        value.detach().cpu().numpy().copy() for value in model.state_dict().values()
    ]


def _without_pending_draw(
    result: Any, with_pending: list[np.ndarray], model: torch.nn.Module
) -> Any:
    """Return ``fit``'s result without the anticorrelated draw it was taken with.

    ``fit`` usually returns the model's ``state_dict`` arrays, taken while the
    last draw was still in the weights; leaving the session removed it from the
    model. A returned array equal to the model's array of the same position
    before that removal is replaced by the array after it.
    """
    clean = _state_arrays(model)
    if clean is None or not (isinstance(result, tuple) and len(result) == 3):
        return result
    returned, num_examples, metrics = result
    if not isinstance(returned, list):
        return result
    cleaned = list(returned)
    for index, (pending, after) in enumerate(zip(with_pending, clean, strict=True)):
        if index >= len(cleaned):
            break
        array = cleaned[index]
        if (
            isinstance(array, np.ndarray)
            and array.shape == pending.shape
            and np.array_equal(array, pending)
        ):
            cleaned[index] = after.astype(array.dtype, copy=False)
    return cleaned, num_examples, metrics


def _fit_with_local_noise(fit: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``NumPyClient.fit`` so that it trains with the server's noise."""

    @functools.wraps(fit)
    def fit_with_local_noise(
        self: NoisyNumPyClient, parameters: NDArrays, config: dict[str, Scalar]
    ) -> Any:
        # A subclass's fit calling super().fit() is already inside a session.
        if self._local_noise_active:
            return fit(self, parameters, config)
        parameters, added = self._received_noise(parameters, config)
        spec = (
            spec_from_legacy_config(config)
            if NoiseSpec.in_config(config, LOCAL_PREFIX)
            else None
        )
        if spec is None or not spec.enabled:
            return _with_metrics(fit(self, parameters, config), added)
        server_round = server_round_of(config)
        step_noise = StepNoise(
            lambda: self.model,
            spec,
            client=self._noise_client_key(config),
            server_round=server_round,
            start_step=self._local_start_step(config, server_round),
            model_label=f"{type(self).__name__}.model",
        )
        anticorrelated = getattr(spec, "correlation", None) == "anticorrelated"
        self._local_noise_active = True
        try:
            with step_noise:
                result = fit(self, parameters, config)
                with_pending = _state_arrays(self.model) if anticorrelated else None
        finally:
            self._local_noise_active = False
        if with_pending is not None:
            result = _without_pending_draw(result, with_pending, self.model)
        if step_noise.report().applications == 0:
            log(
                WARNING,
                "%s.fit: no optimizer stepped the parameters of self.model, so no "
                "local noise was added",
                type(self).__name__,
            )
        return _with_metrics(result, {**added, **step_noise.metrics()})

    setattr(fit_with_local_noise, _WRAPPED_FIT_MARK, True)
    return fit_with_local_noise


class NoisyNumPyClient(NumPyClient):
    """A ``NumPyClient`` whose ``fit`` trains with the server-sent local noise.

    To adopt it, change a client's base class from ``NumPyClient`` to
    ``NoisyNumPyClient`` and set ``self.model`` to the ``torch.nn.Module``
    that ``fit`` trains; ``fit`` itself stays as it is. When the fit config
    holds a local spec (sent by :class:`NoisyLegacyStrategy` under
    ``noise.local.``), every optimizer step on the model's parameters during
    ``fit`` is followed by one application of the noise
    (:class:`flwr_noise.WeightNoise`), whatever optimizer and training loop
    ``fit`` uses: a global optimizer step hook is registered for the duration
    of ``fit`` only and acts only on optimizers that hold parameters of
    ``self.model``. The fit metrics then get ``noise-local-sigma`` (the last
    application's sigma), ``noise-local-l2`` (L2 norm of all the noise added)
    and ``noise-local-applications``. Without a spec, or with a disabled one,
    ``fit`` runs unchanged. A ``received`` spec (under ``noise.received.``)
    is added once to the ``parameters`` that ``fit`` gets (arrays named after
    ``self.model.state_dict()`` when the counts match, else ``arr_<i>``), and
    reported as ``noise-received-sigma``, ``-l2``, ``-applications``. The
    local ``"step"`` schedule starts at the ``noise.local.start-step`` the
    server sends, else at ``(server_round - 1) * local_steps``.

    This works by wrapping the ``fit`` that a subclass defines when the
    subclass is created; ``evaluate`` and the other methods are untouched.

    Client key of the noise stream: ``partition_id`` when set (stable across
    runs), else the ``noise-client-key`` the strategy sent (its
    ``client_key_fn``, by default the client's cid, which changes between
    runs).

    Parameters
    ----------
    model : torch.nn.Module | None (default: None)
        The model ``fit`` trains; may also be assigned to ``self.model``
        directly (e.g. without calling this constructor), at the latest in
        ``fit`` before the first optimizer step.
    partition_id : int | str | None (default: None)
        This client's partition id, e.g. ``context.node_config["partition-id"]``;
        also settable as ``self.partition_id``.
    local_steps : int | None (default: None)
        Optimizer steps per round. With it a ``"step"`` noise schedule
        continues across rounds (``start_step = (server_round - 1) *
        local_steps``); without it the schedule restarts every round, because
        a ``NumPyClient`` keeps no state between rounds.

    Examples
    --------
    ::

        class FlowerClient(NoisyNumPyClient):
            def __init__(self, model, trainloader, partition_id):
                super().__init__(model, partition_id=partition_id)
                self.trainloader = trainloader

            def fit(self, parameters, config):
                set_weights(self.model, parameters)
                train(self.model, self.trainloader)  # builds its own optimizer
                return get_weights(self.model), len(self.trainloader.dataset), {}


        def client_fn(context):
            partition_id = context.node_config["partition-id"]
            client = FlowerClient(Net(), load_data(partition_id), partition_id)
            return client.to_client()

    """

    model: torch.nn.Module | None = None
    partition_id: int | str | None = None
    local_steps: int | None = None
    _local_noise_active: bool = False

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        partition_id: int | str | None = None,
        local_steps: int | None = None,
    ) -> None:
        super().__init__()
        if model is not None and not isinstance(model, torch.nn.Module):
            raise not_allowed("model", model, "a torch.nn.Module or None", TypeError)
        if local_steps is not None:
            local_steps = check_integer("local_steps", local_steps, low=1)
        # Only assign what was given: a subclass may have set them already.
        if model is not None:
            self.model = model
        if partition_id is not None:
            self.partition_id = partition_id
        if local_steps is not None:
            self.local_steps = local_steps

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap the ``fit`` a subclass defines so that it applies the local noise."""
        super().__init_subclass__(**kwargs)
        fit = cls.__dict__.get("fit")
        if callable(fit) and not getattr(fit, _WRAPPED_FIT_MARK, False):
            cls.fit = _fit_with_local_noise(fit)  # type: ignore[method-assign]

    def _received_noise(
        self, parameters: NDArrays, config: Mapping[str, Any]
    ) -> tuple[NDArrays, dict[str, float | int]]:
        """Return ``parameters`` with the server's ``received`` noise, and its metrics.

        Arrays are named after ``self.model.state_dict()`` when it has one
        entry per array (as the strategy's ``array_names``), else ``arr_0``,
        ``arr_1``, ... .
        """
        if not NoiseSpec.in_config(config, RECEIVED_PREFIX):
            return parameters, {}
        spec = spec_from_legacy_config(config, RECEIVED_PREFIX)
        if not spec.enabled:
            return parameters, {}
        names = [f"arr_{index}" for index in range(len(parameters))]
        if isinstance(self.model, torch.nn.Module):
            state_names = list(self.model.state_dict())
            if len(state_names) == len(parameters):
                names = state_names
        perturbed, report = add_noise_once(
            dict(zip(names, parameters, strict=True)),
            spec,
            kind="received",
            client=self._noise_client_key(config),
            server_round=server_round_of(config),
        )
        return list(perturbed.values()), noise_metrics(report, "noise-received")

    def _local_start_step(self, config: Mapping[str, Any], server_round: int) -> int:
        """Return the schedule time of this round's first local step."""
        if LOCAL_START_STEP_KEY in config:
            return check_integer(
                f"config[{LOCAL_START_STEP_KEY!r}]", config[LOCAL_START_STEP_KEY], low=0
            )
        return max(server_round - 1, 0) * (self.local_steps or 0)

    def _noise_client_key(self, config: Mapping[str, Any]) -> int | str:
        if self.partition_id is not None:
            return self.partition_id
        if CLIENT_KEY_CONFIG_KEY in config:
            return config[CLIENT_KEY_CONFIG_KEY]
        raise ValueError(
            f"{type(self).__name__} has no client key for its noise stream: set "
            "partition_id (e.g. context.node_config['partition-id']) or let "
            f"NoisyLegacyStrategy send {CLIENT_KEY_CONFIG_KEY!r} in the fit config"
        )
