"""Results of a run: ``results.json``, ``results.csv`` and ``results.png``.

``ResultsWriter`` rewrites the JSON and the CSV after every round (the plot
at most every few seconds, and at the end). Each file is written to a
temporary file in the same folder and moved into place with ``os.replace``,
so a crash never leaves a truncated file, and a run that stopped early still
says ``"status": "running"`` (or ``"failed"``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from flwr_noise.validation import not_allowed
from flwr_noise_app.config import check_run_name

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_PNG = "results.png"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
STATUSES: tuple[str, ...] = (STATUS_RUNNING, STATUS_COMPLETE, STATUS_FAILED)

REQUIRED_ROUND_KEYS: tuple[str, ...] = (
    "round",
    "global_accuracy",
    "global_loss",
    "local_accuracy_mean",
    "local_accuracy_min",
    "local_accuracy_max",
)


def make_run_name(config: Mapping[str, Any], *, now: datetime | None = None) -> str:
    """Return an automatic run name: local timestamp and a short config hash.

    Parameters
    ----------
    config : Mapping[str, Any]
        The run's whole config; equal configs give equal hashes.
    now : datetime | None
        The time to stamp (default: now).

    Returns
    -------
    run_name : str
        For example ``"20250131-142501-3f2a9c1d"``.

    """
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    canonical = json.dumps(_jsonable(config, "config"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]
    return f"{stamp}-{digest}"


def validate_run_name(run_name: str) -> str:
    """Return ``run_name`` if it is a valid run folder name, else raise.

    See ``flwr_noise_app.config.check_run_name`` (at most
    ``MAX_RUN_NAME_LENGTH`` letters, digits, ``.``, ``_`` and ``-``, starting
    with a letter or digit).
    """
    return check_run_name("run_name", run_name)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run's results.

    Parameters
    ----------
    path : str | os.PathLike[str]
        A ``results.json`` file or the run folder that holds it.

    Returns
    -------
    results : dict[str, Any]
        The parsed ``results.json`` (``run_name``, ``config``, ``rounds``,
        ``status``, ...). Non-finite numbers were stored as ``null``.

    Raises
    ------
    ValueError
        If the file is not a results file.

    """
    file = Path(path)
    if file.is_dir():
        file = file / RESULTS_JSON
    with file.open(encoding="utf-8") as handle:
        results = json.load(handle)
    if not isinstance(results, dict) or not {"rounds", "status", "config"} <= set(
        results
    ):
        raise not_allowed(
            "results file",
            str(file),
            "a JSON object with 'config', 'rounds' and 'status'",
        )
    return results


