"""Reference models for the bundled tasks: linear, MLP, small CNN, deep tanh MLP."""

from __future__ import annotations

import operator

import torch
from torch import nn

from flwr_noise.validation import allowed_choices, not_allowed

MODELS: tuple[str, ...] = ("linear", "mlp", "cnn", "deep-tanh")

# The deep tanh MLP: many narrow tanh layers, no normalization, torch's default
# initialisation; hard to optimize (long early plateau), the regime where
# Neelakantan et al. (2015) report gains from noise.
DEEP_TANH_HIDDEN_LAYERS = 10
DEEP_TANH_WIDTH = 64

_CNN_CONV_CHANNELS = (32, 64)
_CNN_KERNEL_SIZE = 3
_CNN_POOL_SIZE = 2


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build one of the reference models.

    Parameters
    ----------
    name : str
        One of ``MODELS``: ``"linear"`` (Flatten + Linear), ``"mlp"`` (two
        hidden layers of 256 and 128 ReLU units) or ``"cnn"`` (two 3x3
        convolutions with 32 and 64 channels, 2x2 max pooling, a hidden
        layer of 128 units; about 1.2M parameters on 1x28x28 inputs) or
        ``"deep-tanh"`` (10 hidden layers of 64 tanh units, no
        normalization: an optimization-hard network).
    input_shape : tuple[int, int, int]
        Shape of one input, ``(channels, height, width)``.
    num_classes : int
        Number of output logits.
    seed : int | None
        When given, the parameters are initialised from this seed without
        consuming or changing torch's global random state. When ``None``
        (the default) the global random state is used, so the caller
        controls it, e.g. with ``torch.manual_seed``.

    Returns
    -------
    model : torch.nn.Module
        A freshly initialised model on the CPU, in train mode.

    Raises
    ------
    ValueError
        If ``name`` is not one of ``MODELS``, a shape or class count is not
        positive, or the input is too small for the CNN.

    """
    if name not in MODELS:
        raise not_allowed("model", name, allowed_choices(MODELS))
    shape = _checked_shape(input_shape, num_classes)
    if seed is None:
        return _BUILDERS[name](shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _checked_shape(
    input_shape: tuple[int, int, int], num_classes: int
) -> tuple[int, int, int]:
    try:
        shape = tuple(operator.index(size) for size in input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise not_allowed(
            "input_shape",
            input_shape,
            "three positive ints (channels, height, width)",
        )
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or (num_classes < 1)
    ):
        raise not_allowed("num_classes", num_classes, "a positive int")
    return shape  # type: ignore[return-value]


def _flat_size(input_shape: tuple[int, int, int]) -> int:
    channels, height, width = input_shape
    return channels * height * width


def _build_linear(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(input_shape), num_classes))


def _build_mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_size(input_shape), 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _build_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    # Two unpadded 3x3 convolutions each shrink a side by 2, then pooling halves it.
    shrink = len(_CNN_CONV_CHANNELS) * (_CNN_KERNEL_SIZE - 1)
    pooled_height = (height - shrink) // _CNN_POOL_SIZE
    pooled_width = (width - shrink) // _CNN_POOL_SIZE
    if pooled_height < 1 or pooled_width < 1:
        minimum = shrink + _CNN_POOL_SIZE
        raise not_allowed(
            "input_shape",
            input_shape,
            f"height and width >= {minimum} for model 'cnn'",
        )
    first, second = _CNN_CONV_CHANNELS
    return nn.Sequential(
        nn.Conv2d(channels, first, _CNN_KERNEL_SIZE),
        nn.ReLU(),
        nn.Conv2d(first, second, _CNN_KERNEL_SIZE),
        nn.ReLU(),
        nn.MaxPool2d(_CNN_POOL_SIZE),
        nn.Flatten(),
        nn.Linear(second * pooled_height * pooled_width, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _build_deep_tanh(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat_size(input_shape)
    for _ in range(DEEP_TANH_HIDDEN_LAYERS):
        layers += [nn.Linear(width, DEEP_TANH_WIDTH), nn.Tanh()]
        width = DEEP_TANH_WIDTH
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


_BUILDERS = {
    "linear": _build_linear,
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "deep-tanh": _build_deep_tanh,
}
