"""Checkpoints of a federated run, and resuming a run that was interrupted.

After every round the ServerApp writes ``checkpoint.npz`` into the run folder,
beside ``results.json``, atomically (a crash leaves the previous checkpoint,
never a truncated one). It holds everything the next round depends on:

- the global model (the ``ArrayRecord``'s arrays, byte for byte);
- the number of the last finished round;
- the run config it was made with;
- the state of Python's and NumPy's global random generators, which Flower's
  strategies use to sample clients;
- the state that Flower's stateful strategies carry from round to round
  (``STRATEGY_STATE_ATTRIBUTES``: FedAdam / FedYogi / FedAdagrad moments,
  FedAvgM momentum and model, the adaptive clipping norm), found anywhere in a
  chain of wrappers (``NoisyStrategy(FedAdam(...))``). FedAvg has none.

The results so far are in ``results.json``, written before the checkpoint of
the same round, so a resumed run drops at most the rounds recorded after the
last checkpoint and redoes them (see ``ResultsWriter(resume_after=...)``).

Noise streams depend only on (seed, partition, round, purpose) and the
clients' mini-batches on (seed, partition, round), so a resumed run draws the
same noise and batches as the uninterrupted run would have. With
``NoisyStrategy(client_key_fn=...)`` replies are averaged, and clients sampled
(``fraction-train < 1``), in partition order, so with the restored random state
its rounds are equal bit for bit whatever node ids Flower assigns.

Limit: strategy state outside ``STRATEGY_STATE_ATTRIBUTES`` (a custom
strategy's own attributes) is not saved.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from flwr_noise_app.config import AppConfig, RunConfigValue
from flwr_noise_app.results import ResultsWriter, atomic_write, validate_run_name

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = 1
# Run config keys whose value may change when a run is resumed; every other
# key must keep the value the run was started with.
RESUMABLE_CONFIG_CHANGES: tuple[str, ...] = (
    "num-server-rounds",
    "round-timeout",
    "min-nodes",
    "resume",
    "results-dir",
    "run-name",
)
# Attributes in which Flower's strategies keep state from one round to the next.
STRATEGY_STATE_ATTRIBUTES: tuple[str, ...] = (
    "m_t",  # FedAdam, FedYogi, FedAdagrad (FedOpt)
    "v_t",
    "momentum_vector",  # FedAvgM
    "current_arrays",  # FedAvgM keeps it across rounds (others reset it each round)
    "clipping_norm",  # DifferentialPrivacy*AdaptiveClipping
)

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


def _strategy_chain(strategy: Strategy) -> list[Strategy]:
    """Return ``strategy`` and the strategies it wraps (``.strategy``), outer first."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)  # type: ignore[attr-defined]
    return chain


