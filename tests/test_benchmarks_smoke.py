"""The App benchmarks: their shared helpers, and a tiny run of each benchmark.

The helpers are checked directly (fast). The ``slow`` tests run every
benchmark script the way a user does, with the smallest settings, and check
the JSON report it writes: its structure and that its numbers are numbers, never
how fast anything was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS_DIR))

import common  # noqa: E402

BENCHMARK_TIMEOUT_S = 900


# Helpers ------------------------------------------------------------------------


def test_interleave_rotates_the_order_of_the_variants() -> None:
    calls: list[str] = []

    def variant(name: str):
        def run() -> str:
            calls.append(name)
            return f"{name}{len(calls)}"

        return run

    results = common.interleave({name: variant(name) for name in "ABC"}, repeats=4)

    assert calls == list("ABCBCACABABC")
    assert results == {
        "A": ["A1", "A6", "A8", "A10"],
        "B": ["B2", "B4", "B9", "B11"],
        "C": ["C3", "C5", "C7", "C12"],
    }


def test_interleave_reports_every_result() -> None:
    seen: list[tuple[int, str, int]] = []

    common.interleave(
        {"x": lambda: 1, "y": lambda: 2},
        repeats=2,
        on_result=lambda repeat, name, result: seen.append((repeat, name, result)),
    )

    assert seen == [(0, "x", 1), (0, "y", 2), (1, "y", 2), (1, "x", 1)]


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_interleave_rejects_bad_repeats(repeats: object) -> None:
    with pytest.raises(ValueError, match="repeats"):
        common.interleave({"x": lambda: 1}, repeats=repeats)


def test_median_ratios_divide_by_the_baseline_median() -> None:
    ratios = common.median_ratios(
        {"base": [2.0, 4.0, 100.0], "other": [5.0, 1.0, 6.0]}, "base"
    )

    assert ratios == {"base": 1.0, "other": 1.25}


def test_median_ratios_of_a_zero_baseline_are_nan() -> None:
    ratios = common.median_ratios({"base": [0.0], "other": [1.0]}, "base")

    assert all(math.isnan(value) for value in ratios.values())


def test_relative_spread() -> None:
    assert common.relative_spread([9.0, 10.0, 12.0]) == pytest.approx(0.3)


def test_format_table_aligns_columns_and_rounds_floats() -> None:
    table = common.format_table(["name", "seconds"], [["a", 1.23456], ["long", 10]])

    assert table.splitlines() == [
        "name  seconds",
        "----  -------",
        "   a    1.235",
        "long       10",
    ]


def test_app_run_config_fuses_the_project_defaults_with_overrides() -> None:
    run_config = common.app_run_config({"num-server-rounds": 2, "model": "linear"})

    assert run_config["num-server-rounds"] == 2
    assert run_config["model"] == "linear"
    # Untouched keys keep the value of pyproject.toml's [tool.flwr.app.config].
    assert run_config["dataset"] == "digits"
    assert "local-noise-std" in run_config


def test_app_run_config_rejects_a_bad_value() -> None:
    with pytest.raises(ValueError, match="model"):
        common.app_run_config({"model": "resnet"})


def test_process_tree_rss_counts_child_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        total, processes = common.process_tree_rss()
        own, _ = common.process_tree_rss(child.pid)
    finally:
        child.kill()
        child.wait()

    assert processes >= 2
    assert own > 0
    assert total > own


def test_peak_memory_samples_until_exit() -> None:
    with common.PeakMemory(interval_s=0.01) as memory:
        buffer = bytearray(64 * 2**20)
        time.sleep(0.1)

    assert memory.samples >= 3
    assert memory.peak_bytes >= len(buffer)
    assert memory.peak_processes >= 1


def test_run_isolated_returns_the_job_result() -> None:
    run = common.run_isolated(json.loads, {"s": '{"answer": 42}'})

    assert run.result == {"answer": 42}
    assert run.process_s > 0
    assert run.peak_rss_bytes > 0


def test_run_isolated_reports_the_job_error() -> None:
    with pytest.raises(RuntimeError, match="JSONDecodeError: Expecting value"):
        common.run_isolated(json.loads, {"s": "not JSON"})


def test_run_isolated_kills_the_process_tree_of_a_job_past_its_timeout() -> None:
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}"
    with pytest.raises(RuntimeError, match="ran past 2"):
        common.run_isolated(subprocess.run, {"args": ["sleep", marker]}, timeout_s=2.0)

    sleeping = [
        process
        for process in psutil.process_iter(["cmdline"])
        if process.info["cmdline"] == ["sleep", marker]
    ]
    assert sleeping == []


# Tiny runs of the benchmarks ------------------------------------------------------


def run_benchmark(script: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS_DIR / f"{script}.py"),
            *args,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=BENCHMARK_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"wrote {out}" in completed.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == script
    assert report["machine"]["cpu_count"] >= 1
    return report


def assert_seconds(value: object) -> None:
    assert isinstance(value, float) and value >= 0.0 and math.isfinite(value), value


def assert_app_run(run: dict[str, Any], rounds: int) -> None:
    for key in ("wall_s", "server_s", "startup_s", "discovery_s", "process_s"):
        assert_seconds(run[key])
    round_s = run["round_s"]
    assert isinstance(round_s, list) and len(round_s) == rounds
    for seconds in round_s:
        assert_seconds(seconds)
    assert 0.0 <= run["final_global_accuracy"] <= 1.0


@pytest.mark.slow
def test_bench_wrapper_tiny_run(tmp_path: Path) -> None:
    report = run_benchmark(
        "bench_wrapper",
        tmp_path,
        *("--repeats", "1", "--clients", "2", "--rounds", "2", "--local-steps", "1"),
    )

    variants = {"fedavg", "noisy-off", "noisy-on"}
    assert report["settings"]["clients"] == 2
    assert set(report["targets_met"]) == {"noisy-off", "noisy-on"}
    for measure in ("simulation_s", "server_s", "later_rounds_s", "process_s"):
        ratios = report["ratios"][measure]
        assert set(ratios) == variants
        assert ratios["fedavg"] == 1.0
    runs = report["runs"]
    assert set(runs) == variants
    for side in runs.values():
        (run,) = side
        assert_app_run(run, rounds=2)
    # With the noise off, NoisyStrategy(FedAvg) trains like FedAvg (it only
    # averages the replies in partition order, which may move the last bits).
    assert runs["fedavg"][0]["final_global_accuracy"] == pytest.approx(
        runs["noisy-off"][0]["final_global_accuracy"], abs=0.02
    )


@pytest.mark.slow
def test_bench_floor_tiny_run_with_profile(tmp_path: Path) -> None:
    report = run_benchmark(
        "bench_floor",
        tmp_path,
        *("--quick", "--repeats", "1", "--clients", "2"),
        *("--rounds", "2", "--local-steps", "1", "--profile", "--top", "5"),
    )

    assert set(report["ratio_app_over_floor"]) == {"process", "experiment"}
    (floor,) = report["runs"]["floor"]
    (app,) = report["runs"]["app"]
    assert_seconds(floor["experiment_s"])
    assert_app_run(app, rounds=2)
    # Same experiment on both sides: the floor averages the same local models
    # (up to the rounding of torch's multi-threaded kernels).
    assert floor["final_global_accuracy"] == pytest.approx(
        app["final_global_accuracy"], abs=0.02
    )
    for phase in report["app_phases_s"].values():
        assert isinstance(phase, float)
    profile = report["profile"]
    assert profile["client_calls"]["train"]["calls"] == 4
    assert profile["client_calls"]["query"]["calls"] == 2
    client_costs = profile["client_cumulative_s"]
    assert client_costs["train_steps"] > 0
    assert client_costs["train (whole ClientApp call)"] >= client_costs["train_steps"]
    assert profile["server_cumulative_s"]["global evaluation"] > 0
    assert "cumulative" in profile["client_top"]


@pytest.mark.slow
def test_bench_scale_tiny_run(tmp_path: Path) -> None:
    report = run_benchmark("bench_scale", tmp_path, "--clients", "2", "--rounds", "1,2")

    (entry,) = report["per_clients"].values()
    assert entry["clients_per_round"] == 2
    assert entry["round_ratio_vs_smallest"] == 1.0
    assert entry["peak_rss_mb_1_rounds"] > 0
    assert entry["peak_rss_mb_2_rounds"] > 0
    assert entry["peak_ratio_most_vs_fewest_rounds"] > 0
    configs = report["configs"]
    assert set(configs) == {"2 clients, 1 rounds", "2 clients, 2 rounds"}
    for name, config in configs.items():
        (run,) = config["runs"]
        assert run["peak_processes"] >= 2, name  # the process and Ray's
        assert_app_run(run, rounds=int(name.split(", ")[1].split()[0]))


def test_bench_scale_rejects_a_bad_client_list() -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS_DIR / "bench_scale.py"), "--clients", "10,x"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2
    assert "'10,x' is not allowed" in completed.stderr
