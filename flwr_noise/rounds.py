"""The numpy-level core behind both strategy wrappers.

:class:`NoiseRounds` holds what :class:`flwr_noise.NoisyStrategy` (Message
API) and :class:`flwr_noise.legacy.NoisyLegacyStrategy` have in common: the
specs and their checks, the entries sent to the clients, broadcast and
aggregation noise on name -> ``np.ndarray`` mappings, the screening of
replies, the guard around the wrapped aggregation and the round's metrics.
The wrappers only convert between their API's types (``ArrayRecord`` and
``Message``, ``Parameters`` and ``FitRes``) and :class:`ReplyView` / numpy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.supercore import log

from flwr_noise.sampling import perturb_arrays
from flwr_noise.seeding import AGGREGATE_CLIENT, numpy_generator
from flwr_noise.spec import ConfigValue, NoiseSpec
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

# The largest weight (num-examples) a reply may claim: beyond it float64 sums
# of weights are no longer exact.
MAX_WEIGHT = 2.0**53

# Specs the clients apply, by the config prefix they travel under.
CLIENT_KINDS = {
    "local": LOCAL_PREFIX,
    "update": UPDATE_PREFIX,
    "received": RECEIVED_PREFIX,
}
# Kinds applied once per round: their schedule time is server_round - 1.
ONCE_PER_ROUND_KINDS = ("broadcast", "aggregation", "update", "received")

ArraySignature = dict[str, tuple[tuple[int, ...], str]]
# Sentinel: the wrapped strategy weights replies by nothing.
NO_WEIGHT = object()


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


def first_non_finite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Return the name of the first array holding NaN or Inf, else ``None``."""
    for name, array in arrays.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return name
    return None


def array_signature(arrays: Mapping[str, np.ndarray]) -> ArraySignature:
    """Return name -> (shape, dtype name) of decoded arrays."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


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
                f"array {name!r} decodes to shape {got_shape} and dtype "
                f"{got_dtype}, but shape {shape} and dtype {dtype} were sent"
            )
    return None


def enabled_or_none(name: str, spec: NoiseSpec | None) -> NoiseSpec | None:
    """Check a wrapper's spec argument; ``None`` when it is absent or off."""
    if spec is None:
        return None
    if not isinstance(spec, NoiseSpec):
        raise not_allowed(name, spec, "a flwr_noise.NoiseSpec or None", TypeError)
    return spec if spec.enabled else None


def weight_problem(label: str, value: Any) -> str | None:
    """Say why a reply's weight is unusable, or ``None`` for ``0 < w <= 2**53``."""
    if value is NO_WEIGHT:
        return None
    # NaN fails the comparison; big ints are compared without float overflow.
    if not is_real(value) or not 0 < value <= MAX_WEIGHT:
        return f"its weight {label}={value!r} is not a finite number in (0, 2**53]"
    return None


def metric_kind(value: Any) -> Hashable:
    """Return what aggregation needs to know of a metric value's type."""
    if is_real(value):
        return "number"
    if isinstance(value, list):
        return ("list", len(value))
    return type(value).__name__


@dataclass
class ReplyView:
    """What the core needs of one (non-error) reply, in any API.

    Parameters
    ----------
    node : int | str
        Who sent it (node id, or a legacy client's cid): names it in logs,
        detects duplicates and replies from nodes that were not asked.
    order : str
        Its client key as a str: the deterministic order of replies.
    decode : Callable[[], Mapping[str, np.ndarray]]
        Decodes its arrays; may raise anything (the reply is then dropped).
    weight : Any
        The value the wrapped strategy weights it by, or ``NO_WEIGHT``.
    weight_label : str
        The weight's name in messages, e.g. ``"num-examples"``.
    structure : Hashable
        Record keys and metric keys with the kinds of their values: replies
        whose structure differs from the majority's are dropped.
    problem : str | None (default: None)
        A problem found while building the view (e.g. two ArrayRecords).
    reply_to : str | None (default: None)
        The id of the message it answers, when the API has one.

    """

    node: int | str
    order: str
    decode: Callable[[], Mapping[str, np.ndarray]]
    weight: Any
    weight_label: str
    structure: Hashable
    problem: str | None = None
    reply_to: str | None = None


@dataclass
class _Round:
    """What was sent in one round."""

    signature: ArraySignature
    # node -> id of the message sent to it ("" while unknown).
    asked: dict[int | str, Callable[[], str]]


