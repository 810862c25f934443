"""The paper's experiment in one process: m learners with periodic averaging.

Each of ``learners`` learners trains its own copy of the model with mini-batch
SGD on its own partition; every ``local_steps`` (b) steps all local models are
replaced by their average. This is FedAvg with every client in every round, so
the runner mirrors the bundled Flower App step for step, with the same seeds:

- data: ``load_dataset(dataset, data_dir, split_seed=seed)`` and
  ``client_data(..., partition_id=k, seed=seed)``;
- initial model: ``build_model(model, ..., seed=seed)``;
- learner k's mini-batch order in round r:
  ``torch_generator(seed, client=k, server_round=r, purpose="data")``;
- learner k's local noise in round r: ``WeightNoise(model, spec,
  client=k, server_round=r, start_step=(r - 1) * b)`` attached to a fresh
  plain-SGD optimizer, with ``spec.seed = seed`` (and
  ``spec.correlation``), its handle removed when local training ends;
- SAM rows (``sam_rho > 0``): every local step is a FedSAM-style step, the
  gradient taken at ``w + rho g / ||g||`` (``tasks.training.sam_gradient``);
- the local models' accuracy is measured right after local training, before
  averaging, on the held-out test set;
- the average is FedAvg's (weighted by the number of local examples, in
  partition order, accumulated in float32 like Flower's
  ``aggregate_arrayrecords``).

Besides the federated run it trains the two serial baselines of the paper:
one model with SGD over the union of the learners' data for ``learners * b *
rounds`` steps of batch B (the same number of samples), and one with batch
``learners * B`` for ``b * rounds`` steps.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from flwr_noise import validation
from flwr_noise.hook import WeightNoise
from flwr_noise.sampling import perturb_arrays
from flwr_noise.seeding import AGGREGATE_CLIENT, numpy_generator, torch_generator
from flwr_noise.spec import DISTRIBUTIONS, SCHEDULES, NoiseSpec
from flwr_noise_app.tasks.data import (
    DATASETS,
    PARTITION_SCHEMES,
    client_data,
    load_dataset,
)
from flwr_noise_app.tasks.models import MODELS, build_model
from flwr_noise_app.tasks.training import (
    evaluate,
    get_device,
    make_optimizer,
    train_steps,
)

PLACEMENTS: tuple[str, ...] = ("local", "received", "aggregation")
# Placement of a noise-free configuration (``noise_std == 0``).
NO_NOISE = "none"
# Seeding purpose of the mini-batch order (shared with the ClientApp).
DATA_PURPOSE = "data"
# Seeding purpose of each placement's noise stream.
PLACEMENT_PURPOSES: dict[str, str] = {
    "local": "local",
    "received": "broadcast",
    "aggregation": "aggregation",
}
# Client keys of the serial baselines' mini-batch streams (no learner has them).
SERIAL_CLIENT = "serial"
SERIAL_LARGE_BATCH_CLIENT = "serial-large-batch"
# NoiseSpec.correlation: "independent" (the paper's kept noise, the default)
# or "anticorrelated" (Anti-PGD: the previous draw is removed before the next).
INDEPENDENT = "independent"
CORRELATIONS: tuple[str, ...] = (INDEPENDENT, "anticorrelated")


def _allowed(options: Sequence[str]) -> str:
    return "one of " + ", ".join(repr(option) for option in options)


def check_int(label: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise naming ``label``.

    Raises
    ------
    TypeError
        If ``value`` is not an int (``bool`` is not).
    ValueError
        If ``value < minimum``.

    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(
            f"{label}={value!r} is not allowed: expected an int >= {minimum}"
        )
    if value < minimum:
        raise ValueError(
            f"{label}={value!r} is not allowed: expected an int >= {minimum}"
        )
    return int(value)


def check_float(label: str, value: Any, *, positive: bool) -> float:
    """Return ``value`` as a float if finite and ``> 0`` (or ``>= 0``).

    Raises
    ------
    TypeError
        If ``value`` is not a real number (``bool`` is not).
    ValueError
        If ``value`` is not finite or out of range.

    """
    expected = "a finite number > 0" if positive else "a finite number >= 0"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{label}={value!r} is not allowed: expected {expected}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{label}={value!r} is not allowed: expected {expected}")
    return number


def check_choice(label: str, value: Any, options: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``options``, else raise naming ``label``.

    Raises
    ------
    ValueError
        If ``value`` is not one of ``options``.

    """
    if not isinstance(value, str) or value not in options:
        raise ValueError(
            f"{label}={value!r} is not allowed: expected {_allowed(options)}"
        )
    return value


