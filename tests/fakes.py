"""Test doubles for Flower's Message API: a fake Grid and message helpers.

``FakeGrid`` is the App's in-memory Grid (``flwr_noise_app.grid``, which
imports nothing but Flower): a fixed set of node ids and, optionally, a
``reply_fn`` that plays the ClientApps, so that ``Strategy.start`` can run a
whole federation in-process without Flower's runtime.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

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
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from flwr_noise_app.grid import RUN_ID, FunctionGrid, ReplyFn, set_serverapp_identity

DEFAULT_NODE_IDS = (1001, 1002, 1003, 1004)


class FakeGrid(FunctionGrid):
    """The App's in-memory ``FunctionGrid``, with ``DEFAULT_NODE_IDS`` unless given."""

    def __init__(
        self,
        node_ids: Iterable[int] = DEFAULT_NODE_IDS,
        reply_fn: ReplyFn | None = None,
    ) -> None:
        super().__init__(node_ids, reply_fn)


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
