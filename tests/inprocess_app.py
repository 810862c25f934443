"""Run the bundled App in-process: the real ServerApp and ClientApp over a FakeGrid.

``run_app`` calls the ServerApp with a ``FakeGrid`` whose nodes run the real
ClientApp, each with its own node config (``partition-id``,
``num-partitions``). As Flower's runtime does, an exception in a ClientApp
becomes an error reply. A ``fault`` hook sees every instruction and the
ClientApp's reply and may replace the reply, drop it (a node that died or
timed out) or raise (the ServerApp crashes mid-round). Unless asked for, the
results plot is a stub: drawing it takes longer than a tiny round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any
from unittest import mock

from fakes import FakeGrid
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from client_app.app import app as client_app
from server_app.app import app as server_app

DEFAULT_NODE_IDS = (101, 102, 103)
# (instruction, the ClientApp's reply) -> the reply the server gets, or None for none.
Fault = Callable[[Message, Message], Message | None]


class AppGrid(FakeGrid):
    """A FakeGrid whose nodes may not reply, and that records the timeouts used."""

    def __init__(self, node_ids: Iterable[int], reply_fn: Callable[[Message], Any]):
        super().__init__(node_ids, reply_fn)
        self.timeouts: list[float | None] = []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = super().pull_messages(message_ids)
        return [reply for reply in replies if reply is not None]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self.timeouts.append(timeout)
        return super().send_and_receive(messages, timeout=timeout)


def server_round(instruction: Message) -> int | None:
    """The round of a train instruction, ``None`` for other messages."""
    if instruction.metadata.message_type != MessageType.TRAIN:
        return None
    return int(instruction.content["config"]["server-round"])


def partition_of(instruction: Message, node_ids: Iterable[int]) -> int:
    """The partition id of the node an instruction goes to."""
    return list(node_ids).index(instruction.metadata.dst_node_id)


def run_app(
    run_config: Mapping[str, Any],
    *,
    node_ids: Iterable[int] = DEFAULT_NODE_IDS,
    node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    fault: Fault | None = None,
    plot: bool = False,
) -> AppGrid:
    """Run the App to its end (or until ``fault`` raises); return the grid.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        The run config overrides (missing keys take their defaults).
    node_ids : Iterable[int]
        The nodes; the k-th gets ``partition-id=k``.
    node_configs : Mapping[int, Mapping[str, Any]] | None
        Node id -> node config entries that replace the default ones.
    fault : Fault | None
        Sees every instruction and its reply; returns the reply to deliver.
    plot : bool
        Whether to draw ``results.png`` (else a stub file is written).
    """
    node_ids = tuple(node_ids)
    contexts = {
        node_id: Context(
            run_id=1,
            node_id=node_id,
            node_config={
                "partition-id": index,
                "num-partitions": len(node_ids),
                **(node_configs or {}).get(node_id, {}),
            },
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for index, node_id in enumerate(node_ids)
    }

    def reply_fn(instruction: Message) -> Message | None:
        try:
            reply = client_app(instruction, contexts[instruction.metadata.dst_node_id])
        except Exception as error:  # what Flower's runtime does with it
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(error)),
                reply_to=instruction,
            )
        return reply if fault is None else fault(instruction, reply)

    grid = AppGrid(node_ids, reply_fn)
    server_context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    if plot:
        server_app(grid, server_context)
    else:
        with mock.patch("flwr_noise_app.results._plot_rounds", _stub_plot):
            server_app(grid, server_context)
    return grid


def _stub_plot(rounds: list[dict[str, Any]]) -> Callable[[IO[bytes]], Any]:
    return lambda stream: stream.write(b"\x89PNG stub")