@dataclass(frozen=True)
class ExperimentConfig:
    """One configuration of the paper's experiment (without the seed).

    Parameters
    ----------
    dataset : str (default: "digits")
        ``"digits"`` or ``"mnist"`` (see ``flwr_noise_app.tasks.data``).
    data_dir : str (default: "")
        MNIST IDX folder; ignored for ``"digits"``.
    model : str (default: "mlp")
        ``"linear"``, ``"mlp"`` or ``"cnn"``.
    learners : int (default: 4)
        Number of learners m, ``>= 1``.
    images_per_learner : int | None (default: None)
        Training images each learner keeps: the first ones of its partition
        (partitions are shuffled). ``None`` keeps the whole partition.
    local_steps : int (default: 10)
        b, mini-batch SGD steps between two averagings.
    rounds : int (default: 10)
        Number of averagings.
    batch_size : int (default: 16)
        Mini-batch size B of the learners and of the first serial baseline.
    learning_rate : float (default: 0.05)
        Plain SGD step size, for the learners and both serial baselines.
    noise_std : float (default: 0.0)
        Base standard deviation of the noise; ``0`` turns it off.
    schedule : str (default: "constant")
        Noise schedule (``NoiseSpec.schedule``).
    relative : bool (default: False)
        Scale the noise by each tensor's RMS (``NoiseSpec.relative``).
    placement : str (default: "local")
        ``"local"``: after every local SGD step, on each learner's model;
        ``"received"``: once per round on each learner's copy of the averaged
        model; ``"aggregation"``: once per round on the average itself;
        ``"none"``: only with ``noise_std == 0``.
    distribution : str (default: "gaussian")
        Noise distribution (``NoiseSpec.distribution``).
    partitioning : str (default: "iid")
        ``"iid"`` or ``"dirichlet"`` (label skew).
    dirichlet_alpha : float (default: 0.5)
        Concentration of the Dirichlet partitioning.
    record_rounds : bool (default: False)
        Evaluate the local and averaged models after every round, not only
        after the last one.
    correlation : str (default: "independent")
        ``NoiseSpec.correlation`` of local noise: ``"independent"`` (every
        draw stays in the weights) or ``"anticorrelated"`` (the previous
        draw is removed before the next one is added; ``"local"`` only).
    sam_rho : float (default: 0.0)
        ``> 0``: the learners take SAM steps of this radius (a reference
        row; it may be combined with noise).

    Raises
    ------
    TypeError, ValueError
        If a field is not allowed; the message names the field.

    """

    dataset: str = "digits"
    data_dir: str = ""
    model: str = "mlp"
    learners: int = 4
    images_per_learner: int | None = None
    local_steps: int = 10
    rounds: int = 10
    batch_size: int = 16
    learning_rate: float = 0.05
    noise_std: float = 0.0
    schedule: str = "constant"
    relative: bool = False
    placement: str = "local"
    distribution: str = "gaussian"
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    record_rounds: bool = False
    correlation: str = INDEPENDENT
    sam_rho: float = 0.0

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        if not isinstance(self.data_dir, str):
            raise TypeError(
                f"data_dir={self.data_dir!r} is not allowed: expected a str path"
            )
        check_choice("model", self.model, MODELS)
        check_int("learners", self.learners, 1)
        if self.images_per_learner is not None:
            check_int("images_per_learner", self.images_per_learner, 1)
        check_int("local_steps", self.local_steps, 1)
        check_int("rounds", self.rounds, 1)
        check_int("batch_size", self.batch_size, 1)
        object.__setattr__(
            self,
            "learning_rate",
            check_float("learning_rate", self.learning_rate, positive=True),
        )
        object.__setattr__(
            self, "noise_std", check_float("noise_std", self.noise_std, positive=False)
        )
        check_choice("schedule", self.schedule, SCHEDULES)
        for flag in ("relative", "record_rounds"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"{flag}={getattr(self, flag)!r} is not allowed: expected "
                    "True or False"
                )
        check_choice("placement", self.placement, (*PLACEMENTS, NO_NOISE))
        if self.placement == NO_NOISE and self.noise_std > 0:
            raise ValueError(
                f"placement={NO_NOISE!r} is not allowed with noise_std="
                f"{self.noise_std!r}: expected {_allowed(PLACEMENTS)}"
            )
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_choice("partitioning", self.partitioning, PARTITION_SCHEMES)
        object.__setattr__(
            self,
            "dirichlet_alpha",
            check_float("dirichlet_alpha", self.dirichlet_alpha, positive=True),
        )
        validation.check_choice("correlation", self.correlation, CORRELATIONS)
        if (
            self.correlation != INDEPENDENT
            and self.noise_enabled
            and self.placement != "local"
        ):
            raise validation.not_allowed(
                "correlation",
                self.correlation,
                f"{INDEPENDENT!r} with placement={self.placement!r} (noise added "
                "once per round has no previous draw to remove)",
            )
        object.__setattr__(
            self, "sam_rho", validation.check_real("sam_rho", self.sam_rho, low=0.0)
        )

    @property
    def noise_enabled(self) -> bool:
        """Whether this configuration adds any noise."""
        return self.noise_std > 0

    def canonical(self) -> ExperimentConfig:
        """Return the same experiment with the noise fields of a noise-free run.

        Every placement, schedule, scaling and correlation of a zero std is
        the same experiment; they all map to ``placement="none"``,
        ``"constant"``, absolute, Gaussian, independent.
        """
        if self.noise_enabled:
            return self
        return replace(
            self,
            noise_std=0.0,
            placement=NO_NOISE,
            schedule="constant",
            relative=False,
            distribution="gaussian",
            correlation=INDEPENDENT,
        )

    @property
    def is_reference(self) -> bool:
        """Whether this configuration is plain SGD (no noise, no SAM)."""
        return not self.noise_enabled and self.sam_rho == 0

    def noise_label(self, *, with_std: bool = True) -> str:
        """Return the perturbation in words, e.g. ``"local 0.01 relative"``.

        Plain SGD is ``"none"``; SAM adds ``"SAM rho=<rho>"``.

        Parameters
        ----------
        with_std : bool (default: True)
            Name the std; without it the label names the kind of noise only
            (one line of a plot over the std).

        """
        words: list[str] = []
        if self.noise_enabled:
            words.append(self.placement)
            if with_std:
                words.append(f"{self.noise_std:g}")
            if self.relative:
                words.append("relative")
            if self.schedule != "constant":
                words.append(self.schedule)
            if self.distribution != "gaussian":
                words.append(self.distribution)
            if self.correlation != INDEPENDENT:
                words.append(self.correlation)
        if self.sam_rho > 0:
            words.append(f"SAM rho={self.sam_rho:g}")
        return " ".join(words) or "none"

    def noise_spec(self, seed: int) -> NoiseSpec:
        """Return the noise of this configuration, seeded with the run's seed.

        Raises
        ------
        TypeError
            If the correlation is not ``"independent"`` and the installed
            ``NoiseSpec`` has no ``correlation`` field.

        """
        # Only a non-default correlation is passed, so that the runner also
        # works with a NoiseSpec that predates the field.
        extra = {}
        if self.correlation != INDEPENDENT:
            extra["correlation"] = self.correlation
        return NoiseSpec(
            std=self.noise_std,
            distribution=self.distribution,
            relative=self.relative,
            schedule=self.schedule,
            seed=seed,
            **extra,
        )

    def serial_key(self) -> tuple[Any, ...]:
        """Fields the serial baselines depend on (the noise and b, R do not)."""
        return (
            self.dataset,
            self.data_dir,
            self.model,
            self.learners,
            self.images_per_learner,
            self.partitioning,
            self.dirichlet_alpha if self.partitioning == "dirichlet" else None,
            self.batch_size,
            self.learning_rate,
            self.local_steps * self.rounds,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class LearnerData:
    """The learners' training data and the shared held-out test set.

    Attributes
    ----------
    x, y : tuple[torch.Tensor, ...]
        Learner k's inputs and labels, on the device.
    x_test, y_test : torch.Tensor
        The held-out test set, on the device.
    input_shape : tuple[int, int, int]
        Shape of one input.
    num_classes : int
        Number of classes.

    """

    x: tuple[torch.Tensor, ...]
    y: tuple[torch.Tensor, ...]
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, int, int]
    num_classes: int

    @property
    def sizes(self) -> list[int]:
        """Number of training examples of each learner."""
        return [len(labels) for labels in self.y]


