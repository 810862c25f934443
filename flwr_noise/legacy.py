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

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
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

from flwr_noise.legacy_client import (
    CLIENT_KEY_CONFIG_KEY,
    NoisyNumPyClient,
    spec_from_legacy_config,
    spec_to_legacy_config,
)
from flwr_noise.replies import ReplyView, array_signature, metric_kind
from flwr_noise.rounds import (
    SERVER_ROUND_KEY,
    NoiseWrapper,
    measured_keys,
)
from flwr_noise.spec import NoiseSpec
from flwr_noise.validation import not_allowed

__all__ = [
    "CLIENT_KEY_CONFIG_KEY",
    "NUMPY_TENSOR_TYPE",
    "NoisyLegacyStrategy",
    "NoisyNumPyClient",
    "NoisyStrategy",
    "spec_from_legacy_config",
    "spec_to_legacy_config",
]

# The only serialization the server can decode to add noise and check replies.
NUMPY_TENSOR_TYPE = "numpy.ndarray"
# Client-reported metrics that the strategy averages into the round's metrics.
_CLIENT_REPORTED_KEYS = measured_keys(("local",))

ClientKeyFn = Callable[[ClientProxy], int | str]


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

    _name = "NoisyLegacyStrategy"

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