def capture_strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Return the round-to-round state of ``strategy`` and the strategies it wraps.

    Parameters
    ----------
    strategy : Strategy
        The strategy, possibly a wrapper (e.g. ``NoisyStrategy(FedAdam(...))``).

    Returns
    -------
    dict[str, Any]
        ``"<depth>.<attribute>"`` -> value, for every attribute of
        ``STRATEGY_STATE_ATTRIBUTES`` that is set (not ``None``); empty for
        FedAvg.

    """
    state: dict[str, Any] = {}
    for depth, member in enumerate(_strategy_chain(strategy)):
        for attribute in STRATEGY_STATE_ATTRIBUTES:
            value = getattr(member, attribute, None)
            if value is not None:
                state[f"{depth}.{attribute}"] = value
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Set the state from ``capture_strategy_state`` on the same kind of strategy.

    Raises
    ------
    ValueError
        If the state names a strategy or attribute that ``strategy`` lacks (it
        was saved from a different strategy).

    """
    chain = _strategy_chain(strategy)
    for name, value in state.items():
        depth, _, attribute = name.partition(".")
        if (
            not depth.isdigit()
            or int(depth) >= len(chain)
            or attribute not in STRATEGY_STATE_ATTRIBUTES
            or not hasattr(chain[int(depth)], attribute)
        ):
            names = "(".join(type(member).__name__ for member in chain)
            raise ValueError(
                f"strategy state {name!r} is not allowed for {names}"
                f"{')' * (len(chain) - 1)}: expected the state of the same strategy "
                "(and wrappers) as the checkpoint's"
            )
        setattr(chain[int(depth)], attribute, value)


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
    raise TypeError(
        f"checkpoint value of type {type(value).__name__} is not allowed: expected "
        "numbers, strings, None, ndarrays, ArrayRecords, and lists, tuples or "
        "dicts of them"
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
            raise ValueError(f"format {meta.get('format')!r}")
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
        raise ValueError(
            f"checkpoint file {str(file)!r} is not allowed: expected a "
            f"{CHECKPOINT_FILE} of format {CHECKPOINT_FORMAT} written by flwr-noise, "
            f"but it could not be read ({type(error).__name__}: {error})"
        ) from error


class Checkpointer:
    """Save a run's checkpoint after every round.

    Parameters
    ----------
    run_dir : str | Path
        The run folder (the results writer's ``run_dir``).
    config : Mapping[str, RunConfigValue]
        The run config, stored in every checkpoint.
    strategy : Strategy | None (default: None)
        The strategy whose round-to-round state is saved.

    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, RunConfigValue],
        strategy: Strategy | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.strategy = strategy

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.run_dir / CHECKPOINT_FILE

    def save(self, server_round: int, arrays: ArrayRecord) -> Path:
        """Save the state after ``server_round`` with global model ``arrays``."""
        return save_checkpoint(
            self.run_dir,
            Checkpoint(
                server_round=server_round,
                arrays=arrays,
                config=self.config,
                rng_state=capture_rng_state(),
                strategy_state=(
                    {}
                    if self.strategy is None
                    else capture_strategy_state(self.strategy)
                ),
            ),
        )


def _resume_error(config: AppConfig, reason: str) -> ValueError:
    return ValueError(
        f"run config key 'resume' = {config.resume!r} is not allowed: {reason}"
    )


def resolve_run_folder(config: AppConfig) -> Path:
    """Return the run folder that ``config.resume`` names.

    ``resume`` is tried as a run name in ``results-dir`` first, then as a path
    (absolute, or relative to the working directory); the first folder that
    holds ``checkpoint.npz`` is the one.

    Raises
    ------
    ValueError
        If no such folder holds a checkpoint, or its name is not a valid run
        name (the results writer could not reopen it).

    """
    candidates = [Path(config.results_dir) / config.resume, Path(config.resume)]
    for folder in candidates:
        if (folder.expanduser() / CHECKPOINT_FILE).is_file():
            run_dir = folder.expanduser().resolve()
            try:
                validate_run_name(run_dir.name)
            except ValueError as error:
                expected = str(error).partition("is not allowed: ")[2]
                raise _resume_error(
                    config,
                    f"its folder's name {run_dir.name!r} is not a run name; {expected}",
                ) from None
            return run_dir
    tried = " or ".join(repr(str(folder / CHECKPOINT_FILE)) for folder in candidates)
    raise _resume_error(
        config,
        f"found no {tried}; expected '' (a new run), or the name (in results-dir) "
        "or the path of the folder of an earlier run, which holds its checkpoint",
    )


def check_resumable(saved: Mapping[str, Any], config: AppConfig) -> None:
    """Check that ``config`` may continue a run started with ``saved``.

    Only the keys in ``RESUMABLE_CONFIG_CHANGES`` may differ.

    Raises
    ------
    ValueError
        Naming the first key that differs, its value and the saved one.

    """
    current = config.to_dict()
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CONFIG_CHANGES or saved.get(key) == current.get(key):
            continue
        allowed = ", ".join(repr(name) for name in RESUMABLE_CONFIG_CHANGES)
        raise ValueError(
            f"run config key {key!r} = {current.get(key)!r} is not allowed when "
            f"resuming: expected {saved.get(key)!r}, the value the run was started "
            f"with (only {allowed} may change)"
        )


@dataclass(frozen=True, eq=False)
class ResumePoint:
    """Where and from what state a resumed run continues.

    Attributes
    ----------
    run_dir : Path
        The run folder, which the resumed run keeps writing to.
    checkpoint : Checkpoint
        Its last checkpoint.

    """

    run_dir: Path
    checkpoint: Checkpoint

    @property
    def next_round(self) -> int:
        """The first round the resumed run trains."""
        return self.checkpoint.server_round + 1

    def results_writer(self, config: AppConfig) -> ResultsWriter:
        """Reopen the run's results to append the rounds after the checkpoint."""
        return ResultsWriter(
            self.run_dir.parent,
            self.run_dir.name,
            config.to_dict(),
            resume_after=self.checkpoint.server_round,
        )

    def restore(self, strategy: Strategy) -> ArrayRecord:
        """Restore the random and strategy state; return the global model."""
        restore_strategy_state(strategy, self.checkpoint.strategy_state)
        restore_rng_state(self.checkpoint.rng_state)
        return self.checkpoint.arrays


def find_resume_point(config: AppConfig) -> ResumePoint | None:
    """Return where ``config`` resumes a run, ``None`` for a new run.

    Everything is checked here, before anything runs or is written: the run
    folder and its checkpoint exist and can be read, the config keeps the
    values the run was started with, and ``num-server-rounds`` is not below
    the rounds already done.

    Raises
    ------
    ValueError
        Naming the run config key, its value and what is allowed.

    """
    if not config.resume:
        return None
    run_dir = resolve_run_folder(config)
    try:
        checkpoint = load_checkpoint(run_dir)
    except ValueError as error:
        raise _resume_error(
            config, str(error).partition("is not allowed: ")[2]
        ) from None
    check_resumable(checkpoint.config, config)
    done = checkpoint.server_round
    if config.num_server_rounds < done:
        raise ValueError(
            f"run config key 'num-server-rounds' = {config.num_server_rounds!r} is "
            f"not allowed when resuming run {str(run_dir)!r}: expected an int >= "
            f"{done}, the rounds it has done"
        )
    return ResumePoint(run_dir, checkpoint)