def load_learner_data(
    config: ExperimentConfig, seed: int, device: torch.device | None = None
) -> LearnerData:
    """Load the dataset and cut it into the learners' partitions, as the App does.

    Parameters
    ----------
    config : ExperimentConfig
        Dataset, partitioning, number of learners and images per learner.
    seed : int
        Seed of the train/test split and of the partitioning.
    device : torch.device | None (default: None)
        Where the tensors go; ``None`` is ``get_device()``.

    Raises
    ------
    ValueError
        If a learner's partition is smaller than ``images_per_learner``.

    """
    device = get_device() if device is None else device
    data = load_dataset(config.dataset, config.data_dir, split_seed=seed)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for learner in range(config.learners):
        x, y = client_data(
            data,
            config.learners,
            learner,
            scheme=config.partitioning,
            alpha=config.dirichlet_alpha,
            seed=seed,
        )
        if config.images_per_learner is not None:
            if len(y) < config.images_per_learner:
                raise ValueError(
                    f"images_per_learner={config.images_per_learner} is not "
                    f"allowed: learner {learner} has only {len(y)} of the "
                    f"{len(data.y_train)} {config.dataset} training images "
                    f"({config.partitioning} partitioning into {config.learners} "
                    "learners); expected at most that many"
                )
            x, y = x[: config.images_per_learner], y[: config.images_per_learner]
        xs.append(x.to(device))
        ys.append(y.to(device))
    return LearnerData(
        x=tuple(xs),
        y=tuple(ys),
        x_test=data.x_test.to(device),
        y_test=data.y_test.to(device),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
    )


