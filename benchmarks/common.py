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
import dataclasses
import datetime
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

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
    from flwr.clientapp import ClientApp
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


def _profiled(profile_dir: str, kind: str, call: Callable[[], T]) -> T:
    """Run ``call`` under this actor's cProfile; log its duration.

    Profiles go to ``<profile_dir>/client-<pid>.prof`` (one file per actor
    process, accumulated over its calls), durations to ``client-<pid>.times``.
    """
    profile = _CLIENT_PROFILES.setdefault(profile_dir, cProfile.Profile())
    start = time.perf_counter()
    profile.enable()
    try:
        return call()
    finally:
        profile.disable()
        elapsed = time.perf_counter() - start
        stem = Path(profile_dir) / f"client-{os.getpid()}"
        profile.dump_stats(f"{stem}.prof")
        with open(f"{stem}.times", "a") as times:
            times.write(f"{kind} {elapsed:.6f}\n")


def app_client(run_config: Mapping[str, Any], profile_dir: str | None) -> ClientApp:
    """The App's ClientApp (``client_app.app:app``), given ``run_config``.

    Calls the App's ClientApp object as Flower does, with a copy of the
    context that carries the run config; with ``profile_dir`` every call is
    profiled (:func:`_profiled`).
    """
    from flwr.clientapp import ClientApp

    from client_app.app import app as the_app

    def handle(message: Message, context: Context) -> Message:
        def call() -> Message:
            return the_app(message, _with_run_config(context, run_config))

        if profile_dir is None:
            return call()
        return _profiled(profile_dir, message.metadata.message_type, call)

    client = ClientApp()
    client.train()(handle)
    client.query()(handle)
    return client


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
        return sum(
            (end - start for name, _, start, end in self.calls if name == kind), 0.0
        )


@dataclass
class AppRun:
    """What one simulation took.

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
        Ray actors to start); 0 for servers that send no query.
    round_s : list[float]
        Per round: from sending its train messages to sending the next round's
        (the last round: to the end of ``main``), so aggregation, evaluation
        and results writing are included.
    final_global_accuracy : float
        The global model's accuracy on the held-out data after the last round.

    """

    wall_s: float
    server_s: float
    startup_s: float
    discovery_s: float
    round_s: list[float]
    final_global_accuracy: float

    @property
    def mean_round_s(self) -> float:
        """Mean seconds per round."""
        return statistics.fmean(self.round_s)

    def summary(self) -> dict[str, Any]:
        """Everything, for the JSON report."""
        return dataclasses.asdict(self)


# What a simulation's ServerApp runs: the App's own ServerApp, or the strategy
# alone (the App's model, data and ClientApp) with or without NoisyStrategy.
SERVERS = ("app", "fedavg", "noisy")


def strategy_main(
    grid: Grid, run_config: Mapping[str, Any], noisy: bool
) -> tuple[float, float]:
    """Run ``FedAvg`` or ``NoisyStrategy(FedAvg)`` with Flower's ``start``.

    Built from public names only, as a user's ServerApp would: the App's
    config, model and data for the initial model and the global evaluation.

    Returns
    -------
    tuple[float, float]
        The global model's loss and accuracy after the last round.
    """
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from flwr_noise import NoisyStrategy
    from flwr_noise_app.config import AppConfig
    from flwr_noise_app.tasks.data import load_dataset
    from flwr_noise_app.tasks.models import build_model
    from flwr_noise_app.tasks.training import evaluate

    config = AppConfig.from_run_config(run_config)
    data = load_dataset(config.dataset, config.data_dir, split_seed=config.seed)
    model = build_model(
        config.model, data.input_shape, data.num_classes, seed=config.seed
    )

    def evaluate_global(_: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, data.x_test, data.y_test)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=config.min_nodes,
    )
    if noisy:
        strategy = NoisyStrategy(
            strategy,
            local=config.local_spec(),
            broadcast=config.broadcast_spec(),
            aggregation=config.aggregation_spec(),
            local_steps=config.local_steps,
        )
    result = strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=config.num_server_rounds,
        evaluate_fn=evaluate_global,
    )
    last = result.evaluate_metrics_serverapp[config.num_server_rounds]
    return float(last["loss"]), float(last["accuracy"])


