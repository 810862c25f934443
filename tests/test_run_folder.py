"""The App's run folder: exclusive, checked whole before any node is contacted.

Every case below runs the real ServerApp on a Grid that fails the test if a
node is contacted; the run must be refused with one line naming the run config
key, and the folder of the earlier run must be left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeGrid
from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM
from inprocess_app import run_app

from flwr_noise import NoisyStrategy
from flwr_noise_app.checkpoint import (
    CHECKPOINT_FILE,
    capture_strategy_state,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_numbers,
)
from flwr_noise_app.results import atomic_write, load_results
from server_app.app import app as server_app

RUN = {
    "num-server-rounds": 2,
    "local-steps": 1,
    "run-name": "earlier",
    "results-dir": "results",  # relative: resolved against the working directory
}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a finished 2-round run of the App."""
    workdir = tmp_path_factory.mktemp("workdir")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        run_app(RUN)
    finally:
        os.chdir(cwd)
    return workdir / "results" / "earlier"


def test_the_run_folder_is_logged_and_stored_as_an_absolute_path(
    earlier: Path,
) -> None:
    results = load_results(earlier)
    assert results["status"] == "complete"
    assert results["info"]["path"] == str(earlier)
    assert Path(results["info"]["path"]).is_absolute()


@pytest.fixture
def results_dir(earlier: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's results-dir, for one case to damage."""
    shutil.copytree(earlier, tmp_path / "earlier")
    return tmp_path


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def refuse(results_dir: Path, **run_config: Any) -> str:
    """Run the ServerApp, which must stop before contacting a node; its message."""
    grid = FakeGrid(reply_fn=lambda message: pytest.fail("a node was contacted"))
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**RUN, "results-dir": str(results_dir), **run_config},
    )
    with pytest.raises(ValueError) as raised:
        server_app(grid, context)
    assert grid.pushed == []
    message = str(raised.value)
    assert "\n" not in message
    return message


def damage_checkpoint(folder: Path, change: Callable[[Any], Any]) -> None:
    checkpoint = load_checkpoint(folder)
    save_checkpoint(folder, change(checkpoint))


def replace_first_array(checkpoint: Any, values: Callable[[np.ndarray], Any]) -> Any:
    arrays = checkpoint.arrays
    name = next(iter(arrays))
    changed = {key: arrays[key] for key in arrays}
    changed[name] = Array(values(arrays[name].numpy()))
    object.__setattr__(checkpoint, "arrays", ArrayRecord(changed))
    return checkpoint


def set_field(name: str, value: Any) -> Callable[[Any], Any]:
    def change(checkpoint: Any) -> Any:
        object.__setattr__(checkpoint, name, value)
        return checkpoint

    return change


def drop_first_array(checkpoint: Any) -> Any:
    kept = dict(list(checkpoint.arrays.items())[1:])
    return set_field("arrays", ArrayRecord(kept))(checkpoint)


