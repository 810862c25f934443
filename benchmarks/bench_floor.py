"""The App against its floor: the same experiment as a plain PyTorch loop.

The floor is ``flwr_noise_app.reproduce.run_experiment``: m model copies (one
working model loaded with each client's weights in turn), b SGD steps each with
the same local weight noise, a FedAvg-weighted average, every local model and
the average evaluated on the held-out data after every round. It is the App's
experiment without Flower (its averages are bit-identical to the App's). It
runs with torch's default threads (one per core); the App's Ray actors get one
CPU, hence one thread, each, and train clients in parallel: both sides use
every core.

Both sides run in a fresh Python process each, interleaved (floor, app, app,
floor, ...); the figures are medians over the repetitions:

- ``process``: the process's wall time, interpreter start to exit (what a user
  waits for);
- ``experiment``: the floor's ``run_experiment`` call against the App's
  ``run_simulation`` call (both include loading the data, neither the
  interpreter start and the imports of the benchmark process).

With ``--profile`` one more App run is profiled (cProfile on the ServerApp
thread and on every ClientApp call in the Ray actors) and its costs are
broken down.

Usage::

    python benchmarks/bench_floor.py [--quick] [--repeats N] [--profile]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from common import (
    MNIST_T10K_DIR,
    IsolatedRun,
    app_job,
    app_run_config,
    bench_settings,
    cumulative_seconds,
    default_report_path,
    format_table,
    interleave,
    load_profiles,
    quiet_logs,
    run_isolated,
    top_functions,
    write_report,
)

TARGET_RATIO = 2.0
# The paper's setting on the offline MNIST data: 10 clients, CNN; 2 rounds of
# 25 steps keep a run to a few minutes (--rounds 3 --local-steps 50 for more).
DEFAULT_SETTINGS: dict[str, Any] = {
    "clients": 10,
    "num-server-rounds": 2,
    "local-steps": 25,
    "batch-size": 16,
    "model": "cnn",
    "dataset": "mnist",
    "data-dir": str(MNIST_T10K_DIR),
}
QUICK_SETTINGS: dict[str, Any] = {
    **DEFAULT_SETTINGS,
    "num-server-rounds": 2,
    "local-steps": 10,
    "model": "mlp",
    "dataset": "digits",
    "data-dir": "",
}


def floor_job(
    overrides: dict[str, Any], num_clients: int, torch_threads: int = 0
) -> dict[str, Any]:
    """Job for ``run_isolated``: the App's experiment without Flower.

    ``torch_threads`` 0 keeps torch's default (one thread per core).
    """
    import torch

    from flwr_noise_app.config import AppConfig
    from flwr_noise_app.reproduce import ExperimentConfig, run_experiment

    if torch_threads:
        torch.set_num_threads(torch_threads)
    config = AppConfig.from_run_config(app_run_config(overrides))
    if config.broadcast_noise_std or config.aggregation_noise_std:
        raise ValueError(
            "the floor adds local noise only: expected broadcast-noise-std and "
            "aggregation-noise-std 0"
        )
    experiment = ExperimentConfig(
        dataset=config.dataset,
        data_dir=config.data_dir,
        model=config.model,
        learners=num_clients,
        local_steps=config.local_steps,
        rounds=config.num_server_rounds,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        noise_std=config.local_noise_std,
        schedule=config.noise_schedule,
        relative=config.noise_relative,
        placement="local" if config.local_noise_std > 0 else "none",
        distribution=config.noise_distribution,
        partitioning=config.partitioning,
        dirichlet_alpha=config.dirichlet_alpha,
        record_rounds=True,  # the App evaluates every round
    )
    started = time.perf_counter()
    result = run_experiment(experiment, config.seed)
    elapsed = time.perf_counter() - started
    last = result.rounds[-1]
    return {
        "experiment_s": elapsed,
        "final_global_accuracy": last.averaged_accuracy,
        "final_local_accuracy_mean": last.local_accuracy_mean,
    }


def app_params(settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """``common.app_job`` parameters for the App run of ``settings``."""
    overrides = {key: value for key, value in settings.items() if key != "clients"}
    return {"overrides": overrides, "num_supernodes": settings["clients"], **extra}


def experiment_seconds(run: IsolatedRun) -> float:
    """The in-process time of one run: run_experiment or run_simulation."""
    result = run.result
    return float(
        result["experiment_s"] if "experiment_s" in result else result["wall_s"]
    )


def app_phases(runs: list[IsolatedRun]) -> dict[str, float]:
    """Median seconds of the App's phases over its timed runs.

    ``ray + actors start`` is the ServerApp's query of the nodes (it waits
    for the actors); ``first-call set-up`` is how much longer round 1 takes
    than the later rounds (the actors' first train call loads the data and
    imports what training needs).
    """

    def phase(run: IsolatedRun) -> dict[str, float]:
        result = run.result
        rounds = result["round_s"]
        steady = statistics.fmean(rounds[1:]) if len(rounds) > 1 else rounds[0]
        return {
            "interpreter + imports + exit": run.process_s - result["wall_s"],
            "ray + actors start (node query)": result["discovery_s"],
            "server set-up before round 1": result["startup_s"] - result["discovery_s"],
            "first-call set-up in round 1": rounds[0] - steady,
            "rounds at steady speed": steady * len(rounds),
            "shutdown after the last round": result["wall_s"]
            - result["startup_s"]
            - sum(rounds),
        }

    phases = [phase(run) for run in runs]
    return {name: median([entry[name] for entry in phases]) for name in phases[0]}


# What the profile is searched for: label -> (function name, part of its file).
SERVER_COSTS: dict[str, tuple[str, str]] = {
    "load_dataset (server)": ("load_dataset", "tasks/data.py"),
    "discover_partition_ids": ("discover_partition_ids", "federation.py"),
    "run_rounds (all rounds)": ("run_rounds", "flwr_noise_app/federation.py"),
    "grid.send_and_receive (waiting)": ("timed", "benchmarks/common.py"),
    "NoisyStrategy.aggregate_train": ("aggregate_train", "flwr_noise/strategy.py"),
    "global evaluation": ("evaluate", "tasks/training.py"),
    "ResultsWriter.add_round": ("add_round", "results.py"),
    "results plot (_plot_rounds)": ("_plot_rounds", "results.py"),
    "ResultsWriter.finish": ("finish", "results.py"),
    "RunFolder.save_checkpoint": ("save_checkpoint", "flwr_noise_app/run_folder.py"),
    "atomic_write (with fsync)": ("atomic_write", "flwr_noise_app/results.py"),
}
CLIENT_COSTS: dict[str, tuple[str, str]] = {
    "train (whole ClientApp call)": ("train", "client_app/app.py"),
    "AppConfig.from_run_config": ("from_run_config", "flwr_noise_app/config.py"),
    "_local_task (load + partition)": ("_local_task", "client_app/app.py"),
    "load_dataset": ("load_dataset", "tasks/data.py"),
    "client_data (partitioning)": ("client_data", "tasks/data.py"),
    "build_model": ("build_model", "tasks/models.py"),
    "ArrayRecord -> state_dict": ("to_torch_state_dict", "message/arrayrecord.py"),
    "load_state_dict": ("load_state_dict", "torch/nn/modules/module.py"),
    "make_optimizer": ("make_optimizer", "tasks/training.py"),
    "weight_noise (set-up)": ("weight_noise", "flwr_noise/mod.py"),
    "train_steps": ("train_steps", "tasks/training.py"),
    "evaluate (local model)": ("evaluate", "tasks/training.py"),
    "ArrayRecord(state_dict)": ("__init__", "message/arrayrecord.py"),
}


def profile_app(
    settings: dict[str, Any], top: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """Run the App once more under cProfile and break its costs down."""
    profile_dir = Path(tempfile.mkdtemp(prefix="flwr-noise-profile-"))
    try:
        run = run_isolated(
            app_job,
            app_params(settings, profile_dir=str(profile_dir), **extra),
        )
        server = load_profiles([profile_dir / "server.prof"])
        clients = load_profiles(sorted(profile_dir.glob("client-*.prof")))
        call_times: dict[str, list[float]] = {}
        for path in profile_dir.glob("client-*.times"):
            for line in path.read_text().splitlines():
                kind, seconds = line.split()
                call_times.setdefault(kind, []).append(float(seconds))
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    report: dict[str, Any] = {"run": run.result, "client_calls": {}}
    for kind, times in sorted(call_times.items()):
        report["client_calls"][kind] = {
            "calls": len(times),
            "total_s": sum(times),
            "max_s": max(times),
            "median_s": median(times),
        }
    for name, stats, costs in (
        ("server", server, SERVER_COSTS),
        ("client", clients, CLIENT_COSTS),
    ):
        if stats is None:
            continue
        report[f"{name}_cumulative_s"] = {
            label: cumulative_seconds(stats, function, file_part)
            for label, (function, file_part) in costs.items()
        }
        report[f"{name}_top"] = top_functions(stats, top)
    return report


def print_profile(report: dict[str, Any]) -> None:
    run = report["run"]
    print(
        f"\nProfiled App run (cProfile inflates Python-heavy code): "
        f"run_simulation {run['wall_s']:.1f}s, rounds "
        + ", ".join(f"{seconds:.2f}" for seconds in run["round_s"])
    )
    rows = [
        [kind, entry["calls"], entry["total_s"], entry["median_s"], entry["max_s"]]
        for kind, entry in report["client_calls"].items()
    ]
    print(
        format_table(["ClientApp call", "calls", "total s", "median s", "max s"], rows)
    )
    for side in ("server", "client"):
        costs = report.get(f"{side}_cumulative_s", {})
        print()
        print(
            format_table(
                [f"{side} cost (cumulative, all calls)", "seconds"],
                [[label, seconds] for label, seconds in costs.items()],
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="digits + MLP, 2 rounds x 10 steps"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per side")
    parser.add_argument("--clients", type=int, help="number of clients (m)")
    parser.add_argument("--rounds", type=int, help="number of rounds")
    parser.add_argument("--local-steps", type=int, help="local steps per round (b)")
    parser.add_argument(
        "--floor-threads",
        type=int,
        default=0,
        help="torch threads of the floor; 0: torch's default, one per core",
    )
    parser.add_argument(
        "--num-cpus-per-client", type=float, default=1.0, help="Ray CPUs per actor"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one more App run"
    )
    parser.add_argument("--top", type=int, default=25, help="profile rows to keep")
    parser.add_argument("--out", type=Path, default=default_report_path("bench_floor"))
    args = parser.parse_args()
    quiet_logs()

    settings, overrides = bench_settings(args, QUICK_SETTINGS, DEFAULT_SETTINGS)
    app_run_config(overrides)  # a bad setting fails here, before any run

    def progress(repeat: int, name: str, run: IsolatedRun) -> None:
        print(
            f"  repeat {repeat + 1}: {name:<5} process {run.process_s:6.1f}s  "
            f"experiment {experiment_seconds(run):6.1f}s",
            flush=True,
        )

    cpus = {"num_cpus_per_client": args.num_cpus_per_client}
    print(f"settings: {settings}", flush=True)
    runs = interleave(
        {
            "floor": lambda: run_isolated(
                floor_job,
                {
                    "overrides": overrides,
                    "num_clients": settings["clients"],
                    "torch_threads": args.floor_threads,
                },
            ),
            "app": lambda: run_isolated(app_job, app_params(settings, **cpus)),
        },
        args.repeats,
        on_result=progress,
    )

    process = {name: [run.process_s for run in side] for name, side in runs.items()}
    experiment = {
        name: [experiment_seconds(run) for run in side] for name, side in runs.items()
    }
    ratios = {
        "process": median(process["app"]) / median(process["floor"]),
        "experiment": median(experiment["app"]) / median(experiment["floor"]),
    }
    rows = [
        [
            name,
            median(process[name]),
            median(experiment[name]),
            statistics.fmean(run.result["final_global_accuracy"] for run in side),
        ]
        for name, side in runs.items()
    ]
    print()
    print(format_table(["side", "process s", "experiment s", "final acc"], rows))
    print(
        f"\nApp / floor: process {ratios['process']:.2f}x, experiment "
        f"{ratios['experiment']:.2f}x (target <= {TARGET_RATIO:.0f}x)"
    )
    phases = app_phases(runs["app"])
    print()
    print(
        format_table(
            ["App phase (median)", "seconds"],
            [[name, seconds] for name, seconds in phases.items()],
        )
    )

    report: dict[str, Any] = {
        "benchmark": "bench_floor",
        "settings": settings,
        "floor_torch_threads": args.floor_threads or "torch default",
        "num_cpus_per_client": args.num_cpus_per_client,
        "repeats": args.repeats,
        "target_ratio": TARGET_RATIO,
        "ratio_app_over_floor": ratios,
        "median_process_s": {name: median(v) for name, v in process.items()},
        "median_experiment_s": {name: median(v) for name, v in experiment.items()},
        "app_phases_s": phases,
        "runs": {
            name: [
                {
                    "process_s": run.process_s,
                    "peak_rss_mb": run.peak_rss_bytes / 2**20,
                    **run.result,
                }
                for run in side
            ]
            for name, side in runs.items()
        },
    }
    if args.profile:
        profile = profile_app(settings, args.top, cpus)
        print_profile(profile)
        report["profile"] = profile
    print(f"\nwrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
