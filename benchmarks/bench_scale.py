"""How the App scales with the number of simulated clients and of rounds.

For every number of clients (10, 100, 1000 by default) the App trains about
10 clients per round (``fraction-train = 10 / clients``) with a tiny model
(digits, MLP, 5 local steps), over 3 and over 6 rounds. Every run is a fresh
Python process (``run_simulation`` in-process, Ray backend, 1 CPU per
ClientApp actor); the runs are interleaved in a rotating order. Reported:

- wall time per round (rounds after the first: the first one also pays the
  actors' first-call set-up) and its ratio to the smallest federation;
- start-up: from ``run_simulation`` to the first round (Ray, the actors, and
  the ServerApp's query of every node's partition id);
- peak resident memory of the whole process tree (sum of RSS over the process
  and its descendants, Ray's included, sampled every 0.25 s) and the ratio of
  the longer run's peak to the shorter one's: about 1 when memory does not
  grow with the number of rounds.

Usage::

    python benchmarks/bench_scale.py [--quick] [--clients 10,100,1000] [--rounds 3,6]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import median
from typing import Any

from common import (
    IsolatedRun,
    app_job,
    app_run_config,
    default_report_path,
    format_table,
    interleave,
    quiet_logs,
    run_isolated,
    write_report,
)

CLIENTS_PER_ROUND = 10
SETTINGS: dict[str, Any] = {
    "model": "mlp",
    "dataset": "digits",
    "local-steps": 5,
    "batch-size": 16,
}
MEBIBYTE = 2**20


def int_list(text: str) -> list[int]:
    """Parse a comma-separated list of positive ints (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: expected comma-separated ints >= 1, e.g. 3,6"
        )
    return values


def run_params(clients: int, rounds: int, num_cpus_per_client: float) -> dict[str, Any]:
    """``common.app_job`` parameters for one federation size and round count."""
    fraction = min(1.0, CLIENTS_PER_ROUND / clients)
    overrides = {**SETTINGS, "num-server-rounds": rounds, "fraction-train": fraction}
    app_run_config(overrides)  # a bad setting fails here, before any run
    return {
        "overrides": overrides,
        "num_supernodes": clients,
        "num_cpus_per_client": num_cpus_per_client,
    }


def summarize(runs: list[IsolatedRun]) -> dict[str, float]:
    """Medians over the repetitions of one configuration."""

    def later_rounds(run: IsolatedRun) -> float:
        rounds = run.result["round_s"]
        steady = rounds[1:] or rounds
        return sum(steady) / len(steady)

    return {
        "round_s": median([later_rounds(run) for run in runs]),
        "first_round_s": median([run.result["round_s"][0] for run in runs]),
        "startup_s": median([run.result["startup_s"] for run in runs]),
        "discovery_s": median([run.result["discovery_s"] for run in runs]),
        "simulation_s": median([run.result["wall_s"] for run in runs]),
        "peak_rss_mb": median([run.peak_rss_bytes / MEBIBYTE for run in runs]),
        "peak_processes": max(run.peak_processes for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="clients 10,100 and rounds 2,4"
    )
    parser.add_argument("--clients", type=int_list, help="default 10,100,1000")
    parser.add_argument("--rounds", type=int_list, help="default 3,6")
    parser.add_argument("--repeats", type=int, default=1, help="runs per config")
    parser.add_argument(
        "--num-cpus-per-client", type=float, default=1.0, help="Ray CPUs per actor"
    )
    parser.add_argument("--out", type=Path, default=default_report_path("bench_scale"))
    args = parser.parse_args()
    quiet_logs()

    clients = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    round_counts = args.rounds or ([2, 4] if args.quick else [3, 6])
    configs = {
        (size, rounds): run_params(size, rounds, args.num_cpus_per_client)
        for size in clients
        for rounds in round_counts
    }

    def progress(repeat: int, name: str, run: IsolatedRun) -> None:
        peak_mb = run.peak_rss_bytes / MEBIBYTE
        print(
            f"  repeat {repeat + 1}: {name:<22} simulation "
            f"{run.result['wall_s']:6.1f}s  peak {peak_mb:6.0f} MB",
            flush=True,
        )

    def label(size: int, rounds: int) -> str:
        return f"{size} clients, {rounds} rounds"

    print(f"settings: {SETTINGS}, ~{CLIENTS_PER_ROUND} clients per round", flush=True)
    runs = interleave(
        {
            label(*key): (lambda params=params: run_isolated(app_job, params))
            for key, params in configs.items()
        },
        args.repeats,
        on_result=progress,
    )
    summaries = {key: summarize(runs[label(*key)]) for key in configs}

    smallest, fewest, most = clients[0], round_counts[0], round_counts[-1]
    reference_round = median(
        [summaries[(smallest, rounds)]["round_s"] for rounds in round_counts]
    )
    rows = []
    per_size: dict[str, dict[str, float]] = {}
    for size in clients:
        round_s = median(
            [summaries[(size, rounds)]["round_s"] for rounds in round_counts]
        )
        startup_s = median(
            [summaries[(size, rounds)]["startup_s"] for rounds in round_counts]
        )
        peaks = {
            rounds: summaries[(size, rounds)]["peak_rss_mb"] for rounds in round_counts
        }
        per_size[str(size)] = {
            "clients_per_round": min(size, CLIENTS_PER_ROUND),
            "round_s": round_s,
            "round_ratio_vs_smallest": round_s / reference_round,
            "startup_s": startup_s,
            **{f"peak_rss_mb_{rounds}_rounds": peak for rounds, peak in peaks.items()},
            "peak_ratio_most_vs_fewest_rounds": peaks[most] / peaks[fewest],
        }
        rows.append(
            [
                size,
                startup_s,
                round_s,
                round_s / reference_round,
                *(f"{peaks[rounds]:.0f}" for rounds in round_counts),
                peaks[most] / peaks[fewest],
            ]
        )
    headers = [
        "clients",
        "start-up s",
        "s/round",
        f"x {smallest} clients",
        *(f"peak MB {rounds}r" for rounds in round_counts),
        f"peak {most}r/{fewest}r",
    ]
    print()
    print(format_table(headers, rows))

    report = {
        "benchmark": "bench_scale",
        "settings": SETTINGS,
        "clients_per_round": CLIENTS_PER_ROUND,
        "num_cpus_per_client": args.num_cpus_per_client,
        "repeats": args.repeats,
        "per_clients": per_size,
        "configs": {
            label(*key): {
                **summary,
                "runs": [
                    {
                        "process_s": run.process_s,
                        "peak_rss_mb": run.peak_rss_bytes / MEBIBYTE,
                        "peak_processes": run.peak_processes,
                        **run.result,
                    }
                    for run in runs[label(*key)]
                ],
            }
            for key, summary in summaries.items()
        },
    }
    print(f"\nwrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