def write_results(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = folder / "results.json"
    results = json.loads(path.read_text())
    path.write_text(change(results))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "NaN weights": (
        lambda f: damage_checkpoint(
            f, lambda c: replace_first_array(c, lambda a: np.full_like(a, np.nan))
        ),
        "holds NaN or Inf",
    ),
    "a wrong shape": (
        lambda f: damage_checkpoint(
            f, lambda c: replace_first_array(c, lambda a: a.reshape(-1)[:3].copy())
        ),
        "the model has",
    ),
    "a wrong dtype": (
        lambda f: damage_checkpoint(
            f, lambda c: replace_first_array(c, lambda a: a.astype(np.float64))
        ),
        "float64",
    ),
    "a missing array": (
        lambda f: damage_checkpoint(f, drop_first_array),
        "differ from the model's",
    ),
    "a broken random state": (
        lambda f: damage_checkpoint(
            f, set_field("rng_state", {"python": [3, [1, 2], None], "numpy": {}})
        ),
        "a usable random state",
    ),
    "no random state": (
        lambda f: damage_checkpoint(f, set_field("rng_state", {})),
        "a usable random state",
    ),
    "a foreign strategy state": (
        lambda f: damage_checkpoint(
            f, set_field("strategy_state", {"1.m_t": {"w": np.zeros(2)}})
        ),
        "no such attribute",
    ),
    "a non-finite strategy state": (
        lambda f: damage_checkpoint(
            f,
            set_field("strategy_state", {"1.fraction_train": np.array([np.inf])}),
        ),
        "NaN or Inf",
    ),
    "a checkpoint past results.json": (
        lambda f: write_results(
            f, lambda r: json.dumps({**r, "rounds": r["rounds"][:1]})
        ),
        "results.json rounds of run 'earlier'=[1] is not allowed: expected rounds 1",
    ),
    "a results.json that is not JSON": (
        lambda f: (f / "results.json").write_text('{"rounds": ['),
        "results.json",
    ),
    "a round without global_accuracy": (
        lambda f: write_results(
            f,
            lambda r: json.dumps(
                {
                    **r,
                    "rounds": [
                        {k: v for k, v in e.items() if k != "global_accuracy"}
                        for e in r["rounds"]
                    ],
                }
            ),
        ),
        "global_accuracy",
    ),
    "a damaged checkpoint file": (
        lambda f: (f / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 truncated"),
        "a readable checkpoint",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_checks_everything_it_reads_before_any_node(
    results_dir: Path, damage: str
) -> None:
    folder = results_dir / "earlier"
    apply, reason = DAMAGE[damage]
    apply(folder)
    before = files(folder)
    message = refuse(results_dir, resume="earlier", **{"num-server-rounds": 3})
    assert message.startswith("run config 'resume'='earlier' is not allowed: "), message
    assert reason in message, message
    assert files(folder) == before


def test_a_taken_run_name_is_refused_and_the_finished_run_is_untouched(
    results_dir: Path,
) -> None:
    before = files(results_dir / "earlier")
    message = refuse(results_dir)
    assert message.startswith("run config 'run-name'='earlier' is not allowed: ")
    assert "resume='earlier'" in message
    assert files(results_dir / "earlier") == before


def test_a_too_long_run_name_is_refused_before_anything(tmp_path: Path) -> None:
    message = refuse(tmp_path / "results", **{"run-name": "r" * 300})
    assert message.startswith("run config 'run-name'='rrr")
    assert "at most 100" in message
    assert not (tmp_path / "results").exists()


def test_resume_cleans_stale_temporary_files_and_keeps_live_ones(
    results_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = results_dir / "earlier"
    stale = folder / ".results.json.999999999.0123456789abcdef.tmp"
    stale.write_text("half a file")
    live = folder / f".results.json.{os.getpid()}.0123456789abcdef.tmp"
    live.write_text("being written")
    with caplog.at_level(logging.INFO):
        run_app(
            {
                **RUN,
                "results-dir": str(results_dir),
                "resume": "earlier",
                "num-server-rounds": 3,
            }
        )
    assert not stale.exists()
    assert live.exists()
    results = load_results(folder)
    assert [entry["round"] for entry in results["rounds"]] == [1, 2, 3]
    assert str(folder) in caplog.text  # the absolute path is logged


def test_atomic_write_leaves_no_temporary_file_when_it_fails(tmp_path: Path) -> None:
    def fail(stream: Any) -> None:
        stream.write("part")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "results.json", fail, binary=False)
    assert list(tmp_path.iterdir()) == []


# Strategy state: found generically, never by a list of attribute names.


class Momentum(FedAdam):
    """A strategy with state of its own, unknown to the App."""

    def __init__(self) -> None:
        super().__init__()
        self.velocity: list[np.ndarray] | None = None
        self.temperature = 1.0


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: FedAdam(), {"1.m_t", "1.v_t", "1.current_arrays"}),
        (lambda: FedAvgM(server_momentum=0.9), {"1.momentum_vector"}),
        (Momentum, {"1.velocity", "1.temperature", "1.m_t", "1.v_t"}),
    ],
)
def test_array_state_and_changed_numbers_are_saved_and_restored(
    make: Callable[[], Any], expected: set[str]
) -> None:
    strategy = NoisyStrategy(make())
    baseline = strategy_numbers(strategy)
    assert capture_strategy_state(strategy, baseline) == {}
    inner = strategy.strategy
    ones = [np.ones(2, np.float32)]
    for name in expected:
        attribute = name.split(".", 1)[1]
        value = 0.5 if attribute == "temperature" else ones
        if attribute in ("m_t", "v_t", "current_arrays"):
            value = {"w": np.ones(2, np.float32)}
        setattr(inner, attribute, value)
    state = capture_strategy_state(strategy, baseline)
    assert set(state) == expected

    fresh = NoisyStrategy(make())
    restore_strategy_state(fresh, state)
    assert capture_strategy_state(fresh, baseline).keys() == state.keys()
    for name in expected:
        attribute = name.split(".", 1)[1]
        assert repr(getattr(fresh.strategy, attribute)) == repr(
            getattr(inner, attribute)
        )


def test_a_run_folder_in_use_is_refused_and_a_dead_writers_lock_is_taken_over(
    results_dir: Path,
) -> None:
    folder = results_dir / "earlier"
    assert not (folder / ".lock").exists()  # released when the run ended
    (folder / ".lock").write_text(f"{os.getpid()}@{socket.gethostname()}")
    message = refuse(results_dir, resume="earlier", **{"num-server-rounds": 3})
    assert "no other ServerApp is writing" in message, message
    assert str(os.getpid()) in message

    (folder / ".lock").write_text(f"999999999@{socket.gethostname()}")
    run_app(
        {**RUN, "results-dir": str(results_dir), "resume": "earlier"},
    )
    assert not (folder / ".lock").exists()
    assert load_results(folder)["status"] == "complete"
