"""Cost of ResultsWriter.add_round as a run grows (full rewrite of JSON and CSV).

Usage: python benchmarks/bench_results.py [--rounds 1000]

Prints the median add_round time over the last 10 rounds at rounds 1, 10, 100,
1000 (plot off: the plot is throttled separately), and the total.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from flwr_noise_app.results import ResultsWriter

ENTRY = {
    "global_accuracy": 0.9,
    "global_loss": 0.3,
    "local_accuracy_mean": 0.8,
    "local_accuracy_min": 0.7,
    "local_accuracy_max": 0.85,
    "local_loss_mean": 0.4,
    "num_replies": 10,
    "round_status": "ok",
    "round_failure": None,
    "replies_received": 10,
    "replies_failed": 0,
    "replies_dropped": 0,
    "noise_local_sigma": 0.01,
    "noise_local_l2": 1.23,
    "noise_broadcast_l2": 0.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    rounds = parser.parse_args().rounds
    config = {f"key-{index}": index for index in range(35)}
    times: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        writer = ResultsWriter(folder, "run", config, plot=False)
        for server_round in range(1, rounds + 1):
            start = time.perf_counter()
            writer.add_round({"round": server_round, **ENTRY})
            times.append(time.perf_counter() - start)
            if server_round in (1, 10, 100, 1000, 10000):
                window = times[-10:]
                print(
                    f"round {server_round:5d}: add_round median of the last "
                    f"{len(window)}: {statistics.median(window) * 1e3:.1f} ms"
                )
    print(f"total for {rounds} rounds: {sum(times):.1f} s")


if __name__ == "__main__":
    main()
