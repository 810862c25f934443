"""Training and evaluation loops of the reference tasks (plain mini-batch SGD)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flwr_noise.validation import check_integer, check_real, not_allowed


def get_device() -> torch.device:
    """Return the CUDA device when one is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.SGD:
    """Return plain SGD (no momentum, no weight decay) over ``model``'s parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model to train.
    learning_rate : float
        Step size, finite and positive.

    Returns
    -------
    optimizer : torch.optim.SGD
        The optimizer; attach a noise hook to it before training.

    """
    _check_learning_rate(learning_rate)
    return torch.optim.SGD(model.parameters(), lr=learning_rate)


def train_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    learning_rate: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    sam_rho: float = 0.0,
) -> float:
    """Run exactly ``steps`` mini-batch optimizer steps on ``(x, y)``.

    Each epoch reshuffles the local data with ``generator`` and cuts it into
    full mini-batches (a trailing partial batch is dropped, so every step sees
    ``min(batch_size, len(x))`` samples); epochs repeat until ``steps`` steps
    are done. Every step goes through ``optimizer.step()``, so hooks attached
    to the optimizer (such as weight noise) run after each step.

    Parameters
    ----------
    model : torch.nn.Module
        The model, put in train mode here.
    x : torch.Tensor
        Inputs, on the model's device.
    y : torch.Tensor
        int64 class labels, on the same device.
    steps : int
        Number of optimizer steps, ``>= 1``.
    batch_size : int
        Mini-batch size, ``>= 1``.
    generator : torch.Generator
        Source of the shuffles; the same seed gives the same batches.
    learning_rate : float | None
        Step size of the plain SGD optimizer made when ``optimizer`` is
        ``None``. With an ``optimizer``, leave it ``None`` or pass the
        optimizer's own learning rate.
    optimizer : torch.optim.Optimizer | None
        The optimizer to step, e.g. one from ``make_optimizer`` with a noise
        hook attached.
    sam_rho : float (default: 0.0)
        ``> 0``: every step is a SAM step (see ``sam_gradient``) with this
        radius; ``0``: plain gradient steps.

    Returns
    -------
    loss : float
        Mean training cross-entropy over the ``steps`` mini-batches.

    Raises
    ------
    ValueError
        If ``x`` and ``y`` do not match or are empty, ``steps`` or
        ``batch_size`` is not positive, ``sam_rho`` is negative, or the
        learning rate is missing or does not match the optimizer's.

    """
    _check_positive_int("steps", steps)
    check_real("sam_rho", sam_rho, low=0.0)
    _check_positive_int("batch_size", batch_size)
    _check_data(x, y)
    optimizer = _resolve_optimizer(model, learning_rate, optimizer)

    model.train()
    num_samples = len(x)
    batch = min(batch_size, num_samples)
    batches_per_epoch = num_samples // batch
    # Summed on the device: reading a loss back every step would sync each step.
    total_loss = torch.zeros((), device=x.device)
    order = torch.empty(0, dtype=torch.long, device=x.device)
    for step in range(steps):
        position = step % batches_per_epoch
        if position == 0:
            order = torch.randperm(
                num_samples, generator=generator, device=generator.device
            ).to(x.device)
        indices = order[position * batch : (position + 1) * batch]
        optimizer.zero_grad(set_to_none=True)
        inputs, labels = x[indices], y[indices]
        if sam_rho > 0:
            loss = sam_gradient(
                model,
                lambda inputs=inputs, labels=labels: F.cross_entropy(
                    model(inputs), labels
                ),
                sam_rho,
            )
        else:
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
        optimizer.step()
        total_loss += loss.detach()
    return float(total_loss) / steps


def sam_gradient(
    model: nn.Module, compute_loss: Callable[[], torch.Tensor], rho: float
) -> torch.Tensor:
    """Leave in ``.grad`` the SAM gradient: the gradient at ``w + rho g / ||g||``.

    Sharpness-aware minimization (Foret et al. 2021), as FedSAM uses it for
    local training: ``g`` is the gradient at the current weights ``w``
    (``||g||`` the L2 norm over every parameter that has one); the loss is
    differentiated again at the ascent point ``w + rho g / ||g||`` and the
    weights are put back to ``w`` exactly, so the next ``optimizer.step()``
    moves ``w`` along the gradient taken at the ascent point.

    Parameters
    ----------
    model : torch.nn.Module
        The model, with no gradients accumulated.
    compute_loss : Callable[[], torch.Tensor]
        Returns the mini-batch loss of the model's current weights.
    rho : float
        The radius of the ascent step, ``>= 0``.

    Returns
    -------
    loss : torch.Tensor
        The loss at ``w`` (detached).

    """
    loss = compute_loss()
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        )
        scale = rho / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        saved = [p.detach().clone() for p in params]
        for param in params:
            param.add_(param.grad * scale)
    model.zero_grad(set_to_none=True)
    compute_loss().backward()
    with torch.no_grad():
        for param, weights in zip(params, saved, strict=True):
            param.copy_(weights)
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048
) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on ``(x, y)``.

    The model is evaluated in eval mode without gradients, and put back in
    the mode it was in.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    x : torch.Tensor
        Inputs, on the model's device.
    y : torch.Tensor
        int64 class labels, on the same device.
    batch_size : int
        How many samples go through the model at once.

    Returns
    -------
    loss, accuracy : tuple[float, float]
        Mean cross-entropy and fraction of correct predictions.

    """
    _check_positive_int("batch_size", batch_size)
    _check_data(x, y)
    was_training = model.training
    model.eval()
    try:
        total_loss = torch.zeros((), device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            labels = y[start : start + batch_size]
            total_loss += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
    finally:
        model.train(was_training)
    return float(total_loss) / len(x), int(correct) / len(x)


def _resolve_optimizer(
    model: nn.Module,
    learning_rate: float | None,
    optimizer: torch.optim.Optimizer | None,
) -> torch.optim.Optimizer:
    if optimizer is None:
        if learning_rate is None:
            raise not_allowed(
                "learning_rate", None, "a learning rate when no optimizer is passed"
            )
        return make_optimizer(model, learning_rate)
    if learning_rate is not None:
        rates = {group["lr"] for group in optimizer.param_groups}
        if rates != {learning_rate}:
            raise not_allowed(
                "learning_rate",
                learning_rate,
                f"None or the optimizer's learning rate {sorted(rates)}",
            )
    return optimizer


def _check_learning_rate(learning_rate: float) -> None:
    check_real("learning_rate", learning_rate, low=0.0, low_open=True)


def _check_positive_int(name: str, value: int) -> None:
    check_integer(name, value, low=1)


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse empty data and inputs without one label each."""
    if len(x) == 0:
        raise not_allowed("len(x)", 0, "at least one input")
    if len(y) != len(x):
        raise not_allowed("len(y)", len(y), f"len(x) = {len(x)}: one label an input")