def run_app(
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    server: str = "app",
    profile_dir: Path | None = None,
) -> AppRun:
    """Run one simulation of the App's ClientApp in this process.

    Parameters
    ----------
    overrides : Mapping[str, Any]
        Run config overrides (``results-dir`` is set here, to a scratch folder).
    num_supernodes : int
        Number of simulated SuperNodes (clients).
    num_cpus_per_client : float
        CPUs Ray reserves per ClientApp actor.
    server : str
        ``"app"``: the App's ServerApp (``server_app.app:app``); ``"fedavg"``
        / ``"noisy"``: :func:`strategy_main` with plain ``FedAvg`` /
        ``NoisyStrategy(FedAvg)``.
    profile_dir : Path | None
        Profile the ServerApp thread (``server.prof``) and every ClientApp call
        (``client-<pid>.prof``) into this folder.

    Returns
    -------
    AppRun
        The timings and the final global accuracy.

    """
    # Imported here, so that a process that runs no App does not pay for them.
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from server_app.app import app as the_server_app

    if server not in SERVERS:
        raise ValueError(f"server {server!r} is not allowed: expected one of {SERVERS}")
    with tempfile.TemporaryDirectory(prefix="flwr-noise-bench-") as scratch:
        run_config = app_run_config({**overrides, "results-dir": scratch})
        grid_calls = GridCalls()
        server_times: dict[str, float] = {}
        accuracy: list[float] = []
        profile = str(profile_dir) if profile_dir is not None else None

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            grid_calls.record(grid)
            server_profile = cProfile.Profile() if profile else None
            server_times["start"] = time.perf_counter()
            if server_profile is not None:
                server_profile.enable()
            try:
                if server == "app":
                    the_server_app(grid, _with_run_config(context, run_config))
                else:
                    noisy = server == "noisy"
                    accuracy.append(strategy_main(grid, run_config, noisy)[1])
            finally:
                server_times["end"] = time.perf_counter()
                if server_profile is not None:
                    server_profile.disable()
                    server_profile.dump_stats(Path(profile) / "server.prof")

        start = time.perf_counter()
        run_simulation(
            server_app=server_app,
            client_app=app_client(run_config, profile),
            num_supernodes=num_supernodes,
            backend_config=backend_config(num_cpus_per_client),
        )
        wall = time.perf_counter() - start

        if server == "app":
            (results_path,) = Path(scratch).glob("*/results.json")
            results = json.loads(results_path.read_text())
            if results["status"] != "complete":
                raise RuntimeError(f"the App's run did not complete: {results}")
            accuracy.append(results["rounds"][-1]["global_accuracy"])
    if not accuracy or "end" not in server_times:
        raise RuntimeError(f"the {server!r} ServerApp did not finish")
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
        final_global_accuracy=accuracy[0],
    )


# One run per fresh Python process --------------------------------------------


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


# How long a process that returned its result may take to exit.
EXIT_GRACE_S = 120.0


def _child(
    connection: Connection, job: Callable[..., dict[str, Any]], params: dict[str, Any]
) -> None:
    quiet_logs()
    try:
        connection.send(("ok", job(**params)))
    except BaseException as error:  # reported to the parent, which raises
        connection.send(("error", "".join(traceback.format_exception(error))))
        raise


def run_isolated(
    job: Callable[..., dict[str, Any]],
    params: Mapping[str, Any],
    *,
    timeout_s: float = 1800.0,
) -> IsolatedRun:
    """Run ``job(**params)`` in a fresh Python process and measure the process.

    Every run pays the same cold start (interpreter, imports, Ray), whichever
    variant it is, and its memory is measured on its own process tree.
    The process is started with multiprocessing's ``spawn`` method.

    Parameters
    ----------
    job : Callable[..., dict[str, Any]]
        A module-level function (it is pickled by name) that returns a
        picklable dict.
    params : Mapping[str, Any]
        Its keyword arguments (picklable).
    timeout_s : float
        The process and its descendants are killed after this long.

    Returns
    -------
    IsolatedRun
        The job's result and the process's wall time and peak memory.

    Raises
    ------
    RuntimeError
        If the job raises, the process dies or runs past ``timeout_s``.

    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, job, dict(params)))
    start = time.perf_counter()
    process.start()
    sender.close()
    with PeakMemory(root=process.pid) as memory:
        try:
            if receiver.poll(timeout_s):
                status, value = receiver.recv()
            else:
                status, value = "error", f"ran past {timeout_s}s"
        except EOFError:
            status, value = "error", "the process ended without a result"
        # A failed run may leave threads (Flower's, Ray's) that keep the
        # process alive: stop its whole tree rather than wait.
        process.join(EXIT_GRACE_S if status == "ok" else 0)
        if process.is_alive():
            kill_tree(process.pid)
            process.join()
    elapsed = time.perf_counter() - start
    if status != "ok":
        raise RuntimeError(
            f"{job.__name__}({params}) failed (exit code {process.exitcode}):\n{value}"
        )
    return IsolatedRun(
        result=value,
        process_s=elapsed,
        peak_rss_bytes=memory.peak_bytes,
        peak_processes=memory.peak_processes,
    )


def app_job(
    overrides: Mapping[str, Any],
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    server: str = "app",
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Job for :func:`run_isolated`: one :func:`run_app`, its summary."""
    run = run_app(
        overrides,
        num_supernodes=num_supernodes,
        num_cpus_per_client=num_cpus_per_client,
        server=server,
        profile_dir=Path(profile_dir) if profile_dir else None,
    )
    return run.summary()


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
    all of them alike. (pyperf runs all processes of one benchmark before the
    next, so it cannot do this for benchmarks that are compared.)

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


# Memory of the process tree (psutil) -------------------------------------------


def _tree(root: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(root: int) -> None:
    """SIGKILL a process and all its descendants."""
    for process in reversed(_tree(root)):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def process_tree_rss(root: int | None = None) -> tuple[int, int]:
    """Return (sum of RSS in bytes, number of processes) of a process tree.

    Pages shared between processes (libraries, Ray's object store) count once
    per process, so the sum overstates the memory in use; it is comparable
    between runs.

    Parameters
    ----------
    root : int | None
        The tree's root process; ``None`` is this process.

    """
    processes = _tree(os.getpid() if root is None else root)
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, len(processes)


class PeakMemory:
    """Sample the RSS of a process tree in a thread; keep the peak.

    psutil reads each process's RSS but keeps no peak over a tree of
    processes that come and go (Ray's), hence the sampling.
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
