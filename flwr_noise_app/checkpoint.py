"""Checkpoints of a federated run, and resuming a run that was interrupted.

After every round the ServerApp writes ``checkpoint.npz`` into the run folder,
beside ``results.json``, atomically (a crash leaves the previous checkpoint,
never a truncated one). It holds everything the next round depends on:

- the global model (the ``ArrayRecord``'s arrays, byte for byte);
- the number of the last finished round;
- the run config it was made with;
- the state of Python's and NumPy's global random generators, which Flower's
  strategies use to sample clients;
- the state that strategies carry from round to round, found generically in
  every strategy of a chain of wrappers (``NoisyStrategy(FedAdam(...))``):
  every array-valued attribute (an ndarray, an ``ArrayRecord``, or a list or
  dict of ndarrays: FedAdam / FedYogi / FedAdagrad moments, FedAvgM momentum
  and model), and every number that changed since the strategy was built (the
  adaptive clipping norm). No attribute names are hard-coded.

The results so far are in ``results.json``, written before the checkpoint of
the same round, so a resumed run drops at most the rounds recorded after the
last checkpoint and redoes them (see ``ResultsWriter(resume_after=...)``).
``flwr_noise_app.run_folder.RunFolder`` writes checkpoints and checks one
before a run resumes from it.

Noise streams depend only on (seed, partition, round, purpose) and the
clients' mini-batches on (seed, partition, round), so a resumed run draws the
same noise and batches as the uninterrupted run would have. With
``NoisyStrategy(client_key_fn=...)`` replies are averaged, and clients sampled
(``fraction-train < 1``), in partition order, so with the restored random state
its rounds are equal bit for bit whatever node ids Flower assigns.

Limit: state that is neither array-valued nor a number (e.g. a custom
strategy's list of strings) is not saved.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from flwr_noise.validation import not_allowed
from flwr_noise_app.config import RunConfigValue
from flwr_noise_app.results import atomic_write

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = 1
_META_KEY = "meta"
_ARRAY_PREFIX = "array-"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The state of a run after one of its rounds.

    Attributes
    ----------
    server_round : int
        The last finished round (``0``: before the first one).
    arrays : ArrayRecord
        The global model after that round.
    config : dict[str, RunConfigValue]
        The run config (``AppConfig.to_dict()``) it was made with.
    rng_state : dict[str, Any]
        Python's and NumPy's global random state (``capture_rng_state()``).
    strategy_state : dict[str, Any]
        The strategy's round-to-round state (``capture_strategy_state()``).

    """

    server_round: int
    arrays: ArrayRecord
    config: dict[str, RunConfigValue] = field(default_factory=dict)
    rng_state: dict[str, Any] = field(default_factory=dict)
    strategy_state: dict[str, Any] = field(default_factory=dict)


def capture_rng_state() -> dict[str, Any]:
    """Return the state of Python's ``random`` and NumPy's global generator."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a state from ``capture_rng_state`` (missing parts are left as is)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])


def rng_state_problem(state: Any) -> str | None:
    """Say why ``state`` is not a whole ``capture_rng_state()``, or ``None``.

    The state is tried on scratch generators, not on the global ones.
    """
    try:
        if not isinstance(state, Mapping) or set(state) != {"python", "numpy"}:
            return "it lacks the keys 'python' and 'numpy'"
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _strategy_chain(strategy: Strategy) -> list[Strategy]:
    """Return ``strategy`` and the strategies it wraps (``.strategy``), outer first."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)  # type: ignore[attr-defined]
    return chain


