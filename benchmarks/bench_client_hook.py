"""Per-step cost of the client's global optimizer hook (flwr_noise.weight_noise).

Prints the best-of-N time of one ``optimizer.step()`` of a small MLP (64-64-10,
SGD, one thread) in four settings: a plain step; a step after the global hook
was registered but with no session active (every optimizer in the process pays
this once ``weight_noise`` or ``NoisyNumPyClient`` has been used); a step with
``WeightNoise.attach``; a step inside ``StepNoise`` (what ``weight_noise``
uses). The last two should be the same within noise.

    python benchmarks/bench_client_hook.py [--steps 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from flwr_noise.hook import WeightNoise
from flwr_noise.spec import NoiseSpec
from flwr_noise.step_noise import StepNoise


def per_step_us(optimizer: torch.optim.Optimizer, steps: int, repeats: int) -> float:
    """Return the best time of one ``optimizer.step()`` in microseconds."""
    optimizer.step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e6


def main() -> None:
    """Run the four settings and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    spec = NoiseSpec(std=0.01, seed=0)
    timings = {"plain step": per_step_us(optimizer, args.steps, args.repeats)}
    with StepNoise(model, spec):
        pass  # registers the global hook, once per process
    timings["idle global hook"] = per_step_us(optimizer, args.steps, args.repeats)
    handle = WeightNoise(model, spec).attach(optimizer)
    timings["WeightNoise.attach"] = per_step_us(optimizer, args.steps, args.repeats)
    handle.remove()
    with StepNoise(model, spec):
        timings["StepNoise session"] = per_step_us(optimizer, args.steps, args.repeats)
    for name, microseconds in timings.items():
        print(f"{name:>20}: {microseconds:8.2f} us per step")


if __name__ == "__main__":
    main()
