"""The paper's experiment in one process: m learners with periodic averaging.

Each of ``learners`` learners trains its own copy of the model with mini-batch
SGD on its own partition; every ``local_steps`` (b) steps all local models are
replaced by their average. This is FedAvg with every client in every round, so
the runner runs the bundled Flower App's strategy, and trains its learners as
the App's ClientApp does, with the same seeds:

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
- the server is the App's: Flower's ``FedAvg`` wrapped in
  ``flwr_noise.NoisyStrategy``, which adds the received (broadcast) and the
  aggregation noise, run by Flower's ``Strategy.start`` on an in-memory
  ``FunctionGrid`` whose nodes are the learners (node k + 1 is learner k,
  whose client key is k).

Besides the federated run it trains the two serial baselines of the paper:
one model with SGD over the union of the learners' data for ``learners * b *
rounds`` steps of batch B (the same number of samples), and one with batch
``learners * B`` for ``b * rounds`` steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import FedAvg
from torch import nn

from flwr_noise import validation
from flwr_noise.hook import WeightNoise
from flwr_noise.seeding import torch_generator
from flwr_noise.spec import DISTRIBUTIONS, SCHEDULES, NoiseSpec
from flwr_noise.strategy import NoisyStrategy
from flwr_noise_app.grid import FunctionGrid
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
# The metric FedAvg weighs the learners' models by.
NUM_EXAMPLES = "num-examples"
# Client keys of the serial baselines' mini-batch streams (no learner has them).
SERIAL_CLIENT = "serial"
SERIAL_LARGE_BATCH_CLIENT = "serial-large-batch"
# NoiseSpec.correlation: "independent" (the paper's kept noise, the default)
# or "anticorrelated" (Anti-PGD: the previous draw is removed before the next).
INDEPENDENT = "independent"
CORRELATIONS: tuple[str, ...] = (INDEPENDENT, "anticorrelated")


def _path(label: str, value: Any) -> str:
    if not isinstance(value, str):
        raise validation.not_allowed(label, value, "a str path", TypeError)
    return value


def _positive_int(label: str, value: Any) -> int:
    return validation.check_integer(label, value, low=1)


def _optional_positive_int(label: str, value: Any) -> int | None:
    return None if value is None else _positive_int(label, value)


def _real_above_zero(label: str, value: Any) -> float:
    return validation.check_real(label, value, low=0, low_open=True)


def _real_at_least_zero(label: str, value: Any) -> float:
    return validation.check_real(label, value, low=0.0)


# ExperimentConfig's fields in the order they are checked: (name, check, whether
# the checked value replaces the given one); then the combinations are checked.
_EXPERIMENT_FIELDS: tuple[tuple[str, Callable[[str, Any], Any], bool], ...] = (
    ("dataset", validation.choice_checker(DATASETS), False),
    ("data_dir", _path, False),
    ("model", validation.choice_checker(MODELS), False),
    ("learners", _positive_int, False),
    ("local_steps", _positive_int, False),
    ("rounds", _positive_int, False),
    ("batch_size", _positive_int, False),
    ("images_per_learner", _optional_positive_int, False),
    ("learning_rate", _real_above_zero, True),
    ("dirichlet_alpha", _real_above_zero, True),
    ("noise_std", _real_at_least_zero, True),
    ("schedule", validation.choice_checker(SCHEDULES), False),
    ("relative", validation.check_bool, False),
    ("record_rounds", validation.check_bool, False),
    ("placement", validation.choice_checker((*PLACEMENTS, NO_NOISE)), False),
    ("distribution", validation.choice_checker(DISTRIBUTIONS), False),
    ("partitioning", validation.choice_checker(PARTITION_SCHEMES), False),
    ("correlation", validation.choice_checker(CORRELATIONS), False),
    ("sam_rho", _real_at_least_zero, True),
)


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
        for name, check, store in _EXPERIMENT_FIELDS:
            value = check(name, getattr(self, name))
            if store:
                object.__setattr__(self, name, value)
        _check_combinations(self)

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


def _check_combinations(config: ExperimentConfig) -> None:
    """Refuse the field combinations an experiment cannot run."""
    if config.placement == NO_NOISE and config.noise_std > 0:
        raise validation.not_allowed(
            "placement",
            config.placement,
            f"{validation.allowed_choices(PLACEMENTS)} with noise_std="
            f"{config.noise_std!r}",
        )
    if (
        config.correlation != INDEPENDENT
        and config.noise_enabled
        and config.placement != "local"
    ):
        raise validation.not_allowed(
            "correlation",
            config.correlation,
            f"{INDEPENDENT!r} with placement={config.placement!r} (noise added "
            "once per round has no previous draw to remove)",
        )


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
                raise validation.not_allowed(
                    "images_per_learner",
                    config.images_per_learner,
                    f"at most {len(y)}: learner {learner} has only {len(y)} of "
                    f"the {len(data.y_train)} {config.dataset} training images "
                    f"({config.partitioning} partitioning into {config.learners} "
                    "learners)",
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


def _evaluated_rounds(config: ExperimentConfig) -> set[int]:
    if config.record_rounds:
        return set(range(1, config.rounds + 1))
    return {config.rounds}


@contextmanager
def _quiet_flower(threshold: int = logging.WARNING) -> Iterator[None]:
    """Keep Flower's log lines below ``threshold`` out of the runner's output."""
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(max(level, threshold))
    try:
        yield
    finally:
        FLOWER_LOGGER.setLevel(level)


class _Learners:
    """The learners as in-process ClientApps: the ``reply_fn`` of a FunctionGrid.

    Node ``k + 1`` is learner k. Each train message is handled as the App's
    ClientApp handles it: the received arrays are loaded into one working
    model, trained with plain SGD (and the local noise), evaluated when the
    round is recorded, and sent back with the learner's number of examples.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        seed: int,
        data: LearnerData,
        model: nn.Module,
        device: torch.device,
    ) -> None:
        self.config = config
        self.seed = seed
        self.data = data
        self.model = model
        self.spec = config.noise_spec(seed)
        self.evaluated_rounds = _evaluated_rounds(config)
        # One meter per learner, summed in learner order: the same total
        # whatever order the strategy sends the messages in.
        self.meters = [_UpdateMeter(device) for _ in range(config.learners)]
        # server round -> learner -> (test loss, test accuracy) after training.
        self.metrics: dict[int, dict[int, tuple[float, float]]] = {}

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.config.learners + 1))

    @staticmethod
    def learner_of(node_id: int) -> int:
        return node_id - 1

    def update_rms(self) -> float:
        steps = sum(meter.steps for meter in self.meters)
        if not steps:
            return math.nan
        total = sum(float(meter.total) for meter in self.meters)
        return total / steps

    def __call__(self, message: Message) -> Message:
        config = self.config
        learner = self.learner_of(message.metadata.dst_node_id)
        server_round = int(message.content["config"]["server-round"])
        model = self.model
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        optimizer = make_optimizer(model, config.learning_rate)
        handles = [self.meters[learner].attach(optimizer)]
        if config.noise_enabled and config.placement == "local":
            noise = WeightNoise(
                model,
                self.spec,
                client=learner,
                server_round=server_round,
                start_step=(server_round - 1) * config.local_steps,
                purpose="local",
                track_norm=False,
            )
            handles.append(noise.attach(optimizer))
        train_steps(
            model,
            self.data.x[learner],
            self.data.y[learner],
            steps=config.local_steps,
            batch_size=config.batch_size,
            optimizer=optimizer,
            generator=torch_generator(
                self.seed,
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
        if server_round in self.evaluated_rounds:
            self.metrics.setdefault(server_round, {})[learner] = evaluate(
                model, self.data.x_test, self.data.y_test
            )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({NUM_EXAMPLES: self.data.sizes[learner]}),
            }
        )
        return Message(content, reply_to=message)


