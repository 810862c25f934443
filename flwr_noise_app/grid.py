"""An in-memory Grid: every node is a function of this process.

``FunctionGrid`` implements ``flwr.serverapp.Grid`` without Flower's runtime:
a fixed set of node ids and a ``reply_fn`` that plays their ClientApps, so that
``Strategy.start`` runs a whole federation in one process. The reproduction
runner trains its learners through it, and the tests run the real App and
strategies on it. It imports nothing but Flower, so the library's tests can use
it too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
# A ClientApp's answer: a reply, several (a misbehaving node), or none.
ReplyFn = Callable[[Message], "Message | list[Message] | None"]


def set_serverapp_identity() -> None:
    """Give this process the identity of a ServerApp task, as Flower's runtime does.

    ``Message(...)`` reads the run, node and task ids from it; without a
    runtime they are unset and creating a message raises.
    """
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID


class FunctionGrid(Grid):
    """In-memory Grid: fixed node ids, replies produced by ``reply_fn``.

    Parameters
    ----------
    node_ids : Iterable[int]
        The connected nodes.
    reply_fn : Callable[[Message], Message | list[Message] | None] | None
        Called with a deep copy of every pushed message (as a ClientApp would
        receive it), when it is pushed; returns its reply, a list of replies
        (all are pulled) or ``None`` (no reply). Without it
        ``send_and_receive`` returns no replies.
    keep_pushed : bool (default: True)
        Keep every pushed message in ``pushed`` (for tests to inspect).

    """

    def __init__(
        self,
        node_ids: Iterable[int],
        reply_fn: ReplyFn | None = None,
        *,
        keep_pushed: bool = True,
    ) -> None:
        self.node_ids = list(node_ids)
        self.reply_fn = reply_fn
        self.keep_pushed = keep_pushed
        self.pushed: list[Message] = []
        self._replies: dict[str, list[Message]] = {}
        self._run = Run.create_empty(run_id=RUN_ID)
        set_serverapp_identity()

    def set_run(self, run: Run) -> None:
        """Set the run the grid reports."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run (an empty one unless ``set_run`` was called)."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Return a new message to ``dst_node_id``."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to ``reply_fn`` and keep its replies to pull."""
        message_ids = []
        for message in messages:
            message_id = str(uuid4())
            # As Flower's own Grids do: the message id is set on push.
            message.metadata.__dict__["_message_id"] = message_id
            if self.keep_pushed:
                self.pushed.append(message)
            if self.reply_fn is not None:
                # A ClientApp gets its own copy off the wire, never the object
                # the strategy built (FedAvg shares one RecordDict among all).
                answer = self.reply_fn(copy.deepcopy(message))
                if answer is not None:
                    self._replies[message_id] = (
                        answer if isinstance(answer, list) else [answer]
                    )
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the replies to ``message_ids``."""
        return [
            reply
            for message_id in message_ids
            for reply in self._replies.pop(message_id, [])
        ]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and return their replies (``timeout`` is unused)."""
        return self.pull_messages(self.push_messages(messages))
