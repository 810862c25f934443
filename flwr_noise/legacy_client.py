"""NoisyNumPyClient: the server-sent local noise during a NumPyClient's ``fit``.

The client half of :mod:`flwr_noise.legacy` (which re-exports every name
here), and the legacy wire format of specs both halves share: legacy configs
carry only scalars, so the list entries of a spec travel as JSON strings.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from flwr.supercore import log

from flwr_noise.mod import add_noise_once, server_round_of, spec_from_wire
from flwr_noise.rounds import LOCAL_PREFIX, LOCAL_START_STEP_KEY, RECEIVED_PREFIX
from flwr_noise.spec import NoiseSpec
from flwr_noise.step_noise import StepNoise, noise_metrics
from flwr_noise.validation import check_integer, not_allowed

# A NumPyClient does not know its node id: the strategy sends each client the
# key of its noise streams beside the local spec.
CLIENT_KEY_CONFIG_KEY = "noise-client-key"
_WRAPPED_FIT_MARK = "__flwr_noise_local_noise__"


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
