"""The drop-in example (examples/drop-in): a Flower App before and after noise.

The fast tests check that the two folders differ only by the few lines the
README shows. The slow ones run both Apps end to end, in this process, with
``flwr.simulation.run_simulation`` (Ray backend, two SuperNodes, two rounds):
BEFORE, AFTER, and AFTER with the noise turned off. Runs are seeded, so the
last one must reproduce BEFORE bit for bit, which makes "AFTER differs from
BEFORE" mean that the noise did it.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flower_processes import (
    PROCESS_TAG_VARIABLE,
    stop_tagged_processes,
    tagged_processes,
)
from flwr.app import ArrayRecord, Context, Message, MetricRecord, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "drop-in"
BEFORE_DIR = EXAMPLE_DIR / "before"
AFTER_DIR = EXAMPLE_DIR / "after"
# Both Apps hold a package of this name: they are never imported side by side.
PACKAGE = "quickstart"
# The App's sources; build outputs (__pycache__, final_model.pt) are not compared.
SOURCE_SUFFIXES = (".py", ".toml")
CHANGED_FILES = [
    "pyproject.toml",
    f"{PACKAGE}/client_app.py",
    f"{PACKAGE}/server_app.py",
]
# "A few lines": the most lines the change may add to / remove from the apps.
MAX_ADDED_PYTHON_LINES = 15
MAX_REMOVED_PYTHON_LINES = 1

NUM_SUPERNODES = 2
TINY_RUN_CONFIG: UserConfig = {"num-server-rounds": 2, "batch-size": 64}
NUM_ROUNDS = 2
ROUNDS = list(range(1, NUM_ROUNDS + 1))
LOCAL_NOISE_STD = 0.05
BACKEND_CONFIG = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": NUM_SUPERNODES, "include_dashboard": False},
}
# Ray's processes exit shortly after ray.shutdown(); how long to wait for them.
PROCESS_EXIT_TIMEOUT_S = 20.0


def source_files(app_dir: Path) -> set[str]:
    return {
        path.relative_to(app_dir).as_posix()
        for path in app_dir.rglob("*")
        if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts
    }


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def folder_diff(before: Path, after: Path) -> str:
    """Return what ``diff -ru before after`` prints, without timestamps."""
    chunks = []
    for name in sorted(source_files(before) | source_files(after)):
        old, new = read_lines(before / name), read_lines(after / name)
        lines = list(
            difflib.unified_diff(
                old, new, f"{before.name}/{name}", f"{after.name}/{name}"
            )
        )
        if lines:
            chunks.append(f"diff -ru {before.name}/{name} {after.name}/{name}\n")
            chunks.extend(lines)
    return "".join(chunks)


def readme_diff() -> str:
    readme = (EXAMPLE_DIR / "README.md").read_text()
    blocks = re.findall(r"^```diff\n(.*?)^```$", readme, flags=re.DOTALL | re.M)
    assert len(blocks) == 1, "the README must show exactly one ```diff block"
    return blocks[0]


def test_both_apps_have_the_same_files() -> None:
    assert source_files(BEFORE_DIR) == source_files(AFTER_DIR)
    assert {"pyproject.toml", f"{PACKAGE}/task.py"} <= source_files(BEFORE_DIR)


def test_only_the_server_and_client_apps_and_the_config_change() -> None:
    changed = [
        name
        for name in sorted(source_files(BEFORE_DIR))
        if (BEFORE_DIR / name).read_bytes() != (AFTER_DIR / name).read_bytes()
    ]
    assert changed == CHANGED_FILES


def test_the_change_adds_a_few_lines_to_the_apps() -> None:
    added = removed = 0
    for name in CHANGED_FILES:
        if not name.endswith(".py"):
            continue
        old, new = read_lines(BEFORE_DIR / name), read_lines(AFTER_DIR / name)
        for line in difflib.ndiff(old, new):
            added += line.startswith("+ ")
            removed += line.startswith("- ")
    assert 0 < added <= MAX_ADDED_PYTHON_LINES
    assert removed <= MAX_REMOVED_PYTHON_LINES


def test_train_creates_its_own_optimizer_as_in_flowers_quickstart() -> None:
    """The layout of quickstart-pytorch: ``weight_noise`` must find the optimizer."""
    task = (BEFORE_DIR / PACKAGE / "task.py").read_text()
    signature = re.search(r"^def train\((.*?)\) -> float:", task, re.S | re.M)
    assert signature is not None
    parameters = [line.split(":")[0].strip() for line in signature[1].split(",")]
    assert parameters[:5] == ["net", "trainloader", "epochs", "lr", "device"]
    assert "optimizer = torch.optim." in task
    for app_dir in (BEFORE_DIR, AFTER_DIR):
        assert "torch.optim" not in (app_dir / PACKAGE / "client_app.py").read_text()


def test_requirements_are_ranges_that_include_flower_1_42() -> None:
    for app_dir in (BEFORE_DIR, AFTER_DIR):
        pyproject = (app_dir / "pyproject.toml").read_text()
        dependencies = pyproject.split("dependencies = [")[1].split("]\n")[0]
        assert '"flwr[simulation]>=1.39,<1.43"' in dependencies
        assert '"torch>=2.4"' in dependencies
        assert "==" not in dependencies


def test_readme_shows_the_real_diff_of_the_two_folders() -> None:
    assert readme_diff() == folder_diff(BEFORE_DIR, AFTER_DIR)


@dataclass(frozen=True)
class ExampleRun:
    """What one simulated run of an example App produced."""

    run_config: UserConfig
    result: Result
    initial_arrays: dict[str, np.ndarray]
    # Optimizer steps per round of each partition, from the example's task.py.
    steps_per_round: list[int]

    @property
    def final_arrays(self) -> dict[str, np.ndarray]:
        return numpy_arrays(self.result.arrays)


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def forget_package() -> None:
    for name in list(sys.modules):
        if name == PACKAGE or name.startswith(f"{PACKAGE}."):
            del sys.modules[name]


@contextmanager
def imported_app(app_dir: Path) -> Iterator[dict[str, Any]]:
    """Import ``app_dir``'s package as Flower does; yield its modules by name.

    ``app_dir`` goes first on ``sys.path`` (Ray's workers copy ``sys.path``
    into their ``PYTHONPATH``); afterwards the package is forgotten, so the
    other example's package of the same name can be imported next.
    """
    forget_package()
    sys.path.insert(0, str(app_dir))
    try:
        yield {
            module: importlib.import_module(f"{PACKAGE}.{module}")
            for module in ("server_app", "client_app", "task")
        }
    finally:
        sys.path.remove(str(app_dir))
        forget_package()


def with_run_config(client_app: ClientApp, run_config: UserConfig) -> ClientApp:
    """Return a ClientApp that runs ``client_app`` with ``run_config``.

    ``run_simulation`` gives the apps an empty run config (``flwr run`` reads
    it from pyproject.toml).
    """

    def handle(msg: Message, context: Context) -> Message:
        given = context.run_config
        context.run_config = run_config
        try:
            return client_app(msg, context)
        finally:
            # The SuperNode rejects a context whose run config was changed.
            context.run_config = given

    app = ClientApp()
    app.train()(handle)
    app.evaluate()(handle)
    return app


def server_with_run_config(server_app: ServerApp, run_config: UserConfig) -> ServerApp:
    """Return a ServerApp that runs ``server_app`` with ``run_config``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config = run_config
        server_app(grid, context)

    return app


