"""Test doubles for Flower's Message API: a fake Grid and message helpers.

``FakeGrid`` implements ``flwr.serverapp.Grid`` in memory: a fixed set of node
ids and, optionally, a ``reply_fn`` that plays the ClientApps, so that
``Strategy.start`` can run a whole federation in-process without Flower's
runtime.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterable, Mapping
from uuid import uuid4

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

DEFAULT_NODE_IDS = (1001, 1002, 1003, 1004)
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


class FakeGrid(Grid):
    """In-memory Grid: fixed node ids, replies produced by ``reply_fn``.

    Parameters
    ----------
    node_ids : Iterable[int]
        The connected nodes.
    reply_fn : Callable[[Message], Message | list[Message] | None] | None
        Called with a deep copy of every pushed message (as a ClientApp would
        receive it); returns its reply, a list of replies (all are pulled) or
        ``None`` (no reply). Without it ``send_and_receive`` returns no
        replies. Pushed messages are kept in ``pushed``.
    """

    def __init__(
        self,
        node_ids: Iterable[int] = DEFAULT_NODE_IDS,
        reply_fn: ReplyFn | None = None,
    ) -> None:
        self.node_ids = list(node_ids)
        self.reply_fn = reply_fn
        self.pushed: list[Message] = []
        self._replies: dict[str, list[Message]] = {}
        self._run = Run.create_empty(run_id=RUN_ID)
        set_serverapp_identity()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = []
        for message in messages:
            message_id = str(uuid4())
            # As Flower's own Grids do: the message id is set on push.
            message.metadata.__dict__["_message_id"] = message_id
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
        return [
            reply
            for message_id in message_ids
            for reply in self._replies.pop(message_id, [])
        ]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def random_arrays(
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    """Return name -> standard normal array of each shape."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()
    }


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Return an ArrayRecord holding ``arrays`` (keys in order)."""
    return ArrayRecord(
        {name: Array(np.asarray(value)) for name, value in arrays.items()}
    )


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return the arrays of an ArrayRecord as a name -> ndarray dict."""
    return {name: array.numpy() for name, array in record.items()}


def train_message(
    node_id: int,
    arrays: Mapping[str, np.ndarray] | ArrayRecord,
    config: Mapping[str, object] | None = None,
    *,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """Return an instruction as FedAvg builds it: ``arrays`` and ``config``."""
    set_serverapp_identity()
    record = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays)
    content = RecordDict(
        {"arrays": record, "config": ConfigRecord(dict(config or {}))}  # type: ignore[arg-type]
    )
    return Message(content, dst_node_id=node_id, message_type=message_type)


def train_reply(
    instruction: Message,
    arrays: Mapping[str, np.ndarray] | ArrayRecord,
    num_examples: int = 10,
    metrics: Mapping[str, float] | None = None,
) -> Message:
    """Return a ClientApp's train reply: ``arrays`` and a MetricRecord."""
    record = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays)
    metric_record = MetricRecord({"num-examples": num_examples, **(metrics or {})})
    content = RecordDict({"arrays": record, "metrics": metric_record})
    return Message(content, reply_to=instruction)


def spoofed(
    reply: Message, *, src_node_id: int | None = None, reply_to: str | None = None
) -> Message:
    """Return ``reply`` claiming another sender or another message it answers."""
    if src_node_id is not None:
        reply.metadata.__dict__["_src_node_id"] = src_node_id
    if reply_to is not None:
        reply.metadata.__dict__["_reply_to_message_id"] = reply_to
    return reply


def raw_array(
    data: bytes,
    *,
    dtype: str = "float32",
    shape: tuple[int, ...] = (1,),
    stype: str = "numpy.ndarray",
) -> Array:
    """Return an Array whose declared dtype, shape and stype may lie about data."""
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """Return ``array`` serialized as Flower's numpy Arrays carry it (.npy)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def error_reply(instruction: Message, reason: str = "client failed") -> Message:
    """Return an error reply to ``instruction``."""
    return Message(Error(code=0, reason=reason), reply_to=instruction)


def make_context(
    node_id: int = 1001, partition_id: int | None = None, num_partitions: int = 4
) -> Context:
    """Return a ClientApp Context; ``partition_id`` goes into ``node_config``."""
    node_config: dict[str, int] = {}
    if partition_id is not None:
        node_config = {"partition-id": partition_id, "num-partitions": num_partitions}
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config=node_config,  # type: ignore[arg-type]
        state=RecordDict(),
        run_config={},
    )


class FakeClientProxy(ClientProxy):
    """A legacy client the strategy can sample; it is never called."""

    def _never_called(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the strategy must not call clients itself")

    get_properties = get_parameters = fit = evaluate = reconnect = _never_called


def client_manager(cids: Iterable[str]) -> SimpleClientManager:
    """Return a legacy client manager with a FakeClientProxy per cid."""
    manager = SimpleClientManager()
    for cid in cids:
        manager.register(FakeClientProxy(cid))
    return manager
