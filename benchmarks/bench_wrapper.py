"""Cost of NoisyStrategy in the App: whole simulations against plain FedAvg.

Three variants of the App, same seed and settings, each run in a fresh Python
process (``run_simulation`` in-process, Ray backend), interleaved in a
rotating order:

- ``fedavg``: the ServerApp with the plain ``FedAvg`` it configures (the
  benchmark patches ``server_app.app.NoisyStrategy`` to return the wrapped
  strategy), all noise off;
- ``noisy-off``: ``NoisyStrategy(FedAvg)`` with every kind of noise off
  (target <= 1.02x ``fedavg``);
- ``noisy-on``: local, broadcast and aggregation noise on
  (target <= 1.05x ``fedavg``).

The ratios are medians over the repetitions of: the whole ``run_simulation``
call (the target's figure), the ServerApp's ``main``, and the rounds after the
first (steady state, without Ray's and the actors' start-up).

Usage::

    python benchmarks/bench_wrapper.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import (
    NOISE_OFF,
    IsolatedRun,
    app_run_config,
    default_report_path,
    format_table,
    interleave,
    median,
    median_ratios,
    relative_spread,
    run_isolated,
    write_report,
)

BASELINE = "fedavg"
# Variant -> (run config overrides, run with plain FedAvg, target ratio).
NOISE_ON: dict[str, float] = {
    "local-noise-std": 0.01,
    "broadcast-noise-std": 0.01,
    "aggregation-noise-std": 0.001,
}
VARIANTS: dict[str, tuple[dict[str, float], bool, float]] = {
    BASELINE: (NOISE_OFF, True, 1.0),
    "noisy-off": (NOISE_OFF, False, 1.02),
    "noisy-on": (NOISE_ON, False, 1.05),
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
        "--out", type=Path, default=default_report_path("bench_wrapper")
    )
    args = parser.parse_args()

    settings = dict(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    for key, value in (
        ("clients", args.clients),
        ("num-server-rounds", args.rounds),
        ("local-steps", args.local_steps),
    ):
        if value is not None:
            settings[key] = value
    shared = {key: value for key, value in settings.items() if key != "clients"}
    params: dict[str, dict[str, Any]] = {}
    for name, (noise, plain, _) in VARIANTS.items():
        overrides = {**shared, **noise}
        app_run_config(overrides)  # a bad setting fails here, before any run
        params[name] = {
            "overrides": overrides,
            "num_supernodes": settings["clients"],
            "num_cpus_per_client": args.num_cpus_per_client,
            "plain": plain,
        }

    def progress(repeat: int, name: str, run: IsolatedRun) -> None:
        print(
            f"  repeat {repeat + 1}: {name:<9} simulation {run.result['wall_s']:6.1f}s",
            flush=True,
        )

    print(f"settings: {settings}", flush=True)
    runs = interleave(
        {
            name: (lambda name=name: run_isolated("common:app_job", params[name]))
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