class ResultsWriter:
    """Write a run's results after every round.

    The run folder is ``<results_dir>/<run_name>``. ``results.json`` is
    written at once (no rounds, status ``"running"``) and rewritten, with
    the CSV (and the plot, see ``plot_interval``), by every ``add_round``.
    Use it as a context manager to mark the run ``"complete"`` on a normal
    exit and ``"failed"`` on an exception.

    Parameters
    ----------
    results_dir : str | os.PathLike[str]
        Folder that holds the run folders; created when missing.
    run_name : str | None
        Name of the run folder: letters, digits, ``.``, ``_`` and ``-``.
        ``None`` or ``""``: ``make_run_name(config)``, with a numeric suffix
        when that folder exists already. The folder is created exclusively:
        a new run never writes into an existing folder.
    config : Mapping[str, Any]
        The run's whole config (JSON-serializable values).
    plot : bool
        Whether to write ``results.png``.
    plot_interval : float
        While the run is running, ``results.png`` is redrawn at most once per
        this many seconds (drawing takes a few tenths of a second, more than
        a small round); ``0`` redraws it after every round. Finishing the run
        always redraws it.
    resume_after : int | None
        ``None`` (default): a new run. An int ``n >= 0``: continue the
        interrupted run in the existing folder ``<results_dir>/<run_name>``
        after its round ``n`` (its last checkpoint). Its ``results.json`` is
        loaded: rounds ``1..n`` are kept, later ones (recorded after the last
        checkpoint) are dropped, since the resumed run redoes them; the start
        time and ``info`` are kept, ``info["resumed"]`` lists every resume;
        the status goes back to ``"running"``.

    Raises
    ------
    ValueError
        If ``run_name`` is not valid, or when resuming: the folder holds no
        results file, or its rounds are not ``1..resume_after``.
    FileNotFoundError
        When resuming a folder without ``results.json``.
    FileExistsError
        For a new run whose explicit ``run_name`` folder exists already.

    Examples
    --------
    >>> with ResultsWriter("results", "", config) as writer:  # doctest: +SKIP
    ...     writer.add_round({"round": 1, "global_accuracy": 0.9, ...})

    """

    def __init__(
        self,
        results_dir: str | os.PathLike[str],
        run_name: str | None,
        config: Mapping[str, Any],
        *,
        plot: bool = True,
        plot_interval: float = 5.0,
        resume_after: int | None = None,
    ) -> None:
        self._config = _jsonable(config, "config")
        if not isinstance(self._config, dict):
            raise not_allowed("config", config, "a mapping", TypeError)
        resuming = resume_after is not None
        run_dir = _run_folder(Path(results_dir), run_name, self._config, resuming)
        self._run_dir = run_dir
        self._files = _ResultFiles(run_dir, plot=plot, plot_interval=plot_interval)
        self._info: dict[str, Any] = {}
        self._status = STATUS_RUNNING
        self._started_at = _utc_now()
        self._finished_at: str | None = None
        self._error: str | None = None
        if resume_after is not None:
            rounds, self._info, started_at = _resumed(run_dir, resume_after)
            for entry in rounds:
                self._files.append(entry)
            self._started_at = started_at or self._started_at
        self._files.write_json(self._head())

    @property
    def run_name(self) -> str:
        """The run's name (its folder's name)."""
        return self._run_dir.name

    @property
    def run_dir(self) -> Path:
        """The folder the files are written to."""
        return self._run_dir

    @property
    def json_path(self) -> Path:
        """Path of ``results.json``."""
        return self._files.json_path

    @property
    def csv_path(self) -> Path:
        """Path of ``results.csv``."""
        return self._files.csv_path

    @property
    def png_path(self) -> Path:
        """Path of ``results.png``."""
        return self._files.png_path

    @property
    def status(self) -> str:
        """``"running"``, ``"complete"`` or ``"failed"``."""
        return self._status

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Copies of the rounds recorded so far."""
        return [dict(entry) for entry in self._files.rounds]

    def add_round(self, metrics: Mapping[str, Any]) -> None:
        """Record one round and rewrite the files.

        Parameters
        ----------
        metrics : Mapping[str, Any]
            The round's values: every key of ``REQUIRED_ROUND_KEYS`` (``round``
            an int greater than the previous round's, the others numbers),
            plus any JSON-serializable extras such as the noise injected.

        Raises
        ------
        ValueError
            If a required key is missing or the round number is not new.
        TypeError
            If a value has the wrong type or cannot be stored.
        RuntimeError
            If the run is finished already.

        """
        if self._status != STATUS_RUNNING:
            raise RuntimeError(
                f"run {self.run_name!r} is {self._status}: no rounds can be added"
            )
        entry = _checked_round(metrics)
        rounds = self._files.rounds
        if rounds and entry["round"] <= rounds[-1]["round"]:
            raise not_allowed(
                "metrics['round']",
                entry["round"],
                f"a round after {rounds[-1]['round']}",
            )
        self._files.append(entry)
        self._files.write_all(self._head(), final=False)

    def update_info(self, **fields: Any) -> None:
        """Add or replace top-level facts about the run and rewrite the JSON.

        They are stored under ``"info"`` in ``results.json``, e.g. the data
        source or the number of clients.
        """
        self._info.update(_jsonable(fields, "info"))
        self._files.write_json(self._head())

    def finish(
        self, status: str = STATUS_COMPLETE, *, error: str | None = None
    ) -> None:
        """Mark the run finished and rewrite the files.

        Parameters
        ----------
        status : str
            ``"complete"`` or ``"failed"``.
        error : str | None
            What went wrong, stored for a failed run.

        """
        if status not in (STATUS_COMPLETE, STATUS_FAILED):
            raise not_allowed("status", status, "'complete' or 'failed'")
        self._status = status
        self._error = error
        self._finished_at = _utc_now()
        self._files.write_all(self._head(), final=True)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._status != STATUS_RUNNING:
            return
        if exc is None:
            self.finish(STATUS_COMPLETE)
        else:
            self.finish(STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")

    def to_dict(self) -> dict[str, Any]:
        """Return the content of ``results.json``."""
        return {**self._head(), "rounds": self.rounds}

    def _head(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "status": self._status,
            "started_at": self._started_at,
            "finished_at": self._finished_at,
            "error": self._error,
            "config": self._config,
            "info": self._info,
        }


class _ResultFiles:
    """A run's rounds written to ``results.json``, ``results.csv`` and the plot.

    Each round is converted to JSON and to a CSV line once, when appended; a
    rewrite only joins the texts (measured: benchmarks in README).
    """

    def __init__(self, run_dir: Path, *, plot: bool, plot_interval: float) -> None:
        self.json_path = run_dir / RESULTS_JSON
        self.csv_path = run_dir / RESULTS_CSV
        self.png_path = run_dir / RESULTS_PNG
        self._plot = plot
        self._plot_interval = plot_interval
        self._last_plot: float | None = None
        self.rounds: list[dict[str, Any]] = []
        self._round_json: list[str] = []
        self._csv_columns: list[str] = list(REQUIRED_ROUND_KEYS)
        self._csv_lines: list[str] = []

    def append(self, entry: dict[str, Any]) -> None:
        """Add a checked round entry (see ``_checked_round``)."""
        round_json = json.dumps(entry, allow_nan=False)
        columns = self._csv_columns + [
            key for key in entry if key not in self._csv_columns
        ]
        if len(columns) > len(self._csv_columns):  # a new column: redo every line
            lines = [_csv_line(row, columns) for row in [*self.rounds, entry]]
        else:
            lines = [*self._csv_lines, _csv_line(entry, columns)]
        self.rounds.append(entry)
        self._round_json.append(round_json)
        self._csv_columns, self._csv_lines = columns, lines

    def write_json(self, head: Mapping[str, Any]) -> None:
        """Write ``results.json``: ``head`` indented, then one round per line."""
        rounds = ",\n    ".join(self._round_json)
        text = json.dumps(head, indent=2, allow_nan=False)[: -len("\n}")]
        text += ',\n  "rounds": [' + (f"\n    {rounds}\n  " if rounds else "")
        text += "]\n}\n"
        atomic_write(self.json_path, lambda handle: handle.write(text), binary=False)

    def write_all(self, head: Mapping[str, Any], *, final: bool) -> None:
        """Write the JSON, the CSV and (when due, or ``final``) the plot."""
        self.write_json(head)
        text = "".join([_csv_line(None, self._csv_columns), *self._csv_lines])
        atomic_write(self.csv_path, lambda handle: handle.write(text), binary=False)
        if not self._plot or not self.rounds:
            return
        now = time.monotonic()
        if (
            final
            or self._last_plot is None
            or now - self._last_plot >= self._plot_interval
        ):
            atomic_write(self.png_path, _plot_rounds(self.rounds), binary=True)
            self._last_plot = now


def _resumed(
    run_dir: Path, resume_after: int
) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """Return a resumed run's rounds ``1..resume_after``, info and start time.

    The rounds are checked; the info lists this resume under ``"resumed"``.
    """
    if isinstance(resume_after, bool) or not isinstance(resume_after, numbers.Integral):
        raise not_allowed(
            "resume_after", resume_after, "an int >= 0 or None", TypeError
        )
    if resume_after < 0:
        raise not_allowed("resume_after", resume_after, "an int >= 0 or None")
    previous = load_results(run_dir)
    rounds = [
        entry
        for entry in previous["rounds"]
        if not isinstance(entry, Mapping) or entry.get("round", 0) <= resume_after
    ]
    numbers_kept = [
        entry.get("round") if isinstance(entry, Mapping) else entry for entry in rounds
    ]
    label = f"results.json rounds of run {run_dir.name!r}"
    if numbers_kept != list(range(1, resume_after + 1)):
        raise not_allowed(
            label,
            numbers_kept,
            f"rounds 1 to {resume_after} to resume after round {resume_after}",
        )
    try:
        rounds = [
            _checked_round(entry, nullable=True, label=f"{label}[{index}]")
            for index, entry in enumerate(rounds)
        ]
    except TypeError as error:
        # Resuming refuses a damaged file with a ValueError, whatever is wrong.
        raise ValueError(*error.args) from None
    info = dict(previous.get("info") or {})
    info["resumed"] = [
        *info.get("resumed", []),
        {"at": _utc_now(), "after_round": int(resume_after)},
    ]
    return rounds, info, previous.get("started_at")


def _checked_round(
    metrics: Mapping[str, Any], *, nullable: bool = False, label: str = "metrics"
) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise not_allowed(label, metrics, "a mapping", TypeError)
    for key in REQUIRED_ROUND_KEYS:
        if key not in metrics:
            raise not_allowed(
                f"{label} keys",
                list(metrics),
                "every one of "
                + ", ".join(repr(required) for required in REQUIRED_ROUND_KEYS)
                + f" ({key!r} is missing)",
            )
    round_number = metrics["round"]
    if (
        isinstance(round_number, bool)
        or not isinstance(round_number, numbers.Integral)
        or round_number < 1
    ):
        raise not_allowed(f"{label}['round']", round_number, "an int >= 1", TypeError)
    for key in REQUIRED_ROUND_KEYS[1:]:
        value = metrics[key]
        if nullable and value is None:  # a non-finite number, as stored
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise not_allowed(f"{label}[{key!r}]", value, "a number", TypeError)
    entry = {
        str(key): _jsonable(value, f"{label}[{key!r}]")
        for key, value in metrics.items()
    }
    entry["round"] = int(round_number)
    return entry


def _jsonable(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data; non-finite floats become ``None``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {
            str(key): _jsonable(item, f"{where}[{key!r}]")
            for key, item in value.items()
        }
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist(), where)
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(
        value, (bytes, bytearray)
    ):
        return [_jsonable(item, where) for item in value]
    raise not_allowed(
        where,
        value,
        "JSON data (numbers, strings, booleans, None, lists, mappings)",
        TypeError,
    )


def _csv_line(entry: Mapping[str, Any] | None, columns: list[str]) -> str:
    """Return one CSV line of ``entry`` (``None``: the header) in ``columns``."""

    def cell(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, (list, dict)):
            return json.dumps(value)
        return value

    buffer = io.StringIO()
    row = columns if entry is None else [cell(entry.get(key)) for key in columns]
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def _plot_rounds(rounds: list[dict[str, Any]]) -> Callable[[IO[Any]], None]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> list[float]:
        return [math.nan if entry[key] is None else entry[key] for entry in rounds]

    x = [entry["round"] for entry in rounds]
    figure = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without pyplot's global state: thread-safe
    accuracy, loss = figure.subplots(1, 2)
    accuracy.plot(x, series("global_accuracy"), marker="o", label="global model")
    accuracy.plot(
        x, series("local_accuracy_mean"), marker=".", label="local models (mean)"
    )
    accuracy.fill_between(
        x,
        series("local_accuracy_min"),
        series("local_accuracy_max"),
        alpha=0.25,
        label="local models (min-max)",
    )
    accuracy.set_xlabel("round")
    accuracy.set_ylabel("test accuracy")
    accuracy.legend(loc="lower right")
    accuracy.grid(alpha=0.3)
    loss.plot(x, series("global_loss"), marker="o", color="tab:red")
    loss.set_xlabel("round")
    loss.set_ylabel("global model test loss")
    loss.grid(alpha=0.3)

    def write(handle: IO[Any]) -> None:
        figure.savefig(handle, format="png", dpi=100)

    return write


def atomic_write(path: Path, write: Callable[[IO[Any]], Any], *, binary: bool) -> None:
    """Write a file so that readers and crashes only ever see a whole one.

    ``write`` fills a temporary file in the same folder, which is flushed to
    disk and moved over ``path`` with ``os.replace`` (atomic on POSIX and
    Windows). A crash leaves the old file, or none, never a truncated one.

    Parameters
    ----------
    path : Path
        The file to (re)write; its folder must exist.
    write : Callable[[IO[Any]], Any]
        Writes the content to the stream it is given.
    binary : bool
        Whether the stream is binary (else UTF-8 text, no newline
        translation).

    """
    temporary = path.with_name(
        f"{_TEMPORARY_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex}"
        f"{_TEMPORARY_SUFFIX}"
    )
    try:
        # open() honours the umask (mkstemp would make the file private).
        text_mode: dict[str, Any] = {"encoding": "utf-8", "newline": ""}
        with open(
            temporary, "xb" if binary else "x", **({} if binary else text_mode)
        ) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


_TEMPORARY_PREFIX = "."
_TEMPORARY_SUFFIX = ".tmp"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that crashed ``atomic_write`` calls left.

    A temporary file is stale when the process that wrote it (its name holds
    the process id) is no longer running on this machine.

    Returns
    -------
    list[Path]
        The files removed.

    """
    removed = []
    for candidate in folder.glob(f"{_TEMPORARY_PREFIX}*{_TEMPORARY_SUFFIX}"):
        parts = candidate.name.split(".")
        pid = parts[-3] if len(parts) >= 4 else ""
        if not pid.isdigit() or process_is_running(int(pid)):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def process_is_running(pid: int) -> bool:
    """Return whether a process with id ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run_folder(base: Path, run_name: str | None, config: Any, resuming: bool) -> Path:
    """Return the folder of a resumed run, or create a new run's folder.

    A new run's folder must be new (``mkdir`` is atomic, race-free).
    """
    if resuming:
        if not run_name:
            raise not_allowed(
                "run_name", run_name, "the name of the run folder to continue"
            )
        return base / run_name
    base.mkdir(parents=True, exist_ok=True)
    if run_name:
        folder = base / validate_run_name(run_name)
        folder.mkdir()  # FileExistsError: never write into another run's folder
        return folder
    name = make_run_name(config)
    for suffix in itertools.count(1):
        folder = base / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
