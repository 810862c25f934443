"""The run folder: one object owns ``<results-dir>/<run-name>`` and its files.

``RunFolder.open`` is called before any node is contacted. For a new run it
creates the folder exclusively (a run-name that is taken is refused, so no
run ever writes into another run's folder); with ``resume`` it checks
everything it will read (the checkpoint's format, round and config, the
model's names, shapes, dtypes and finiteness against the model the config
builds, the random state, the strategy state, and ``results.json``'s rounds)
and removes temporary files that crashed writers left. Then the run only
talks to the folder: ``start`` (the model to begin with), ``record_round``,
``save_checkpoint``, ``update_info``, and leaving the ``with`` block marks
the run complete or failed.

Paths: a relative ``results-dir`` (or ``resume`` path) is resolved against
the working directory of the process that runs the ServerApp (with ``flwr
run`` against a local SuperLink: the directory that SuperLink was started
in); ``RunFolder.path`` is absolute, and is what the App logs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from flwr_noise.validation import not_allowed
from flwr_noise_app.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    capture_rng_state,
    capture_strategy_state,
    load_checkpoint,
    restore_rng_state,
    restore_strategy_state,
    rng_state_problem,
    save_checkpoint,
    strategy_numbers,
)
from flwr_noise_app.config import AppConfig, key_label
from flwr_noise_app.results import (
    ResultsWriter,
    process_is_running,
    remove_stale_temporaries,
)

# Held by the ServerApp that writes the folder: "<pid>@<host>".
LOCK_FILE = ".lock"
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


class RunFolder:
    """A run's folder: results, CSV, plot and checkpoint, with one owner.

    Build it with ``RunFolder.open``; use it as a context manager.

    Parameters
    ----------
    config : AppConfig
        The validated run config.
    results : ResultsWriter
        The writer of ``results.json``, ``results.csv``, ``results.png``.
    checkpoint : Checkpoint | None
        The checkpoint a resumed run continues from; ``None`` for a new run.
    strategy : Strategy | None
        The strategy whose state is checkpointed.
    baseline : Mapping[str, Any] | None
        ``strategy_numbers`` of the strategy as built (before any restore).
    lock : Path | None
        The folder's ``LOCK_FILE``, held until the ``with`` block ends.

    """

    def __init__(
        self,
        config: AppConfig,
        results: ResultsWriter,
        checkpoint: Checkpoint | None,
        strategy: Strategy | None,
        baseline: Mapping[str, Any] | None,
        lock: Path | None = None,
    ) -> None:
        self._lock = lock
        self._config = config
        self._results = results
        self._resumed_from = checkpoint
        self._strategy = strategy
        self._baseline = baseline

    @classmethod
    def open(
        cls,
        config: AppConfig,
        model: ArrayRecord,
        strategy: Strategy | None = None,
        *,
        plot: bool = True,
    ) -> RunFolder:
        """Create the folder of a new run, or check and reopen a resumed one.

        Parameters
        ----------
        config : AppConfig
            The run config; ``config.resume`` names a run to continue.
        model : ArrayRecord
            The initial global model the config builds: a checkpoint must
            hold the same names, shapes and dtypes.
        strategy : Strategy | None (default: None)
            The strategy; a resumed run's strategy state is restored into it
            here.
        plot : bool (default: True)
            Whether to draw ``results.png``.

        Raises
        ------
        ValueError
            One line naming the run config key (``run-name``, ``resume``,
            ``num-server-rounds`` or the key that changed) and what is
            allowed, if the run-name is taken or the run to resume cannot be
            continued. Nothing was written then.

        """
        results_dir = Path(config.results_dir).expanduser().absolute()
        baseline = None if strategy is None else strategy_numbers(strategy)
        if not config.resume:
            try:
                results = ResultsWriter(
                    results_dir, config.run_name, config.to_dict(), plot=plot
                )
            except FileExistsError:
                raise not_allowed(
                    key_label("run-name"),
                    config.run_name,
                    f"a name not used yet in {str(results_dir)!r} (its folder "
                    f"exists; to continue that run add resume={config.run_name!r}, "
                    "else choose another run-name)",
                ) from None
            lock = _lock(
                results.run_dir,
                lambda reason: not_allowed(
                    key_label("run-name"), config.run_name, reason
                ),
            )
            return cls(config, results, None, strategy, baseline, lock)

        path = _resume_folder(config, results_dir)
        checkpoint = _checked_checkpoint(config, path, model)
        if strategy is not None:
            try:
                restore_strategy_state(strategy, checkpoint.strategy_state)
            except ValueError as error:
                raise _resume_error(
                    config, f"a checkpoint of this App's strategy ({error})"
                ) from None
        lock = _lock(path, lambda reason: _resume_error(config, reason))
        remove_stale_temporaries(path)
        try:
            results = ResultsWriter(
                path.parent,
                path.name,
                config.to_dict(),
                plot=plot,
                resume_after=checkpoint.server_round,
            )
        except (OSError, ValueError) as error:
            lock.unlink(missing_ok=True)
            raise _resume_error(
                config, f"a run folder with its results.json ({error})"
            ) from None
        return cls(config, results, checkpoint, strategy, baseline, lock)

    @property
    def path(self) -> Path:
        """The run folder (absolute)."""
        return self._results.run_dir

    @property
    def results(self) -> ResultsWriter:
        """The results writer (read its ``rounds``, ``status``, paths)."""
        return self._results

    @property
    def first_round(self) -> int:
        """The first round this run trains (``1`` unless it resumes)."""
        done = 0 if self._resumed_from is None else self._resumed_from.server_round
        return done + 1

    def start(self, model: ArrayRecord) -> ArrayRecord:
        """Return the model to begin with, and checkpoint the starting point.

        A resumed run gets its checkpoint's model, and the random state of
        its checkpoint is restored (call this right before the first round).

        Parameters
        ----------
        model : ArrayRecord
            The initial model of a new run.

        """
        if self._resumed_from is not None:
            restore_rng_state(self._resumed_from.rng_state)
            model = self._resumed_from.arrays
        self.save_checkpoint(self.first_round - 1, model)
        return model

    def record_round(self, entry: Mapping[str, Any]) -> None:
        """Append one round's entry to the results (see ``ResultsWriter``)."""
        self._results.add_round(entry)

    def update_info(self, **facts: Any) -> None:
        """Store facts about the run under ``info`` in ``results.json``."""
        self._results.update_info(**facts)

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path:
        """Save the state after ``server_round`` (after its results entry)."""
        return save_checkpoint(
            self.path,
            Checkpoint(
                server_round=server_round,
                arrays=arrays,
                config=self._config.to_dict(),
                rng_state=capture_rng_state(),
                strategy_state=(
                    {}
                    if self._strategy is None
                    else capture_strategy_state(self._strategy, self._baseline)
                ),
            ),
        )

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._results.__exit__(exc_type, exc, tb)
        finally:
            if self._lock is not None:
                self._lock.unlink(missing_ok=True)


