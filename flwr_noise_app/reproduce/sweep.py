"""A sweep: the cartesian product of experiment settings, run over several seeds.

Every combination of the listed values is one configuration (noise-free
combinations that differ only in how the zero noise would be placed or
scheduled are one configuration). Each configuration runs once per seed; the
summary holds, per configuration, the mean and standard deviation over seeds
of the local models' accuracy before averaging, of the averaged model's
accuracy, of the two serial baselines' accuracy, and of the paired (same seed)
difference to the noise-free configuration with the same other settings.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from flwr_noise import validation
from flwr_noise_app.reproduce.runner import (
    INDEPENDENT,
    ExperimentConfig,
    LearnerData,
    RoundRecord,
    RunResult,
    SerialResult,
    load_learner_data,
    noise_ratios,
    run_experiment,
    run_serial_baseline,
)
from flwr_noise_app.tasks.training import get_device

SUMMARY_FORMAT = "flwr-noise-reproduce/1"


@dataclass(frozen=True)
class SweepGrid:
    """The settings of a sweep; every tuple field is one axis of the product.

    Parameters
    ----------
    dataset : str (default: "digits")
        ``"digits"`` or ``"mnist"``.
    data_dir : str (default: "")
        MNIST IDX folder.
    models : tuple[str, ...] (default: ("mlp",))
        Models to train.
    learners : tuple[int, ...] (default: (4,))
        Numbers of learners m.
    images_per_learner : tuple[int | None, ...] (default: (None,))
        Training images per learner; ``None``: the whole partition.
    local_steps : tuple[int, ...] (default: (10,))
        Values of b, the local steps between averagings.
    rounds : int | None (default: 10)
        Number of averagings, the same for every b. Exactly one of ``rounds``
        and ``total_local_steps`` is given.
    total_local_steps : int | None (default: None)
        Local steps per learner over the whole run; ``rounds = total / b``, so
        runs with different b see the same number of samples (and share their
        serial baselines). Every b must divide it.
    noise_stds : tuple[float, ...] (default: (0, 1e-3, 3e-3, 1e-2, 3e-2))
        Noise standard deviations; include 0 for the paired comparison. May
        be empty when ``sam_rhos`` is not (SAM rows only).
    schedules : tuple[str, ...] (default: ("constant",))
        Noise schedules.
    relative : tuple[bool, ...] (default: (False,))
        Absolute and/or relative (scaled by each tensor's RMS) noise.
    relative_noise_stds : tuple[float, ...] | None (default: None)
        The std levels of the relative runs (relative stds are fractions of a
        tensor's RMS, so they usually need other levels); ``None``: the
        ``noise_stds``. Only with ``True`` in ``relative``.
    placements : tuple[str, ...] (default: ("local",))
        ``"local"``, ``"received"``, ``"aggregation"``.
    partitionings : tuple[str, ...] (default: ("iid",))
        ``"iid"`` and/or ``"dirichlet"``.
    batch_sizes : tuple[int, ...] (default: (16,))
        Mini-batch sizes B.
    learning_rates : tuple[float, ...] (default: (0.05,))
        SGD step sizes.
    dirichlet_alpha : float (default: 0.5)
        Concentration of the Dirichlet partitioning.
    distribution : str (default: "gaussian")
        Noise distribution.
    seeds : tuple[int, ...] (default: (0,))
        Seeds; every configuration runs once per seed.
    record_rounds : bool (default: False)
        Evaluate after every round (adds per-round curves and the rounds to
        reach ``accuracy_levels`` to the summary).
    correlations : tuple[str, ...] (default: ("independent",))
        ``"independent"`` and/or ``"anticorrelated"`` local noise; other
        placements run ``"independent"`` only.
    sam_rhos : tuple[float, ...] (default: ())
        Each value > 0 adds, per setting, one noise-free row whose learners
        take SAM steps of that radius.
    accuracy_levels : tuple[float, ...] (default: (0.5, 0.8, 0.9))
        Accuracy levels of the rounds-to-reach table (with ``record_rounds``).
    serial_baselines : bool (default: True)
        Train the serial baselines; ``False`` leaves them out of the summary
        (another run of the same settings can supply them, see
        ``merge_summaries``).

    Raises
    ------
    TypeError, ValueError
        If a value is not allowed; the message names the field.

    """

    dataset: str = "digits"
    data_dir: str = ""
    models: tuple[str, ...] = ("mlp",)
    learners: tuple[int, ...] = (4,)
    images_per_learner: tuple[int | None, ...] = (None,)
    local_steps: tuple[int, ...] = (10,)
    rounds: int | None = 10
    total_local_steps: int | None = None
    noise_stds: tuple[float, ...] = (0.0, 0.001, 0.003, 0.01, 0.03)
    schedules: tuple[str, ...] = ("constant",)
    relative: tuple[bool, ...] = (False,)
    relative_noise_stds: tuple[float, ...] | None = None
    placements: tuple[str, ...] = ("local",)
    partitionings: tuple[str, ...] = ("iid",)
    batch_sizes: tuple[int, ...] = (16,)
    learning_rates: tuple[float, ...] = (0.05,)
    dirichlet_alpha: float = 0.5
    distribution: str = "gaussian"
    seeds: tuple[int, ...] = (0,)
    record_rounds: bool = False
    correlations: tuple[str, ...] = (INDEPENDENT,)
    sam_rhos: tuple[float, ...] = ()
    accuracy_levels: tuple[float, ...] = (0.5, 0.8, 0.9)
    serial_baselines: bool = True

    def __post_init__(self) -> None:
        for name in _AXES:
            empty_ok = name == "noise_stds" and bool(self.sam_rhos)
            values = _distinct(name, getattr(self, name), empty_ok=empty_ok)
            object.__setattr__(self, name, values)
        if self.relative_noise_stds is not None:
            stds = _relative_stds(self.relative_noise_stds, self.relative)
            object.__setattr__(self, "relative_noise_stds", stds)
        for seed in self.seeds:
            validation.check_integer("seeds", seed, low=0)
        sam_rhos = _distinct(
            "sam_rhos",
            self.sam_rhos,
            expected="a tuple of numbers > 0",
            empty_ok=True,
            each=lambda rho: validation.check_real(
                "sam_rhos", rho, low=0.0, low_open=True
            ),
        )
        object.__setattr__(self, "sam_rhos", sam_rhos)
        for level in self.accuracy_levels:
            validation.check_real("accuracy_levels", level, low=0.0, high=1.0)
        _check_run_length(self.rounds, self.total_local_steps, self.local_steps)
        # Builds (and so validates) every configuration once.
        self.configurations()

    def rounds_for(self, local_steps: int) -> int:
        """Return the number of rounds of runs with ``local_steps`` steps per round."""
        if self.rounds is not None:
            return self.rounds
        assert self.total_local_steps is not None
        return self.total_local_steps // local_steps

    def noise_stds_for(self, relative: bool) -> tuple[float, ...]:
        """Return the std levels of the absolute or of the relative runs."""
        if relative and self.relative_noise_stds is not None:
            return self.relative_noise_stds
        return self.noise_stds

    def configurations(self) -> list[ExperimentConfig]:
        """Return every distinct configuration of the product, in a stable order.

        The order nests the axes as listed in the class (models outermost,
        noise std innermost), so each noise-free configuration precedes the
        noisy ones it is compared with.
        """
        configurations: dict[ExperimentConfig, None] = {}
        for (
            model,
            images,
            local_steps,
            learners,
            partitioning,
            batch_size,
            learning_rate,
            placement,
            relative,
            schedule,
        ) in itertools.product(
            self.models,
            self.images_per_learner,
            self.local_steps,
            self.learners,
            self.partitionings,
            self.batch_sizes,
            self.learning_rates,
            self.placements,
            self.relative,
            self.schedules,
        ):
            setting = ExperimentConfig(
                dataset=self.dataset,
                data_dir=self.data_dir,
                model=model,
                learners=learners,
                images_per_learner=images,
                local_steps=local_steps,
                rounds=self.rounds_for(local_steps),
                batch_size=batch_size,
                learning_rate=learning_rate,
                schedule=schedule,
                relative=relative,
                placement=placement,
                distribution=self.distribution,
                partitioning=partitioning,
                dirichlet_alpha=self.dirichlet_alpha,
                record_rounds=self.record_rounds,
            )
            for noise_std in self.noise_stds_for(relative):
                for correlation in self.correlations:
                    if correlation != INDEPENDENT and placement != "local":
                        continue
                    config = replace(
                        setting, noise_std=noise_std, correlation=correlation
                    )
                    configurations.setdefault(config.canonical(), None)
            for rho in self.sam_rhos:
                config = replace(setting, noise_std=0.0, sam_rho=rho)
                configurations.setdefault(config.canonical(), None)
        return list(configurations)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in asdict(self).items()
        }


# SweepGrid's axes: tuples of at least one value, duplicates dropped.
_AXES: tuple[str, ...] = (
    "models",
    "learners",
    "images_per_learner",
    "local_steps",
    "noise_stds",
    "schedules",
    "relative",
    "placements",
    "partitionings",
    "batch_sizes",
    "learning_rates",
    "seeds",
    "correlations",
    "accuracy_levels",
)


def _distinct(
    name: str,
    values: Any,
    *,
    expected: str = "a tuple of values",
    empty_ok: bool = False,
    each: Callable[[Any], object] | None = None,
) -> tuple[Any, ...]:
    """Return ``values`` without repeats (first occurrence, given order), or raise.

    ``each`` checks every value (repeats included) before they are compared.
    """
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise validation.not_allowed(name, values, expected, TypeError)
    if not values and not empty_ok:
        raise validation.not_allowed(name, values, "at least one value")
    if each is not None:
        for value in values:
            each(value)
    return tuple(dict.fromkeys(values))


def _relative_stds(stds: Any, relative: tuple[bool, ...]) -> tuple[float, ...]:
    """Return ``relative_noise_stds`` without repeats, or raise."""
    if True not in relative:
        raise validation.not_allowed(
            "relative_noise_stds",
            stds,
            f"None with relative={relative!r} (True not in relative)",
        )
    if not stds:
        raise validation.not_allowed(
            "relative_noise_stds", stds, "at least one value, or None"
        )
    return tuple(dict.fromkeys(stds))


def _check_run_length(
    rounds: int | None, total_local_steps: int | None, local_steps: tuple[int, ...]
) -> None:
    """Check that exactly one of ``rounds`` and ``total_local_steps`` is given."""
    if (rounds is None) == (total_local_steps is None):
        raise validation.not_allowed(
            "rounds",
            rounds,
            "an int >= 1 with total_local_steps=None, or None with an int "
            f"total_local_steps (not {total_local_steps!r})",
        )
    if rounds is not None:
        validation.check_integer("rounds", rounds, low=1)
        return
    validation.check_integer("total_local_steps", total_local_steps, low=1)
    assert total_local_steps is not None
    for steps in local_steps:
        validation.check_integer("local_steps", steps, low=1)
        if total_local_steps % steps:
            raise validation.not_allowed(
                "local_steps",
                steps,
                f"a divisor of total_local_steps={total_local_steps}",
            )


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": array.tolist()}


SERIAL_FIELDS = (
    "serial_accuracy",
    "serial_large_batch_accuracy",
    "serial_loss",
    "serial_large_batch_loss",
    "serial_steps",
    "serial_large_batch_steps",
    "serial_large_batch_size",
)


def _paired_gains(
    finals: Sequence[tuple[float, float]], baselines: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Paired (same seed) local and averaged gains over the noise-free row."""
    pairs = list(zip(finals, baselines, strict=True))
    return {
        "local_gain": summarize([f[0] - b[0] for f, b in pairs]),
        "averaged_gain": summarize([f[1] - b[1] for f, b in pairs]),
    }


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge summaries of one sweep split over processes into one summary.

    Long sweeps can run one process per seed and per row (``--seeds``, and
    ``--no-serial`` for all but one of the rows of a setting). Summaries of
    the same seeds are first joined row by row: a row without serial
    baselines takes them from a row of the same setting that has them, and a
    row without paired gains gets them from its noise-free row. The groups
    of different seeds are then merged as if one sweep had run every seed;
    configurations missing from any group are left out.

    Parameters
    ----------
    summaries : Sequence[dict[str, Any]]
        What ``run_sweep`` returned (or ``summary.json`` holds).

    Returns
    -------
    dict[str, Any]
        One summary over the union of the seeds, in the given order.

    Raises
    ------
    ValueError
        If ``summaries`` is empty or two groups share a seed.

    """
    if not summaries:
        raise validation.not_allowed("summaries", summaries, "at least one summary")
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(tuple(summary["grid"]["seeds"]), []).append(summary)
    summaries = [_join_rows(group) for group in groups.values()]
    seeds = [seed for summary in summaries for seed in summary["grid"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise validation.not_allowed(
            "summaries", f"<seeds {seeds}>", "summaries of disjoint seeds"
        )
    grid = {**summaries[0]["grid"], "seeds": seeds}
    keyed = [
        {_entry_key(e["config"]): e for e in summary["entries"]}
        for summary in summaries
    ]
    entries = [
        _merge_entries([entries[key] for entries in keyed])
        for key in keyed[0]
        if all(key in entries for entries in keyed)
    ]
    return {
        "format": SUMMARY_FORMAT,
        "grid": grid,
        "num_configurations": len(entries),
        "entries": entries,
    }


def _entry_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def _join_rows(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join summaries of the same seeds and different rows into one."""
    entries: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        for entry in summary["entries"]:
            entries.setdefault(_entry_key(entry["config"]), dict(entry))
    serial: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entry in entries.values():
        if "serial_accuracy" in entry:
            key = ExperimentConfig(**entry["config"]).serial_key()
            serial.setdefault(key, {name: entry[name] for name in SERIAL_FIELDS})
    for entry in entries.values():
        config = ExperimentConfig(**entry["config"])
        if "serial_accuracy" not in entry and config.serial_key() in serial:
            entry.update(serial[config.serial_key()])
        base = entries.get(_entry_key(noise_free_counterpart(config).to_dict()))
        if "local_gain" not in entry and base is not None:
            entry.update(
                _paired_gains(
                    list(
                        zip(
                            entry["local_accuracy"]["values"],
                            entry["averaged_accuracy"]["values"],
                            strict=True,
                        )
                    ),
                    list(
                        zip(
                            base["local_accuracy"]["values"],
                            base["averaged_accuracy"]["values"],
                            strict=True,
                        )
                    ),
                )
            )
    return {**summaries[0], "entries": list(entries.values())}


def _merge_entries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    weights = [len(part["seeds"]) for part in parts]

    def weighted(values: Sequence[float]) -> float:
        return float(np.average(values, weights=weights))

    merged: dict[str, Any] = {}
    keys = dict.fromkeys(key for part in parts for key in part)
    for key in keys:
        value = next(part[key] for part in parts if key in part)
        if isinstance(value, dict) and "values" in value:
            # Serial baselines may come from some seeds only (the other
            # processes ran with --no-serial): summarize the seeds that have them.
            merged[key] = summarize(
                [v for part in parts if key in part for v in part[key]["values"]]
            )
            if key in SERIAL_FIELDS and not all(key in part for part in parts):
                merged["serial_seeds"] = [
                    seed for part in parts if key in part for seed in part["seeds"]
                ]
        elif key == "seeds":
            merged[key] = [seed for part in parts for seed in part["seeds"]]
        elif key == "sigma_over_layer_rms":
            merged[key] = {
                name: weighted([part[key][name] for part in parts]) for name in value
            }
        elif key == "rounds_to_reach":
            merged[key] = {
                model: {
                    level: [r for part in parts for r in part[key][model][level]]
                    for level in levels
                }
                for model, levels in value.items()
            }
        elif key == "rounds":
            merged[key] = [
                _merge_round(records, weighted)
                for records in zip(*(part["rounds"] for part in parts), strict=True)
            ]
        else:
            merged[key] = value
    return merged


def _merge_round(
    records: Sequence[dict[str, Any]], weighted: Callable[[Sequence[float]], float]
) -> dict[str, Any]:
    merged = {"round": records[0]["round"]}
    for key in ("local_loss", "averaged_loss"):
        merged[key] = weighted([record[key] for record in records])
    for model in ("local", "averaged"):
        values = [v for record in records for v in record[f"{model}_accuracy_seeds"]]
        merged[f"{model}_accuracy"] = _mean(values)
        merged[f"{model}_accuracy_seeds"] = values
    return merged


def noise_free_counterpart(config: ExperimentConfig) -> ExperimentConfig:
    """Return the configuration with the same settings, no noise and no SAM."""
    return replace(config, noise_std=0.0, sam_rho=0.0).canonical()


def _data_key(config: ExperimentConfig, seed: int) -> tuple[Any, ...]:
    return (
        config.dataset,
        config.data_dir,
        config.learners,
        config.images_per_learner,
        config.partitioning,
        config.dirichlet_alpha,
        seed,
    )


class SweepRunner:
    """Runs a grid, sharing data and serial baselines between configurations.

    Parameters
    ----------
    grid : SweepGrid
        What to run.
    progress : Callable[[str], None] | None (default: None)
        Receives one line per finished run.
    device : torch.device | None (default: None)
        Where to train; ``None`` is ``get_device()``.

    """

    def __init__(
        self,
        grid: SweepGrid,
        *,
        progress: Callable[[str], None] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.grid = grid
        self.configurations = grid.configurations()
        self._progress = progress
        self._device = get_device() if device is None else device
        self._data: dict[tuple[Any, ...], LearnerData] = {}
        self._serial: dict[tuple[Any, ...], SerialResult] = {}
        self.results: dict[tuple[ExperimentConfig, int], RunResult] = {}

    def data(self, config: ExperimentConfig, seed: int) -> LearnerData:
        """Return the learners' data of ``config`` and ``seed`` (loaded once)."""
        key = _data_key(config, seed)
        if key not in self._data:
            self._data[key] = load_learner_data(config, seed, self._device)
        return self._data[key]

    def check_data(self) -> None:
        """Load every configuration's data up front, so bad sizes fail fast."""
        for config in self.configurations:
            for seed in self.grid.seeds:
                self.data(config, seed)

    def serial(
        self, config: ExperimentConfig, seed: int, *, large_batch: bool
    ) -> SerialResult:
        """Return a serial baseline of ``config`` and ``seed`` (trained once)."""
        key = (*config.serial_key(), seed, large_batch)
        if key not in self._serial:
            self._serial[key] = run_serial_baseline(
                config,
                seed,
                large_batch=large_batch,
                data=self.data(config, seed),
                device=self._device,
            )
        return self._serial[key]

    def run(
        self, *, checkpoint: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Run every configuration with every seed; return the summary.

        Parameters
        ----------
        checkpoint : Callable[[dict[str, Any]], None] | None (default: None)
            Receives the summary so far after each configuration's last seed,
            so a long sweep that is stopped keeps its finished rows.

        """
        self.check_data()
        total = len(self.configurations) * len(self.grid.seeds)
        done = 0
        for config in self.configurations:
            for seed in self.grid.seeds:
                result = run_experiment(
                    config, seed, data=self.data(config, seed), device=self._device
                )
                self.results[(config, seed)] = result
                serial = ""
                if self.grid.serial_baselines:
                    small = self.serial(config, seed, large_batch=False)
                    large = self.serial(config, seed, large_batch=True)
                    serial = f", serial {small.accuracy:.4f} / {large.accuracy:.4f}"
                done += 1
                if self._progress is not None:
                    self._progress(
                        f"[{done}/{total}] {describe(config)} seed={seed}: local "
                        f"{result.final.local_accuracy_mean:.4f}, averaged "
                        f"{result.final.averaged_accuracy:.4f}{serial} "
                        f"({result.seconds:.1f} s)"
                    )
            if checkpoint is not None:
                checkpoint(self.summary())
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Return the summary of the runs done so far (see ``run_sweep``)."""
        entries = [
            self._entry(config)
            for config in self.configurations
            if all((config, seed) in self.results for seed in self.grid.seeds)
        ]
        return {
            "format": SUMMARY_FORMAT,
            "grid": self.grid.to_dict(),
            "num_configurations": len(entries),
            "entries": entries,
        }

    def _entry(self, config: ExperimentConfig) -> dict[str, Any]:
        seeds = self.grid.seeds
        runs = [self.results[(config, seed)] for seed in seeds]
        finals = [run.final for run in runs]
        entry: dict[str, Any] = {
            "config": config.to_dict(),
            "seeds": list(seeds),
            "local_accuracy": summarize([f.local_accuracy_mean for f in finals]),
            "local_accuracy_min": summarize([f.local_accuracy_min for f in finals]),
            "local_accuracy_max": summarize([f.local_accuracy_max for f in finals]),
            "averaged_accuracy": summarize([f.averaged_accuracy for f in finals]),
            "local_loss": summarize([f.local_loss_mean for f in finals]),
            "averaged_loss": summarize([f.averaged_loss for f in finals]),
            "update_rms": summarize([run.update_rms for run in runs]),
        }
        if self.grid.serial_baselines:
            serial = [self.serial(config, seed, large_batch=False) for seed in seeds]
            large = [self.serial(config, seed, large_batch=True) for seed in seeds]
            entry.update(
                {
                    "serial_accuracy": summarize([s.accuracy for s in serial]),
                    "serial_large_batch_accuracy": summarize(
                        [s.accuracy for s in large]
                    ),
                    "serial_loss": summarize([s.loss for s in serial]),
                    "serial_large_batch_loss": summarize([s.loss for s in large]),
                    "serial_steps": serial[0].steps,
                    "serial_large_batch_steps": large[0].steps,
                    "serial_large_batch_size": large[0].batch_size,
                }
            )
        if config.noise_enabled and not config.relative:
            ratios = [
                noise_ratios(config.noise_std, run.update_rms, run.layer_rms)
                for run in runs
            ]
            entry["sigma_over_update"] = summarize(
                [r["sigma_over_update"] for r in ratios]
            )
            entry["sigma_over_layer_rms"] = {
                name: _mean(r["sigma_over_layer_rms"][name] for r in ratios)
                for name in ratios[0]["sigma_over_layer_rms"]
            }
        baseline = noise_free_counterpart(config)
        if all((baseline, seed) in self.results for seed in seeds):
            base_finals = [self.results[(baseline, seed)].final for seed in seeds]
            entry.update(
                _paired_gains(
                    [(f.local_accuracy_mean, f.averaged_accuracy) for f in finals],
                    [(b.local_accuracy_mean, b.averaged_accuracy) for b in base_finals],
                )
            )
        if config.record_rounds:
            entry["rounds"] = [
                {
                    "round": records[0].round,
                    "local_accuracy": _mean(r.local_accuracy_mean for r in records),
                    "averaged_accuracy": _mean(r.averaged_accuracy for r in records),
                    "local_loss": _mean(r.local_loss_mean for r in records),
                    "averaged_loss": _mean(r.averaged_loss for r in records),
                    "local_accuracy_seeds": [r.local_accuracy_mean for r in records],
                    "averaged_accuracy_seeds": [r.averaged_accuracy for r in records],
                }
                for records in zip(*(run.rounds for run in runs), strict=True)
            ]
            entry["rounds_to_reach"] = {
                model: {
                    f"{level:g}": [
                        rounds_to_reach(run.rounds, level, model=model) for run in runs
                    ]
                    for level in self.grid.accuracy_levels
                }
                for model in ("local", "averaged")
            }
        return entry


def rounds_to_reach(
    records: Sequence[RoundRecord], level: float, *, model: str = "averaged"
) -> int | None:
    """Return the first round whose accuracy is at least ``level``, or ``None``.

    Parameters
    ----------
    records : Sequence[RoundRecord]
        Every round of a run (``record_rounds``).
    level : float
        The accuracy level, in ``[0, 1]``.
    model : str (default: "averaged")
        ``"averaged"``: the averaged model; ``"local"``: the learners' mean.

    """
    for record in records:
        accuracy = (
            record.averaged_accuracy
            if model == "averaged"
            else record.local_accuracy_mean
        )
        if accuracy >= level:
            return record.round
    return None


def _mean(values: Any) -> float:
    return float(np.mean(list(values)))


def describe(config: ExperimentConfig) -> str:
    """Return one short line naming a configuration's model, setting and noise."""
    images = "all" if config.images_per_learner is None else config.images_per_learner
    return (
        f"{config.model} m={config.learners} n={images} b={config.local_steps} "
        f"R={config.rounds} B={config.batch_size} lr={config.learning_rate:g} "
        f"{config.partitioning} noise={config.noise_label()}"
    )


def run_sweep(
    grid: SweepGrid,
    *,
    progress: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Run every configuration of ``grid`` with every seed; return the summary.

    Parameters
    ----------
    grid : SweepGrid
        What to run.
    progress : Callable[[str], None] | None (default: None)
        Receives one line per finished run.
    device : torch.device | None (default: None)
        Where to train; ``None`` is ``get_device()``.

    Returns
    -------
    dict[str, Any]
        ``{"format", "grid", "num_configurations", "entries"}``; each entry
        has ``config``, ``seeds``, ``local_accuracy``, ``local_accuracy_min``,
        ``local_accuracy_max``, ``averaged_accuracy``, ``serial_accuracy``,
        ``serial_large_batch_accuracy`` (each ``{"mean", "std", "values"}``
        over seeds), the serial baselines' steps and batch size, and, when the
        grid holds the noise-free counterpart, ``local_gain`` and
        ``averaged_gain`` (paired per seed). With ``record_rounds`` also
        ``rounds``: the per-round means over seeds.

    """
    return SweepRunner(grid, progress=progress, device=device).run()
