"""Shared helpers of the App benchmarks: bench_wrapper, bench_floor, bench_scale.

The App is run in this process with Flower's Simulation Runtime
(``flwr.simulation.run_simulation``, Ray backend): the ServerApp runs in a
thread of this process, the ClientApps in Ray actor processes. Flower 1.39's
public ``run_simulation`` takes no run config (server and clients get an empty
one), so :func:`run_app` wraps the App's own ``main`` / ``train`` / ``query``
functions in a ServerApp and a ClientApp that hand them a ``Context`` whose run
config is the App's ``[tool.flwr.app.config]`` plus the benchmark's overrides,
the same fused config ``flwr run --run-config`` produces.

Timings are wall-clock; :func:`interleave` runs the variants of a benchmark in
a rotating order (A B C, B C A, ...) so that machine load hits all of them
alike, and the benchmarks report medians and their ratios.
"""

from __future__ import annotations

import cProfile
import datetime
import importlib
import io
import json
import logging
import math
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from unittest import mock

BENCHMARKS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
# The MNIST test set (10,000 images) that tests and benchmarks use offline.
MNIST_T10K_DIR = PROJECT_ROOT.parent / "shared" / "data" / "mnist-t10k"

if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

# Flower sends telemetry events from `run_simulation` unless this is off.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.serverapp import Grid

T = TypeVar("T")
RunConfig = dict[str, bool | int | float | str]

# Every kind of noise off: the App then runs NoisyStrategy(FedAvg) as a no-op.
NOISE_OFF: RunConfig = {
    "local-noise-std": 0.0,
    "broadcast-noise-std": 0.0,
    "aggregation-noise-std": 0.0,
}