def _lock(folder: Path, refuse: Callable[[str], Exception]) -> Path:
    """Take the folder's lock, so one ServerApp at a time writes it.

    A lock left by a process that is gone (on this machine) is taken over;
    one held by a live process, or by another machine, refuses the run.
    """
    lock = folder / LOCK_FILE
    owner = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text(encoding="utf-8", errors="replace").strip()
            except FileNotFoundError:
                continue  # released meanwhile
            pid, _, host = holder.partition("@")
            if host == socket.gethostname() and pid.isdigit():
                if not process_is_running(int(pid)):
                    lock.unlink(missing_ok=True)
                    continue
            raise refuse(
                f"a run folder that no other ServerApp is writing ({str(lock)!r} "
                f"is held by process {holder!r}; delete it if that process is "
                "gone)"
            ) from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(owner)
        return lock
    raise refuse(f"a run folder whose lock {str(lock)!r} can be taken")


def _resume_error(config: AppConfig, expected: str) -> ValueError:
    return not_allowed(key_label("resume"), config.resume, expected)


def _resume_folder(config: AppConfig, results_dir: Path) -> Path:
    """Return the folder ``config.resume`` names: a run in results-dir, or a path."""
    candidates = [results_dir / config.resume, Path(config.resume).expanduser()]
    for folder in candidates:
        if (folder / CHECKPOINT_FILE).is_file():
            return folder.absolute()
    tried = " or ".join(
        repr(str(folder.absolute() / CHECKPOINT_FILE)) for folder in candidates
    )
    raise _resume_error(
        config,
        "'' (a new run), or the name (in results-dir) or the path of the folder "
        f"of an earlier run, which holds its checkpoint; found no {tried}",
    )