@dataclass(frozen=True)
class RoundRecord:
    """The models of one round, evaluated on the held-out test set.

    Attributes
    ----------
    round : int
        The round, from 1.
    local_accuracy_mean, local_accuracy_min, local_accuracy_max : float
        The learners' models after local training, before averaging.
    local_loss_mean : float
        Their mean test cross-entropy.
    averaged_accuracy, averaged_loss : float
        The averaged model (after any aggregation noise).

    """

    round: int
    local_accuracy_mean: float
    local_accuracy_min: float
    local_accuracy_max: float
    local_loss_mean: float
    averaged_accuracy: float
    averaged_loss: float


@dataclass(frozen=True, eq=False)
class RunResult:
    """What one federated run (one configuration, one seed) gave.

    Attributes
    ----------
    rounds : tuple[RoundRecord, ...]
        Every round with ``record_rounds``, else only the last one.
    averaged_state : dict[str, torch.Tensor]
        The final averaged model's weights, on the CPU.
    seconds : float
        Wall-clock time of the run.
    update_rms : float
        Mean over every local step of every learner of the RMS (over all
        trainable parameter elements) of the optimizer's update
        ``learning_rate * gradient``, before any noise; ``nan`` before the
        first step.
    layer_rms : dict[str, float]
        RMS of each floating-point tensor of the final averaged model.

    """

    rounds: tuple[RoundRecord, ...]
    averaged_state: dict[str, torch.Tensor] = field(repr=False)
    seconds: float
    update_rms: float = math.nan
    layer_rms: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> RoundRecord:
        """The last round."""
        return self.rounds[-1]


def noise_ratios(
    sigma: float, update_rms: float, layer_rms: Mapping[str, float]
) -> dict[str, Any]:
    """Return the noise std as a ratio to the learning signal and to the weights.

    Parameters
    ----------
    sigma : float
        The (absolute) noise standard deviation, per element.
    update_rms : float
        RMS of one SGD step's update (``RunResult.update_rms``).
    layer_rms : Mapping[str, float]
        RMS of each tensor (``RunResult.layer_rms``).

    Returns
    -------
    dict[str, Any]
        ``sigma_over_update``: ``sigma / update_rms``; ``sigma_over_layer_rms``:
        ``{name: sigma / rms}``. A zero denominator gives ``inf``.

    """

    def ratio(denominator: float) -> float:
        return sigma / denominator if denominator > 0 else math.inf

    return {
        "sigma_over_update": ratio(update_rms),
        "sigma_over_layer_rms": {name: ratio(rms) for name, rms in layer_rms.items()},
    }


