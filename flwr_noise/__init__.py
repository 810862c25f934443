"""flwr-noise: weight-noise injection for Flower federated training."""

from flwr_noise import legacy
from flwr_noise.hook import WeightNoise
from flwr_noise.mod import (
    noise_metrics,
    weight_noise,
    weight_noise_from_message,
    weight_noise_mod,
)
from flwr_noise.sampling import NoiseReport
from flwr_noise.spec import NoiseSpec
from flwr_noise.step_noise import StepNoise
from flwr_noise.strategy import NoisyStrategy

__all__ = [
    "NoiseReport",
    "NoiseSpec",
    "NoisyStrategy",
    "StepNoise",
    "WeightNoise",
    "legacy",
    "noise_metrics",
    "weight_noise",
    "weight_noise_from_message",
    "weight_noise_mod",
]
