"""Command line of the paper reproduction: ``python -m flwr_noise_app.reproduce``.

Every list option is one axis of a cartesian product (see ``SweepGrid``); the
sweep runs each configuration once per seed and writes ``summary.json``,
``summary.md`` and ``accuracy_vs_noise_<model>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from flwr_noise import validation
from flwr_noise.spec import DISTRIBUTIONS, SCHEDULES
from flwr_noise_app.reproduce.report import SUMMARY_JSON, write_report
from flwr_noise_app.reproduce.runner import CORRELATIONS, INDEPENDENT, PLACEMENTS
from flwr_noise_app.reproduce.sweep import SweepGrid, SweepRunner, merge_summaries
from flwr_noise_app.tasks.data import DATASETS, PARTITION_SCHEMES
from flwr_noise_app.tasks.models import MODELS

PROGRAM = "python -m flwr_noise_app.reproduce"
ALL_IMAGES = "all"
BOOLEANS = {"true": True, "false": False}

# SweepGrid / ExperimentConfig field -> command-line flag, for error messages.
FLAGS: dict[str, str] = {
    "models": "--model",
    "model": "--model",
    "learners": "--learners",
    "images_per_learner": "--images-per-learner",
    "local_steps": "--local-steps",
    "rounds": "--rounds",
    "total_local_steps": "--total-local-steps",
    "noise_stds": "--noise-std",
    "noise_std": "--noise-std",
    "relative_noise_stds": "--relative-noise-std",
    "relative": "--relative",
    "schedules": "--schedule",
    "placements": "--placement",
    "partitionings": "--partitioning",
    "batch_sizes": "--batch-size",
    "batch_size": "--batch-size",
    "learning_rates": "--lr",
    "learning_rate": "--lr",
    "dirichlet_alpha": "--dirichlet-alpha",
    "seeds": "--seeds",
    "correlations": "--correlation",
    "correlation": "--correlation",
    "sam_rhos": "--sam-rho",
    "sam_rho": "--sam-rho",
    "accuracy_levels": "--accuracy-levels",
    "threads": "--threads",
}


def _int_or_all(text: str) -> int | None:
    """Parse ``--images-per-learner``: an int, or ``"all"`` (``None``)."""
    return None if text == ALL_IMAGES else int(text)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=(
            "Reproduce Adilova, Paul, Schlicht (2018): m learners train with "
            "mini-batch SGD and are averaged every b steps, with weight noise. "
            "Every option that takes several values is an axis of a cartesian "
            "product; each configuration runs once per seed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="digits", help="dataset")
    add("--data-dir", default="", help="folder of MNIST IDX files")
    add("--model", nargs="+", choices=MODELS, default=["mlp"], help="models")
    add("--learners", nargs="+", type=int, default=[4], help="m")
    add(
        "--images-per-learner",
        nargs="+",
        type=_int_or_all,
        default=[None],
        help=f"training images per learner, or {ALL_IMAGES!r} (whole partition)",
    )
    add(
        "--local-steps",
        nargs="+",
        type=int,
        default=[10],
        help="b: local SGD steps between two averagings",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--rounds", type=int, default=None, help="averagings (10)")
    budget.add_argument(
        "--total-local-steps",
        type=int,
        default=None,
        help="local steps per learner in all; rounds = this / b (same samples "
        "for every b)",
    )
    add(
        "--noise-std",
        nargs="*",
        type=float,
        default=[0.0, 0.001, 0.003, 0.01, 0.03],
        help="noise standard deviations (0: no noise); none at all: SAM rows only",
    )
    add("--schedule", nargs="+", choices=SCHEDULES, default=["constant"])
    add(
        "--relative",
        nargs="*",
        choices=sorted(BOOLEANS),
        default=["false"],
        help="scale the noise by each tensor's RMS; alone it means 'true', "
        "'--relative false true' runs both",
    )
    add(
        "--relative-noise-std",
        nargs="+",
        type=float,
        default=None,
        help="std levels of the relative runs, as fractions of each tensor's "
        "RMS (default: the --noise-std levels)",
    )
    add(
        "--placement",
        nargs="+",
        choices=PLACEMENTS,
        default=["local"],
        help="local: after every local step; received: once per round on each "
        "learner's copy of the average; aggregation: on the average",
    )
    add(
        "--correlation",
        nargs="+",
        choices=CORRELATIONS,
        default=[INDEPENDENT],
        help="local noise: independent (every draw stays in the weights) and/or "
        "anticorrelated (Anti-PGD: the previous draw is removed before the next)",
    )
    add(
        "--sam-rho",
        nargs="+",
        type=float,
        default=[],
        help="add one noise-free SAM row per radius rho (FedSAM-style local "
        "steps: the gradient taken at w + rho g/||g||)",
    )
    add(
        "--accuracy-levels",
        nargs="+",
        type=float,
        default=[0.5, 0.8, 0.9],
        help="accuracy levels of the rounds-to-reach table (with --record-rounds)",
    )
    add("--distribution", choices=DISTRIBUTIONS, default="gaussian")
    add("--partitioning", nargs="+", choices=PARTITION_SCHEMES, default=["iid"])
    add("--dirichlet-alpha", type=float, default=0.5)
    add("--batch-size", nargs="+", type=int, default=[16], help="B")
    add("--lr", nargs="+", type=float, default=[0.05])
    add("--seeds", nargs="+", type=int, default=[0])
    add(
        "--record-rounds",
        action="store_true",
        help="evaluate every round, not only the last",
    )
    add(
        "--no-serial",
        action="store_true",
        help="skip the serial baselines (e.g. in all but one process of a "
        "sweep split over processes; --merge joins them)",
    )
    add("--threads", type=int, default=None, help="torch CPU threads")
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add("--quiet", action="store_true", help="no progress lines")
    add(
        "--merge",
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="instead of running: merge the summary.json of these folders "
        "(one sweep split over processes by --seeds and by rows) into one "
        "report in --out",
    )
    add("--out", required=True, help="output folder")
    return parser


def grid_from_args(args: argparse.Namespace) -> SweepGrid:
    """Build the sweep grid from parsed arguments (validated by ``SweepGrid``)."""
    rounds = args.rounds
    if rounds is None and args.total_local_steps is None:
        rounds = 10
    relative = [BOOLEANS[value] for value in args.relative] or [True]
    return SweepGrid(
        dataset=args.dataset,
        data_dir=args.data_dir,
        models=tuple(args.model),
        learners=tuple(args.learners),
        images_per_learner=tuple(args.images_per_learner),
        local_steps=tuple(args.local_steps),
        rounds=rounds,
        total_local_steps=args.total_local_steps,
        noise_stds=tuple(args.noise_std),
        schedules=tuple(args.schedule),
        relative=tuple(relative),
        relative_noise_stds=None
        if args.relative_noise_std is None
        else tuple(args.relative_noise_std),
        placements=tuple(args.placement),
        partitionings=tuple(args.partitioning),
        batch_sizes=tuple(args.batch_size),
        learning_rates=tuple(args.lr),
        dirichlet_alpha=args.dirichlet_alpha,
        distribution=args.distribution,
        seeds=tuple(args.seeds),
        record_rounds=args.record_rounds,
        correlations=tuple(args.correlation),
        sam_rhos=tuple(args.sam_rho),
        accuracy_levels=tuple(args.accuracy_levels),
        serial_baselines=not args.no_serial,
    )


def _with_flags(message: str) -> str:
    """Name command-line flags instead of Python fields in an error message."""
    pattern = r"\b(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")="
    return re.sub(pattern, lambda match: FLAGS[match.group(1)] + "=", message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep the arguments describe and write its report.

    Parameters
    ----------
    argv : Sequence[str] | None (default: None)
        The arguments; ``None`` is ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status (argument errors exit with status 2).

    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.merge is not None:
        summaries = [
            json.loads((Path(folder) / SUMMARY_JSON).read_text(encoding="utf-8"))
            for folder in args.merge
        ]
        merged = merge_summaries(summaries)
        merged["merged_from"] = [summary.get("command") for summary in summaries]
        for path in write_report(
            merged,
            args.out,
            command=[*PROGRAM.split(), *arguments],
            plots=not args.no_plots,
        ):
            print(f"wrote {path}")
        return 0
    progress = None if args.quiet else lambda line: print(line, flush=True)
    try:
        if args.threads is not None:
            torch.set_num_threads(
                validation.check_integer("threads", args.threads, low=1)
            )
        grid = grid_from_args(args)
        runner = SweepRunner(grid, progress=progress)
        runner.check_data()
    except (TypeError, ValueError) as error:
        parser.error(_with_flags(str(error)))
    if progress is not None:
        progress(
            f"{len(runner.configurations)} configurations x {len(grid.seeds)} "
            f"seeds = {len(runner.configurations) * len(grid.seeds)} runs"
        )
    command = [*PROGRAM.split(), *arguments]
    summary = runner.run(
        checkpoint=lambda partial: write_report(
            partial, args.out, command=command, plots=False
        )
    )
    written = write_report(
        summary,
        args.out,
        command=command,
        plots=not args.no_plots,
    )
    if progress is not None:
        for path in written:
            progress(f"wrote {path}")
    return 0
