"""The numpy-level core behind both strategy wrappers.

:class:`NoiseRounds` holds what :class:`flwr_noise.NoisyStrategy` (Message
API) and :class:`flwr_noise.legacy.NoisyLegacyStrategy` have in common: the
specs and their checks, the entries sent to the clients, broadcast and
aggregation noise on name -> ``np.ndarray`` mappings, the guard around the
wrapped aggregation and the round's metrics; the screening of replies is
:class:`flwr_noise.replies.ReplyScreen`. :class:`NoiseWrapper` is the
wrappers' common base. The wrappers only convert between their API's types
(``ArrayRecord`` and ``Message``, ``Parameters`` and ``FitRes``) and
:class:`~flwr_noise.replies.ReplyView` / numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, TypeVar

import numpy as np
from flwr.supercore import log

from flwr_noise.replies import ArraySignature, ReplyScreen, ReplyView, first_non_finite
from flwr_noise.sampling import NoiseReport, perturb_arrays
from flwr_noise.seeding import AGGREGATE_CLIENT, numpy_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.validation import check_integer, is_real, not_allowed

LOCAL_PREFIX = "noise.local."
UPDATE_PREFIX = "noise.update."
# Noise added once to the model a client receives (weight_noise_mod).
RECEIVED_PREFIX = "noise.received."
# The schedule time of this round's first local step, (server_round - 1) *
# local_steps, so that a client continues a decaying schedule without arithmetic.
LOCAL_START_STEP_KEY = "noise.local.start-step"
# Flower's strategies put the round into the train config under this key.
SERVER_ROUND_KEY = "server-round"

REPLIES_RECEIVED_KEY = "replies-received"
REPLIES_FAILED_KEY = "replies-failed"
REPLIES_DROPPED_KEY = "replies-dropped"
# 1 in a round whose aggregation raised or gave a non-finite model.
ROUND_FAILED_KEY = "round-failed"

# Specs the clients apply, by the config prefix they travel under.
CLIENT_KINDS = {
    "local": LOCAL_PREFIX,
    "update": UPDATE_PREFIX,
    "received": RECEIVED_PREFIX,
}
# Kinds applied once per round: their schedule time is server_round - 1.
ONCE_PER_ROUND_KINDS = ("broadcast", "aggregation", "update", "received")

Source = TypeVar("Source")


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


def measured_keys(kinds: Iterable[str]) -> tuple[str, ...]:
    """Return the sigma and L2 keys that clients measure for these kinds."""
    return tuple(
        noise_metric_key(kind, quantity)
        for kind in kinds
        for quantity in ("sigma", "l2")
    )


def enabled_or_none(name: str, spec: NoiseSpec | None) -> NoiseSpec | None:
    """Check a wrapper's spec argument; ``None`` when it is absent or off."""
    if spec is None:
        return None
    if not isinstance(spec, NoiseSpec):
        raise not_allowed(name, spec, "a flwr_noise.NoiseSpec or None", TypeError)
    return spec if spec.enabled else None


def checked_local_steps(local_steps: Any, local: NoiseSpec | None) -> int | None:
    """Return ``local_steps`` (an int >= 1 or None), which ``local`` may need.

    Raises
    ------
    ValueError
        If a ``local`` spec with ``schedule_unit="step"`` and a decaying
        schedule comes without ``local_steps`` (the server could not tell a
        client where its schedule continues).

    """
    if local_steps is not None:
        return check_integer("local_steps", local_steps, low=1)
    if (
        local is not None
        and local.schedule_unit == "step"
        and local.schedule != "constant"
    ):
        raise not_allowed(
            "local_steps",
            None,
            "an int >= 1 with a local spec whose schedule "
            f"{local.schedule!r} counts steps (schedule_unit='step'): the "
            "server sends each round's start step; or schedule_unit='round'",
        )
    return None


def weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """Return the mean of ``(weight, value)`` pairs (unweighted if no weight)."""
    total = sum(weight for weight, _ in pairs)
    if total <= 0:
        return float(np.mean([value for _, value in pairs]))
    return sum(weight * value for weight, value in pairs) / total


def perturb_once(
    arrays: Mapping[str, np.ndarray],
    spec: NoiseSpec,
    *,
    client: int | str,
    server_round: int,
    purpose: str,
) -> tuple[dict[str, np.ndarray], NoiseReport]:
    """Return ``arrays`` plus one draw of a once-per-round spec, and its report.

    The draw comes from the stream of (``spec.seed``, ``client``,
    ``server_round``, ``purpose``) at schedule time ``server_round - 1``.
    """
    rng = numpy_generator(
        spec.seed, client=client, server_round=server_round, purpose=purpose
    )
    return perturb_arrays(arrays, spec, spec.sigma_at(server_round - 1), rng)


