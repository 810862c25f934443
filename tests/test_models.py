import re

import pytest
import torch

from flwr_noise_app.tasks.models import MODELS, build_model, count_parameters

DIGITS_SHAPE = (1, 8, 8)
MNIST_SHAPE = (1, 28, 28)


@pytest.mark.parametrize(
    ("name", "input_shape", "expected"),
    [
        ("linear", MNIST_SHAPE, 784 * 10 + 10),
        ("mlp", MNIST_SHAPE, (784 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)),
        # conv1 + conv2 + fc(64*12*12 -> 128) + fc(128 -> 10): about 1.2M
        ("cnn", MNIST_SHAPE, 320 + 18_496 + (9216 * 128 + 128) + 1290),
        ("linear", DIGITS_SHAPE, 64 * 10 + 10),
        ("mlp", DIGITS_SHAPE, (64 * 256 + 256) + (256 * 128 + 128) + 1290),
        ("cnn", DIGITS_SHAPE, 320 + 18_496 + (256 * 128 + 128) + 1290),
        # 64 -> 64, nine 64 -> 64 hidden layers, 64 -> 10
        ("deep-tanh", DIGITS_SHAPE, (64 * 64 + 64) * 10 + (64 * 10 + 10)),
        ("deep-tanh", MNIST_SHAPE, (784 * 64 + 64) + (64 * 64 + 64) * 9 + 650),
    ],
)
def test_parameter_counts(name, input_shape, expected):
    assert count_parameters(build_model(name, input_shape, 10)) == expected


def test_cnn_on_mnist_has_about_1_2m_parameters():
    assert 1_150_000 < count_parameters(build_model("cnn", MNIST_SHAPE, 10)) < 1_250_000


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("input_shape", [DIGITS_SHAPE, MNIST_SHAPE, (3, 12, 10)])
def test_output_shape(name, input_shape):
    model = build_model(name, input_shape, 7)
    logits = model(torch.zeros(5, *input_shape))
    assert logits.shape == (5, 7)


def test_unknown_model_names_it_and_the_allowed_ones():
    message = (
        "model='resnet' is not allowed: expected one of 'linear', 'mlp', 'cnn', "
        "'deep-tanh'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model("resnet", MNIST_SHAPE, 10)


@pytest.mark.parametrize("input_shape", [(1, 28), (0, 28, 28), (1, -2, 28), "abc"])
def test_bad_input_shape(input_shape):
    message = (
        f"input_shape={input_shape!r} is not allowed: expected three positive ints "
        "(channels, height, width)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model("mlp", input_shape, 10)


@pytest.mark.parametrize("num_classes", [0, True, 2.0])
def test_bad_num_classes(num_classes):
    message = f"num_classes={num_classes!r} is not allowed: expected a positive int"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model("mlp", MNIST_SHAPE, num_classes)


def test_cnn_rejects_too_small_inputs():
    message = (
        "input_shape=(1, 5, 5) is not allowed: expected height and width >= 6 for "
        "model 'cnn'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model("cnn", (1, 5, 5), 10)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_model("cnn", DIGITS_SHAPE, 10, seed=7)
    assert torch.equal(torch.rand(3), expected_next)

    second = build_model("cnn", DIGITS_SHAPE, 10, seed=7)
    other = build_model("cnn", DIGITS_SHAPE, 10, seed=8)
    assert torch.equal(_flat(first), _flat(second))
    assert not torch.equal(_flat(first), _flat(other))


def test_unseeded_build_follows_the_global_rng():
    torch.manual_seed(5)
    first = build_model("mlp", DIGITS_SHAPE, 10)
    torch.manual_seed(5)
    second = build_model("mlp", DIGITS_SHAPE, 10)
    assert torch.equal(_flat(first), _flat(second))


def test_deep_tanh_is_ten_tanh_layers_without_normalization():
    model = build_model("deep-tanh", DIGITS_SHAPE, 10, seed=0)
    kinds = [type(module) for module in model]
    assert kinds.count(torch.nn.Tanh) == 10
    assert kinds.count(torch.nn.Linear) == 11
    assert not any(
        isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm))
        for module in model.modules()
    )


def test_deep_tanh_trains():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, *DIGITS_SHAPE, generator=generator)
    y = torch.arange(32) % 4
    model = build_model("deep-tanh", DIGITS_SHAPE, 4, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_app_accepts_deep_tanh():
    from flwr_noise_app.config import AppConfig

    assert AppConfig.from_run_config({"model": "deep-tanh"}).model == "deep-tanh"