def quiet_logs(verbose: bool = False) -> None:
    """Keep Flower's per-round INFO logs and Ray's start-up warnings off the table.

    Both variants of every comparison run with the same logging, so this does
    not favour either side.
    """
    # Flower sets its logger's level when its logging module is imported.
    from flwr.supercore import logger

    logger.FLOWER_LOGGER.setLevel(logging.INFO if verbose else logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")


def app_run_config(overrides: Mapping[str, Any]) -> RunConfig:
    """Return the App's run config as ``flwr run --run-config`` would fuse it.

    Parameters
    ----------
    overrides : Mapping[str, Any]
        Run config keys to override (``num-server-rounds``, ...).

    Returns
    -------
    RunConfig
        ``[tool.flwr.app.config]`` of ``pyproject.toml`` with ``overrides``
        applied, validated by ``AppConfig``.

    Raises
    ------
    ValueError, TypeError
        If a key is unknown or a value is not allowed (from ``AppConfig``).

    """
    from flwr.common.config import get_fused_config_from_dir

    from flwr_noise_app.config import AppConfig

    run_config = get_fused_config_from_dir(PROJECT_ROOT, dict(overrides))
    AppConfig.from_run_config(run_config)
    return dict(run_config)


def bench_settings(
    args: Any, quick: Mapping[str, Any], default: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a benchmark's --quick/default settings with its command-line flags.

    Returns the settings (with ``clients``) and the App run config overrides
    (the settings without ``clients``).
    """
    settings = dict(quick if args.quick else default)
    for key, value in (
        ("clients", args.clients),
        ("num-server-rounds", args.rounds),
        ("local-steps", args.local_steps),
    ):
        if value is not None:
            settings[key] = value
    overrides = {key: value for key, value in settings.items() if key != "clients"}
    return settings, overrides


def backend_config(num_cpus_per_client: float) -> dict[str, Any]:
    """Return the Ray backend config: CPUs per ClientApp actor, quiet Ray logs.

    Ray starts ``floor(os.cpu_count() / num_cpus_per_client)`` actors, which
    run the ClientApps of all simulated SuperNodes in turn.
    """
    return {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }


# Running the App in this process --------------------------------------------


def _with_run_config(context: Context, run_config: Mapping[str, Any]) -> Context:
    """Return a copy of ``context`` (same state) with ``run_config``.

    The original is left alone: Flower refuses a ClientApp context whose run
    config changed.
    """
    from flwr.app import Context

    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=dict(run_config),
    )


# ClientApp profiles of this (actor) process, keyed by their output folder.
_CLIENT_PROFILES: dict[str, cProfile.Profile] = {}


@dataclass(frozen=True)
class RunConfigMod:
    """Flower mod: hand the ClientApp the benchmark's run config.

    With ``profile_dir``, every ClientApp call is also profiled with cProfile
    into ``<profile_dir>/client-<pid>.prof`` (one file per actor process,
    accumulated over its calls) and timed into ``client-<pid>.times``.
    """

    run_config: Mapping[str, Any]
    profile_dir: str | None = None

    def __call__(
        self, message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Call the ClientApp with the run config (and profile it)."""
        client_context = _with_run_config(context, self.run_config)
        if self.profile_dir is None:
            return call_next(message, client_context)
        profile = _CLIENT_PROFILES.setdefault(self.profile_dir, cProfile.Profile())
        start = time.perf_counter()
        profile.enable()
        try:
            return call_next(message, client_context)
        finally:
            profile.disable()
            elapsed = time.perf_counter() - start
            stem = Path(self.profile_dir) / f"client-{os.getpid()}"
            profile.dump_stats(f"{stem}.prof")
            with open(f"{stem}.times", "a") as times:
                times.write(f"{message.metadata.message_type} {elapsed:.6f}\n")


@dataclass
class GridCalls:
    """When the ServerApp sent each batch of messages and got the replies."""

    calls: list[tuple[str, int, float, float]] = field(default_factory=list)

    def record(self, grid: Grid) -> None:
        """Time every ``grid.send_and_receive`` call of this Grid instance."""
        send_and_receive = grid.send_and_receive

        def timed(messages: Sequence[Message], *, timeout: float | None = None) -> Any:
            messages = list(messages)
            kind = messages[0].metadata.message_type if messages else "none"
            start = time.perf_counter()
            replies = send_and_receive(messages, timeout=timeout)
            self.calls.append((kind, len(messages), start, time.perf_counter()))
            return replies

        grid.send_and_receive = timed  # type: ignore[method-assign]

    def starts(self, kind: str) -> list[float]:
        """Start times of the calls that sent messages of ``kind``."""
        return [start for name, _, start, _ in self.calls if name == kind]

    def seconds(self, kind: str) -> float:
        """Total duration of the calls that sent messages of ``kind``."""
        return sum(end - start for name, _, start, end in self.calls if name == kind)


@dataclass
class AppRun:
    """What one simulation of the App took.

    Attributes
    ----------
    wall_s : float
        The whole ``run_simulation`` call: Ray start-up, ServerApp, shutdown.
    server_s : float
        The ServerApp's ``main``: data loading, node discovery, rounds, results.
    startup_s : float
        From ``run_simulation`` to the first train message (Ray and its actors
        starting, the ServerApp loading data and discovering the nodes).
    discovery_s : float
        The ServerApp's query of every node's partition id (it waits for the
        Ray actors to start).
    round_s : list[float]
        Per round: from sending its train messages to sending the next round's
        (the last round: to the end of ``main``), so aggregation, evaluation
        and results writing are included.
    results : dict[str, Any]
        The run's ``results.json``.

    """

    wall_s: float
    server_s: float
    startup_s: float
    discovery_s: float
    round_s: list[float]
    results: dict[str, Any]

    @property
    def mean_round_s(self) -> float:
        """Mean seconds per round."""
        return statistics.fmean(self.round_s)

    def summary(self) -> dict[str, Any]:
        """Timings and the final round's metrics, for the JSON report."""
        last = self.results["rounds"][-1]
        return {
            "wall_s": self.wall_s,
            "server_s": self.server_s,
            "startup_s": self.startup_s,
            "discovery_s": self.discovery_s,
            "round_s": self.round_s,
            "final_global_accuracy": last["global_accuracy"],
            "final_local_accuracy_mean": last["local_accuracy_mean"],
        }


def plain_fedavg(strategy: Any, **_: Any) -> Any:
    """Stand-in for ``NoisyStrategy(...)`` that returns the wrapped strategy.

    ``server_app.app.main`` reads ``strategy.round_noise`` for its round
    entries, so the plain strategy gets an empty one.
    """
    strategy.round_noise = {}
    return strategy


def run_app(
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    plain: bool = False,
    profile_dir: Path | None = None,
) -> AppRun:
    """Run one simulation of the App in this process.

    Parameters
    ----------
    overrides : Mapping[str, Any]
        Run config overrides (``results-dir`` is set here, to a scratch folder).
    num_supernodes : int
        Number of simulated SuperNodes (clients).
    num_cpus_per_client : float
        CPUs Ray reserves per ClientApp actor.
    plain : bool
        Run the ServerApp with the plain ``FedAvg`` it configures instead of
        ``NoisyStrategy(FedAvg)``: ``server_app.app.NoisyStrategy`` is patched
        with :func:`plain_fedavg` for the call.
    profile_dir : Path | None
        Profile the ServerApp thread (``server.prof``) and every ClientApp call
        (``client-<pid>.prof``) into this folder.

    Returns
    -------
    AppRun
        The timings and the run's results.

    """
    # Imported here, so that a process that runs no App does not pay for them.
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client_app import app as client_module
    from server_app import app as server_module

    with tempfile.TemporaryDirectory(prefix="flwr-noise-bench-") as scratch:
        run_config = app_run_config({**overrides, "results-dir": scratch})
        grid_calls = GridCalls()
        server_times: dict[str, float] = {}
        profile = str(profile_dir) if profile_dir is not None else None

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            grid_calls.record(grid)
            server_context = _with_run_config(context, run_config)
            server_profile = cProfile.Profile() if profile else None
            server_times["start"] = time.perf_counter()
            if server_profile is not None:
                server_profile.enable()
            try:
                server_module.main(grid, server_context)
            finally:
                server_times["end"] = time.perf_counter()
                if server_profile is not None:
                    server_profile.disable()
                    server_profile.dump_stats(Path(profile) / "server.prof")

        client_app = ClientApp(mods=[RunConfigMod(run_config, profile)])
        client_app.train()(client_module.train)
        client_app.query()(client_module.query)

        strategy_patch = (
            mock.patch.object(server_module, "NoisyStrategy", plain_fedavg)
            if plain
            else _no_patch()
        )
        with strategy_patch:
            start = time.perf_counter()
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_supernodes,
                backend_config=backend_config(num_cpus_per_client),
            )
            wall = time.perf_counter() - start

        (results_path,) = Path(scratch).glob("*/results.json")
        results = json.loads(results_path.read_text())
    if results["status"] != "complete":
        raise RuntimeError(f"the App's run did not complete: {results}")
    train_starts = grid_calls.starts("train")
    round_ends = [*train_starts[1:], server_times["end"]]
    return AppRun(
        wall_s=wall,
        server_s=server_times["end"] - server_times["start"],
        startup_s=train_starts[0] - start,
        discovery_s=grid_calls.seconds("query"),
        round_s=[
            end - begin for begin, end in zip(train_starts, round_ends, strict=True)
        ],
        results=results,
    )


@contextmanager
def _no_patch() -> Iterator[None]:
    yield


# One run per fresh Python process --------------------------------------------

RESULT_MARKER = "BENCH-RESULT "
_OUTPUT_TAIL_CHARS = 4000


@dataclass
class IsolatedRun:
    """One job run in a fresh Python process.

    Attributes
    ----------
    result : dict[str, Any]
        What the job function returned.
    process_s : float
        Wall time of the process: interpreter start, imports, the job, exit.
    peak_rss_bytes : int
        Peak of the summed RSS of the process and its descendants (Ray's
        processes included), sampled every 0.25 s.
    peak_processes : int
        Most processes seen in that tree at once.

    """

    result: dict[str, Any]
    process_s: float
    peak_rss_bytes: int
    peak_processes: int


def run_isolated(
    job: str, params: Mapping[str, Any], *, timeout_s: float = 1800.0
) -> IsolatedRun:
    """Run a job function in a fresh Python process and measure the process.

    Every run pays the same cold start (interpreter, imports, Ray), whichever
    variant it is, and its memory is measured on its own process tree.

    Parameters
    ----------
    job : str
        ``"module:function"``, a module importable from ``benchmarks/``; the
        function takes ``params`` as keyword arguments and returns a
        JSON-serializable dict.
    params : Mapping[str, Any]
        The function's keyword arguments (JSON-serializable).
    timeout_s : float
        The process is killed (with its process group) after this long.

    Returns
    -------
    IsolatedRun
        The job's result and the process's wall time and peak memory.

    Raises
    ------
    RuntimeError
        If the process fails or returns no result; the message has the end
        of its output.

    """
    command = [sys.executable, str(Path(__file__).resolve()), job, json.dumps(params)]
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    with PeakMemory(root=process.pid) as memory:
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise RuntimeError(
                f"{job} ran past {timeout_s}s; its output:\n"
                f"{output[-_OUTPUT_TAIL_CHARS:]}"
            ) from None
    elapsed = time.perf_counter() - start
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARKER)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"{job}({params}) failed with exit code {process.returncode}; its "
            f"output:\n{output[-_OUTPUT_TAIL_CHARS:]}"
        )
    return IsolatedRun(
        result=json.loads(lines[-1][len(RESULT_MARKER) :]),
        process_s=elapsed,
        peak_rss_bytes=memory.peak_bytes,
        peak_processes=memory.peak_processes,
    )


