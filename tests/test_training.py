import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from flwr_noise_app.tasks.data import client_data, load_dataset
from flwr_noise_app.tasks.models import build_model
from flwr_noise_app.tasks.training import (
    evaluate,
    get_device,
    make_optimizer,
    train_steps,
)


def _digits_client():
    data = load_dataset("digits")
    x, y = client_data(data, 2, 0, seed=0)
    return data, x, y


def test_get_device_matches_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device().type == expected


def test_mlp_learns_digits_in_a_few_hundred_steps():
    data, x, y = _digits_client()
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    loss_before, accuracy_before = evaluate(model, data.x_test, data.y_test)
    generator = torch.Generator().manual_seed(0)
    first = train_steps(
        model, x, y, steps=50, batch_size=16, learning_rate=0.05, generator=generator
    )
    later = train_steps(
        model, x, y, steps=250, batch_size=16, learning_rate=0.05, generator=generator
    )
    loss_after, accuracy_after = evaluate(model, data.x_test, data.y_test)
    assert later < first
    assert loss_after < loss_before / 3
    assert accuracy_before < 0.3 < 0.85 < accuracy_after


@pytest.mark.parametrize(
    ("steps", "num_samples", "batch_size"), [(7, 10, 4), (5, 3, 8)]
)
def test_exactly_steps_optimizer_steps_through_the_given_optimizer(
    steps, num_samples, batch_size
):
    model = nn.Linear(2, 3)
    optimizer = make_optimizer(model, 0.1)
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    x = torch.randn(num_samples, 2)
    y = torch.randint(0, 3, (num_samples,))
    train_steps(
        model,
        x,
        y,
        steps=steps,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(0),
        optimizer=optimizer,
    )
    assert len(calls) == steps


def test_own_optimizer_also_steps_exactly_steps_times():
    calls = []
    handle = register_optimizer_step_post_hook(lambda *_: calls.append(1))
    try:
        train_steps(
            nn.Linear(2, 3),
            torch.randn(9, 2),
            torch.randint(0, 3, (9,)),
            steps=11,
            batch_size=4,
            learning_rate=0.1,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert len(calls) == 11


def test_each_epoch_is_a_fresh_shuffle_in_full_batches():
    # Inputs are their own index, so the batches show which samples were drawn.
    x = torch.arange(12, dtype=torch.float32).reshape(12, 1)
    y = torch.zeros(12, dtype=torch.long)
    model = nn.Linear(1, 2)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].flatten()))
    train_steps(
        model,
        x,
        y,
        steps=6,
        batch_size=4,
        learning_rate=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    assert [len(batch) for batch in seen] == [4] * 6
    first_epoch = torch.cat(seen[:3]).long().sort().values
    second_epoch = torch.cat(seen[3:]).long().sort().values
    assert torch.equal(first_epoch, torch.arange(12))
    assert torch.equal(second_epoch, torch.arange(12))
    assert not torch.equal(torch.cat(seen[:3]), torch.cat(seen[3:]))


def _train_once(generator_seed):
    data, x, y = _digits_client()
    model = build_model("mlp", data.input_shape, data.num_classes, seed=1)
    loss = train_steps(
        model,
        x,
        y,
        steps=30,
        batch_size=16,
        learning_rate=0.05,
        generator=torch.Generator().manual_seed(generator_seed),
    )
    return loss, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seeds_give_identical_results():
    loss, weights = _train_once(4)
    loss_again, weights_again = _train_once(4)
    loss_other, weights_other = _train_once(5)
    assert loss == loss_again
    assert torch.equal(weights, weights_again)
    assert not torch.equal(weights, weights_other)
    assert loss != loss_other


def test_returned_loss_is_the_mean_of_the_batch_losses():
    model = nn.Linear(2, 3)
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()
    # One step over the whole data: the mean is the loss before the update.
    loss = train_steps(
        model,
        x,
        y,
        steps=1,
        batch_size=8,
        learning_rate=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    assert loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps=0"),
        ({"batch_size": 0}, "batch_size=0"),
        (
            {"learning_rate": None},
            r"^learning_rate=None is not allowed: expected a learning rate when no "
            "optimizer",
        ),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"learning_rate": float("nan")}, "learning_rate=nan"),
        (
            {"optimizer": "same", "learning_rate": 0.2},
            r"^learning_rate=0\.2 is not allowed: expected None or the optimizer's "
            r"learning rate \[0\.1\]$",
        ),
        (
            {"y": torch.zeros(3, dtype=torch.long)},
            r"^len\(y\)=3 is not allowed: expected len\(x\) = 4: one label an input$",
        ),
    ],
)
def test_bad_training_arguments(kwargs, match):
    model = nn.Linear(2, 3)
    arguments = {
        "x": torch.randn(4, 2),
        "y": torch.zeros(4, dtype=torch.long),
        "steps": 1,
        "batch_size": 2,
        "learning_rate": 0.1,
        "generator": torch.Generator(),
    }
    arguments.update(kwargs)
    if arguments.get("optimizer") == "same":
        arguments["optimizer"] = make_optimizer(model, 0.1)
    x, y = arguments.pop("x"), arguments.pop("y")
    with pytest.raises(ValueError, match=match):
        train_steps(model, x, y, **arguments)


