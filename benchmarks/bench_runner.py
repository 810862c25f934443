"""Speed of the reproduction runner: this checkout against another git ref.

Usage: python benchmarks/bench_runner.py [--before-ref main] [--repeats 3]

Runs the same ``python -m flwr_noise_app.reproduce`` sweep (``COMMAND``: MLP,
10 learners, b=10, 10 rounds, noise std 0 and 0.01 in every placement, one
seed, no serial baselines, no plots, one torch thread) with the code of
``--before-ref`` (exported with ``git archive`` into a temporary folder) and
with this checkout, in fresh processes, interleaved (before, after, after,
before, ...) so that other load on the machine slows both alike. Prints every
run's wall-clock and CPU (user + system) seconds, the medians and the ratios
after / before; CPU time moves less with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [
    "-m", "flwr_noise_app.reproduce", "--threads", "1", "--model", "mlp",
    "--learners", "10", "--local-steps", "10", "--rounds", "10",
    "--noise-std", "0", "0.01", "--placement", "local", "received", "aggregation",
    "--seeds", "0", "--no-serial", "--no-plots", "--quiet",
]  # fmt: skip


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(tree: Path, out: Path) -> tuple[float, float]:
    """Return the wall-clock and CPU seconds of one run of ``COMMAND`` in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cpu = _children_cpu_s()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, *COMMAND, "--out", str(out)], cwd=tree, env=env, check=True
    )
    return time.perf_counter() - started, _children_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-ref", default="main")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        before.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.before_ref],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        trees = {"before": before, "after": ROOT}
        for repeat in range(args.repeats):
            order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
            for name in order:
                wall, cpu = run_once(trees[name], Path(scratch) / f"out-{name}")
                times[name].append((wall, cpu))
                print(
                    f"{name:6s} run {repeat + 1}: {wall:6.1f} s wall, {cpu:6.1f} s CPU",
                    flush=True,
                )
    for index, kind in enumerate(("wall", "CPU")):
        before_s, after_s = (
            statistics.median(run[index] for run in times[name]) for name in times
        )
        print(
            f"median {kind}: before ({args.before_ref}) {before_s:.1f} s, after "
            f"{after_s:.1f} s, after / before {after_s / before_s:.3f}"
        )


if __name__ == "__main__":
    main()