def app_job(
    overrides: Mapping[str, Any],
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    plain: bool = False,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Job for :func:`run_isolated`: one :func:`run_app`, its summary."""
    run = run_app(
        overrides,
        num_supernodes=num_supernodes,
        num_cpus_per_client=num_cpus_per_client,
        plain=plain,
        profile_dir=Path(profile_dir) if profile_dir else None,
    )
    return run.summary()


def _run_job(argv: Sequence[str]) -> None:
    """Entry point of the processes :func:`run_isolated` starts."""
    job, params = argv
    module_name, function_name = job.split(":")
    quiet_logs()
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(params))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# Interleaved repetitions --------------------------------------------------------


def interleave(
    variants: Mapping[str, Callable[[], T]],
    repeats: int,
    *,
    on_result: Callable[[int, str, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run every variant ``repeats`` times, in a rotating order.

    Repetition ``r`` runs the variants starting from the ``r``-th one
    (A B C, B C A, C A B, ...), so that no variant always runs first or
    right after the same neighbour, and slow phases of the machine fall on
    all of them alike.

    Parameters
    ----------
    variants : Mapping[str, Callable[[], T]]
        Name -> a function that runs the variant once and returns its result.
    repeats : int
        Repetitions of every variant, ``>= 1``.
    on_result : Callable[[int, str, T], None] | None
        Called with (repetition, name, result) after every run (progress).

    Returns
    -------
    dict[str, list[T]]
        Name -> its results, in repetition order.

    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats {repeats!r} is not allowed: expected an int >= 1")
    order = list(variants)
    results: dict[str, list[T]] = {name: [] for name in order}
    for repeat in range(repeats):
        rotation = repeat % len(order)
        for name in order[rotation:] + order[:rotation]:
            result = variants[name]()
            results[name].append(result)
            if on_result is not None:
                on_result(repeat, name, result)
    return results


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def median_ratios(
    samples: Mapping[str, Sequence[float]], baseline: str
) -> dict[str, float]:
    """Median of every variant divided by the median of ``baseline`` (nan if 0)."""
    reference = median(samples[baseline])
    if reference == 0:
        return {name: math.nan for name in samples}
    return {name: median(values) / reference for name, values in samples.items()}


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much repetitions of one variant disagree."""
    middle = median(values)
    return (max(values) - min(values)) / middle if middle else math.nan


# Memory of the process tree ---------------------------------------------------


def _descendants_from_proc(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _rss_from_proc(pid: int) -> int:
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def process_tree_rss(root: int | None = None) -> tuple[int, int]:
    """Return (sum of RSS in bytes, number of processes) of a process tree.

    Uses psutil when it is installed, else ``/proc``. Pages shared between
    processes (libraries, Ray's object store) count once per process, so the
    sum overstates the memory in use; it is comparable between runs.

    Parameters
    ----------
    root : int | None
        The tree's root process; ``None`` is this process.

    """
    root = os.getpid() if root is None else root
    try:
        import psutil
    except ImportError:
        pids = _descendants_from_proc(root)
        return sum(_rss_from_proc(pid) for pid in pids), len(pids)
    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, len(processes)


class PeakMemory:
    """Sample the RSS of this process tree in a thread; keep the peak.

    Use as a context manager around the code to measure::

        with PeakMemory(root=child.pid) as memory:
            child.wait()
        memory.peak_bytes, memory.peak_processes

    Parameters
    ----------
    root : int | None
        The tree's root process; ``None`` is this process.
    interval_s : float
        Seconds between samples.

    """

    def __init__(self, root: int | None = None, interval_s: float = 0.25) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss, processes = process_tree_rss(self.root)
        self.peak_bytes = max(self.peak_bytes, rss)
        self.peak_processes = max(self.peak_processes, processes)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# Profiles -----------------------------------------------------------------------


def load_profiles(paths: Sequence[Path]) -> pstats.Stats | None:
    """Merge cProfile files into one ``pstats.Stats`` (``None`` if there are none)."""
    paths = [path for path in paths if path.is_file()]
    if not paths:
        return None
    stats = pstats.Stats(str(paths[0]), stream=io.StringIO())
    for path in paths[1:]:
        stats.add(str(path))
    return stats


def cumulative_seconds(stats: pstats.Stats, function: str, file_part: str) -> float:
    """Cumulative seconds of the functions named ``function`` in files matching.

    Parameters
    ----------
    stats : pstats.Stats
        Merged profiles.
    function : str
        The function's name (``train_steps``, ``ArrayRecord.__init__`` is
        ``__init__`` with ``file_part`` ``"array_record"``).
    file_part : str
        A part of the path of the file that defines it.

    """
    total = 0.0
    for (filename, _, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and file_part in filename:
            total += entry[3]
    return total


def top_functions(stats: pstats.Stats, limit: int) -> str:
    """The ``limit`` functions with the highest cumulative time, as pstats prints."""
    stream = io.StringIO()
    stats.stream = stream  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(limit)
    return stream.getvalue()


# Reports ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Where and when the figures were measured."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        # Other work on the machine slows both sides of a ratio alike.
        "load_average_1_5_15min": list(os.getloadavg()),
        "processor": platform.processor() or platform.machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": _version("flwr"),
        "ray": _version("ray"),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a plain-text table; floats get 3 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[column]) for row in cells))
        for column, header in enumerate(headers)
    ]
    lines = [
        "  ".join(
            header.rjust(width) for header, width in zip(headers, widths, strict=True)
        ),
        "  ".join("-" * width for width in widths),
    ]
    lines += [
        "  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True))
        for row in cells
    ]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: Path) -> Path:
    """Write a benchmark's JSON report (with the machine info) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), **report}, indent=2))
    return path


def default_report_path(name: str) -> Path:
    """``benchmarks/results/<name>.json``."""
    return RESULTS_DIR / f"{name}.json"


if __name__ == "__main__":
    _run_job(sys.argv[1:])