class _UpdateMeter:
    """Sums the RMS of every plain-SGD update ``lr * grad``, before the step runs."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        def measure(opt: torch.optim.Optimizer, *_: Any) -> None:
            with torch.no_grad():
                norms = []
                count = 0
                for group in opt.param_groups:
                    grads = [p.grad for p in group["params"] if p.grad is not None]
                    if grads:
                        # One fused kernel per group (what clip_grad_norm_ uses).
                        group_norms = torch.stack(torch._foreach_norm(grads))
                        norms.append(group_norms * group["lr"])
                        count += sum(grad.numel() for grad in grads)
                if count:
                    total = torch.linalg.vector_norm(torch.cat(norms))
                    self.total += total.double() / math.sqrt(count)
                    self.steps += 1

        return optimizer.register_step_pre_hook(measure)

    @property
    def mean(self) -> float:
        return float(self.total) / self.steps if self.steps else math.nan


def _layer_rms(arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {
        name: float(np.sqrt(np.mean(np.square(array, dtype=np.float64))))
        for name, array in arrays.items()
        if np.issubdtype(array.dtype, np.floating) and array.size
    }


@dataclass(frozen=True)
class SerialResult:
    """Test accuracy and loss of one serial baseline model."""

    accuracy: float
    loss: float
    steps: int
    batch_size: int
    seconds: float


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy of the model's weights as numpy arrays (an ArrayRecord's content)."""
    return {
        name: tensor.detach().cpu().numpy().copy()
        for name, tensor in model.state_dict().items()
    }