def _strategy(config: ExperimentConfig, spec: NoiseSpec) -> NoisyStrategy:
    """NoisyStrategy(FedAvg) with every learner in every round, as in the App."""
    server_spec = spec if config.noise_enabled else None
    # Without its warning that fraction_evaluate=0 skips federated evaluation.
    with _quiet_flower(logging.ERROR):
        fedavg = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=config.learners,
            min_available_nodes=config.learners,
            weighted_by_key=NUM_EXAMPLES,
        )
    return NoisyStrategy(
        fedavg,
        broadcast=server_spec if config.placement == "received" else None,
        aggregation=server_spec if config.placement == "aggregation" else None,
        client_key_fn=_Learners.learner_of,
    )


def run_experiment(
    config: ExperimentConfig,
    seed: int,
    *,
    data: LearnerData | None = None,
    device: torch.device | None = None,
) -> RunResult:
    """Run the learners with periodic averaging and the configured noise.

    The server is Flower's ``FedAvg`` wrapped in ``flwr_noise.NoisyStrategy``
    (which adds the received and the aggregation noise), run by its own
    ``start`` on a ``FunctionGrid`` whose nodes are the learners.

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
    validation.check_integer("seed", seed, low=0)
    started = time.perf_counter()
    device = get_device() if device is None else device
    data = load_learner_data(config, seed, device) if data is None else data
    # One working model, loaded with each learner's weights in turn, like a
    # ClientApp that builds a model and loads the received arrays into it.
    model = build_model(config.model, data.input_shape, data.num_classes, seed=seed).to(
        device
    )
    learners = _Learners(config, seed, data, model, device)
    records: list[RoundRecord] = []
    # The global model after each round: the aggregate, or the previous model
    # when the strategy skipped the round (no usable reply, non-finite model).
    global_arrays = ArrayRecord(model.state_dict())

    def evaluate_averaged(server_round: int, arrays: ArrayRecord) -> None:
        nonlocal global_arrays
        global_arrays = arrays
        if server_round not in learners.evaluated_rounds:
            return
        model.load_state_dict(arrays.to_torch_state_dict())
        averaged_loss, averaged_accuracy = evaluate(model, data.x_test, data.y_test)
        local_metrics = [
            metrics for _, metrics in sorted(learners.metrics.pop(server_round).items())
        ]
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

    with _quiet_flower():
        _strategy(config, learners.spec).start(
            grid=FunctionGrid(learners.node_ids, learners, keep_pushed=False),
            initial_arrays=global_arrays,
            num_rounds=config.rounds,
            evaluate_fn=evaluate_averaged,
        )
    averaged = {name: array.numpy() for name, array in global_arrays.items()}
    return RunResult(
        rounds=tuple(records),
        averaged_state=global_arrays.to_torch_state_dict(),
        seconds=time.perf_counter() - started,
        update_rms=learners.update_rms(),
        layer_rms=_layer_rms(averaged),
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
    validation.check_integer("seed", seed, low=0)
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