@contextmanager
def ray_processes_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tag the processes Ray starts; fail if any is alive a while after the run."""
    env = {PROCESS_TAG_VARIABLE: uuid.uuid4().hex}
    monkeypatch.setenv(PROCESS_TAG_VARIABLE, env[PROCESS_TAG_VARIABLE])
    try:
        yield
    finally:
        deadline = time.monotonic() + PROCESS_EXIT_TIMEOUT_S
        while (alive := tagged_processes(env)) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = stop_tagged_processes(env)
    assert not alive, f"processes still running after the simulation: {alive}"
    assert not survivors, f"processes survived SIGKILL: {survivors}"


def simulate(app_dir: Path, overrides: UserConfig, work_dir: Path) -> ExampleRun:
    """Run the example App in ``app_dir`` with the tiny config plus ``overrides``."""
    # Imported here: it imports Ray, which collecting the fast tests can skip.
    from flwr.simulation import run_simulation

    run_config = get_fused_config_from_dir(app_dir, {**TINY_RUN_CONFIG, **overrides})
    started: list[tuple[dict[str, Any], Result]] = []
    start = Strategy.start

    def recording_start(self: Strategy, *args: Any, **kwargs: Any) -> Result:
        result = start(self, *args, **kwargs)
        started.append((kwargs, result))
        return result

    with pytest.MonkeyPatch.context() as monkeypatch, imported_app(app_dir) as app:
        monkeypatch.setattr(Strategy, "start", recording_start)
        monkeypatch.chdir(work_dir)  # the ServerApp writes final_model.pt here
        monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # run_simulation overwrites PYTHONPATH (for Ray's workers): restore it after.
        monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        with ray_processes_checked(monkeypatch):
            run_simulation(
                server_app=server_with_run_config(app["server_app"].app, run_config),
                client_app=with_run_config(app["client_app"].app, run_config),
                num_supernodes=NUM_SUPERNODES,
                backend_config=BACKEND_CONFIG,
            )
        steps_per_round = [
            int(run_config["local-epochs"]) * len(trainloader)
            for trainloader, _ in (
                app["task"].load_data(
                    partition_id, NUM_SUPERNODES, int(run_config["batch-size"])
                )
                for partition_id in range(NUM_SUPERNODES)
            )
        ]

    assert len(started) == 1, "the ServerApp must start its strategy once"
    ((start_kwargs, result),) = started
    assert (work_dir / "final_model.pt").is_file()
    return ExampleRun(
        run_config=run_config,
        result=result,
        initial_arrays=numpy_arrays(start_kwargs["initial_arrays"]),
        steps_per_round=steps_per_round,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExampleRun]:
    """BEFORE, AFTER, and AFTER with the noise off, with the same seed."""
    settings = {
        "before": (BEFORE_DIR, {}),
        "after": (AFTER_DIR, {"local-noise-std": LOCAL_NOISE_STD}),
        "after-noise-off": (AFTER_DIR, {"local-noise-std": 0.0}),
    }
    return {
        name: simulate(app_dir, overrides, tmp_path_factory.mktemp(name))
        for name, (app_dir, overrides) in settings.items()
    }


def train_metric(run: ExampleRun, key: str) -> list[float]:
    metrics: dict[int, MetricRecord] = run.result.train_metrics_clientapp
    assert sorted(metrics) == ROUNDS
    return [float(metrics[server_round][key]) for server_round in ROUNDS]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["before", "after", "after-noise-off"])
def test_each_run_completes_every_round(runs: dict[str, ExampleRun], name: str) -> None:
    run = runs[name]

    assert run.run_config["num-server-rounds"] == NUM_ROUNDS
    assert all(np.isfinite(loss) for loss in train_metric(run, "train_loss"))
    evaluated = run.result.evaluate_metrics_clientapp
    assert sorted(evaluated) == ROUNDS
    assert all(0.0 <= float(m["eval_acc"]) <= 1.0 for m in evaluated.values())
    assert run.final_arrays.keys() == run.initial_arrays.keys()
    assert all(np.isfinite(array).all() for array in run.final_arrays.values())
    assert any(
        not np.array_equal(run.final_arrays[key], initial)
        for key, initial in run.initial_arrays.items()
    ), "training did not change the model"


@pytest.mark.slow
def test_after_clients_add_the_configured_noise_at_every_step(
    runs: dict[str, ExampleRun],
) -> None:
    run = runs["after"]
    # All partitions take the same number of steps, so the weighted mean is it.
    (steps,) = set(run.steps_per_round)

    assert (
        train_metric(run, "noise-local-sigma")
        == [pytest.approx(LOCAL_NOISE_STD)] * NUM_ROUNDS
    )
    assert train_metric(run, "noise-local-applications") == [steps] * NUM_ROUNDS
    assert all(l2 > 0 for l2 in train_metric(run, "noise-local-l2"))
    assert train_metric(run, "replies-failed") == [0] * NUM_ROUNDS


@pytest.mark.slow
def test_noise_changes_the_model_and_without_it_after_is_before(
    runs: dict[str, ExampleRun],
) -> None:
    before = runs["before"].final_arrays
    noisy = runs["after"].final_arrays
    noise_off = runs["after-noise-off"]

    assert not any(
        key.startswith("noise-")
        for metrics in noise_off.result.train_metrics_clientapp.values()
        for key in metrics
    )
    assert noise_off.final_arrays.keys() == before.keys()
    for key, array in before.items():
        np.testing.assert_array_equal(noise_off.final_arrays[key], array)
    assert any(not np.array_equal(noisy[key], array) for key, array in before.items())