def test_optimizer_with_matching_learning_rate_is_accepted():
    model = nn.Linear(2, 3)
    train_steps(
        model,
        torch.randn(4, 2),
        torch.zeros(4, dtype=torch.long),
        steps=1,
        batch_size=2,
        learning_rate=0.1,
        generator=torch.Generator(),
        optimizer=make_optimizer(model, 0.1),
    )


def test_evaluate_matches_whole_data_loss_and_accuracy_in_any_batch_size():
    model = nn.Linear(2, 3)
    x, y = torch.randn(50, 2), torch.randint(0, 3, (50,))
    with torch.no_grad():
        logits = model(x)
    expected_loss = F.cross_entropy(logits, y).item()
    expected_accuracy = (logits.argmax(1) == y).float().mean().item()
    for batch_size in (7, 2048):
        loss, accuracy = evaluate(model, x, y, batch_size=batch_size)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert accuracy == pytest.approx(expected_accuracy)


def test_evaluate_uses_eval_mode_and_restores_the_previous_mode():
    model = nn.Sequential(nn.Dropout(0.9), nn.Linear(2, 3))
    modes = []
    model.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    x, y = torch.randn(5, 2), torch.zeros(5, dtype=torch.long)
    evaluate(model, x, y)
    assert modes == [False] and model.training
    model.eval()
    evaluate(model, x, y)
    assert not model.training


def test_evaluate_rejects_empty_data():
    message = r"^len\(x\)=0 is not allowed: expected at least one input$"
    with pytest.raises(ValueError, match=message):
        evaluate(nn.Linear(2, 3), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_sam_gradient_is_the_gradient_at_the_ascent_point():
    # loss(w) = (w . x - t)^2 on a 2-weight linear model, by hand:
    # g = 2 (w . x - t) x, e = rho g / |g|, SAM gradient = 2 ((w + e) . x - t) x.
    from flwr_noise_app.tasks.training import sam_gradient

    model = nn.Linear(2, 1, bias=False)
    w = torch.tensor([[0.3, -0.2]])
    with torch.no_grad():
        model.weight.copy_(w)
    x, target, rho = torch.tensor([[1.0, 2.0]]), 0.5, 0.1

    def compute_loss():
        return ((model(x) - target) ** 2).sum()

    loss = sam_gradient(model, compute_loss, rho)

    g = 2 * ((w * x).sum() - target) * x
    e = rho * g / g.norm()
    expected = 2 * (((w + e) * x).sum() - target) * x
    assert loss.item() == pytest.approx(((w * x).sum() - target).item() ** 2)
    assert torch.allclose(model.weight.grad, expected, atol=1e-7)
    assert not torch.allclose(expected, g)  # the ascent point matters
    assert torch.equal(model.weight.detach(), w)  # weights put back exactly


def _one_step(model, x, y, lr, **options):
    generator = torch.Generator().manual_seed(0)
    train_steps(
        model,
        x,
        y,
        steps=1,
        batch_size=16,
        learning_rate=lr,
        generator=generator,
        **options,
    )


def test_train_steps_with_sam_rho_takes_sam_steps():
    data, x, y = _digits_client()
    x, y = x[:16], y[:16]
    rho, lr = 0.5, 0.1
    model = build_model("linear", data.input_shape, data.num_classes, seed=0)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    _one_step(model, x, y, lr, sam_rho=rho)
    # By hand on a copy: gradient at w, ascend by rho g / ||g||, gradient
    # there, one SGD step from w (the batch is the whole, reordered, data).
    reference = build_model("linear", data.input_shape, data.num_classes, seed=0)
    F.cross_entropy(reference(x), y).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads, strict=True):
            p.add_(rho * g / norm)
    reference.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(
        model.named_parameters(), reference.parameters(), strict=True
    ):
        expected = start[name] - lr * q.grad
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
    plain = build_model("linear", data.input_shape, data.num_classes, seed=0)
    _one_step(plain, x, y, lr)
    assert not torch.allclose(plain[1].weight, model[1].weight, atol=1e-6)


def test_negative_sam_rho_is_refused():
    data, x, y = _digits_client()
    model = build_model("linear", data.input_shape, data.num_classes, seed=0)
    with pytest.raises(ValueError, match=r"sam_rho=-0\.1 is not allowed"):
        _one_step(model, x, y, 0.1, sam_rho=-0.1)
