"""Monte-Carlo check of the paper's claim 1: for a linear model, noise cancels.

With squared loss the gradient of a linear model is affine in its weights, so
a step of SGD is an affine map and zero-mean weight noise added after every
local step passes through the steps and the averaging linearly: the expected
averaged model equals the noise-free one (same data, same batch order). The
noise only adds variance, so it cannot help in expectation.

The draws run in parallel: the model holds one row of weights per draw, so one
``WeightNoise`` (the product's hook, attached to a torch SGD optimizer) adds
independent noise to every draw, and the rows never interact (the loss is a
sum over draws). Per coordinate, the mean difference to the noise-free model
over the draws is tested against 4.5 standard errors; for 6 coordinates that
is a Bonferroni-corrected two-sided level below 1e-4.

The counterpart with a small tanh network shows the same test does detect a
shift of the expectation when the gradient is not affine in the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from flwr_noise import NoiseSpec, WeightNoise

DRAWS = 400
FEATURES = 5
SAMPLES_PER_LEARNER = 32
LEARNERS = 4
ROUNDS = 3
LOCAL_STEPS = 5
LEARNING_RATE = 0.1
STANDARD_ERRORS = 4.5


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny models: one thread is as fast, and far faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearRegressions(nn.Module):
    """``draws`` independent linear regressions ``w . x + c``, one per row."""

    def __init__(self, draws: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(draws, FEATURES))
        self.bias = nn.Parameter(torch.zeros(draws))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight @ x.T + self.bias[:, None]

    def flat(self) -> torch.Tensor:
        return torch.cat([self.weight, self.bias[:, None]], dim=1)


class TanhNetworks(nn.Module):
    """``draws`` copies of ``sum_j v_j tanh(u_j . x)``, one per row."""

    HIDDEN = 4

    def __init__(self, draws: int) -> None:
        super().__init__()
        init = torch.Generator().manual_seed(7)
        hidden = torch.randn(self.HIDDEN, FEATURES, generator=init)
        out = torch.randn(self.HIDDEN, generator=init)
        hidden /= math.sqrt(FEATURES)
        out /= math.sqrt(self.HIDDEN)
        self.hidden = nn.Parameter(hidden.expand(draws, -1, -1).clone())
        self.out = nn.Parameter(out.expand(draws, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations = torch.tanh(torch.einsum("dhf,nf->dhn", self.hidden, x))
        return torch.einsum("dh,dhn->dn", self.out, activations)

    def flat(self) -> torch.Tensor:
        return torch.cat([self.hidden.flatten(1), self.out], dim=1)


def _learner_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    true_weight = torch.randn(FEATURES, generator=generator)
    data = []
    for _ in range(LEARNERS):
        x = torch.randn(SAMPLES_PER_LEARNER, FEATURES, generator=generator)
        noise = torch.randn(SAMPLES_PER_LEARNER, generator=generator)
        data.append((x, 2 * torch.tanh(x @ true_weight) + 0.1 * noise))
    return data


def averaged_models(
    make_model: Callable[[int], nn.Module], spec: NoiseSpec, draws: int
) -> torch.Tensor:
    """Periodic averaging with local noise; returns the final rows, (draws, P)."""
    data = _learner_data()
    state = make_model(draws).state_dict()
    for server_round in range(1, ROUNDS + 1):
        local_states = []
        for learner, (x, y) in enumerate(data):
            model = make_model(draws)
            model.load_state_dict(state)
            optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
            WeightNoise(
                model,
                spec,
                client=learner,
                server_round=server_round,
                start_step=(server_round - 1) * LOCAL_STEPS,
            ).attach(optimizer)
            for _ in range(LOCAL_STEPS):
                optimizer.zero_grad()
                # Full-batch squared loss, summed over the independent draws.
                loss = 0.5 * ((model(x) - y) ** 2).mean(dim=1).sum()
                loss.backward()
                optimizer.step()
            local_states.append(model.state_dict())
        state = {
            name: sum(local[name] for local in local_states) / LEARNERS
            for name in state
        }
    model = make_model(draws)
    model.load_state_dict(state)
    return model.flat().detach().double()


def standardized_mean_shift(
    make_model: Callable[[int], nn.Module], spec: NoiseSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate: mean(noisy - clean) in standard errors, and the spread."""
    noisy = averaged_models(make_model, spec, DRAWS)
    clean = averaged_models(make_model, NoiseSpec(std=0.0), 1)[0]
    difference = noisy - clean
    spread = difference.std(dim=0, correction=1)
    return difference.mean(dim=0) / (spread / math.sqrt(DRAWS)), spread


@pytest.mark.parametrize(
    ("distribution", "mode"),
    [
        ("gaussian", "additive"),
        ("uniform", "additive"),
        ("laplace", "additive"),
        ("gaussian", "multiplicative"),
    ],
)
def test_noise_cancels_in_expectation_for_linear_model(
    distribution: str, mode: str
) -> None:
    std = 0.1
    spec = NoiseSpec(std=std, distribution=distribution, mode=mode, seed=3)
    shift, spread = standardized_mean_shift(LinearRegressions, spec)
    # The noise did reach the averaged model...
    if mode == "additive":
        assert bool((spread > 0.1 * std).all())
    else:
        assert float(spread.max()) > 0.01 * std
    # ...and its mean is the noise-free model's.
    assert float(shift.abs().max()) < STANDARD_ERRORS, shift


def test_noise_shifts_expectation_for_nonlinear_model() -> None:
    spec = NoiseSpec(std=0.3, seed=3)
    shift, _ = standardized_mean_shift(TanhNetworks, spec)
    assert float(shift.abs().max()) > STANDARD_ERRORS, shift
