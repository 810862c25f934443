import math
import re

import numpy as np
import pytest
import torch

from flwr_noise import NoiseReport, NoiseSpec
from flwr_noise.sampling import (
    FlatTensorNoise,
    fill_noise_,
    perturb_arrays,
    sample_numpy,
)
from flwr_noise.seeding import numpy_generator, torch_generator

SAMPLES = 1_000_000
SIGMA = 0.1
DISTRIBUTIONS = ("gaussian", "uniform", "laplace")
KURTOSIS = {"gaussian": 3.0, "uniform": 1.8, "laplace": 6.0}
MODES = ("additive", "multiplicative")


def _assert_zero_mean_with_std(samples: np.ndarray, sigma: float) -> None:
    samples = np.asarray(samples, dtype=np.float64)
    assert samples.size >= SAMPLES
    # Sample mean has sd sigma / 1000 here; sample std well under 0.2 %.
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(samples.size)
    assert samples.std() == pytest.approx(sigma, rel=0.01)


def _kurtosis(samples: np.ndarray) -> float:
    centered = np.asarray(samples, dtype=np.float64) - np.mean(samples)
    return float(np.mean(centered**4) / np.mean(centered**2) ** 2)


def _weights(rng: np.random.Generator, mode: str) -> np.ndarray:
    if mode == "multiplicative":
        # Away from zero, so that (w_new - w) / w is well defined, and with
        # E[1 / w**2] != 1, so that additive noise would show in the std.
        magnitude = rng.uniform(1.0, 3.0, SAMPLES)
        return (magnitude * rng.choice([-1.0, 1.0], SAMPLES)).astype(np.float32)
    return rng.normal(0.0, 1.0, SAMPLES).astype(np.float32)


def _realized_noise(old: np.ndarray, new: np.ndarray, mode: str) -> np.ndarray:
    change = new.astype(np.float64) - old.astype(np.float64)
    return change / old.astype(np.float64) if mode == "multiplicative" else change