class NoiseRounds:
    """Specs, noise, reply checks and round bookkeeping of one wrapper.

    Parameters
    ----------
    owner : str
        The wrapper's name, for logs (``"NoisyStrategy"``).
    sender : str (default: "node")
        What logs call the sender of a reply (``"client"`` in the legacy API).
    local, broadcast, aggregation, update, received : NoiseSpec | None
        The wrapper's specs (see :class:`flwr_noise.NoisyStrategy`).
    local_steps : int | None
        Optimizer steps per client per round.

    Raises
    ------
    ValueError
        If ``local_steps`` is not an int >= 1 or None, or a ``local`` spec
        with ``schedule_unit="step"`` and a decaying schedule comes without
        ``local_steps`` (the server could not tell a client where its
        schedule continues).

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
        self.sender = sender
        self.specs: dict[str, NoiseSpec | None] = {
            "local": enabled_or_none("local", local),
            "broadcast": enabled_or_none("broadcast", broadcast),
            "aggregation": enabled_or_none("aggregation", aggregation),
            "update": enabled_or_none("update", update),
            "received": enabled_or_none("received", received),
        }
        if local_steps is not None:
            local_steps = check_integer("local_steps", local_steps, low=1)
        spec = self.specs["local"]
        if (
            spec is not None
            and local_steps is None
            and spec.schedule_unit == "step"
            and spec.schedule != "constant"
        ):
            raise not_allowed(
                "local_steps",
                None,
                "an int >= 1 with a local spec whose schedule "
                f"{spec.schedule!r} counts steps (schedule_unit='step'): the "
                "server sends each round's start step; or schedule_unit='round'",
            )
        self.local_steps = local_steps
        # Per round: what was injected and what happened to the replies.
        self.round_noise: dict[int, dict[str, float]] = {}
        # Per failed round: why (the aggregation raised, a non-finite model).
        self.round_failures: dict[int, str] = {}
        self._rounds: dict[int, _Round] = {}
        self._last_structure: Hashable = None

    @property
    def active(self) -> bool:
        """Whether any noise is on."""
        return any(spec is not None for spec in self.specs.values())

    def summary(self) -> None:
        """Log the specs."""
        log(INFO, "\t├──> Noise (flwr-noise):")
        for kind, spec in self.specs.items():
            log(INFO, "\t│\t├── %s: %s", kind, spec or "off")

    # --- configure ----------------------------------------------------------

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

    def client_specs(self) -> dict[str, NoiseSpec]:
        """Return prefix -> spec of the specs the clients apply."""
        return {
            prefix: spec
            for kind, prefix in CLIENT_KINDS.items()
            if (spec := self.specs[kind]) is not None
        }

    def round_entries(self, server_round: int) -> dict[str, ConfigValue]:
        """Return the round and the local start step, when a client spec is sent."""
        if not self.client_specs():
            return {}
        entries: dict[str, ConfigValue] = {SERVER_ROUND_KEY: server_round}
        if self.specs["local"] is not None and self.local_steps is not None:
            entries[LOCAL_START_STEP_KEY] = (server_round - 1) * self.local_steps
        return entries

    def start_round(
        self,
        server_round: int,
        sent: ArraySignature,
        asked: Mapping[int | str, Callable[[], str]],
    ) -> None:
        """Record what a round sends, and the nominal sigmas of the client kinds.

        Parameters
        ----------
        server_round : int
            The round.
        sent : ArraySignature
            Name -> (shape, dtype name) of the global model sent.
        asked : Mapping[int | str, Callable[[], str]]
            Node -> a function returning the id of the message sent to it
            (``""`` when the API has none).

        """
        self._rounds[server_round] = _Round(dict(sent), dict(asked))
        info: dict[str, float] = {}
        for kind in CLIENT_KINDS:
            sigma = self.sigma(kind, server_round)
            if sigma is not None:
                info[noise_metric_key(kind, "sigma")] = sigma
        self.round_noise[server_round] = info

    def perturb_broadcast(
        self,
        server_round: int,
        arrays_by_client: Sequence[tuple[int | str, Mapping[str, np.ndarray]]],
    ) -> list[dict[str, np.ndarray]]:
        """Return each client's own perturbed copy, and record the noise."""
        spec = self.specs["broadcast"]
        assert spec is not None
        sigma = spec.sigma_at(server_round - 1)
        copies, norms = [], []
        for client, arrays in arrays_by_client:
            rng = numpy_generator(
                spec.seed, client=client, server_round=server_round, purpose="broadcast"
            )
            perturbed, report = perturb_arrays(arrays, spec, sigma, rng)
            copies.append(perturbed)
            norms.append(report.l2_norm)
        info = self.round_noise.setdefault(server_round, {})
        info[noise_metric_key("broadcast", "sigma")] = sigma
        info[noise_metric_key("broadcast", "l2")] = (
            float(np.mean(norms)) if norms else 0.0
        )
        return copies

    # --- replies ------------------------------------------------------------

    def screen(self, server_round: int, views: Sequence[ReplyView | None]) -> list[int]:
        """Return the indices of the replies to aggregate, logging every drop.

        ``views[i] is None`` marks an error reply: it is kept (the wrapped
        strategy counts it) unless its node replied more than once. Rules, in
        order: the node was asked this round (and the reply answers the
        message sent to it); the node replied once; the view has no problem;
        a finite weight in (0, 2**53]; every array decodes, to the dtype and
        shape sent, finite; the reply's structure is the one most replies
        share (a tie goes to last round's structure, else to the reply first
        in client-key order).
        """
        sent = self._rounds.pop(server_round, None)
        nodes = Counter(view.node for view in views if view is not None)
        problems: dict[int, str] = {}
        structures: dict[int, Hashable] = {}
        for index, view in enumerate(views):
            if view is None:
                continue
            problem = self._problem(view, sent, nodes)
            if problem is None:
                structures[index] = view.structure
            else:
                problems[index] = problem
        consensus = self._consensus(structures, views)
        for index, structure in structures.items():
            if structure != consensus:
                problems[index] = (
                    "its records or metrics (keys, value types) differ from "
                    "those of the other replies"
                )
        for index, problem in sorted(problems.items()):
            view = views[index]
            assert view is not None
            log(
                WARNING,
                "%s: round %s: dropping the reply of %s %s: %s",
                self.owner,
                server_round,
                self.sender,
                view.node,
                problem,
            )
        info = self.round_noise.setdefault(server_round, {})
        info[REPLIES_RECEIVED_KEY] = len(views)
        info[REPLIES_FAILED_KEY] = sum(view is None for view in views)
        info[REPLIES_DROPPED_KEY] = len(problems)
        return [index for index in range(len(views)) if index not in problems]

    def _problem(
        self, view: ReplyView, sent: _Round | None, nodes: Counter[int | str]
    ) -> str | None:
        if sent is not None:
            if view.node not in sent.asked:
                return "the node was not asked to train in this round"
            expected_id = sent.asked[view.node]()
            if expected_id and view.reply_to and view.reply_to != expected_id:
                return "it does not answer the message sent to the node"
        if nodes[view.node] > 1:
            return f"the node sent {nodes[view.node]} replies in this round"
        if view.problem is not None:
            return view.problem
        problem = weight_problem(view.weight_label, view.weight)
        if problem is not None:
            return problem
        try:
            arrays = view.decode()
        except Exception as error:  # pylint: disable=broad-except
            return f"its arrays do not decode: {type(error).__name__}: {error}"
        if sent is not None:
            mismatch = signature_mismatch(sent.signature, array_signature(arrays))
            if mismatch is not None:
                return mismatch
        else:
            # Without the sent model, the arrays' signature joins the structure.
            view.structure = (view.structure, tuple(array_signature(arrays).items()))
        name = first_non_finite(arrays)
        if name is not None:
            return f"array {name!r} holds NaN or Inf"
        return None

    def _consensus(
        self, structures: Mapping[int, Hashable], views: Sequence[ReplyView | None]
    ) -> Hashable:
        if not structures:
            return None
        counts = Counter(structures.values())
        top = max(counts.values())
        tied = [structure for structure, count in counts.items() if count == top]
        if len(tied) > 1 and self._last_structure in tied:
            chosen = self._last_structure
        else:
            first = min(
                (index for index in structures if structures[index] in tied),
                key=lambda index: (views[index].order, index),  # type: ignore[union-attr]
            )
            chosen = structures[first]
        self._last_structure = chosen
        return chosen

    # --- aggregate ----------------------------------------------------------

    def aggregate(
        self,
        server_round: int,
        aggregate_fn: Callable[[], tuple[Any, Any]],
        decode: Callable[[Any], Mapping[str, np.ndarray]],
    ) -> tuple[Any, Any, dict[str, np.ndarray] | None]:
        """Run the wrapped aggregation; never let it fail the run.

        Parameters
        ----------
        server_round : int
            The round.
        aggregate_fn : Callable[[], tuple[Any, Any]]
            The wrapped strategy's aggregation: ``(arrays or None, metrics)``.
        decode : Callable[[Any], Mapping[str, np.ndarray]]
            Its arrays as name -> ndarray.

        Returns
        -------
        tuple[Any, Any, dict[str, np.ndarray] | None]
            The wrapped strategy's arrays and metrics, and the aggregate plus
            the aggregation noise (``None`` when that noise is off: the
            arrays are the model). The arrays are ``None`` where aggregation
            raised or the model is not finite; the round is then marked
            failed.

        """
        try:
            arrays, metrics = aggregate_fn()
            if arrays is None:
                return None, metrics, None
            decoded = dict(decode(arrays))
        except Exception as error:  # pylint: disable=broad-except
            self._fail(
                server_round, f"aggregation raised {type(error).__name__}: {error}"
            )
            return None, None, None
        spec = self.specs["aggregation"]
        noisy = None
        if spec is not None:
            decoded = noisy = self._perturb_aggregate(server_round, spec, decoded)
        name = first_non_finite(decoded)
        if name is not None:
            self._fail(
                server_round,
                f"the aggregated model is not finite (array {name!r}); the "
                "previous model is kept",
            )
            return None, metrics, None
        return arrays, metrics, noisy

    def _perturb_aggregate(
        self, server_round: int, spec: NoiseSpec, arrays: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        rng = numpy_generator(
            spec.seed,
            client=AGGREGATE_CLIENT,
            server_round=server_round,
            purpose="aggregation",
        )
        sigma = spec.sigma_at(server_round - 1)
        with np.errstate(over="ignore", invalid="ignore"):
            perturbed, report = perturb_arrays(arrays, spec, sigma, rng)
        log(
            INFO,
            "%s: aggregation noise (sigma %.4g, L2 norm %.4g) added",
            self.owner,
            sigma,
            report.l2_norm,
        )
        info = self.round_noise.setdefault(server_round, {})
        info[noise_metric_key("aggregation", "sigma")] = sigma
        info[noise_metric_key("aggregation", "l2")] = report.l2_norm
        return perturbed

    def _fail(self, server_round: int, reason: str) -> None:
        log(WARNING, "%s: round %s failed: %s", self.owner, server_round, reason)
        self.round_failures[server_round] = reason
        self.round_noise.setdefault(server_round, {})[ROUND_FAILED_KEY] = 1

    def round_metrics(
        self,
        server_round: int,
        metrics: Mapping[str, Any] | None,
        client_reported: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """Return the wrapped strategy's metrics plus the round's noise entries.

        Entries in ``client_reported`` that the wrapped metrics already hold
        (measured by the clients) win over the server's nominal ones. With
        every spec off, no reply dropped or failed and the round ok: ``None``
        (the wrapped strategy's metrics stand as they are).
        """
        info = self.round_noise.get(server_round, {})
        eventful = info.get(REPLIES_DROPPED_KEY) or info.get(REPLIES_FAILED_KEY)
        if not self.active and not eventful and ROUND_FAILED_KEY not in info:
            return None
        merged = dict(metrics or {})
        for key, value in info.items():
            if key in client_reported and key in merged:
                continue
            merged[key] = value if isinstance(value, int) else float(value)
        return merged


class NoiseRoundsView:
    """The wrappers' read-only view of their :class:`NoiseRounds` (``self.core``)."""

    core: NoiseRounds

    local = property(lambda self: self.core.specs["local"], doc="The local spec.")
    broadcast = property(lambda self: self.core.specs["broadcast"])
    aggregation = property(lambda self: self.core.specs["aggregation"])
    update = property(lambda self: self.core.specs["update"])
    received = property(lambda self: self.core.specs["received"])
    local_steps = property(lambda self: self.core.local_steps)

    @property
    def round_noise(self) -> dict[int, dict[str, float]]:
        """Per round: what the server injected and what became of the replies."""
        return self.core.round_noise

    @property
    def round_failures(self) -> dict[int, str]:
        """Per failed round: why it failed (the previous model was kept)."""
        return self.core.round_failures

    @property
    def active(self) -> bool:
        """Whether any noise is on."""
        return self.core.active
