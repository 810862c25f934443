"""Cost of NoisyStrategy in the App: whole simulations against plain FedAvg.

Three variants of the App, same seed and settings, each run in a fresh Python
process (``run_simulation`` in-process, Ray backend), interleaved in a
rotating order:

- ``fedavg``: plain ``FedAvg``, run with Flower's ``strategy.start`` (the App's
  model, data and ClientApp; ``common.strategy_main``), all noise off;
- ``noisy-off``: the same with ``NoisyStrategy(FedAvg)``, every kind of noise
  off (target <= 1.02x ``fedavg``);
- ``noisy-on``: local, broadcast and aggregation noise on
  (target <= 1.05x ``fedavg``).

The ratios are medians over the repetitions of: the whole ``run_simulation``
call (the target's figure), the ServerApp's ``main``, and the rounds after the
first (steady state, without Ray's and the actors' start-up).

A second table isolates the server side: the strategy's own work per round
(``configure_train`` + ``aggregate_train`` on the App's model and as many
replies as clients), in this process with the App's in-memory ``FunctionGrid``
playing the clients (no Ray, no polling), so that it resolves fractions of a
millisecond.

Usage::

    python benchmarks/bench_wrapper.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from statistics import median
from typing import Any

from common import (
    NOISE_OFF,
    IsolatedRun,
    app_job,
    app_run_config,
    bench_settings,
    default_report_path,
    format_table,
    interleave,
    median_ratios,
    quiet_logs,
    relative_spread,
    run_isolated,
    write_report,
)

BASELINE = "fedavg"
NOISE_ON: dict[str, float] = {
    "local-noise-std": 0.01,
    "broadcast-noise-std": 0.01,
    "aggregation-noise-std": 0.001,
}
# Variant -> (run config overrides, server (``common.SERVERS``), target ratio).
VARIANTS: dict[str, tuple[dict[str, float], str, float]] = {
    BASELINE: (NOISE_OFF, "fedavg", 1.0),
    "noisy-off": (NOISE_OFF, "noisy", 1.02),
    "noisy-on": (NOISE_ON, "noisy", 1.05),
}
# The App's own defaults (digits, MLP, 20 local steps), 10 clients, 5 rounds.
DEFAULT_SETTINGS: dict[str, Any] = {"clients": 10, "num-server-rounds": 5}
QUICK_SETTINGS: dict[str, Any] = {
    "clients": 4,
    "num-server-rounds": 2,
    "local-steps": 5,
}
# What each run reports, and how the table names it.
MEASURES: dict[str, str] = {
    "simulation_s": "simulation",
    "server_s": "ServerApp",
    "later_rounds_s": "rounds 2..R",
    "process_s": "process",
}


def measures(run: IsolatedRun) -> dict[str, float]:
    """The seconds of one run that the ratios are taken of."""
    result = run.result
    return {
        "simulation_s": result["wall_s"],
        "server_s": result["server_s"],
        "later_rounds_s": sum(result["round_s"][1:]),
        "process_s": run.process_s,
    }


def strategy_round_seconds(
    overrides: dict[str, Any], num_clients: int, plain: bool, rounds: int
) -> float:
    """Median seconds of the strategy's own work per round, without Flower's runtime.

    The strategy is built as the ServerApp builds it; the App's in-memory
    ``FunctionGrid`` replies to every train message with the arrays it received.
    Only ``configure_train`` and ``aggregate_train`` are timed.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from flwr_noise.strategy import NoisyStrategy
    from flwr_noise_app.config import AppConfig
    from flwr_noise_app.grid import FunctionGrid
    from flwr_noise_app.tasks.data import load_dataset
    from flwr_noise_app.tasks.models import build_model

    config = AppConfig.from_run_config(app_run_config(overrides))
    data = load_dataset(config.dataset, config.data_dir, split_seed=config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=0)
    arrays = ArrayRecord(model.state_dict())

    def reply(message: Message) -> Message:
        metrics = MetricRecord({"num-examples": 100, "local-accuracy": 0.5})
        content = RecordDict({"arrays": message.content["arrays"], "metrics": metrics})
        return Message(content, reply_to=message)

    node_ids = list(range(1, num_clients + 1))
    fedavg = FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
    )
    strategy = (
        fedavg
        if plain
        else NoisyStrategy(
            fedavg,
            local=config.local_spec(),
            broadcast=config.broadcast_spec(),
            aggregation=config.aggregation_spec(),
            client_key_fn=lambda node_id: node_id - 1,
            local_steps=config.local_steps,
        )
    )
    grid = FunctionGrid(node_ids, reply_fn=reply)
    seconds = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        )
        configured = time.perf_counter()
        replies = list(grid.send_and_receive(messages))
        received = time.perf_counter()
        aggregate, _ = strategy.aggregate_train(server_round, replies)
        seconds.append(configured - start + time.perf_counter() - received)
        arrays = aggregate if aggregate is not None else arrays
    return median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 clients, 2 rounds")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant")
    parser.add_argument("--clients", type=int, help="number of simulated clients")
    parser.add_argument("--rounds", type=int, help="number of rounds")
    parser.add_argument("--local-steps", type=int, help="local steps per round")
    parser.add_argument(
        "--num-cpus-per-client", type=float, default=1.0, help="Ray CPUs per actor"
    )
    parser.add_argument(
        "--strategy-repeats",
        type=int,
        default=20,
        help="repetitions of the in-process strategy timing",
    )
    parser.add_argument(
        "--out", type=Path, default=default_report_path("bench_wrapper")
    )
    args = parser.parse_args()
    quiet_logs()

    settings, shared = bench_settings(args, QUICK_SETTINGS, DEFAULT_SETTINGS)
    params: dict[str, dict[str, Any]] = {}
    for name, (noise, server, _) in VARIANTS.items():
        overrides = {**shared, **noise}
        app_run_config(overrides)  # a bad setting fails here, before any run
        params[name] = {
            "overrides": overrides,
            "num_supernodes": settings["clients"],
            "num_cpus_per_client": args.num_cpus_per_client,
            "server": server,
        }

    def progress(repeat: int, name: str, run: IsolatedRun) -> None:
        print(
            f"  repeat {repeat + 1}: {name:<9} simulation {run.result['wall_s']:6.1f}s",
            flush=True,
        )

    print(f"settings: {settings}", flush=True)
    runs = interleave(
        {
            name: (lambda name=name: run_isolated(app_job, params[name]))
            for name in VARIANTS
        },
        args.repeats,
        on_result=progress,
    )

    seconds = {
        measure: {
            name: [measures(run)[measure] for run in side]
            for name, side in runs.items()
        }
        for measure in MEASURES
    }
    ratios = {
        measure: median_ratios(samples, BASELINE)
        for measure, samples in seconds.items()
    }
    rows = []
    for name, (_, _, target) in VARIANTS.items():
        simulation_ratio = ratios["simulation_s"][name]
        rows.append(
            [
                name,
                *(median(seconds[measure][name]) for measure in MEASURES),
                *(ratios[measure][name] for measure in MEASURES),
                f"<= {target:.2f}" if name != BASELINE else "",
                ("yes" if simulation_ratio <= target else "NO")
                if name != BASELINE
                else "",
            ]
        )
    headers = [
        "variant",
        *(f"{label} s" for label in MEASURES.values()),
        *(f"x {label}" for label in MEASURES.values()),
        "target",
        "met",
    ]
    print()
    print(format_table(headers, rows))
    accuracies = {
        name: statistics.fmean(run.result["final_global_accuracy"] for run in side)
        for name, side in runs.items()
    }
    spreads = {
        name: relative_spread(values)
        for name, values in seconds["simulation_s"].items()
    }
    print(
        "\nrun-to-run spread of the simulation time ((max - min) / median): "
        + ", ".join(f"{name} {value:.0%}" for name, value in spreads.items())
    )
    print(
        "final global accuracy: "
        + ", ".join(f"{name} {value:.3f}" for name, value in accuracies.items())
    )

    strategy_ms = interleave(
        {
            name: (
                lambda name=name: (
                    1e3
                    * strategy_round_seconds(
                        params[name]["overrides"],
                        settings["clients"],
                        params[name]["server"] == "fedavg",
                        settings["num-server-rounds"],
                    )
                )
            )
            for name in VARIANTS
        },
        args.strategy_repeats,
    )
    strategy_ratios = median_ratios(strategy_ms, BASELINE)
    print()
    print(
        format_table(
            ["variant", "strategy ms/round", f"x {BASELINE}", "+ ms/round"],
            [
                [
                    name,
                    median(values),
                    strategy_ratios[name],
                    median(values) - median(strategy_ms[BASELINE]),
                ]
                for name, values in strategy_ms.items()
            ],
        )
    )

    report = {
        "benchmark": "bench_wrapper",
        "settings": settings,
        "num_cpus_per_client": args.num_cpus_per_client,
        "repeats": args.repeats,
        "baseline": BASELINE,
        "targets": {name: target for name, (_, _, target) in VARIANTS.items()},
        "median_s": {
            measure: {name: median(values) for name, values in samples.items()}
            for measure, samples in seconds.items()
        },
        "ratios": ratios,
        "simulation_spread": spreads,
        "strategy_ms_per_round": {
            name: median(values) for name, values in strategy_ms.items()
        },
        "strategy_ratios": strategy_ratios,
        "targets_met": {
            name: ratios["simulation_s"][name] <= target
            for name, (_, _, target) in VARIANTS.items()
            if name != BASELINE
        },
        "runs": {
            name: [{"process_s": run.process_s, **run.result} for run in side]
            for name, side in runs.items()
        },
    }
    print(f"\nwrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