def broadcast_copies(
    spec: NoiseSpec,
    server_round: int,
    targets: Sequence[tuple[int | str, Source]],
    decode: Callable[[Source], Mapping[str, np.ndarray]],
) -> tuple[list[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]], float]:
    """Return each client's decoded model and own perturbed copy; the mean L2 norm.

    ``targets`` holds (client key, the model sent to it); a model that several
    clients share (one object) is decoded once. Arrays that got no noise are
    the decoded ones.
    """
    decoded: dict[int, Mapping[str, np.ndarray]] = {}
    pairs, norms = [], []
    for client, source in targets:
        if id(source) not in decoded:
            decoded[id(source)] = decode(source)
        arrays = decoded[id(source)]
        perturbed, report = perturb_once(
            arrays, spec, client=client, server_round=server_round, purpose="broadcast"
        )
        pairs.append((arrays, perturbed))
        norms.append(report.l2_norm)
    return pairs, float(np.mean(norms)) if norms else 0.0


class RoundLog:
    """Per round: the noise injected, what became of the replies, failures.

    Parameters
    ----------
    owner : str
        The wrapper's name, for logs.

    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        # Per round: what was injected and what happened to the replies.
        self.noise: dict[int, dict[str, float]] = {}
        # Per failed round: why (the aggregation raised, a non-finite model).
        self.failures: dict[int, str] = {}

    def record(self, server_round: int, entries: Mapping[str, float]) -> None:
        """Add metric entries to a round's."""
        self.noise.setdefault(server_round, {}).update(entries)

    def injected(self, server_round: int, kind: str, sigma: float, l2: float) -> None:
        """Record the sigma and L2 norm of noise the server added."""
        self.record(
            server_round,
            {noise_metric_key(kind, "sigma"): sigma, noise_metric_key(kind, "l2"): l2},
        )

    def fail(self, server_round: int, reason: str) -> None:
        """Mark a round failed (the previous model is kept), with a WARNING."""
        log(WARNING, "%s: round %s failed: %s", self.owner, server_round, reason)
        self.failures[server_round] = reason
        self.record(server_round, {ROUND_FAILED_KEY: 1})

    def average_reported(
        self,
        server_round: int,
        replies: Iterable[tuple[float, Mapping[str, Any]]],
        keys: Sequence[str],
    ) -> None:
        """Record the weighted mean of what the clients measured, per key.

        ``replies`` holds (weight, metrics) of the kept replies; a key no
        reply reports as a number keeps the server's nominal value.
        """
        replies = list(replies)
        for key in keys:
            reported = [
                (weight, float(metrics[key]))
                for weight, metrics in replies
                if is_real(metrics.get(key))
            ]
            if reported:
                self.record(server_round, {key: weighted_mean(reported)})

    def metrics(
        self,
        server_round: int,
        metrics: Mapping[str, Any] | None,
        client_reported: Sequence[str],
        active: bool,
    ) -> dict[str, Any] | None:
        """Return the wrapped strategy's metrics plus the round's entries.

        Entries in ``client_reported`` that the wrapped metrics already hold
        (measured by the clients) win over the server's nominal ones. With
        no noise ``active``, no reply dropped or failed and the round ok:
        ``None`` (the wrapped strategy's metrics stand as they are).
        """
        info = self.noise.get(server_round, {})
        eventful = info.get(REPLIES_DROPPED_KEY) or info.get(REPLIES_FAILED_KEY)
        if not active and not eventful and ROUND_FAILED_KEY not in info:
            return None
        merged = dict(metrics or {})
        for key, value in info.items():
            if key in client_reported and key in merged:
                continue
            merged[key] = value if isinstance(value, int) else float(value)
        return merged


