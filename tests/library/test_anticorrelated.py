"""Anticorrelated noise (Anti-PGD): at most one pending draw, removed exactly."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from flwr_noise import NoiseSpec, WeightNoise

SIGMA = 0.01


def _layer(seed: int = 0, size: int = 100) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(size, size)


def _quadratic_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # loss = |w|^2 / 2: its gradient is the point where it is taken.
    optimizer.zero_grad()
    sum((parameter**2).sum() for parameter in model.parameters()).div(2).backward()
    optimizer.step()


def _clone(model: nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def _deviation(model: nn.Module, start: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (p.detach() - s).flatten()
            for p, s in zip(model.parameters(), start, strict=True)
        ]
    )


def _assert_clean(
    model: nn.Module, clean: list[torch.Tensor], sigma: float = SIGMA
) -> None:
    # Exact where |w| >= |e|; elsewhere within half an ulp of the draw e
    # (float32: below 1e-7 e, and heavy tails reach about 10 sigma).
    for parameter, expected in zip(model.parameters(), clean, strict=True):
        torch.testing.assert_close(
            parameter.detach(), expected, rtol=0, atol=1e-6 * sigma
        )


@pytest.mark.parametrize(
    ("correlation", "expected_std"),
    [("anticorrelated", SIGMA), ("independent", SIGMA * 10)],
)
def test_with_lr_zero_deviation_stays_one_draw(
    correlation: str, expected_std: float
) -> None:
    # The defining property: independent draws random-walk (sigma sqrt(t),
    # t = 100 steps), anticorrelated ones never stack (sigma).
    model = _layer()
    start = _clone(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    spec = NoiseSpec(std=SIGMA, seed=3, correlation=correlation)
    handle = WeightNoise(model, spec).attach(optimizer)
    for _ in range(100):
        _quadratic_step(model, optimizer)
    deviation = _deviation(model, start)  # 10,100 elements
    assert deviation.std().item() == pytest.approx(expected_std, rel=0.05)
    assert abs(deviation.mean().item()) < 4 * expected_std / deviation.numel() ** 0.5
    handle.remove()
    if correlation == "anticorrelated":
        _assert_clean(model, start)
    else:
        assert deviation.equal(_deviation(model, start))


def test_gradient_is_taken_at_the_perturbed_point_and_steps_the_clean_weights() -> None:
    lr = 0.25
    spec = NoiseSpec(std=SIGMA, seed=4, correlation="anticorrelated")
    model = _layer()
    u0 = _clone(model)
    # The first draw of the same stream, from a kept (independent) draw.
    reference = copy.deepcopy(model)
    WeightNoise(
        reference, dataclasses.replace(spec, correlation="independent")
    ).perturb()
    xi0 = [r.detach() - u for r, u in zip(reference.parameters(), u0, strict=True)]

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    noise = WeightNoise(model, spec)
    noise.attach(optimizer)
    noise.perturb()  # xi_0 on u_0, as the step hook would have added it
    for parameter, u, xi in zip(model.parameters(), u0, xi0, strict=True):
        torch.testing.assert_close(parameter.detach(), u + xi, rtol=0, atol=1e-8)
    _quadratic_step(model, optimizer)  # gradient u0 + xi0; u1 = u0 - lr (u0 + xi0)
    assert noise.pending
    noise.clean()
    assert not noise.pending
    for parameter, u, xi in zip(model.parameters(), u0, xi0, strict=True):
        torch.testing.assert_close(
            parameter.detach(), u - lr * (u + xi), rtol=0, atol=1e-7
        )


@pytest.mark.parametrize("distribution", ["gaussian", "uniform", "laplace"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mode": "multiplicative"},
        {"relative": True},
        {"schedule": "polynomial", "schedule_unit": "step"},
        {"schedule": "exponential", "decay": 0.9, "include": r"weight$"},
        {"exclude": "bias"},
    ],
)
def test_every_combination_leaves_the_model_clean(
    distribution: str, options: dict[str, object]
) -> None:
    model = _layer(size=30)
    start = _clone(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    spec = NoiseSpec(
        std=0.05,
        distribution=distribution,
        seed=1,
        correlation="anticorrelated",
        **options,  # type: ignore[arg-type]
    )
    noise = WeightNoise(model, spec)
    handle = noise.attach(optimizer)
    for _ in range(5):
        _quadratic_step(model, optimizer)
    assert noise.report().applications == 5
    assert _deviation(model, start).abs().max() > 0
    handle.remove()
    _assert_clean(model, start, sigma=0.05)


def _frozen_anticorrelated() -> tuple[
    nn.Module, list[torch.Tensor], torch.optim.Optimizer, WeightNoise
]:
    """A layer, its start, an lr = 0 optimizer and anticorrelated noise."""
    model = _layer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    spec = NoiseSpec(std=SIGMA, seed=2, correlation="anticorrelated")
    return model, _clone(model), optimizer, WeightNoise(model, spec)


def test_perturb_replaces_the_pending_draw_and_clean_removes_it() -> None:
    model, start, _, noise = _frozen_anticorrelated()
    for _ in range(50):
        noise.perturb()
    assert _deviation(model, start).std().item() == pytest.approx(SIGMA, rel=0.05)
    assert noise.step == 50
    noise.clean()
    _assert_clean(model, start)
    noise.clean()  # nothing pending: a no-op
    _assert_clean(model, start)


def test_attaching_twice_still_carries_one_draw() -> None:
    model, start, optimizer, noise = _frozen_anticorrelated()
    handles = [noise.attach(optimizer), noise.attach(optimizer)]
    for _ in range(20):
        _quadratic_step(model, optimizer)
    assert _deviation(model, start).std().item() == pytest.approx(SIGMA, rel=0.05)
    for handle in handles:
        handle.remove()
    _assert_clean(model, start)
    _quadratic_step(model, optimizer)  # no hook left
    _assert_clean(model, start)


def test_clean_leaves_independent_noise_in_place() -> None:
    model = _layer()
    noise = WeightNoise(model, NoiseSpec(std=SIGMA, seed=2))
    noise.perturb()
    noisy = _clone(model)
    noise.clean()
    assert not noise.pending
    for parameter, expected in zip(model.parameters(), noisy, strict=True):
        assert torch.equal(parameter, expected)


def test_handle_works_as_a_context_manager() -> None:
    model, start, optimizer, noise = _frozen_anticorrelated()
    with noise.attach(optimizer):
        _quadratic_step(model, optimizer)
        assert noise.pending
    assert not noise.pending
    _assert_clean(model, start)
