"""The in-process reproduction runner: structure, exactness and reproducibility."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_noise_app.reproduce import (
    NO_NOISE,
    PLACEMENTS,
    ExperimentConfig,
    SweepGrid,
    load_learner_data,
    run_experiment,
    run_serial_baseline,
    run_sweep,
    write_report,
)
from flwr_noise_app.reproduce.cli import main
from flwr_noise_app.tasks.models import build_model


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny models: one thread is as fast, and far faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small enough for a 2-core CI machine: digits, 3 learners, a few steps.
TINY = ExperimentConfig(
    dataset="digits", model="mlp", learners=3, local_steps=4, rounds=3
)


def tiny_grid(**changes: object) -> SweepGrid:
    settings: dict[str, object] = {
        "dataset": "digits",
        "models": ("linear",),
        "learners": (3,),
        "local_steps": (2,),
        "rounds": 2,
        "noise_stds": (0.0, 0.01),
        "placements": PLACEMENTS,
        "seeds": (0, 1),
    }
    settings.update(changes)
    return SweepGrid(**settings)  # type: ignore[arg-type]


def assert_same_weights(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_summary_has_one_entry_per_configuration(tmp_path: Path) -> None:
    summary = run_sweep(tiny_grid())

    # std 0 is one configuration whatever the placement; 0.01 is one per placement.
    entries = summary["entries"]
    assert summary["num_configurations"] == len(entries) == 1 + len(PLACEMENTS)
    placements = [entry["config"]["placement"] for entry in entries]
    assert placements == [NO_NOISE, *PLACEMENTS]
    for entry in entries:
        assert entry["seeds"] == [0, 1]
        for key in (
            "local_accuracy",
            "local_accuracy_min",
            "local_accuracy_max",
            "averaged_accuracy",
            "serial_accuracy",
            "serial_large_batch_accuracy",
            "local_gain",
            "averaged_gain",
        ):
            statistic = entry[key]
            assert len(statistic["values"]) == 2
            assert statistic["mean"] == pytest.approx(np.mean(statistic["values"]))
            assert statistic["std"] == pytest.approx(
                np.std(statistic["values"], ddof=1)
            )
        assert (
            entry["local_accuracy_min"]["mean"]
            <= entry["local_accuracy"]["mean"]
            <= entry["local_accuracy_max"]["mean"]
        )
        # 3 learners x 2 steps x 2 rounds of batch 16; 2 x 2 steps of batch 48.
        assert entry["serial_steps"] == 12
        assert entry["serial_large_batch_steps"] == 4
        assert entry["serial_large_batch_size"] == 48
    assert entries[0]["local_gain"]["values"] == [0.0, 0.0]

    written = write_report(summary, tmp_path, command=["python", "-m", "x"])
    assert {path.name for path in written} == {
        "summary.json",
        "summary.md",
        "accuracy_vs_noise_linear.png",
    }
    assert json.loads((tmp_path / "summary.json").read_text())["entries"] == entries
    table = (tmp_path / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(entries)  # header + one row per configuration
    assert "| local 0.01 |" in table and "| none |" in table


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_noise_is_bit_identical_to_no_noise(placement: str) -> None:
    data = load_learner_data(TINY, 0)
    noise_free = run_experiment(replace(TINY, placement=NO_NOISE), 0, data=data)
    for config in (
        replace(TINY, placement=placement),
        replace(TINY, placement=placement, relative=True, schedule="polynomial"),
    ):
        zero = run_experiment(config, 0, data=data)
        assert_same_weights(zero.averaged_state, noise_free.averaged_state)
        assert zero.final == noise_free.final
    noisy = run_experiment(
        replace(TINY, placement=placement, noise_std=1e-3), 0, data=data
    )
    assert not torch.equal(
        noisy.averaged_state["1.weight"], noise_free.averaged_state["1.weight"]
    )


def test_serial_baselines_are_far_above_chance() -> None:
    config = replace(TINY, learners=4, local_steps=10, rounds=10)
    data = load_learner_data(config, 0)
    serial = run_serial_baseline(config, 0, data=data)
    large = run_serial_baseline(config, 0, large_batch=True, data=data)
    assert (serial.steps, serial.batch_size) == (400, 16)
    assert (large.steps, large.batch_size) == (100, 64)
    # Ten classes: chance is 0.1.
    assert serial.accuracy > 0.85
    assert large.accuracy > 0.6


def test_same_seed_gives_identical_summary() -> None:
    grid = tiny_grid(models=("mlp",), seeds=(3,))
    first = json.dumps(run_sweep(grid))
    assert json.dumps(run_sweep(grid)) == first
    assert json.dumps(run_sweep(replace(grid, seeds=(4,)))) != first


def test_a_round_without_finite_replies_keeps_the_previous_model() -> None:
    """The server is NoisyStrategy: it drops non-finite models, skips the round."""
    config = replace(TINY, rounds=2, learning_rate=1e30, record_rounds=True)
    result = run_experiment(config, 0)
    initial = build_model(config.model, (1, 8, 8), 10, seed=0).state_dict()
    assert_same_weights(result.averaged_state, initial)
    assert [record.round for record in result.rounds] == [1, 2]
    assert result.final.averaged_accuracy == result.rounds[0].averaged_accuracy


def test_record_rounds_gives_one_record_per_round() -> None:
    result = run_experiment(replace(TINY, record_rounds=True), 0)
    assert [record.round for record in result.rounds] == [1, 2, 3]
    last_only = run_experiment(TINY, 0)
    assert [record.round for record in last_only.rounds] == [3]
    assert last_only.final == result.final


def test_images_per_learner_keeps_that_many() -> None:
    data = load_learner_data(replace(TINY, images_per_learner=50), 0)
    assert data.sizes == [50, 50, 50]
    with pytest.raises(ValueError, match="images_per_learner=5000"):
        load_learner_data(replace(TINY, images_per_learner=5000), 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learners": 0}, "learners=0"),
        ({"placement": "server"}, "placement='server'"),
        ({"placement": NO_NOISE, "noise_std": 0.1}, "placement='none'"),
        ({"noise_std": -1.0}, "noise_std=-1.0"),
        ({"model": "resnet"}, "model='resnet'"),
        ({"learning_rate": 0}, "learning_rate=0"),
    ],
)
def test_bad_config_is_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        replace(TINY, **changes)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"images_per_learner": 0}, ValueError, "images_per_learner=0"),
        ({"data_dir": 3}, TypeError, "data_dir=3 is not allowed: expected a str path"),
        ({"sam_rho": -0.1}, ValueError, "sam_rho=-0.1"),
        ({"relative": 1}, TypeError, "relative=1"),
        (
            {
                "noise_std": 0.1,
                "placement": "received",
                "correlation": "anticorrelated",
            },
            ValueError,
            "correlation='anticorrelated' is not allowed: expected 'independent' "
            "with placement='received'",
        ),
    ],
)
def test_experiment_fields_and_combinations_are_checked(
    changes: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        replace(TINY, **changes)


def test_experiment_checked_numbers_are_floats() -> None:
    config = replace(TINY, learning_rate=np.float32(0.5), noise_std=1, sam_rho=0)
    assert [type(config.learning_rate), type(config.noise_std)] == [float, float]
    assert type(config.sam_rho) is float


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"models": "mlp"}, TypeError, "models='mlp' is not allowed: expected a tuple"),
        ({"models": ()}, ValueError, "models=\\(\\) is not allowed: expected at least"),
        ({"sam_rhos": 0.5}, TypeError, "expected a tuple of numbers > 0"),
        # Every value is checked before repeats are dropped (True == 1.0).
        ({"sam_rhos": (1.0, True)}, TypeError, "sam_rhos=True"),
        ({"seeds": (-1,)}, ValueError, "seeds=-1"),
        ({"rounds": 2, "total_local_steps": 4}, ValueError, "rounds=2"),
        ({"rounds": None, "total_local_steps": 0}, ValueError, "total_local_steps=0"),
    ],
)
def test_bad_grid_is_rejected(
    changes: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        tiny_grid(**changes)


def test_grid_axes_drop_repeats_in_order() -> None:
    grid = tiny_grid(
        models=("mlp", "linear", "mlp"), sam_rhos=(0.5, 0.2, 0.5), noise_stds=()
    )
    assert (grid.models, grid.sam_rhos, grid.noise_stds) == (
        ("mlp", "linear"),
        (0.5, 0.2),
        (),
    )


def test_total_local_steps_must_be_divisible_by_b() -> None:
    grid = tiny_grid(rounds=None, total_local_steps=8, local_steps=(2, 4))
    assert [c.rounds for c in grid.configurations()][::4] == [4, 2]
    with pytest.raises(ValueError, match="local_steps=3"):
        tiny_grid(rounds=None, total_local_steps=8, local_steps=(3,))


def test_relative_runs_take_their_own_std_levels() -> None:
    grid = tiny_grid(
        placements=("local",),
        relative=(False, True),
        noise_stds=(0.0, 0.01),
        relative_noise_stds=(0.1, 0.3),
    )
    noise = [(c.noise_std, c.relative) for c in grid.configurations()]
    assert noise == [(0.0, False), (0.01, False), (0.1, True), (0.3, True)]
    with pytest.raises(ValueError, match="relative_noise_stds=\\(0.1,\\)"):
        tiny_grid(relative_noise_stds=(0.1,))


def test_cli_writes_summary_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = main(
        [
            "--dataset=digits",
            "--model=linear",
            "--learners=2",
            "--local-steps=2",
            "--rounds=2",
            "--noise-std",
            "0",
            "0.01",
            "--relative",
            "false",
            "true",
            "--relative-noise-std",
            "0.05",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"][:3] == ["python", "-m", "flwr_noise_app.reproduce"]
    noise = [
        (entry["config"]["noise_std"], entry["config"]["relative"])
        for entry in summary["entries"]
    ]
    assert noise == [(0.0, False), (0.01, False), (0.05, True)]
    assert (out / "accuracy_vs_noise_linear.png").stat().st_size > 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--learners", "0"], "--learners=0 is not allowed: expected an int >= 1"),
        (["--noise-std", "-0.1"], "--noise-std=-0.1 is not allowed"),
        (["--threads", "0"], "--threads=0 is not allowed: expected an int >= 1"),
        (["--placement", "server"], "argument --placement: invalid choice"),
        (
            ["--total-local-steps", "10", "--local-steps", "3"],
            "--local-steps=3 is not allowed: expected a divisor of "
            "--total-local-steps=10",
        ),
        (["--images-per-learner", "5000"], "--images-per-learner=5000"),
        (["--rounds", "2", "--total-local-steps", "4"], "not allowed with"),
    ],
)
def test_cli_rejects_bad_arguments(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--out", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_runner_gives_the_apps_numbers(placement: str) -> None:
    """The App's ClientApp under NoisyStrategy(FedAvg) gives the runner's numbers."""
    from fakes import FakeGrid, make_context
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.serverapp.strategy import FedAvg

    from client_app.app import train
    from flwr_noise.strategy import NoisyStrategy
    from flwr_noise_app.config import AppConfig
    from flwr_noise_app.tasks.models import build_model

    seed = 5
    config = replace(TINY, learners=2, rounds=2, noise_std=0.01, placement=placement)
    ours = run_experiment(config, seed)

    app_config = AppConfig(
        num_server_rounds=config.rounds,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        model=config.model,
        dataset=config.dataset,
        seed=seed,
        local_noise_std=config.noise_std if placement == "local" else 0.0,
        broadcast_noise_std=config.noise_std if placement == "received" else 0.0,
        aggregation_noise_std=config.noise_std if placement == "aggregation" else 0.0,
    )
    node_ids = [1001, 1002]
    partition_of_node = {node: index for index, node in enumerate(node_ids)}
    local_accuracy: dict[int, list[float]] = {}

    def client_app(message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = make_context(node, partition_of_node[node], config.learners)
        context.run_config = app_config.to_dict()
        reply = train(message, context)
        server_round = int(message.content["config"]["server-round"])
        accuracy = float(reply.content["metrics"]["local-accuracy"])
        local_accuracy.setdefault(server_round, []).append(accuracy)
        return reply

    strategy = NoisyStrategy(
        FedAvg(fraction_evaluate=0.0),
        local=app_config.local_spec(),
        broadcast=app_config.broadcast_spec(),
        aggregation=app_config.aggregation_spec(),
        client_key_fn=partition_of_node.__getitem__,
    )
    initial = build_model(config.model, (1, 8, 8), 10, seed=seed)
    result = strategy.start(
        grid=FakeGrid(node_ids, client_app),
        initial_arrays=ArrayRecord(initial.state_dict()),
        train_config=ConfigRecord(),
        num_rounds=config.rounds,
    )

    assert_same_weights(result.arrays.to_torch_state_dict(), ours.averaged_state)
    app_local = local_accuracy[config.rounds]
    assert ours.final.local_accuracy_mean == float(np.mean(app_local))


# --- Beyond the paper (issue 13): correlation, SAM, losses, ratios, curves ---


def test_correlation_is_passed_to_the_noise_spec() -> None:
    from dataclasses import fields

    from flwr_noise import NoiseSpec

    if "correlation" not in {field.name for field in fields(NoiseSpec)}:
        pytest.skip("this NoiseSpec has no 'correlation' field (core feature)")
    anti = replace(TINY, noise_std=0.01, correlation="anticorrelated")
    assert anti.noise_spec(0).correlation == "anticorrelated"
    assert replace(anti, correlation="independent").noise_spec(0).correlation == (
        "independent"
    )
    data = load_learner_data(TINY, 0)
    kept = run_experiment(replace(anti, correlation="independent"), 0, data=data)
    removed = run_experiment(anti, 0, data=data)
    assert not torch.equal(
        kept.averaged_state["1.weight"], removed.averaged_state["1.weight"]
    )
    assert "anticorrelated" in anti.noise_label()


def test_correlation_axis_applies_to_local_noise_only() -> None:
    grid = tiny_grid(correlations=("independent", "anticorrelated"), seeds=(0,))
    labels = [(c.placement, c.correlation) for c in grid.configurations()]
    assert labels == [
        (NO_NOISE, "independent"),
        ("local", "independent"),
        ("local", "anticorrelated"),
        ("received", "independent"),
        ("aggregation", "independent"),
    ]
    with pytest.raises(ValueError, match="correlation='anticorrelated'"):
        replace(
            TINY, noise_std=0.01, placement="received", correlation="anticorrelated"
        )
    with pytest.raises(ValueError, match="correlation='sideways'"):
        replace(TINY, correlation="sideways")


def test_cli_passes_correlation_sam_rho_and_levels() -> None:
    from flwr_noise_app.reproduce.cli import build_parser, grid_from_args

    args = build_parser().parse_args(
        [
            "--correlation",
            "independent",
            "anticorrelated",
            "--sam-rho",
            "0.05",
            "--accuracy-levels",
            "0.7",
            "--out",
            "x",
        ]
    )
    grid = grid_from_args(args)
    assert grid.correlations == ("independent", "anticorrelated")
    assert grid.sam_rhos == (0.05,)
    assert grid.accuracy_levels == (0.7,)


def test_test_loss_is_reported_beside_accuracy(tmp_path: Path) -> None:
    grid = tiny_grid(placements=("local",), seeds=(0,))
    summary = run_sweep(grid)
    for entry, config in zip(summary["entries"], grid.configurations(), strict=True):
        final = run_experiment(config, 0).final
        assert entry["local_loss"]["values"] == [final.local_loss_mean]
        assert entry["averaged_loss"]["values"] == [final.averaged_loss]
        assert entry["serial_loss"]["values"][0] > 0
    write_report(summary, tmp_path, plots=False)
    table = (tmp_path / "summary.md").read_text()
    assert "| local loss |" in table and "| averaged loss |" in table
    assert f"{summary['entries'][1]['averaged_loss']['mean']:.3f} ± " in table


def test_noise_ratios_on_a_tiny_case() -> None:
    from flwr_noise_app.reproduce.runner import noise_ratios

    ratios = noise_ratios(0.01, 0.002, {"w": 0.5, "b": 0.04, "zero": 0.0})
    assert ratios["sigma_over_update"] == pytest.approx(5.0)
    assert ratios["sigma_over_layer_rms"] == pytest.approx(
        {"w": 0.02, "b": 0.25, "zero": float("inf")}
    )


def test_update_rms_and_layer_rms_are_measured() -> None:
    # One learner, one step over its whole (16-image) partition: the update is
    # lr times the full-batch gradient at the initial model.
    config = ExperimentConfig(
        model="linear",
        learners=1,
        images_per_learner=16,
        batch_size=16,
        local_steps=1,
        rounds=1,
        learning_rate=0.1,
    )
    data = load_learner_data(config, 0)
    result = run_experiment(config, 0, data=data)

    from flwr_noise_app.tasks.models import build_model

    model = build_model("linear", data.input_shape, data.num_classes, seed=0)
    torch.nn.functional.cross_entropy(model(data.x[0]), data.y[0]).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert result.update_rms == pytest.approx(
        0.1 * grads.square().mean().sqrt().item(), rel=1e-5
    )
    for name, tensor in result.averaged_state.items():
        expected = tensor.double().square().mean().sqrt().item()
        assert result.layer_rms[name] == pytest.approx(expected)

    summary = run_sweep(tiny_grid(placements=("local",), seeds=(0,)))
    noisy = summary["entries"][1]
    assert noisy["sigma_over_update"]["mean"] == pytest.approx(
        0.01 / noisy["update_rms"]["mean"]
    )
    assert "sigma_over_update" not in summary["entries"][0]


def test_sam_rows_take_sam_steps_and_compare_with_plain_sgd() -> None:
    grid = tiny_grid(placements=("local",), seeds=(0,), sam_rhos=(0.5,))
    configs = grid.configurations()
    sam = configs[-1]
    assert (sam.noise_std, sam.sam_rho, sam.noise_label()) == (0.0, 0.5, "SAM rho=0.5")
    summary = run_sweep(grid)
    entry = summary["entries"][-1]
    reference = summary["entries"][0]
    assert entry["averaged_gain"]["values"] == [
        entry["averaged_accuracy"]["values"][0]
        - reference["averaged_accuracy"]["values"][0]
    ]
    data = load_learner_data(sam, 0)
    plain = run_experiment(replace(sam, sam_rho=0.0), 0, data=data)
    assert not torch.equal(
        run_experiment(sam, 0, data=data).averaged_state["1.weight"],
        plain.averaged_state["1.weight"],
    )


def test_rounds_to_reach_and_merged_seeds(tmp_path: Path) -> None:
    from flwr_noise_app.reproduce.runner import RoundRecord
    from flwr_noise_app.reproduce.sweep import merge_summaries, rounds_to_reach

    records = [
        RoundRecord(r, local, local, local, 1.0, averaged, 1.0)
        for r, local, averaged in [(1, 0.3, 0.6), (2, 0.85, 0.7), (3, 0.95, 0.92)]
    ]
    assert rounds_to_reach(records, 0.5) == 1
    assert rounds_to_reach(records, 0.9) == 3
    assert rounds_to_reach(records, 0.5, model="local") == 2
    assert rounds_to_reach(records, 0.99) is None

    grid = tiny_grid(placements=("local",), record_rounds=True, rounds=3)
    together = run_sweep(grid)
    merged = merge_summaries(
        [run_sweep(replace(grid, seeds=(seed,))) for seed in grid.seeds]
    )
    assert merged["grid"]["seeds"] == [0, 1]
    for ours, theirs in zip(merged["entries"], together["entries"], strict=True):
        assert ours["local_gain"]["values"] == theirs["local_gain"]["values"]
        assert ours["averaged_loss"]["values"] == theirs["averaged_loss"]["values"]
        assert ours["rounds_to_reach"] == theirs["rounds_to_reach"]
        for mine, other in zip(ours["rounds"], theirs["rounds"], strict=True):
            assert mine.keys() == other.keys()
            for key in mine:
                assert mine[key] == pytest.approx(other[key]), key
    written = write_report(merged, tmp_path)
    assert tmp_path / "accuracy_per_round_linear.png" in written
    assert (
        "## Rounds to reach an accuracy level" in (tmp_path / "summary.md").read_text()
    )


def test_a_sweep_split_by_seed_and_row_merges_into_the_whole() -> None:
    from flwr_noise_app.reproduce.sweep import merge_summaries

    whole = tiny_grid(placements=("local",), sam_rhos=(0.5,))
    parts = []
    for seed in whole.seeds:
        parts += [
            run_sweep(replace(whole, noise_stds=(0.0,), sam_rhos=(), seeds=(seed,))),
            run_sweep(
                replace(
                    whole,
                    noise_stds=(0.01,),
                    sam_rhos=(),
                    seeds=(seed,),
                    serial_baselines=False,
                )
            ),
            run_sweep(
                replace(whole, noise_stds=(), seeds=(seed,), serial_baselines=False)
            ),
        ]
    assert "serial_accuracy" not in parts[1]["entries"][0]
    assert "local_gain" not in parts[2]["entries"][0]
    merged = merge_summaries(parts)
    expected = run_sweep(whole)
    assert [e["config"] for e in merged["entries"]] == [
        e["config"] for e in expected["entries"]
    ]
    for ours, theirs in zip(merged["entries"], expected["entries"], strict=True):
        assert ours.keys() == theirs.keys()
        for key in ("local_gain", "averaged_gain", "serial_accuracy", "local_loss"):
            assert ours[key]["values"] == pytest.approx(theirs[key]["values"]), key


def test_serial_baselines_of_some_seeds_only_merge_over_those_seeds() -> None:
    from flwr_noise_app.reproduce.sweep import merge_summaries

    whole = tiny_grid(placements=("local",), noise_stds=(0.0,))
    with_serial = run_sweep(replace(whole, seeds=(whole.seeds[0],)))
    without = run_sweep(replace(whole, seeds=(whole.seeds[1],), serial_baselines=False))
    expected = with_serial["entries"][0]["serial_accuracy"]["values"]
    for parts in ([with_serial, without], [without, with_serial]):
        (entry,) = merge_summaries(parts)["entries"]
        assert entry["serial_accuracy"]["values"] == expected
        assert entry["serial_seeds"] == [whole.seeds[0]]
        assert sorted(entry["seeds"]) == sorted(whole.seeds[:2])


def test_merged_dirichlet_runs_say_which_alpha_each_row_has() -> None:
    from flwr_noise_app.reproduce.report import markdown_summary
    from flwr_noise_app.reproduce.sweep import merge_summaries

    skewed = tiny_grid(
        placements=("local",),
        partitionings=("dirichlet",),
        seeds=(0,),
        serial_baselines=False,
    )
    parts = [run_sweep(replace(skewed, dirichlet_alpha=alpha)) for alpha in (0.1, 0.5)]
    merged = merge_summaries(parts)
    rows = [
        line
        for line in markdown_summary(merged).splitlines()
        if line.startswith("| dirichlet")
    ]
    table_rows = rows[: len(merged["entries"])]
    assert [row.split(" | ")[0] for row in table_rows] == [
        "| dirichlet α=0.1",
        "| dirichlet α=0.1",
        "| dirichlet α=0.5",
        "| dirichlet α=0.5",
    ]
    for part, alpha in zip(parts, ("0.1", "0.5"), strict=True):
        (noisy,) = [e for e in part["entries"] if e["config"]["noise_std"] > 0]
        (row,) = [r for r in table_rows if f"α={alpha}" in r and "local 0.01" in r]
        gain = noisy["averaged_gain"]["mean"] * 100
        assert f"{gain:+.1f}" in row

    iid = markdown_summary(run_sweep(replace(skewed, partitionings=("iid",))))
    assert "partitioning=iid" in iid and "α" not in iid
