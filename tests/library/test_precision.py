"""Noise on fp16 / bf16 models: scales and norms in float32, right statistics."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from flwr_noise import NoiseSpec, WeightNoise
from flwr_noise.sampling import perturb_arrays
from flwr_noise.seeding import numpy_generator

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _layer(
    dtype: torch.dtype, size: int, scale: float, offset: float = 0.0
) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(size, size, bias=False)
    with torch.no_grad():
        layer.weight.normal_(offset, scale)
    return layer.to(dtype)


def _change(layer: nn.Linear, spec: NoiseSpec) -> tuple[torch.Tensor, WeightNoise]:
    before = layer.weight.detach().double()
    noise = WeightNoise(layer, spec)
    noise.perturb()
    return layer.weight.detach().double() - before, noise


def test_relative_noise_on_a_large_fp16_layer_is_finite_and_right() -> None:
    # sum(w**2) of 1e6 weights around 70 is ~4.9e9: an fp16 norm overflows
    # (max 65504) and gave NaN weights.
    layer = _layer(torch.float16, 1000, scale=1.0, offset=70.0)
    rms = layer.weight.double().pow(2).mean().sqrt().item()
    change, noise = _change(layer, NoiseSpec(std=0.01, relative=True, seed=1))
    assert torch.isfinite(layer.weight).all()
    # fp16 rounds 70 + e to a multiple of 1/16: variance + (1/16)^2 / 12.
    expected = math.sqrt((0.01 * rms) ** 2 + (1 / 16) ** 2 / 12)
    assert change.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(change.mean().item()) < 4 * expected / 1000
    report = noise.report()
    assert math.isfinite(report.l2_norm)
    assert report.l2_norm == pytest.approx(0.01 * rms * 1000, rel=0.02)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("distribution", ["gaussian", "uniform", "laplace"])
@pytest.mark.parametrize("relative", [False, True])
def test_low_precision_statistics(
    dtype: torch.dtype, distribution: str, relative: bool
) -> None:
    # Weights near 1 and sigma 0.05: the rounding of bf16 (ulp 2**-7 near 1)
    # adds at most a few percent of variance.
    layer = _layer(dtype, 300, scale=0.1, offset=1.0)
    rms = layer.weight.double().pow(2).mean().sqrt().item()
    sigma = 0.05
    spec = NoiseSpec(std=sigma, distribution=distribution, relative=relative, seed=2)
    change, noise = _change(layer, spec)
    expected = sigma * (rms if relative else 1.0)
    assert torch.isfinite(layer.weight).all()
    assert layer.weight.dtype == dtype
    assert change.std().item() == pytest.approx(expected, rel=0.04)
    assert abs(change.mean().item()) < 4 * expected / 300
    assert noise.report().l2_norm == pytest.approx(expected * 300, rel=0.04)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_anticorrelated_and_multiplicative(dtype: torch.dtype) -> None:
    layer = _layer(dtype, 200, scale=0.1, offset=1.0)
    start = layer.weight.detach().clone()
    spec = NoiseSpec(
        std=0.05, mode="multiplicative", correlation="anticorrelated", seed=3
    )
    noise = WeightNoise(layer, spec)
    for _ in range(10):
        noise.perturb()
    relative_change = (layer.weight.double() - start.double()) / start.double()
    assert relative_change.std().item() == pytest.approx(0.05, rel=0.05)
    noise.clean()
    assert torch.equal(layer.weight.detach(), start)


@pytest.mark.parametrize("distribution", ["gaussian", "uniform", "laplace"])
@pytest.mark.parametrize("options", [{"relative": True}, {"mode": "multiplicative"}])
def test_huge_weights_never_raise_out_of_sampling(
    distribution: str, options: dict[str, object]
) -> None:
    # Weights from the wire can be anything; the largest std with relative or
    # multiplicative noise gives a non-finite result, not an exception.
    spec = NoiseSpec(std=1e6, distribution=distribution, **options)  # type: ignore[arg-type]
    arrays = {
        "huge": np.full(4, 1e300),
        "top32": np.full(4, 3e38, dtype=np.float32),
        "inf": np.array([np.inf, 1.0, np.nan]),
    }
    rng = numpy_generator(0, client=0, server_round=1, purpose="broadcast")
    perturbed, _ = perturb_arrays(arrays, spec, spec.std, rng)
    assert not np.isfinite(perturbed["top32"]).all()
    layer = _layer(torch.float32, 4, scale=1.0, offset=3e38)
    WeightNoise(layer, spec).perturb()
    assert not torch.isfinite(layer.weight).all()