class NoiseRounds:
    """Specs, server-side noise and round bookkeeping of one wrapper.

    Parameters
    ----------
    owner : str
        The wrapper's name, for logs (``"NoisyStrategy"``).
    sender : str (default: "node")
        What logs call the sender of a reply (see :class:`ReplyScreen`).
    local, broadcast, aggregation, update, received : NoiseSpec | None
        The wrapper's specs (see :class:`flwr_noise.NoisyStrategy`).
    local_steps : int | None
        Optimizer steps per client per round (see :func:`checked_local_steps`).

    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        owner: str,
        *,
        sender: str = "node",
        local: NoiseSpec | None,
        broadcast: NoiseSpec | None,
        aggregation: NoiseSpec | None,
        update: NoiseSpec | None,
        received: NoiseSpec | None,
        local_steps: int | None,
    ) -> None:
        self.owner = owner
        self.specs: dict[str, NoiseSpec | None] = {
            "local": enabled_or_none("local", local),
            "broadcast": enabled_or_none("broadcast", broadcast),
            "aggregation": enabled_or_none("aggregation", aggregation),
            "update": enabled_or_none("update", update),
            "received": enabled_or_none("received", received),
        }
        self.local_steps = checked_local_steps(local_steps, self.specs["local"])
        self.replies = ReplyScreen(owner, sender)
        self.log = RoundLog(owner)

    @property
    def active(self) -> bool:
        """Whether any noise is on."""
        return any(spec is not None for spec in self.specs.values())

    def summary(self) -> None:
        """Log the specs."""
        log(INFO, "\t├──> Noise (flwr-noise):")
        for kind, spec in self.specs.items():
            log(INFO, "\t│\t├── %s: %s", kind, spec or "off")

    def sigma(self, kind: str, server_round: int) -> float | None:
        """Return the nominal sigma of one kind at the start of a round."""
        spec = self.specs[kind]
        if spec is None:
            return None
        if kind in ONCE_PER_ROUND_KINDS or spec.schedule_unit == "round":
            return spec.sigma_at(server_round - 1)
        if spec.schedule == "constant":
            return spec.std
        assert self.local_steps is not None
        return spec.sigma_at((server_round - 1) * self.local_steps)

    def client_config(
        self,
        server_round: int,
        encode: Callable[[NoiseSpec, str], Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Return the config entries of the specs the clients apply.

        ``encode(spec, prefix)`` writes one spec (e.g. ``NoiseSpec.to_config``).
        With any client spec on, the round and, for ``local`` with
        ``local_steps``, the round's first step come with them.
        """
        entries: dict[str, Any] = {}
        for kind, prefix in CLIENT_KINDS.items():
            spec = self.specs[kind]
            if spec is not None:
                entries.update(encode(spec, prefix))
        if not entries:
            return {}
        entries[SERVER_ROUND_KEY] = server_round
        if self.specs["local"] is not None and self.local_steps is not None:
            entries[LOCAL_START_STEP_KEY] = (server_round - 1) * self.local_steps
        return entries

    def start_round(
        self,
        server_round: int,
        sent: ArraySignature,
        asked: Mapping[int | str, Callable[[], str]],
    ) -> None:
        """Record what a round sends (:meth:`ReplyScreen.expect`) and its sigmas."""
        self.replies.expect(server_round, sent, asked)
        self.log.noise[server_round] = {
            noise_metric_key(kind, "sigma"): sigma
            for kind in CLIENT_KINDS
            if (sigma := self.sigma(kind, server_round)) is not None
        }

    def perturb_broadcast(
        self,
        server_round: int,
        targets: Sequence[tuple[int | str, Source]],
        decode: Callable[[Source], Mapping[str, np.ndarray]],
    ) -> list[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]]:
        """Return :func:`broadcast_copies` of the broadcast spec; record the noise."""
        spec = self.specs["broadcast"]
        assert spec is not None
        pairs, mean_l2 = broadcast_copies(spec, server_round, targets, decode)
        sigma = self.sigma("broadcast", server_round)
        assert sigma is not None
        self.log.injected(server_round, "broadcast", sigma, mean_l2)
        return pairs

    def screen(
        self,
        server_round: int,
        views: Sequence[ReplyView | None],
        failed: int | None = None,
    ) -> list[int]:
        """Return the indices of the replies to aggregate (see :class:`ReplyScreen`).

        ``failed`` counts the error replies when they are not among ``views``
        (as ``None``).
        """
        dropped = self.replies.screen(server_round, views)
        if failed is None:
            failed = sum(view is None for view in views)
        self.log.record(
            server_round,
            {
                REPLIES_RECEIVED_KEY: len(views),
                REPLIES_FAILED_KEY: failed,
                REPLIES_DROPPED_KEY: len(dropped),
            },
        )
        return [index for index in range(len(views)) if index not in dropped]

    def aggregate(
        self,
        server_round: int,
        aggregate_fn: Callable[[], tuple[Any, Any]],
        decode: Callable[[Any], Mapping[str, np.ndarray]],
        encode: Callable[[dict[str, np.ndarray]], Any],
    ) -> tuple[Any, Any]:
        """Run the wrapped aggregation and add the aggregation noise; never fail.

        ``aggregate_fn`` is the wrapped strategy's aggregation, returning
        ``(arrays or None, metrics)``; ``decode`` gives its arrays as name ->
        ndarray and ``encode`` turns the noisy aggregate back into the API's
        type. Where aggregation raises or the model (after the noise) is not
        finite, the round is marked failed and the arrays are ``None``.
        """
        try:
            arrays, metrics = aggregate_fn()
            if arrays is None:
                return None, metrics
            decoded = dict(decode(arrays))
        except Exception as error:  # pylint: disable=broad-except
            reason = f"aggregation raised {type(error).__name__}: {error}"
            self.log.fail(server_round, reason)
            return None, None
        spec = self.specs["aggregation"]
        if spec is not None:
            decoded = self._add_aggregation_noise(server_round, spec, decoded)
        name = first_non_finite(decoded)
        if name is not None:
            self.log.fail(
                server_round,
                f"the aggregated model is not finite (array {name!r}); the "
                "previous model is kept",
            )
            return None, metrics
        return (arrays if spec is None else encode(decoded)), metrics

    def _add_aggregation_noise(
        self, server_round: int, spec: NoiseSpec, arrays: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        # A huge aggregate may overflow: first_non_finite then fails the round.
        with np.errstate(over="ignore", invalid="ignore"):
            noisy, report = perturb_once(
                arrays,
                spec,
                client=AGGREGATE_CLIENT,
                server_round=server_round,
                purpose="aggregation",
            )
        sigma = self.sigma("aggregation", server_round)
        assert sigma is not None
        log(
            INFO,
            "%s: aggregation noise (sigma %.4g, L2 norm %.4g) added",
            self.owner,
            sigma,
            report.l2_norm,
        )
        self.log.injected(server_round, "aggregation", sigma, report.l2_norm)
        return noisy

    def round_metrics(
        self,
        server_round: int,
        metrics: Mapping[str, Any] | None,
        client_reported: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """Return :meth:`RoundLog.metrics` of a round."""
        return self.log.metrics(server_round, metrics, client_reported, self.active)


class NoiseWrapper:
    """What both strategy wrappers share: the wrapped strategy and the core.

    A subclass calls :meth:`_wrap` in its ``__init__``; then its specs,
    ``local_steps``, :attr:`round_noise` and :attr:`round_failures` are the
    core's (``self.core``), read-only.
    """

    # The wrapper's name in logs and repr (also for subclasses).
    _name: str
    strategy: Any
    client_key_fn: Callable[[Any], int | str] | None
    core: NoiseRounds

    # pylint: disable=too-many-arguments
    def _wrap(
        self,
        strategy: Any,
        strategy_type: tuple[type, str],
        client_key_fn: Callable[[Any], int | str] | None,
        client_key_expected: str,
        *,
        sender: str = "node",
        **specs: Any,
    ) -> None:
        """Check and keep the wrapped strategy and key function; build the core.

        ``strategy_type`` is the class the strategy must be an instance of and
        its name in the error message; ``specs`` go to :class:`NoiseRounds`.
        """
        kind, kind_name = strategy_type
        if not isinstance(strategy, kind):
            raise not_allowed(
                "strategy", strategy, f"an instance of {kind_name}", TypeError
            )
        if client_key_fn is not None and not callable(client_key_fn):
            raise not_allowed(
                "client_key_fn", client_key_fn, client_key_expected, TypeError
            )
        self.strategy = strategy
        self.client_key_fn = client_key_fn
        self.core = NoiseRounds(self._name, sender=sender, **specs)

    def __repr__(self) -> str:
        """Return a string representation of the strategy."""
        return f"{self._name}({self.strategy!r})"

    local = property(lambda self: self.core.specs["local"], doc="The local spec.")
    broadcast = property(lambda self: self.core.specs["broadcast"])
    aggregation = property(lambda self: self.core.specs["aggregation"])
    update = property(lambda self: self.core.specs["update"])
    received = property(lambda self: self.core.specs["received"])
    local_steps = property(lambda self: self.core.local_steps)

    @property
    def round_noise(self) -> dict[int, dict[str, float]]:
        """Per round: what the server injected and what became of the replies."""
        return self.core.log.noise

    @property
    def round_failures(self) -> dict[int, str]:
        """Per failed round: why it failed (the previous model was kept)."""
        return self.core.log.failures

    @property
    def active(self) -> bool:
        """Whether any noise is on."""
        return self.core.active
