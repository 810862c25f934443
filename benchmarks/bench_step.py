"""Per-step cost of local weight noise, in one process with interleaved repetitions.

Variants, each on its own copy of the model and its own SGD optimizer, trained
on the same fixed batch (batch 64):

- baseline: a plain SGD step (zero_grad, forward, backward, step);
- weight-noise: the same step with ``WeightNoise`` attached (gaussian);
- weight-noise-no-norm: the same with ``track_norm=False``;
- weight-noise-anticorrelated: ``correlation="anticorrelated"`` (the pending
  draw removed before every step, its exact change kept: two more passes);
- naive: the plain step followed by ``p.add_(torch.randn_like(p) * sigma)``
  for every parameter (the obvious reference implementation).

Every repetition runs one block of ``--steps`` steps of every variant, in a
rotating order; the table shows the median per-step time over the blocks and
its ratio to the baseline. ``noise-only`` times ``WeightNoise.perturb()`` on its
own (no training), which is the added cost without the step-to-step jitter.

Usage::

    python benchmarks/bench_step.py [--device cpu|cuda] [--steps N] [--repeats N]

On a machine that other jobs keep busy, wall times with several OpenMP threads
swing widely; ``--threads 1 --clock cpu`` measures the work itself (CPU time of
this single-threaded process) and gives steady ratios.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr_noise import NoiseSpec, WeightNoise  # noqa: E402
from flwr_noise_app.tasks.models import build_model  # noqa: E402

BATCH_SIZE = 64
SIGMA = 0.01
LEARNING_RATE = 0.01
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def wide_mlp() -> nn.Module:
    """An MLP with about 11.6M parameters: 784-4096-2048-10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 4096),
        nn.ReLU(),
        nn.Linear(4096, 2048),
        nn.ReLU(),
        nn.Linear(2048, NUM_CLASSES),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": lambda: build_model("cnn", INPUT_SHAPE, NUM_CLASSES, seed=0),
    "mlp-11m": wide_mlp,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(
    base: nn.Module, device: torch.device
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    """Return one step function per variant, each with its own model copy."""
    variants: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {}
    spec = NoiseSpec(std=SIGMA, distribution="gaussian", seed=0)

    def trainer(
        after_step: Callable[[nn.Module], None] | None = None,
        noise: dict[str, bool] | None = None,
        noise_spec: NoiseSpec = spec,
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        model = copy.deepcopy(base).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        if noise is not None:
            WeightNoise(model, noise_spec, **noise).attach(optimizer)

        def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)

        return step

    def naive_noise(model: nn.Module) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * SIGMA)

    variants["baseline"] = trainer()
    variants["weight-noise"] = trainer(noise={"track_norm": True})
    variants["weight-noise-no-norm"] = trainer(noise={"track_norm": False})
    variants["weight-noise-anticorrelated"] = trainer(
        noise={"track_norm": True},
        noise_spec=dataclasses.replace(spec, correlation="anticorrelated"),
    )
    variants["naive"] = trainer(after_step=naive_noise)
    return variants


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU time of this process: with --threads 1 it is the work done, whatever
    # else runs on the machine (OpenMP threads spin, so not with more threads).
    "cpu": time.process_time,
}


def time_block(
    step: Callable[[], None], steps: int, device: torch.device, clock: str = "wall"
) -> float:
    """Return the mean seconds per call of ``step`` over one block."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(steps):
        step()
    synchronize(device)
    return (now() - start) / steps


def bench_model(
    name: str,
    device: torch.device,
    steps: int,
    repeats: int,
    warmup: int,
    clock: str = "wall",
) -> dict[str, object]:
    torch.manual_seed(0)
    base = MODELS[name]()
    parameters = sum(p.numel() for p in base.parameters())
    inputs = torch.randn(BATCH_SIZE, *INPUT_SHAPE, device=device)
    labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), device=device)
    variants = make_variants(base, device)

    noise_model = copy.deepcopy(base).to(device)
    noise_only = WeightNoise(noise_model, NoiseSpec(std=SIGMA, seed=0))
    timed: dict[str, Callable[[], None]] = {
        variant: (lambda run=run: run(inputs, labels))
        for variant, run in variants.items()
    }
    timed["noise-only"] = noise_only.perturb

    for run in timed.values():
        time_block(run, warmup, device)
    blocks: dict[str, list[float]] = {variant: [] for variant in timed}
    order = list(timed)
    for repeat in range(repeats):
        rotation = repeat % len(order)
        for variant in order[rotation:] + order[:rotation]:
            blocks[variant].append(time_block(timed[variant], steps, device, clock))

    medians = {variant: statistics.median(times) for variant, times in blocks.items()}
    baseline = medians["baseline"]
    # Each block against the baseline block of the same repetition: on a busy
    # machine these paired ratios (median and quartiles) are steadier than a
    # ratio of medians.
    paired: dict[str, list[float]] = {}
    for variant, times in blocks.items():
        if variant in ("baseline", "noise-only"):
            continue
        ratios = [
            time / base for time, base in zip(times, blocks["baseline"], strict=True)
        ]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        paired[variant] = [quartiles[0], statistics.median(ratios), quartiles[-1]]
    return {
        "model": name,
        "parameters": parameters,
        "median_ms_per_step": {k: v * 1e3 for k, v in medians.items()},
        "ratio_vs_baseline": {
            k: v / baseline for k, v in medians.items() if k != "noise-only"
        },
        "paired_ratio_quartiles": paired,
        "noise_only_fraction_of_baseline": medians["noise-only"] / baseline,
        "block_ms_per_step": {k: [t * 1e3 for t in v] for k, v in blocks.items()},
    }


def print_table(result: dict[str, object]) -> None:
    medians: dict[str, float] = result["median_ms_per_step"]  # type: ignore[assignment]
    ratios: dict[str, float] = result["ratio_vs_baseline"]  # type: ignore[assignment]
    print(f"\n{result['model']} ({result['parameters']:,} parameters)")
    paired: dict[str, list[float]] = result["paired_ratio_quartiles"]  # type: ignore[assignment]
    print(
        f"  {'variant':<28} {'ms/step':>9} {'x baseline':>11} "
        f"{'paired ratio: q1 / median / q3':>32}"
    )
    for variant, milliseconds in medians.items():
        if variant in ratios:
            ratio = f"{ratios[variant]:.3f}"
        else:
            ratio = f"+{result['noise_only_fraction_of_baseline']:.3f}"
        spread = " / ".join(f"{value:.3f}" for value in paired.get(variant, []))
        print(f"  {variant:<28} {milliseconds:>9.2f} {ratio:>11} {spread:>32}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--repeats", type=int, default=10, help="blocks per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated: {list(MODELS)}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is steadier on a busy machine",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (steady with --threads 1)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/bench_step.json")
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(
            f"--models {unknown} not allowed: expected names from {list(MODELS)}"
        )

    results = [
        bench_model(name, device, args.steps, args.repeats, args.warmup, args.clock)
        for name in names
    ]
    for result in results:
        print_table(result)
    report = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "batch_size": BATCH_SIZE,
        "sigma": SIGMA,
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
