"""Write a sweep's summary: summary.json, summary.md and accuracy plots (PNG)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr_noise_app.reproduce.runner import ExperimentConfig

# Settings that may vary between rows, with their table headers. The noise
# fields are shown together in one "noise" column.
SETTING_COLUMNS: dict[str, str] = {
    "model": "model",
    "learners": "m",
    "images_per_learner": "images/learner",
    "local_steps": "b",
    "rounds": "R",
    "partitioning": "partitioning",
    "batch_size": "B",
    "learning_rate": "lr",
}
NOISE_FIELDS = (
    "placement",
    "noise_std",
    "relative",
    "schedule",
    "distribution",
    "correlation",
    "sam_rho",
)
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"


def write_report(
    summary: dict[str, Any],
    out_dir: str | Path,
    *,
    command: Sequence[str] | None = None,
    plots: bool = True,
) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and the plots into ``out_dir``.

    Parameters
    ----------
    summary : dict[str, Any]
        What ``run_sweep`` returned.
    out_dir : str | Path
        The folder (created when missing).
    command : Sequence[str] | None (default: None)
        The command line that produced the summary, recorded in both files.
    plots : bool (default: True)
        Also draw ``accuracy_vs_noise_<model>.png`` per model and, when the
        rounds were recorded, ``accuracy_per_round_<model>.png``.

    Returns
    -------
    list[Path]
        The files written.

    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    document = dict(summary)
    if command is not None:
        document["command"] = list(command)
    json_path = folder / SUMMARY_JSON
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    markdown_path = folder / SUMMARY_MARKDOWN
    markdown_path.write_text(markdown_summary(document), encoding="utf-8")
    written = [json_path, markdown_path]
    if plots:
        written.extend(plot_accuracy_vs_noise(document, folder))
        written.extend(plot_accuracy_per_round(document, folder))
    return written


def _percent(statistic: dict[str, Any], *, signed: bool = False) -> str:
    mean = 100 * statistic["mean"]
    std = 100 * statistic["std"]
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def _noise_label(config: dict[str, Any], *, with_std: bool = True) -> str:
    return ExperimentConfig(**config).noise_label(with_std=with_std)


def _is_reference(config: dict[str, Any]) -> bool:
    return ExperimentConfig(**config).is_reference


def _loss(statistic: dict[str, Any]) -> str:
    return f"{statistic['mean']:.3f} ± {statistic['std']:.3f}"


def _ratio(value: float) -> str:
    return f"{value:.3g}"


def _ratios(entry: dict[str, Any]) -> tuple[str, str]:
    if "sigma_over_update" not in entry:
        return "", ""
    layers = entry["sigma_over_layer_rms"].values()
    return (
        _ratio(entry["sigma_over_update"]["mean"]),
        f"{_ratio(min(layers))}–{_ratio(max(layers))}",
    )


def _reached(rounds: list[int | None]) -> str:
    reached = [r for r in rounds if r is not None]
    if not reached:
        return "—"
    mean = f"{sum(reached) / len(reached):.1f}"
    return (
        mean
        if len(reached) == len(rounds)
        else f"{mean} ({len(reached)}/{len(rounds)})"
    )


def _setting_value(config: dict[str, Any], name: str) -> str:
    value = config[name]
    if name == "images_per_learner" and value is None:
        return "all"
    if name == "learning_rate":
        return f"{value:g}"
    if name == "partitioning" and value == "dirichlet":
        # Merged runs can differ in alpha alone; a row must say which it is.
        return f"dirichlet α={config['dirichlet_alpha']:g}"
    return str(value)


def _varying_settings(entries: Sequence[dict[str, Any]]) -> list[str]:
    return [
        name
        for name in SETTING_COLUMNS
        if len({_setting_value(entry["config"], name) for entry in entries}) > 1
    ]


def markdown_summary(summary: dict[str, Any]) -> str:
    """Return the summary as a markdown document with one table row per entry."""
    entries = summary["entries"]
    lines = [f"# Reproduction sweep: {summary['grid']['dataset']}", ""]
    if "command" in summary:
        lines += ["```", shlex.join(summary["command"]), "```", ""]
    if not entries:
        return "\n".join([*lines, "No configuration has finished.", ""])
    varying = _varying_settings(entries)
    first = entries[0]["config"]
    fixed = [
        f"{SETTING_COLUMNS[name]}={_setting_value(first, name)}"
        for name in SETTING_COLUMNS
        if name not in varying
    ]
    seeds = ", ".join(str(seed) for seed in summary["grid"]["seeds"])
    lines += [
        f"Same in every row: dataset={first['dataset']}, {', '.join(fixed)}.",
        f"Each cell: mean ± standard deviation over the seeds {seeds}, in percent.",
        "",
        "- *local*: test accuracy of the learners' models after the last round's "
        "local training, before averaging (mean over learners);",
        "- *averaged*: the averaged model after the last round;",
        "- *Δ*: paired (same seed) difference to the noise-free row with the same "
        "settings, in percentage points;",
        "- *serial B*: one model, SGD on the union of the learners' data, "
        "m·b·R steps of batch B (the same samples); *serial mB*: b·R steps of "
        "batch m·B;",
        "- *loss*: test cross-entropy (mean ± std over seeds) of the same models;",
        "- *σ/update*: the noise std over the RMS of one SGD step's update "
        "(lr·gradient, mean over all local steps); *σ/RMS*: over the RMS of "
        "each tensor of the final averaged model (smallest–largest); absolute "
        "noise only;",
        "- *SAM rho*: FedSAM-style local steps, the gradient taken at "
        "w + rho·g/‖g‖ (no noise).",
        "",
    ]
    header = [SETTING_COLUMNS[name] for name in varying] + [
        "noise",
        "local",
        "Δ local",
        "local loss",
        "averaged",
        "Δ averaged",
        "averaged loss",
        "serial B",
        "serial mB",
        "σ/update",
        "σ/RMS",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for entry in entries:
        config = entry["config"]
        noisy = not _is_reference(config)
        row = [_setting_value(config, name) for name in varying] + [
            _noise_label(config),
            _percent(entry["local_accuracy"]),
            _percent(entry["local_gain"], signed=True)
            if noisy and "local_gain" in entry
            else "",
            _loss(entry["local_loss"]) if "local_loss" in entry else "",
            _percent(entry["averaged_accuracy"]),
            _percent(entry["averaged_gain"], signed=True)
            if noisy and "averaged_gain" in entry
            else "",
            _loss(entry["averaged_loss"]) if "averaged_loss" in entry else "",
            *(
                _percent(entry[name]) if name in entry else ""
                for name in ("serial_accuracy", "serial_large_batch_accuracy")
            ),
            *_ratios(entry),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += _rounds_to_reach_table(entries, varying)
    return "\n".join(lines)


def _rounds_to_reach_table(
    entries: Sequence[dict[str, Any]], varying: Sequence[str]
) -> list[str]:
    """Return the table of the first round each row reaches each level."""
    recorded = [entry for entry in entries if "rounds_to_reach" in entry]
    if not recorded:
        return []
    levels = list(recorded[0]["rounds_to_reach"]["averaged"])
    lines = [
        "## Rounds to reach an accuracy level",
        "",
        "First round whose test accuracy is at least the level, mean over the "
        "seeds that reach it (how many did, when not all); — : no seed did.",
        "",
    ]
    header = [SETTING_COLUMNS[name] for name in varying] + [
        "noise",
        *(f"averaged ≥ {level}" for level in levels),
        *(f"local ≥ {level}" for level in levels),
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for entry in recorded:
        reach = entry["rounds_to_reach"]
        row = [_setting_value(entry["config"], name) for name in varying] + [
            _noise_label(entry["config"]),
            *(_reached(reach["averaged"][level]) for level in levels),
            *(_reached(reach["local"][level]) for level in levels),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def plot_accuracy_vs_noise(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Plot local and averaged accuracy against the noise std, one PNG per model.

    Each column of a figure is one setting (the varying settings other than
    the model); each line is one kind of noise (placement, scaling, schedule),
    starting at the noise-free run (std 0, on a symlog axis); the horizontal
    lines are the serial baselines.

    Returns
    -------
    list[Path]
        The PNG files written.

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = summary["entries"]
    settings = [name for name in _varying_settings(entries) if name != "model"]
    written: list[Path] = []
    models = list(dict.fromkeys(entry["config"]["model"] for entry in entries))
    for model in models:
        model_entries = [e for e in entries if e["config"]["model"] == model]
        groups = _groups(model_entries, settings)
        stds = [e["config"]["noise_std"] for e in model_entries]
        positive = [std for std in stds if std > 0]
        figure, axes = plt.subplots(
            2,
            len(groups),
            figsize=(4.2 * len(groups), 7.0),
            squeeze=False,
            sharey="row",
        )
        for column, (key, group) in enumerate(groups.items()):
            _plot_group(axes[0][column], group, "local_accuracy", positive)
            _plot_group(axes[1][column], group, "averaged_accuracy", positive)
            axes[0][column].set_title(_title(settings, key, model), fontsize=9)
            axes[1][column].set_xlabel("noise std (relative: fraction of RMS)")
        path = out_dir / f"accuracy_vs_noise_{model}.png"
        title = f"{summary['grid']['dataset']}, {model}"
        written.append(_save(figure, axes, title, "before averaging", path))
    return written


def _title(settings: Sequence[str], key: Sequence[str], model: str) -> str:
    words = [
        f"{SETTING_COLUMNS[name]}={value}"
        for name, value in zip(settings, key, strict=True)
    ]
    return ", ".join(words) or model


def _groups(
    entries: Sequence[dict[str, Any]], settings: Sequence[str]
) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for entry in entries:
        key = tuple(_setting_value(entry["config"], name) for name in settings)
        groups.setdefault(key, []).append(entry)
    return groups


def _save(figure: Any, axes: Any, title: str, local_note: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes[0][0].set_ylabel(f"local models' accuracy ({local_note})")
    axes[1][0].set_ylabel("averaged model's accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy_per_round(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Plot accuracy against the round, one line per row, one PNG per model.

    Only entries with recorded rounds are drawn; each column is one setting
    (runs of different lengths share one), the top row the local models, the
    bottom row the averaged model.

    Returns
    -------
    list[Path]
        The PNG files written.

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary["entries"] if "rounds" in e]
    # Runs of different lengths share a panel: each curve ends at its last round.
    settings = [
        name for name in _varying_settings(entries) if name not in ("model", "rounds")
    ]
    written: list[Path] = []
    for model in dict.fromkeys(entry["config"]["model"] for entry in entries):
        groups = _groups(
            [e for e in entries if e["config"]["model"] == model], settings
        )
        figure, axes = plt.subplots(
            2, len(groups), figsize=(5.0 * len(groups), 7.0), squeeze=False
        )
        for column, (key, group) in enumerate(groups.items()):
            for row, metric in enumerate(("local_accuracy", "averaged_accuracy")):
                axis = axes[row][column]
                for entry in group:
                    rounds = entry["rounds"]
                    axis.plot(
                        [record["round"] for record in rounds],
                        [100 * record[metric] for record in rounds],
                        label=_noise_label(entry["config"]),
                    )
                if "serial_accuracy" in group[0]:
                    axis.axhline(
                        100 * group[0]["serial_accuracy"]["mean"],
                        color="black",
                        linestyle="--",
                        linewidth=1,
                        label="serial, batch B",
                    )
                axis.grid(True, alpha=0.3)
            axes[0][column].set_title(_title(settings, key, model), fontsize=9)
            axes[1][column].set_xlabel("round")
        path = out_dir / f"accuracy_per_round_{model}.png"
        title = f"{summary['grid']['dataset']}, {model}, mean over seeds"
        written.append(_save(figure, axes, title, "before averaging", path))
    return written


def _plot_group(
    axis: Any, group: list[dict[str, Any]], metric: str, positive_stds: list[float]
) -> None:
    # SAM rows have no noise std to sit on; the table and the curves show them.
    noise_free = [e for e in group if _is_reference(e["config"])]
    variants: dict[str, list[dict[str, Any]]] = {}
    for entry in group:
        if entry["config"]["noise_std"] > 0:
            label = _noise_label(entry["config"], with_std=False)
            variants.setdefault(label, []).append(entry)
    if not variants and noise_free:
        variants["no noise"] = []
    for label, noisy in variants.items():
        points = sorted(noise_free + noisy, key=lambda e: e["config"]["noise_std"])
        axis.errorbar(
            [e["config"]["noise_std"] for e in points],
            [100 * e[metric]["mean"] for e in points],
            yerr=[100 * e[metric]["std"] for e in points],
            marker="o",
            markersize=3,
            capsize=2,
            label=label,
        )
    reference = group[0]
    for name, style, color, label in (
        ("serial_accuracy", "--", "black", "serial, batch B"),
        ("serial_large_batch_accuracy", ":", "grey", "serial, batch m·B"),
    ):
        if name in reference:
            axis.axhline(
                100 * reference[name]["mean"],
                color=color,
                linestyle=style,
                linewidth=1,
                label=label,
            )
    if positive_stds:
        axis.set_xscale("symlog", linthresh=min(positive_stds))
    axis.grid(True, alpha=0.3)
