"""Screening of the training replies a strategy wrapper receives.

What comes back from the clients is untrusted: :class:`ReplyScreen` decides,
for both wrappers, which replies reach the wrapped strategy's aggregation and
logs why each other one is dropped. The wrappers describe every reply in
their API's terms as a :class:`ReplyView`; the checks themselves are here
only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.supercore import log

from flwr_noise.validation import is_real

# The largest weight (num-examples) a reply may claim: beyond it float64 sums
# of weights are no longer exact.
MAX_WEIGHT = 2.0**53

ArraySignature = dict[str, tuple[tuple[int, ...], str]]
# Sentinel: the wrapped strategy weights replies by nothing.
NO_WEIGHT = object()


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
    """What the screening needs of one (non-error) reply, in any API.

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
class _Sent:
    """What was sent in one round."""

    signature: ArraySignature
    # node -> id of the message sent to it ("" while unknown).
    asked: dict[int | str, Callable[[], str]]


class ReplyScreen:
    """Which replies of a round reach the wrapped aggregation, and why not.

    Parameters
    ----------
    owner : str
        The wrapper's name, for logs (``"NoisyStrategy"``).
    sender : str (default: "node")
        What logs call the sender of a reply (``"client"`` in the legacy API).

    """

    def __init__(self, owner: str, sender: str = "node") -> None:
        self.owner = owner
        self.sender = sender
        self._sent: dict[int, _Sent] = {}
        self._last_structure: Hashable = None

    def expect(
        self,
        server_round: int,
        sent: ArraySignature,
        asked: Mapping[int | str, Callable[[], str]],
    ) -> None:
        """Record what a round sends, and to whom.

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
        self._sent[server_round] = _Sent(dict(sent), dict(asked))

    def screen(
        self, server_round: int, views: Sequence[ReplyView | None]
    ) -> dict[int, str]:
        """Return index -> reason of the replies to drop, logging every drop.

        ``views[i] is None`` marks an error reply: it is kept (the wrapped
        strategy counts it) unless its node replied more than once. Rules, in
        order: the node was asked this round (and the reply answers the
        message sent to it); the node replied once; the view has no problem;
        a finite weight in (0, 2**53]; every array decodes, to the dtype and
        shape sent, finite; the reply's structure is the one most replies
        share (a tie goes to last round's structure, else to the reply first
        in client-key order).
        """
        sent = self._sent.pop(server_round, None)
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
        return problems

    @staticmethod
    def _problem(
        view: ReplyView, sent: _Sent | None, nodes: Counter[int | str]
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
