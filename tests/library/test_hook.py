import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from flwr_noise import NoiseReport, NoiseSpec, WeightNoise


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        # An integer parameter (frozen) must never be touched either.
        self.lookup = nn.Parameter(torch.arange(5), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _model(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,)))
        for _ in range(count)
    ]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    inputs, labels = batch
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()


def test_perturb_touches_only_selected_float_parameters() -> None:
    model = _model()
    before = _state(model)
    noise = WeightNoise(model, NoiseSpec(std=0.1, seed=1))
    report = noise.perturb()
    assert _changed(before, model) == {
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "fc.weight",
        "fc.bias",
    }
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(model.state_dict()[name], before[name])
    assert model.lookup.dtype == torch.int64
    assert report.numel == sum(
        p.numel() for p in model.parameters() if p.is_floating_point()
    )
    assert "lookup" not in noise.parameter_names


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ((r"^fc\.",), (), {"fc.weight", "fc.bias"}),
        ((), (r"\.bias$", "^bn"), {"conv.weight", "fc.weight"}),
        (("weight",), ("conv",), {"bn.weight", "fc.weight"}),
    ],
)
def test_include_and_exclude(
    include: tuple[str, ...], exclude: tuple[str, ...], expected: set[str]
) -> None:
    model = _model()
    before = _state(model)
    spec = NoiseSpec(std=0.1, include=include, exclude=exclude, seed=0)
    WeightNoise(model, spec).perturb()
    assert _changed(before, model) == expected


def test_selecting_nothing_warns_and_does_nothing() -> None:
    model = _model()
    before = _state(model)
    with pytest.warns(UserWarning, match="selects no floating-point parameter"):
        noise = WeightNoise(model, NoiseSpec(std=0.1, include=("nope",)))
    assert noise.perturb().applications == 0
    assert _changed(before, model) == set()


def test_disabled_spec_is_a_bit_identical_no_op() -> None:
    model = _model()
    before = _state(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    noise = WeightNoise(model, NoiseSpec(std=0.0, seed=1))
    handle = noise.attach(optimizer)
    assert not optimizer._optimizer_step_post_hooks
    for batch in _batches(3):
        _train_step(model.eval(), optimizer, batch)
    assert noise.perturb() == NoiseReport(0.0, 0.0, 0, 0)
    handle.remove()
    assert _changed(before, model) == set()
    assert noise.step == 0
    assert noise.report().applications == 0


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=1e-3),
    ],
    ids=["sgd", "adam"],
)
def test_attach_adds_noise_exactly_once_per_step(make_optimizer) -> None:
    spec = NoiseSpec(std=0.01, seed=4, distribution="uniform")
    hooked = _model()
    manual = copy.deepcopy(hooked)
    hooked_optimizer = make_optimizer(hooked.parameters())
    manual_optimizer = make_optimizer(manual.parameters())
    hooked_noise = WeightNoise(hooked, spec, client=2, server_round=3)
    manual_noise = WeightNoise(manual, spec, client=2, server_round=3)
    handle = hooked_noise.attach(hooked_optimizer)

    batches = _batches(6)
    for batch in batches[:4]:
        _train_step(hooked, hooked_optimizer, batch)
        _train_step(manual, manual_optimizer, batch)
        manual_noise.perturb()
    assert hooked_noise.step == 4
    for left, right in zip(hooked.parameters(), manual.parameters(), strict=True):
        assert torch.equal(left, right)

    handle.remove()
    for batch in batches[4:]:
        _train_step(hooked, hooked_optimizer, batch)
        _train_step(manual, manual_optimizer, batch)
    assert hooked_noise.step == 4
    assert hooked_noise.report().applications == 4
    for left, right in zip(hooked.parameters(), manual.parameters(), strict=True):
        assert torch.equal(left, right)


def test_noise_differs_from_plain_training() -> None:
    noisy, plain = _model(), _model()
    noisy_optimizer = torch.optim.SGD(noisy.parameters(), lr=0.05)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    WeightNoise(noisy, NoiseSpec(std=0.01, seed=0)).attach(noisy_optimizer)
    for batch in _batches(2):
        _train_step(noisy, noisy_optimizer, batch)
        _train_step(plain, plain_optimizer, batch)
    assert not torch.equal(noisy.fc.weight, plain.fc.weight)


@pytest.mark.parametrize(
    ("stream", "identical"),
    [
        ({}, True),
        ({"client": 1}, False),
        ({"server_round": 2}, False),
        ({"purpose": "mod-received"}, False),
    ],
)
def test_seed_and_stream_decide_the_noise(stream: dict, identical: bool) -> None:
    spec = NoiseSpec(std=0.1, seed=9)
    reference, other = _model(), _model()
    WeightNoise(reference, spec).perturb()
    WeightNoise(other, spec, **stream).perturb()
    assert torch.equal(reference.fc.weight, other.fc.weight) is identical


def test_no_seed_gives_fresh_noise() -> None:
    first, second = _model(), _model()
    WeightNoise(first, NoiseSpec(std=0.1)).perturb()
    WeightNoise(second, NoiseSpec(std=0.1)).perturb()
    assert not torch.equal(first.fc.weight, second.fc.weight)