def _torch_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average the learners' weights as Flower's FedAvg does.

    The factors are ``w_k / sum(w)`` (Python floats) and the arrays are
    accumulated in their own dtype in the given order, exactly as
    ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` does, so
    the result is bit-identical to the App's aggregate.

    Parameters
    ----------
    states : Sequence[Mapping[str, np.ndarray]]
        One name -> array mapping per learner, in partition order.
    weights : Sequence[float]
        The learners' numbers of training examples.

    Returns
    -------
    dict[str, np.ndarray]
        The weighted average.

    """
    total = sum(weights)
    factors = [weight / total for weight in weights]
    average: dict[str, np.ndarray] = {}
    for state, factor in zip(states, factors, strict=True):
        for name, array in state.items():
            if name not in average:
                average[name] = array * factor
            else:
                average[name] += array * factor
    return average


def _server_noise(
    arrays: Mapping[str, np.ndarray],
    spec: NoiseSpec,
    *,
    client: int,
    server_round: int,
    purpose: str,
) -> dict[str, np.ndarray]:
    """Perturb a model once, as the server does (numpy stream, round schedule)."""
    rng = numpy_generator(
        spec.seed, client=client, server_round=server_round, purpose=purpose
    )
    perturbed, _ = perturb_arrays(arrays, spec, spec.sigma_at(server_round - 1), rng)
    return perturbed


def _evaluated_rounds(config: ExperimentConfig) -> set[int]:
    if config.record_rounds:
        return set(range(1, config.rounds + 1))
    return {config.rounds}


def run_experiment(
    config: ExperimentConfig,
    seed: int,
    *,
    data: LearnerData | None = None,
    device: torch.device | None = None,
) -> RunResult:
    """Run the learners with periodic averaging and the configured noise.

    Parameters
    ----------
    config : ExperimentConfig
        The experiment.
    seed : int
        The run's seed: data split, partitioning, initial model, mini-batch
        order and noise streams all derive from it.
    data : LearnerData | None (default: None)
        The learners' data from ``load_learner_data(config, seed)``; loaded
        here when ``None``.
    device : torch.device | None (default: None)
        Where to train; ``None`` is ``get_device()``.

    Returns
    -------
    RunResult
        The evaluated rounds and the final averaged weights.

    """
    check_int("seed", seed, 0)
    started = time.perf_counter()
    device = get_device() if device is None else device
    data = load_learner_data(config, seed, device) if data is None else data
    spec = config.noise_spec(seed)
    placement = config.placement if config.noise_enabled else NO_NOISE
    evaluated_rounds = _evaluated_rounds(config)
    meter = _UpdateMeter(device)
    # One working model, loaded with each learner's weights in turn, like a
    # ClientApp that builds a model and loads the received arrays into it.
    model = build_model(config.model, data.input_shape, data.num_classes, seed=seed).to(
        device
    )
    global_arrays = _numpy_state(model)
    records: list[RoundRecord] = []
    for server_round in range(1, config.rounds + 1):
        local_states: list[dict[str, np.ndarray]] = []
        local_metrics: list[tuple[float, float]] = []
        for learner, (x, y) in enumerate(zip(data.x, data.y, strict=True)):
            received = global_arrays
            if placement == "received":
                received = _server_noise(
                    global_arrays,
                    spec,
                    client=learner,
                    server_round=server_round,
                    purpose=PLACEMENT_PURPOSES["received"],
                )
            model.load_state_dict(_torch_state(received))
            optimizer = make_optimizer(model, config.learning_rate)
            handles = [meter.attach(optimizer)]
            if placement == "local":
                noise = WeightNoise(
                    model,
                    spec,
                    client=learner,
                    server_round=server_round,
                    start_step=(server_round - 1) * config.local_steps,
                    purpose=PLACEMENT_PURPOSES["local"],
                    track_norm=False,
                )
                handles.append(noise.attach(optimizer))
            train_steps(
                model,
                x,
                y,
                steps=config.local_steps,
                batch_size=config.batch_size,
                optimizer=optimizer,
                generator=torch_generator(
                    seed,
                    client=learner,
                    server_round=server_round,
                    purpose=DATA_PURPOSE,
                ),
                sam_rho=config.sam_rho,
            )
            # Removing the noise handle removes an anticorrelated run's last
            # draw, so the learner sends back its clean weights.
            for handle in handles:
                handle.remove()
            if server_round in evaluated_rounds:
                local_metrics.append(evaluate(model, data.x_test, data.y_test))
            local_states.append(_numpy_state(model))
        global_arrays = weighted_average(local_states, data.sizes)
        if placement == "aggregation":
            global_arrays = _server_noise(
                global_arrays,
                spec,
                client=AGGREGATE_CLIENT,
                server_round=server_round,
                purpose=PLACEMENT_PURPOSES["aggregation"],
            )
        if server_round in evaluated_rounds:
            model.load_state_dict(_torch_state(global_arrays))
            averaged_loss, averaged_accuracy = evaluate(model, data.x_test, data.y_test)
            accuracies = [accuracy for _, accuracy in local_metrics]
            records.append(
                RoundRecord(
                    round=server_round,
                    local_accuracy_mean=float(np.mean(accuracies)),
                    local_accuracy_min=min(accuracies),
                    local_accuracy_max=max(accuracies),
                    local_loss_mean=float(np.mean([loss for loss, _ in local_metrics])),
                    averaged_accuracy=averaged_accuracy,
                    averaged_loss=averaged_loss,
                )
            )
    return RunResult(
        rounds=tuple(records),
        averaged_state=_torch_state(global_arrays),
        seconds=time.perf_counter() - started,
        update_rms=meter.mean,
        layer_rms=_layer_rms(global_arrays),
    )


def run_serial_baseline(
    config: ExperimentConfig,
    seed: int,
    *,
    large_batch: bool = False,
    data: LearnerData | None = None,
    device: torch.device | None = None,
) -> SerialResult:
    """Train one model with SGD on the union of the learners' data.

    Parameters
    ----------
    config : ExperimentConfig
        The experiment whose learners' data and budget the baseline matches.
    seed : int
        The run's seed (same initial model as the learners).
    large_batch : bool (default: False)
        ``False``: ``learners * b * rounds`` steps of batch B, the samples
        all learners see together. ``True``: ``b * rounds`` steps of batch
        ``learners * B``, the same samples in as many steps as one learner.
    data : LearnerData | None (default: None)
        The learners' data; loaded here when ``None``.
    device : torch.device | None (default: None)
        Where to train; ``None`` is ``get_device()``.

    Returns
    -------
    SerialResult
        The baseline's test accuracy and loss.

    """
    check_int("seed", seed, 0)
    started = time.perf_counter()
    device = get_device() if device is None else device
    data = load_learner_data(config, seed, device) if data is None else data
    local_steps_total = config.local_steps * config.rounds
    if large_batch:
        steps, batch_size = local_steps_total, config.learners * config.batch_size
    else:
        steps, batch_size = config.learners * local_steps_total, config.batch_size
    model = build_model(config.model, data.input_shape, data.num_classes, seed=seed).to(
        device
    )
    train_steps(
        model,
        torch.cat(data.x),
        torch.cat(data.y),
        steps=steps,
        batch_size=batch_size,
        learning_rate=config.learning_rate,
        generator=torch_generator(
            seed,
            client=SERIAL_LARGE_BATCH_CLIENT if large_batch else SERIAL_CLIENT,
            server_round=0,
            purpose=DATA_PURPOSE,
        ),
    )
    loss, accuracy = evaluate(model, data.x_test, data.y_test)
    return SerialResult(
        accuracy=accuracy,
        loss=loss,
        steps=steps,
        batch_size=min(batch_size, sum(data.sizes)),
        seconds=time.perf_counter() - started,
    )