def check_resumable(saved: Mapping[str, Any], config: AppConfig) -> None:
    """Check that ``config`` may continue a run started with ``saved``.

    Only the keys in ``RESUMABLE_CONFIG_CHANGES`` may differ; a key the saved
    config lacks (added to the App since) must have its default value.

    Raises
    ------
    ValueError
        Naming the first key that differs, its value and the saved one.

    """
    current = config.to_dict()
    defaults = AppConfig().to_dict()
    allowed = ", ".join(repr(name) for name in RESUMABLE_CONFIG_CHANGES)
    for key in sorted(set(saved) | set(current)):
        before = saved.get(key, defaults.get(key))
        if key in RESUMABLE_CONFIG_CHANGES or before == current.get(key):
            continue
        raise not_allowed(
            key_label(key),
            current.get(key),
            f"{before!r} when resuming, the value the run was started with (only "
            f"{allowed} may change)",
        )


def _checked_checkpoint(
    config: AppConfig, path: Path, model: ArrayRecord
) -> Checkpoint:
    """Load the checkpoint of ``path`` and check all of it against ``config``."""
    try:
        checkpoint = load_checkpoint(path)
    except ValueError as error:
        raise _resume_error(config, f"a readable checkpoint ({error})") from None
    check_resumable(checkpoint.config, config)
    done = checkpoint.server_round
    if done < 0:
        raise _resume_error(config, f"a checkpoint of a round >= 0, not {done}")
    if config.num_server_rounds < done:
        raise not_allowed(
            key_label("num-server-rounds"),
            config.num_server_rounds,
            f"an int >= {done} when resuming run {str(path)!r}, the rounds it has done",
        )
    problem = _model_problem(checkpoint.arrays, model)
    if problem is not None:
        raise _resume_error(
            config,
            f"a checkpoint whose model is usable ({path / CHECKPOINT_FILE}: {problem})",
        )
    problem = rng_state_problem(checkpoint.rng_state)
    if problem is not None:
        raise _resume_error(
            config, f"a checkpoint with a usable random state ({problem})"
        )
    return checkpoint


def _model_problem(saved: Any, model: ArrayRecord) -> str | None:
    """Say what is wrong with a checkpoint's model, or ``None`` if nothing is."""
    if not isinstance(saved, ArrayRecord):
        return "it holds no model"
    if list(saved.keys()) != list(model.keys()):
        return f"its arrays {list(saved.keys())} differ from the model's"
    for name, array in saved.items():
        expected = model[name]
        if (array.dtype, tuple(array.shape)) != (expected.dtype, tuple(expected.shape)):
            return (
                f"{name!r} is {array.dtype} {tuple(array.shape)}, the model has "
                f"{expected.dtype} {tuple(expected.shape)}"
            )
        try:
            values = array.numpy()
        except Exception as error:  # bytes that do not decode
            return f"{name!r} cannot be decoded ({type(error).__name__})"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"{name!r} holds NaN or Inf"
    return None
