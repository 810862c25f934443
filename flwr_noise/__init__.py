"""flwr-noise: weight-noise injection for Flower federated training."""

from flwr_noise.hook import WeightNoise
from flwr_noise.sampling import NoiseReport
from flwr_noise.spec import NoiseSpec

__all__ = [
    "NoiseReport",
    "NoiseSpec",
    "WeightNoise",
]