def _torch_noise(tensors: list[torch.Tensor], seed: int = 0, **options: object):
    defaults: dict[str, object] = {
        "distribution": "gaussian",
        "mode": "additive",
        "relative": False,
    }
    return FlatTensorNoise(
        tensors,
        generator_for=lambda device, substream: torch_generator(
            seed,
            client=0,
            server_round=1,
            purpose="local",
            device=device,
            substream=substream,
        ),
        **{**defaults, **options},  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_numpy_path_has_zero_mean_and_std_sigma(distribution: str, mode: str) -> None:
    rng = np.random.default_rng(1)
    weights = _weights(rng, mode)
    spec = NoiseSpec(std=SIGMA, distribution=distribution, mode=mode)
    perturbed, report = perturb_arrays({"w": weights}, spec, SIGMA, rng)
    noise = _realized_noise(weights, perturbed["w"], mode)
    _assert_zero_mean_with_std(noise, SIGMA)
    assert report.numel == SAMPLES
    assert report.applications == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_torch_path_has_zero_mean_and_std_sigma(distribution: str, mode: str) -> None:
    weights = _weights(np.random.default_rng(2), mode)
    tensor = torch.from_numpy(weights.copy())
    _torch_noise([tensor], distribution=distribution, mode=mode).apply(SIGMA)
    noise = _realized_noise(weights, tensor.numpy(), mode)
    _assert_zero_mean_with_std(noise, SIGMA)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_distribution_shapes(distribution: str) -> None:
    numpy_samples = sample_numpy(
        np.random.default_rng(3), (SAMPLES,), SIGMA, distribution
    )
    torch_samples = fill_noise_(
        torch.empty(SAMPLES),
        SIGMA,
        distribution,
        torch.Generator().manual_seed(3),
    ).numpy()
    for samples in (numpy_samples, torch_samples):
        assert samples.dtype == np.float32
        assert np.isfinite(samples).all()
        _assert_zero_mean_with_std(samples, SIGMA)
        assert _kurtosis(samples) == pytest.approx(KURTOSIS[distribution], abs=0.25)
        if distribution == "uniform":
            bound = math.sqrt(3) * SIGMA
            assert np.abs(samples).max() <= bound * (1 + 1e-6)
            assert np.abs(samples).max() > bound * 0.999


def test_laplace_scratch_is_reused_and_results_are_reproducible() -> None:
    scratch = torch.empty(1000)
    first = fill_noise_(
        torch.empty(1000), 1.0, "laplace", torch.Generator().manual_seed(4), scratch
    )
    second = fill_noise_(
        torch.empty(1000), 1.0, "laplace", torch.Generator().manual_seed(4)
    )
    assert torch.equal(first, second)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_relative_noise_scales_with_each_tensors_rms(distribution: str) -> None:
    rng = np.random.default_rng(5)
    arrays = {
        "small": rng.normal(0.0, 0.01, SAMPLES).astype(np.float32),
        "large": rng.normal(0.0, 50.0, SAMPLES).astype(np.float32),
    }
    rms = {
        name: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
        for name, a in arrays.items()
    }
    spec = NoiseSpec(std=SIGMA, distribution=distribution, relative=True)
    perturbed, _ = perturb_arrays(arrays, spec, SIGMA, rng)
    tensors = {name: torch.from_numpy(a.copy()) for name, a in arrays.items()}
    _torch_noise(
        list(tensors.values()), distribution=distribution, relative=True
    ).apply(SIGMA)
    for name, weights in arrays.items():
        for new in (perturbed[name], tensors[name].numpy()):
            relative_noise = _realized_noise(weights, new, "additive") / rms[name]
            _assert_zero_mean_with_std(relative_noise, SIGMA)


def test_perturb_arrays_leaves_input_and_skips_what_it_must() -> None:
    rng = np.random.default_rng(6)
    arrays = {
        "conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float64),
        "bn.weight": np.ones(4, dtype=np.float32),
        "bn.running_mean": rng.normal(size=4).astype(np.float32),
        "bn.running_var": np.ones(4, dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": rng.normal(size=(2, 4)).astype(np.float16),
        "embedding.index": np.arange(5, dtype=np.int32),
    }
    originals = {name: array.copy() for name, array in arrays.items()}
    spec = NoiseSpec(std=0.5, exclude=(r"^bn\.weight$",))
    perturbed, report = perturb_arrays(arrays, spec, 0.5, rng)

    assert list(perturbed) == list(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, originals[name])
        assert perturbed[name].dtype == array.dtype
        assert perturbed[name].shape == array.shape
    changed = {
        name for name in arrays if not np.array_equal(perturbed[name], originals[name])
    }
    assert changed == {"conv.weight", "conv.bias", "fc.weight"}
    assert report.numel == 12 + 4 + 8
    assert report.sigma == 0.5
    squared = sum(
        float(np.sum((perturbed[n].astype(np.float64) - originals[n]) ** 2))
        for n in changed
    )
    assert report.l2_norm == pytest.approx(math.sqrt(squared), rel=1e-12)


def test_perturb_arrays_include_filter() -> None:
    arrays = {name: np.zeros(10, dtype=np.float32) for name in ("a.w", "b.w", "c.w")}
    spec = NoiseSpec(std=1.0, include=(r"^a\.", r"^c\."))
    perturbed, report = perturb_arrays(arrays, spec, 1.0, np.random.default_rng(0))
    assert np.any(perturbed["a.w"] != 0) and np.any(perturbed["c.w"] != 0)
    assert perturbed["b.w"] is arrays["b.w"]
    assert report.numel == 20


def test_perturb_arrays_with_zero_sigma_changes_nothing() -> None:
    arrays = {"w": np.arange(6, dtype=np.float32)}
    perturbed, report = perturb_arrays(
        arrays, NoiseSpec(std=1.0), 0.0, np.random.default_rng(0)
    )
    assert perturbed is not arrays
    np.testing.assert_array_equal(perturbed["w"], np.arange(6, dtype=np.float32))
    assert report == NoiseReport(sigma=0.0, l2_norm=0.0, numel=0, applications=0)


def test_perturb_arrays_is_reproducible_per_stream() -> None:
    arrays = {"w": np.zeros(100, dtype=np.float32)}
    spec = NoiseSpec(std=1.0, seed=3)

    def run(client: int) -> np.ndarray:
        rng = numpy_generator(3, client=client, server_round=1, purpose="broadcast")
        return perturb_arrays(arrays, spec, 1.0, rng)[0]["w"]

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


@pytest.mark.parametrize("sigma", [-1.0, math.nan, math.inf, True, "0.1"])
def test_bad_sigma(sigma: object) -> None:
    arrays = {"w": np.zeros(3, dtype=np.float32)}
    with pytest.raises(ValueError, match=f"sigma={sigma!r}"):
        perturb_arrays(arrays, NoiseSpec(), sigma, np.random.default_rng())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"sigma={sigma!r}"):
        sample_numpy(np.random.default_rng(), (3,), sigma, "gaussian")  # type: ignore[arg-type]


def test_bad_arrays_and_distribution() -> None:
    message = "arrays['w']=[1.0] is not allowed: expected an np.ndarray"
    with pytest.raises(TypeError, match=re.escape(message)):
        perturb_arrays({"w": [1.0]}, NoiseSpec(), 1.0, np.random.default_rng())  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="distribution='cauchy'"):
        sample_numpy(np.random.default_rng(), (3,), 1.0, "cauchy")
    with pytest.raises(ValueError, match="distribution='cauchy'"):
        fill_noise_(torch.empty(3), 1.0, "cauchy")
    message = "tensors[0]=tensor([0, 1, 2]) is not allowed: expected a floating-point"
    with pytest.raises(TypeError, match=re.escape(message)):
        _torch_noise([torch.arange(3)])