def test_stream_continues_across_applications() -> None:
    model = _model()
    noise = WeightNoise(model, NoiseSpec(std=0.1, seed=2))
    before = model.fc.weight.detach().clone()
    noise.perturb()
    first = model.fc.weight.detach() - before
    middle = model.fc.weight.detach().clone()
    noise.perturb()
    second = model.fc.weight.detach() - middle
    assert not torch.allclose(first, second)


@pytest.mark.parametrize(
    ("spec", "start_step", "server_round", "expected"),
    [
        (NoiseSpec(std=1.0), 0, 1, [1.0, 1.0, 1.0]),
        (
            NoiseSpec(std=1.0, schedule="exponential", decay=0.5),
            0,
            1,
            [1.0, 0.5, 0.25],
        ),
        (
            NoiseSpec(std=1.0, schedule="exponential", decay=0.5),
            2,
            5,
            [0.25, 0.125, 0.0625],
        ),
        (NoiseSpec(std=2.0, schedule="inverse-sqrt"), 3, 1, [1.0, 2 / math.sqrt(5)]),
        (
            NoiseSpec(std=2.0, schedule="polynomial", gamma=2.0),
            0,
            1,
            [2.0, 1.0, 2 / 3],
        ),
        (
            NoiseSpec(
                std=1.0, schedule="exponential", decay=0.5, schedule_unit="round"
            ),
            7,
            3,
            [0.25, 0.25, 0.25],
        ),
        (
            NoiseSpec(std=4.0, schedule="inverse-sqrt", schedule_unit="round"),
            0,
            4,
            [2.0, 2.0],
        ),
        (
            NoiseSpec(std=1.0, schedule="polynomial", gamma=1.0, schedule_unit="round"),
            0,
            1,
            [1.0, 1.0],
        ),
    ],
)
def test_schedule_per_application(
    spec: NoiseSpec, start_step: int, server_round: int, expected: list[float]
) -> None:
    noise = WeightNoise(
        _model(), spec, start_step=start_step, server_round=server_round
    )
    sigmas = [noise.perturb().sigma for _ in expected]
    assert sigmas == pytest.approx(expected, rel=1e-12)
    assert noise.step == start_step + len(expected)
    assert noise.report().sigma == pytest.approx(expected[-1], rel=1e-12)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_reported_norms_match_the_actual_change(mode: str) -> None:
    model = _model()
    noise = WeightNoise(model, NoiseSpec(std=0.05, mode=mode, seed=3))
    squared_norms = []
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        report = noise.perturb()
        actual = math.sqrt(
            sum(
                float((p.detach() - b).double().pow(2).sum())
                for p, b in zip(model.parameters(), before, strict=True)
            )
        )
        assert report.l2_norm == pytest.approx(actual, rel=1e-4)
        squared_norms.append(actual**2)
    total = noise.report()
    assert total.applications == 3
    assert total.l2_norm == pytest.approx(math.sqrt(sum(squared_norms)), rel=1e-4)
    assert total.numel == report.numel


def test_without_norm_tracking_norms_are_nan() -> None:
    noise = WeightNoise(_model(), NoiseSpec(std=0.1), track_norm=False)
    assert math.isnan(noise.perturb().l2_norm)
    assert math.isnan(noise.report().l2_norm)
    assert noise.report().applications == 1


class _TwoScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.small = nn.Parameter(torch.randn(1_000_000, generator=generator) * 0.01)
        self.large = nn.Parameter(torch.randn(1_000_000, generator=generator) * 20.0)


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_relative_noise_follows_each_parameters_rms(distribution: str) -> None:
    model = _TwoScales()
    before = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    spec = NoiseSpec(std=0.1, distribution=distribution, relative=True, seed=5)
    WeightNoise(model, spec).perturb()
    for name, parameter in model.named_parameters():
        rms = float(before[name].pow(2).mean().sqrt())
        noise = ((parameter.detach().double() - before[name]) / rms).numpy()
        assert abs(noise.mean()) < 5 * 0.1 / math.sqrt(noise.size)
        assert float(np.std(noise)) == pytest.approx(0.1, rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"model": "net"},
            TypeError,
            re.escape("model='net' is not allowed: expected a torch.nn.Module"),
        ),
        ({"spec": {"std": 0.1}}, TypeError, "spec="),
        ({"client": -5}, ValueError, "client=-5"),
        ({"server_round": -1}, ValueError, "server_round=-1"),
        ({"purpose": "training"}, ValueError, "purpose='training'"),
        ({"start_step": -1}, ValueError, "start_step=-1"),
        ({"start_step": 1.0}, TypeError, r"start_step=1\.0"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    arguments = {"model": _model(), "spec": NoiseSpec(std=0.1), **kwargs}
    model, spec = arguments.pop("model"), arguments.pop("spec")
    with pytest.raises(error, match=message):
        WeightNoise(model, spec, **arguments)


def test_attach_rejects_a_non_optimizer() -> None:
    message = "optimizer=[] is not allowed: expected a torch.optim.Optimizer"
    with pytest.raises(TypeError, match=re.escape(message)):
        WeightNoise(_model(), NoiseSpec(std=0.1)).attach([])  # type: ignore[arg-type]
