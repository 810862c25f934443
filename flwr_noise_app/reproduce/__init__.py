"""In-process reproduction of Adilova, Paul, Schlicht (2018), without Flower's runtime.

``python -m flwr_noise_app.reproduce --help`` runs sweeps from the command line;
``run_experiment`` and ``run_serial_baseline`` run one configuration and seed;
``run_sweep`` runs a ``SweepGrid``; ``write_report`` writes its summary.
"""

from flwr_noise_app.reproduce.report import markdown_summary, write_report
from flwr_noise_app.reproduce.runner import (
    NO_NOISE,
    PLACEMENTS,
    ExperimentConfig,
    LearnerData,
    RoundRecord,
    RunResult,
    SerialResult,
    load_learner_data,
    run_experiment,
    run_serial_baseline,
)
from flwr_noise_app.reproduce.sweep import SweepGrid, SweepRunner, run_sweep

__all__ = [
    "NO_NOISE",
    "PLACEMENTS",
    "ExperimentConfig",
    "LearnerData",
    "RoundRecord",
    "RunResult",
    "SerialResult",
    "SweepGrid",
    "SweepRunner",
    "load_learner_data",
    "markdown_summary",
    "run_experiment",
    "run_serial_baseline",
    "run_sweep",
    "write_report",
]