def test_flat_noise_groups_dtypes_and_tracks_norms() -> None:
    tensors = [
        torch.zeros(50, dtype=torch.float32),
        torch.zeros(0, 3, dtype=torch.float32),  # empty: nothing to perturb
        torch.zeros(5, 4, dtype=torch.float64),
        torch.zeros(30, dtype=torch.float32),
        torch.zeros(8, dtype=torch.bfloat16),
    ]
    noise = _torch_noise(tensors)
    assert noise.numel == 108
    noise.apply(1.0)
    first_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    assert all(bool((t != 0).any()) for t in tensors if t.numel())
    assert [t.dtype for t in tensors] == [
        torch.float32,
        torch.float32,
        torch.float64,
        torch.float32,
        torch.bfloat16,
    ]
    assert noise.last_l2_norm() == pytest.approx(first_norm, rel=1e-5)
    before = [t.clone() for t in tensors]
    noise.apply(2.0)
    second_norm = math.sqrt(
        sum(
            float((t.double() - b.double()).pow(2).sum())
            for t, b in zip(tensors, before, strict=True)
        )
    )
    # bfloat16 rounds the sum w + e, so allow its precision.
    assert noise.last_l2_norm() == pytest.approx(second_norm, rel=1e-2)
    assert noise.total_l2_norm() == pytest.approx(
        math.hypot(first_norm, noise.last_l2_norm()), rel=1e-5
    )


def test_flat_noise_buffers_are_allocated_once() -> None:
    tensor = torch.zeros(1000)
    noise = _torch_noise([tensor], distribution="laplace", relative=True)
    group = noise._groups[0]
    pointers = (group.buffer.data_ptr(), group.scratch.data_ptr())
    assert all(view.data_ptr() >= group.buffer.data_ptr() for view in group.views)
    for _ in range(3):
        noise.apply(0.1)
    assert (group.buffer.data_ptr(), group.scratch.data_ptr()) == pointers


def test_flat_noise_without_norm_tracking_reports_nan() -> None:
    noise = _torch_noise([torch.zeros(10)], track_norm=False)
    noise.apply(1.0)
    assert math.isnan(noise.last_l2_norm()) and math.isnan(noise.total_l2_norm())


def test_flat_noise_skips_empty_tensors_in_relative_mode() -> None:
    weights = torch.ones(4)
    noise = _torch_noise([torch.zeros(0), weights], relative=True)
    noise.apply(0.5)
    assert noise.numel == 4
    assert not torch.equal(weights, torch.ones(4))