def _is_array_valued(value: Any) -> bool:
    if isinstance(value, np.ndarray | ArrayRecord):
        return True
    items = value.values() if isinstance(value, dict) else value
    return (
        isinstance(value, list | tuple | dict)
        and len(value) > 0
        and all(isinstance(item, np.ndarray) for item in items)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def strategy_numbers(strategy: Strategy) -> dict[str, Any]:
    """Return ``"<depth>.<attribute>"`` -> value for the numbers of a chain.

    Taken right after the strategy is built, it is the ``baseline`` of
    ``capture_strategy_state``.
    """
    return {
        f"{depth}.{name}": value
        for depth, member in enumerate(_strategy_chain(strategy))
        for name, value in vars(member).items()
        if _is_number(value)
    }


def capture_strategy_state(
    strategy: Strategy, baseline: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return the round-to-round state of ``strategy`` and the strategies it wraps.

    Parameters
    ----------
    strategy : Strategy
        The strategy, possibly a wrapper (e.g. ``NoisyStrategy(FedAdam(...))``).
    baseline : Mapping[str, Any] | None (default: None)
        ``strategy_numbers`` of the strategy as it was built: numbers that
        differ from it are state. ``None`` saves no numbers.

    Returns
    -------
    dict[str, Any]
        ``"<depth>.<attribute>"`` -> value, for every array-valued attribute
        and every number that changed since ``baseline``; empty for FedAvg.

    """
    state: dict[str, Any] = {}
    for depth, member in enumerate(_strategy_chain(strategy)):
        for name, value in vars(member).items():
            key = f"{depth}.{name}"
            if _is_array_valued(value) or (
                baseline is not None
                and _is_number(value)
                and (key not in baseline or baseline[key] != value)
            ):
                state[key] = value
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Set the state from ``capture_strategy_state`` on the same kind of strategy.

    Raises
    ------
    ValueError
        If the state names a strategy or attribute that ``strategy`` lacks (it
        was saved from a different strategy), or holds a value that is not
        finite.

    """
    chain = _strategy_chain(strategy)
    names = "(".join(type(member).__name__ for member in chain)
    names += ")" * (len(chain) - 1)
    for name, value in state.items():
        depth, _, attribute = name.partition(".")
        if (
            not depth.isdigit()
            or int(depth) >= len(chain)
            or not hasattr(chain[int(depth)], attribute)
        ):
            raise not_allowed(
                "strategy state",
                name,
                f"the state of the same strategy (and wrappers) as the "
                f"checkpoint's: {names} has no such attribute",
            )
        if not _is_number(value) and not _is_array_valued(value):
            raise not_allowed(
                f"strategy state {name!r}", value, "an array-valued or numeric value"
            )
        if _first_non_finite(value) is not None:
            raise not_allowed(
                f"strategy state {name!r}", "...", "finite values (it holds NaN or Inf)"
            )
    for name, value in state.items():
        depth, _, attribute = name.partition(".")
        setattr(chain[int(depth)], attribute, value)


def _first_non_finite(value: Any) -> str | None:
    """Return the name of the first non-finite part of a state value, or None."""
    if isinstance(value, ArrayRecord):
        for name, array in value.items():
            decoded = array.numpy()
            if decoded.dtype.kind in "fc" and not np.isfinite(decoded).all():
                return name
        return None
    if isinstance(value, np.ndarray):
        finite = value.dtype.kind not in "fc" or np.isfinite(value).all()
        return None if finite else ""
    if _is_number(value):
        return None if math.isfinite(value) else ""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if _first_non_finite(item) is not None:
            return str(key)
    return None


def _encode(value: Any, arrays: list[np.ndarray]) -> Any:
    """Return ``value`` as JSON data; its ndarrays are moved into ``arrays``.

    ``ArrayRecord``s keep their arrays' bytes, dtype, shape and serialization
    as they are, so they come back byte for byte.
    """
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"array": len(arrays) - 1}
    if isinstance(value, ArrayRecord):
        return {
            "arrays": [
                [name, array.dtype, list(array.shape), array.stype]
                + [_encode(np.frombuffer(array.data, dtype=np.uint8), arrays)]
                for name, array in value.items()
            ]
        }
    if isinstance(value, np.generic):
        return {"value": value.item()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, Mapping):
        return {
            "dict": {str(key): _encode(item, arrays) for key, item in value.items()}
        }
    if isinstance(value, (list, tuple)):
        items = [_encode(item, arrays) for item in value]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    raise not_allowed(
        "checkpoint value",
        value,
        "numbers, strings, None, ndarrays, ArrayRecords, and lists, tuples or "
        "dicts of them",
        TypeError,
    )


def _decode(data: Any, arrays: Mapping[int, np.ndarray]) -> Any:
    (kind, content), *_ = data.items()
    if kind == "array":
        return arrays[content]
    if kind == "arrays":
        return ArrayRecord(
            {
                name: Array(
                    dtype=dtype,
                    shape=tuple(shape),
                    stype=stype,
                    data=_decode(data_bytes, arrays).tobytes(),
                )
                for name, dtype, shape, stype, data_bytes in content
            }
        )
    if kind == "value":
        return content
    if kind == "dict":
        return {key: _decode(item, arrays) for key, item in content.items()}
    items = [_decode(item, arrays) for item in content]
    return tuple(items) if kind == "tuple" else items


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``<run_dir>/checkpoint.npz`` atomically.

    The file is an uncompressed NumPy ``.npz``: one JSON entry (``meta``:
    format, round, config, and the layout of everything else) and one array
    per model array (its serialized bytes) and per state array.

    Parameters
    ----------
    run_dir : str | Path
        The run folder; it must exist.
    checkpoint : Checkpoint
        What to save.

    Returns
    -------
    Path
        The checkpoint file.

    """
    arrays: list[np.ndarray] = []
    meta = {
        "format": CHECKPOINT_FORMAT,
        "server_round": int(checkpoint.server_round),
        "config": checkpoint.config,
        "state": _encode(
            {
                "model": checkpoint.arrays,
                "rng": checkpoint.rng_state,
                "strategy": checkpoint.strategy_state,
            },
            arrays,
        ),
    }
    entries = {f"{_ARRAY_PREFIX}{index}": array for index, array in enumerate(arrays)}
    meta_bytes = json.dumps(meta, allow_nan=False).encode("utf-8")
    entries[_META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)

    path = Path(run_dir) / CHECKPOINT_FILE
    atomic_write(path, lambda stream: np.savez(stream, **entries), binary=True)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``.

    Parameters
    ----------
    path : str | Path
        The checkpoint file, or the run folder that holds ``checkpoint.npz``.

    Returns
    -------
    Checkpoint
        The saved state.

    Raises
    ------
    FileNotFoundError
        If there is no checkpoint file.
    ValueError
        If the file is not a checkpoint of this format.

    """
    file = Path(path)
    if file.is_dir():
        file = file / CHECKPOINT_FILE
    try:
        with np.load(file, allow_pickle=False) as stored:
            entries = {name: stored[name] for name in stored.files}
        meta = json.loads(entries.pop(_META_KEY).tobytes().decode("utf-8"))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise not_allowed("format", meta.get("format"), repr(CHECKPOINT_FORMAT))
        arrays = {
            int(name.removeprefix(_ARRAY_PREFIX)): array
            for name, array in entries.items()
        }
        state = _decode(meta["state"], arrays)
        return Checkpoint(
            server_round=int(meta["server_round"]),
            arrays=state["model"],
            config=dict(meta["config"]),
            rng_state=state["rng"],
            strategy_state=state["strategy"],
        )
    except FileNotFoundError:
        raise
    except Exception as error:  # any damage means: not a checkpoint
        raise not_allowed(
            "checkpoint file",
            str(file),
            f"a {CHECKPOINT_FILE} of format {CHECKPOINT_FORMAT} written by "
            f"flwr-noise, but it could not be read ({type(error).__name__}: {error})",
        ) from error
