"""Bad input across the API: one clear error with the field, value and what is allowed.

This is the cross-API table; the per-module tables (tests/test_config.py for
the run config keys, tests/test_spec.py for NoiseSpec fields and its
ConfigRecord form) are not repeated here. Every case checks the error type and
that its one-line message names the key or argument, shows the value and says
what is allowed. The last tests check that the ServerApp validates everything
before it contacts a node or writes a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from fakes import FakeGrid, array_record
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from flwr_noise import NoiseSpec, NoisyStrategy, WeightNoise
from flwr_noise_app.checkpoint import (
    Checkpoint,
    capture_rng_state,
    restore_strategy_state,
    save_checkpoint,
)
from flwr_noise_app.config import AppConfig
from flwr_noise_app.results import ResultsWriter
from flwr_noise_app.run_folder import RunFolder
from flwr_noise_app.tasks.data import load_dataset, partition_indices
from flwr_noise_app.tasks.models import build_model
from flwr_noise_app.tasks.training import make_optimizer, train_steps
from server_app.app import app as server_app

ROUND = {
    "round": 1,
    "global_accuracy": 0.5,
    "global_loss": 1.0,
    "local_accuracy_mean": 0.5,
    "local_accuracy_min": 0.4,
    "local_accuracy_max": 0.6,
}
LABELS = np.arange(20) % 4


class Case(NamedTuple):
    call: Callable[[], Any]
    error: type[Exception]
    name: str  # the key or argument, as the message names it
    value: str  # how the message shows the value
    allowed: str  # a fragment of what the message says is allowed


def run_config(**overrides: Any) -> Callable[[], Any]:
    keys = {key.replace("_", "-"): value for key, value in overrides.items()}
    return lambda: AppConfig.from_run_config(keys)


def linear_model() -> torch.nn.Module:
    return torch.nn.Linear(4, 2)


def writer(tmp: Path, **kwargs: Any) -> Callable[[], Any]:
    return lambda: ResultsWriter(tmp, kwargs.pop("run_name", "run"), {}, **kwargs)


def add_round(tmp: Path, **entry: Any) -> Callable[[], Any]:
    def call() -> None:
        results = ResultsWriter(tmp, "run", {}, plot=False)
        results.add_round({**ROUND, **entry})

    return call


def cases(tmp: Path) -> dict[str, Case]:
    """The table; built per test, since some cases write under ``tmp``."""
    more_than_zero = "expected a finite number > 0"
    return {
        # Run config keys not in tests/test_config.py's tables.
        "round-timeout zero": Case(
            run_config(round_timeout=0),
            ValueError,
            "'round-timeout'",
            "0",
            more_than_zero,
        ),
        "round-timeout infinite": Case(
            run_config(round_timeout=math.inf),
            ValueError,
            "'round-timeout'",
            "inf",
            more_than_zero,
        ),
        "round-timeout string": Case(
            run_config(round_timeout="300"),
            TypeError,
            "'round-timeout'",
            "'300'",
            more_than_zero,
        ),
        "resume not a string": Case(
            run_config(resume=3), TypeError, "'resume'", "3", "expected '' (a new run)"
        ),
        "resume blank": Case(
            run_config(resume="  "),
            ValueError,
            "'resume'",
            "'  '",
            "the name (in results-dir) or the path",
        ),
        "batch-size bool": Case(
            run_config(batch_size=True),
            TypeError,
            "'batch-size'",
            "True",
            "an int >= 1",
        ),
        "learning-rate negative": Case(
            run_config(learning_rate=-0.1),
            ValueError,
            "'learning-rate'",
            "-0.1",
            more_than_zero,
        ),
        "fraction-train string": Case(
            run_config(fraction_train="all"),
            TypeError,
            "'fraction-train'",
            "'all'",
            "in (0, 1]",
        ),
        "results-dir not a string": Case(
            run_config(results_dir=5), TypeError, "'results-dir'", "5", "a non-empty"
        ),
        "run-name hidden folder": Case(
            run_config(run_name=".hidden"),
            ValueError,
            "'run-name'",
            "'.hidden'",
            "starting with a letter or digit",
        ),
        # NoiseSpec fields and ConfigRecord entries not in tests/test_spec.py.
        "NoiseSpec mode None": Case(
            lambda: NoiseSpec(mode=None),  # type: ignore[arg-type]
            TypeError,
            "NoiseSpec.mode",
            "None",
            "'additive', 'multiplicative'",
        ),
        "NoiseSpec gamma inf": Case(
            lambda: NoiseSpec(gamma=math.inf),
            ValueError,
            "NoiseSpec.gamma",
            "inf",
            "> 0",
        ),
        "NoiseSpec.from_config schedule": Case(
            lambda: NoiseSpec.from_config(
                {**NoiseSpec(std=0.1).to_config(), "noise.schedule": "cosine"}
            ),
            ValueError,
            "'noise.schedule'",
            "'cosine'",
            "'constant'",
        ),
        "NoiseSpec.from_config gamma": Case(
            lambda: NoiseSpec.from_config(
                {**NoiseSpec(std=0.1).to_config(), "noise.gamma": -1.0}
            ),
            ValueError,
            "'noise.gamma'",
            "-1.0",
            "> 0",
        ),
        # WeightNoise.
        "WeightNoise model": Case(
            lambda: WeightNoise("model", NoiseSpec(std=0.1)),  # type: ignore[arg-type]
            TypeError,
            "model=",
            "'model'",
            "torch.nn.Module",
        ),
        "WeightNoise spec": Case(
            lambda: WeightNoise(linear_model(), 0.1),  # type: ignore[arg-type]
            TypeError,
            "spec=",
            "0.1",
            "flwr_noise.NoiseSpec",
        ),
        "WeightNoise start_step": Case(
            lambda: WeightNoise(linear_model(), NoiseSpec(std=0.1), start_step=-2),
            ValueError,
            "start_step=",
            "-2",
            "an int >= 0",
        ),
        "WeightNoise.attach optimizer": Case(
            lambda: WeightNoise(linear_model(), NoiseSpec(std=0.1)).attach("sgd"),  # type: ignore[arg-type]
            TypeError,
            "optimizer=",
            "'sgd'",
            "torch.optim.Optimizer",
        ),
        # NoisyStrategy.
        "NoisyStrategy strategy": Case(
            lambda: NoisyStrategy("FedAvg"),  # type: ignore[arg-type]
            TypeError,
            "strategy=",
            "'FedAvg'",
            "flwr.serverapp.strategy.Strategy",
        ),
        "NoisyStrategy local": Case(
            lambda: NoisyStrategy(FedAvg(), local=0.01),  # type: ignore[arg-type]
            TypeError,
            "local=",
            "0.01",
            "flwr_noise.NoiseSpec or None",
        ),
        "NoisyStrategy client_key_fn": Case(
            lambda: NoisyStrategy(FedAvg(), client_key_fn=5),  # type: ignore[arg-type]
            TypeError,
            "client_key_fn=",
            "5",
            "callable",
        ),
        "NoisyStrategy local_steps": Case(
            lambda: NoisyStrategy(FedAvg(), local_steps=0),
            ValueError,
            "local_steps=",
            "0",
            "an int >= 1",
        ),
        # Reference tasks.
        "build_model name": Case(
            lambda: build_model("resnet", (1, 8, 8), 10),
            ValueError,
            "model",
            "'resnet'",
            "'linear', 'mlp', 'cnn'",
        ),
        "build_model input_shape": Case(
            lambda: build_model("mlp", (1, 0, 8), 10),
            ValueError,
            "input_shape",
            "(1, 0, 8)",
            "three positive ints",
        ),
        "build_model num_classes": Case(
            lambda: build_model("mlp", (1, 8, 8), 0),
            ValueError,
            "num_classes",
            "0",
            "a positive int",
        ),
        "load_dataset name": Case(
            lambda: load_dataset("cifar10"),
            ValueError,
            "dataset",
            "'cifar10'",
            "'digits', 'mnist'",
        ),
        "load_dataset split_seed": Case(
            lambda: load_dataset("digits", split_seed=-1),
            ValueError,
            "split_seed",
            "-1",
            "an int in [0, 4294967295]",
        ),
        "load_dataset data_dir missing": Case(
            lambda: load_dataset("mnist", str(tmp / "no-such-folder")),
            ValueError,  # DataNotFoundError is a ValueError and a FileNotFoundError
            "data-dir",
            "no-such-folder",
            "expected an existing folder with the MNIST IDX files",
        ),
        "partition_indices num_partitions": Case(
            lambda: partition_indices(LABELS, 0, 0),
            ValueError,
            "num_partitions",
            "0",
            "an int in [1, 20]",
        ),
        "partition_indices partition_id": Case(
            lambda: partition_indices(LABELS, 4, 4),
            ValueError,
            "partition_id",
            "4",
            "an int in [0, 3]",
        ),
        "partition_indices scheme": Case(
            lambda: partition_indices(LABELS, 2, 0, scheme="shards"),
            ValueError,
            "partitioning scheme",
            "'shards'",
            "'iid', 'dirichlet'",
        ),
        "partition_indices alpha": Case(
            lambda: partition_indices(LABELS, 2, 0, scheme="dirichlet", alpha=0.0),
            ValueError,
            "dirichlet alpha",
            "0.0",
            "a finite number > 0",
        ),
        "make_optimizer learning_rate": Case(
            lambda: make_optimizer(linear_model(), math.nan),
            ValueError,
            "learning_rate",
            "nan",
            "a finite number > 0",
        ),
        "train_steps steps": Case(
            lambda: train_steps(
                linear_model(),
                torch.zeros(4, 4),
                torch.zeros(4, dtype=torch.long),
                steps=0,
                batch_size=2,
                generator=torch.Generator(),
                learning_rate=0.1,
            ),
            ValueError,
            "steps",
            "0",
            "an int >= 1",
        ),
        # Results writer.
        "ResultsWriter run_name": Case(
            writer(tmp, run_name="a/b"),
            ValueError,
            "run_name=",
            "'a/b'",
            "letters, digits",
        ),
        "ResultsWriter config": Case(
            lambda: ResultsWriter(tmp, "run", [("seed", 0)]),  # type: ignore[arg-type]
            TypeError,
            "config=",
            "[('seed', 0)]",
            "a mapping",
        ),
        "ResultsWriter resume_after": Case(
            writer(tmp, resume_after=-1),
            ValueError,
            "resume_after=",
            "-1",
            "an int >= 0 or None",
        ),
        "ResultsWriter.add_round round": Case(
            add_round(tmp, round=0), TypeError, "'round'", "0", "an int >= 1"
        ),
        "ResultsWriter.add_round accuracy": Case(
            add_round(tmp, global_accuracy="high"),
            TypeError,
            "'global_accuracy'",
            "'high'",
            "a number",
        ),
        # Checkpoints and resuming.
        "restore_strategy_state": Case(
            lambda: restore_strategy_state(FedAvg(), {"0.m_t": {}}),
            ValueError,
            "strategy state='0.m_t'",
            "FedAvg",  # the strategy it was given
            "the same strategy",
        ),
    }


CASE_IDS = list(cases(Path("unused")))


def test_the_table_is_big_enough() -> None:
    assert len(CASE_IDS) >= 30


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_gets_one_clear_error(case_id: str, tmp_path: Path) -> None:
    case = cases(tmp_path)[case_id]
    with pytest.raises(case.error) as raised:
        case.call()
    message = str(raised.value)
    assert "\n" not in message, message
    assert " is not allowed: expected " in message, message
    assert message.find(case.name) < message.find(" is not allowed: "), message
    for fragment in (case.name, case.value, case.allowed):
        assert fragment in message, (fragment, message)


# Resuming: the run folder and its checkpoint are checked before anything runs.


def make_finished_run(results_dir: Path, **config: Any) -> AppConfig:
    """A run folder holding the results and checkpoint of 2 finished rounds."""
    app_config = AppConfig.from_run_config(
        {"results-dir": str(results_dir), "run-name": "earlier", **config}
    )
    with ResultsWriter(results_dir, "earlier", app_config.to_dict()) as results:
        for round_number in (1, 2):
            results.add_round({**ROUND, "round": round_number})
    save_checkpoint(
        results.run_dir,
        Checkpoint(
            server_round=2,
            arrays=array_record({"w": np.zeros(3, np.float32)}),
            config=app_config.to_dict(),
            rng_state=capture_rng_state(),
        ),
    )
    return app_config


def resume_config(results_dir: Path, **overrides: Any) -> AppConfig:
    return AppConfig.from_run_config(
        {"results-dir": str(results_dir), "resume": "earlier", **overrides}
    )


BAD_RESUMES = [
    ({"resume": "missing"}, "run config 'resume'='missing'", "found no "),
    ({"seed": 7}, "run config 'seed'=7", "expected 0 when resuming, the value the"),
    ({"model": "cnn"}, "run config 'model'='cnn'", "expected 'mlp' when resuming"),
    (
        {"num-server-rounds": 1},
        "run config 'num-server-rounds'=1",
        "the rounds it has done",
    ),
]
MODEL = array_record({"w": np.zeros(3, np.float32)})


@pytest.mark.parametrize(("overrides", "names", "allowed"), BAD_RESUMES)
def test_bad_resume_is_refused_with_one_clear_line(
    tmp_path: Path, overrides: dict[str, Any], names: str, allowed: str
) -> None:
    make_finished_run(tmp_path)
    with pytest.raises(ValueError) as raised:
        RunFolder.open(resume_config(tmp_path, **overrides), MODEL)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(names), message
    assert allowed in message, message


def test_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    make_finished_run(tmp_path)
    (tmp_path / "earlier" / "checkpoint.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError) as raised:
        RunFolder.open(resume_config(tmp_path), MODEL)
    message = str(raised.value)
    assert message.startswith("run config 'resume'='earlier' is not allowed: ")
    assert "checkpoint.npz of format 1 written by flwr-noise" in message


def test_resume_may_change_rounds_timeout_and_find_the_run_by_path(
    tmp_path: Path,
) -> None:
    make_finished_run(tmp_path)
    config = AppConfig.from_run_config(
        {
            "resume": str(tmp_path / "earlier"),
            "num-server-rounds": 9,
            "round-timeout": 5,
            "results-dir": str(tmp_path / "elsewhere"),
        }
    )
    with RunFolder.open(config, MODEL, plot=False) as folder:
        assert folder.path == (tmp_path / "earlier").absolute()
        assert folder.first_round == 3


def test_restoring_into_another_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match=r"strategy state='1\.v_t'"):
        restore_strategy_state(NoisyStrategy(FedAvg()), {"1.v_t": {"w": np.zeros(2)}})
    restore_strategy_state(NoisyStrategy(FedAdam()), {"1.v_t": {"w": np.zeros(2)}})


# The ServerApp stops before it contacts a node or writes a file.


def server_context(run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )


@pytest.mark.parametrize(
    ("run_config", "fragment"),
    [
        ({"model": "resnet"}, "run config 'model'='resnet'"),
        ({"round-timeout": -1}, "run config 'round-timeout'=-1"),
        ({"resume": "no-such-run"}, "run config 'resume'='no-such-run'"),
        ({"dataset": "mnist", "data-dir": "/nonexistent/mnist"}, "data-dir"),
    ],
)
def test_server_app_validates_before_contacting_nodes_or_writing(
    tmp_path: Path, run_config: dict[str, Any], fragment: str
) -> None:
    results_dir = tmp_path / "results"
    grid = FakeGrid(reply_fn=lambda message: pytest.fail("a node was contacted"))
    with pytest.raises(ValueError, match=fragment):
        server_app(
            grid, server_context({**run_config, "results-dir": str(results_dir)})
        )
    assert grid.pushed == []
    assert not results_dir.exists()
