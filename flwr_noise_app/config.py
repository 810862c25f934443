"""The App's run config, validated into an ``AppConfig`` and its ``NoiseSpec``s.

Every key of ``[tool.flwr.app.config]`` (and of ``flwr run --run-config``) is
checked before training starts; a bad value raises one ``ValueError`` or
``TypeError`` that names the key, the value and what is allowed, e.g.::

    run config key 'model' = 'resnet' is not allowed: expected one of
    'linear', 'mlp', 'cnn'

Types follow TOML: ints are ints (``true`` is not an int; a float with an
integral value such as ``20.0`` is accepted as ``20``), numbers may be ints or
floats, strings are strings and flags are booleans. ``noise-include`` and
``noise-exclude`` are comma-separated lists of regular expressions over
parameter names (so a pattern cannot itself contain a comma).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flwr_noise.spec import NoiseSpec
from flwr_noise_app.results import validate_run_name
from flwr_noise_app.tasks.data import DATASETS, PARTITION_SCHEMES
from flwr_noise_app.tasks.models import MODELS

RunConfigValue = bool | int | float | str

# The largest seed every consumer takes (scikit-learn's split seed is 32-bit).
MAX_SEED = 2**32 - 1


def _reason(error: BaseException) -> str:
    """Return the part of a validation message after "is not allowed: "."""
    message = str(error)
    _, found, reason = message.partition("is not allowed: ")
    return reason if found else message


def _not_allowed(
    key: str, value: Any, reason: str, error: type[Exception]
) -> Exception:
    return error(f"run config key {key!r} = {value!r} is not allowed: {reason}")


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str, Any], int]:
    expected = (
        f"an int >= {minimum}"
        if maximum is None
        else f"an int from {minimum} to {maximum}"
    )

    def parse(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _not_allowed(key, value, f"expected {expected}", TypeError)
        if isinstance(value, numbers.Integral):
            number = int(value)
        elif math.isfinite(value) and float(value).is_integer():
            number = int(value)  # TOML convenience: 20.0 means 20
        else:
            raise _not_allowed(key, value, f"expected {expected}", ValueError)
        if number < minimum or (maximum is not None and number > maximum):
            raise _not_allowed(key, value, f"expected {expected}", ValueError)
        return number

    return parse


def _real(
    *, above: float | None = None, at_most: float | None = None
) -> Callable[[str, Any], float]:
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_most is not None:
        bounds.append(f"<= {at_most:g}")
    expected = "a finite number " + " and ".join(bounds)

    def parse(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _not_allowed(key, value, f"expected {expected}", TypeError)
        number = float(value)
        if (
            not math.isfinite(number)
            or (above is not None and number <= above)
            or (at_most is not None and number > at_most)
        ):
            raise _not_allowed(key, value, f"expected {expected}", ValueError)
        return number

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    expected = "expected one of " + ", ".join(repr(option) for option in options)

    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _not_allowed(key, value, expected, TypeError)
        if value not in options:
            raise _not_allowed(key, value, expected, ValueError)
        return value

    return parse


def _text(*, required: bool = False) -> Callable[[str, Any], str]:
    expected = "expected a non-empty string" if required else "expected a string"

    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _not_allowed(key, value, expected, TypeError)
        if required and not value.strip():
            raise _not_allowed(key, value, expected, ValueError)
        return value

    return parse


def _run_name(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _not_allowed(key, value, "expected a string", TypeError)
    if not value:
        return value
    try:
        return validate_run_name(value)
    except ValueError as error:
        raise _not_allowed(key, value, _reason(error), ValueError) from None


_RESUME_EXPECTED = (
    "expected '' (a new run), or the name (in results-dir) or the path of the "
    "folder of an earlier run to continue from its last checkpoint"
)


def _resume(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _not_allowed(key, value, _RESUME_EXPECTED, TypeError)
    if value and (not value.strip() or "\n" in value or "\0" in value):
        raise _not_allowed(key, value, _RESUME_EXPECTED, ValueError)
    return value


def _spec_field(name: str) -> Callable[[str, Any], Any]:
    """Validate one ``NoiseSpec`` field by building a spec with it.

    ``NoiseSpec`` owns the rules (allowed distributions, ranges, valid
    regular expressions); its message is re-worded to name the run config
    key. ``noise-include`` / ``noise-exclude`` take a comma-separated string.
    """
    patterns = name in ("include", "exclude")
    expected_patterns = "expected a comma-separated list of regular expressions"

    def parse(key: str, value: Any) -> Any:
        candidate = value
        if patterns and isinstance(value, str):
            candidate = tuple(part.strip() for part in value.split(",") if part.strip())
        try:
            spec = NoiseSpec(**{name: candidate})
        except TypeError as error:
            reason = expected_patterns if patterns else _reason(error)
            raise _not_allowed(key, value, reason, TypeError) from None
        except ValueError as error:
            reason = _reason(error)
            if patterns:  # keep which pattern is bad, say what the key takes
                reason = f"{reason.split('; expected')[0]}; {expected_patterns}"
            raise _not_allowed(key, value, reason, ValueError) from None
        return getattr(spec, name)

    return parse


def _patterns_to_run_config(patterns: tuple[str, ...]) -> str:
    return ",".join(patterns)


_PARSE = "parse"
_TO_RUN_CONFIG = "to_run_config"


def _run_config_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _key(
    default: Any,
    parse: Callable[[str, Any], Any],
    to_run_config: Callable[[Any], RunConfigValue] | None = None,
) -> Any:
    """Declare an ``AppConfig`` field: its default, parser and run config form."""
    return field(
        default=default,
        metadata={_PARSE: parse, _TO_RUN_CONFIG: to_run_config},
    )


@dataclass(frozen=True)
class AppConfig:
    """The App's validated run config.

    Build it with ``AppConfig.from_run_config(context.run_config)``. Field
    names are the run config keys in snake_case; the values are validated
    (also when the class is built directly), so a bad one raises a
    ``ValueError`` or ``TypeError`` naming its run config key.

    Attributes
    ----------
    num_server_rounds : int
        ``num-server-rounds``: rounds of training, ``>= 1``.
    local_steps : int
        ``local-steps``: mini-batch SGD steps per client and round (the
        paper's b), ``>= 1``.
    batch_size : int
        ``batch-size``: mini-batch size, ``>= 1``.
    learning_rate : float
        ``learning-rate``: SGD step size, finite and ``> 0``.
    model : str
        ``model``: one of ``"linear"``, ``"mlp"``, ``"cnn"``.
    dataset : str
        ``dataset``: ``"digits"`` or ``"mnist"``.
    data_dir : str
        ``data-dir``: folder of MNIST IDX files; empty downloads MNIST with
        Flower Datasets. Its existence is checked where the data is loaded
        (the clients' machines), not here.
    seed : int
        ``seed``: seed of the model init, data split, partitioning, batches
        and noise, ``0 <= seed <= 2**32 - 1``.
    local_noise_std, broadcast_noise_std, aggregation_noise_std : float
        Base sigma (``>= 0``; ``0`` is off) of the noise added during local
        training, to each client's copy of the global model, and to the
        aggregate.
    noise_distribution, noise_mode, noise_relative : str, str, bool
        Shared by the three kinds of noise (``noise-distribution``, ...); see
        ``NoiseSpec``.
    noise_schedule, noise_decay, noise_gamma, noise_schedule_unit
        The noise schedule shared by the three kinds of noise; see
        ``NoiseSpec``.
    noise_include, noise_exclude : tuple[str, ...]
        Regular expressions over parameter names (comma-separated in the run
        config); empty include means every parameter.
    results_dir : str
        ``results-dir``: where the run folder is written.
    partitioning : str
        ``partitioning``: ``"iid"`` or ``"dirichlet"``.
    dirichlet_alpha : float
        ``dirichlet-alpha``: concentration of the label skew, ``> 0``.
    fraction_train : float
        ``fraction-train``: fraction of the clients trained each round,
        ``0 < f <= 1``.
    num_partitions : int
        ``num-partitions``: number of data partitions; ``0`` takes it from
        each node's config (``num-partitions`` node config key).
    run_name : str
        ``run-name``: the run folder's name; empty makes one from the time
        and a hash of the config.
    round_timeout : float
        ``round-timeout``: seconds the server waits for the replies of one
        round, finite and ``> 0``; a SuperNode that has not answered by then
        (dead, disconnected) is left out of that round.
    min_nodes : int
        ``min-nodes``: the server waits (up to ``round-timeout`` seconds) for
        this many connected SuperNodes before the first round, and samples
        from at least this many every round.
    resume : str
        ``resume``: ``""`` starts a new run; the name of a run folder in
        ``results-dir``, or the path of one, continues that run from its last
        checkpoint (see ``flwr_noise_app.checkpoint``). That the folder and its
        checkpoint exist is checked by the ServerApp before anything runs.

    """

    num_server_rounds: int = _key(5, _integer(1))
    local_steps: int = _key(20, _integer(1))
    batch_size: int = _key(16, _integer(1))
    learning_rate: float = _key(0.05, _real(above=0.0))
    model: str = _key("mlp", _choice(MODELS))
    dataset: str = _key("digits", _choice(DATASETS))
    data_dir: str = _key("", _text())
    seed: int = _key(0, _integer(0, MAX_SEED))
    local_noise_std: float = _key(0.01, _spec_field("std"))
    broadcast_noise_std: float = _key(0.0, _spec_field("std"))
    aggregation_noise_std: float = _key(0.0, _spec_field("std"))
    results_dir: str = _key("results", _text(required=True))
    noise_distribution: str = _key("gaussian", _spec_field("distribution"))
    noise_mode: str = _key("additive", _spec_field("mode"))
    noise_relative: bool = _key(False, _spec_field("relative"))
    noise_schedule: str = _key("constant", _spec_field("schedule"))
    noise_decay: float = _key(0.99, _spec_field("decay"))
    noise_gamma: float = _key(0.55, _spec_field("gamma"))
    noise_schedule_unit: str = _key("step", _spec_field("schedule_unit"))
    noise_include: tuple[str, ...] = _key(
        (), _spec_field("include"), _patterns_to_run_config
    )
    noise_exclude: tuple[str, ...] = _key(
        (), _spec_field("exclude"), _patterns_to_run_config
    )
    partitioning: str = _key("iid", _choice(PARTITION_SCHEMES))
    dirichlet_alpha: float = _key(0.5, _real(above=0.0))
    fraction_train: float = _key(1.0, _real(above=0.0, at_most=1.0))
    num_partitions: int = _key(0, _integer(0))
    run_name: str = _key("", _run_name)
    min_nodes: int = _key(1, _integer(1))
    round_timeout: float = _key(300.0, _real(above=0.0))
    resume: str = _key("", _resume)

    def __post_init__(self) -> None:
        for config_field in fields(self):
            parse = config_field.metadata[_PARSE]
            value = getattr(self, config_field.name)
            value = parse(_run_config_key(config_field.name), value)
            object.__setattr__(self, config_field.name, value)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Validate a Flower run config.

        Parameters
        ----------
        run_config : Mapping[str, Any]
            ``context.run_config``, or any mapping of run config keys; a
            missing key takes its default (``DEFAULT_RUN_CONFIG``).

        Returns
        -------
        config : AppConfig
            The validated config.

        Raises
        ------
        ValueError
            If a key is unknown or a value is out of range; the message names
            the key, the value and what is allowed.
        TypeError
            If a value has the wrong type, or ``run_config`` is not a mapping.

        """
        if not isinstance(run_config, Mapping):
            raise TypeError(
                f"run config of type {type(run_config).__name__} is not allowed: "
                "expected a mapping of run config keys to values"
            )
        for name in run_config:
            if name not in RUN_CONFIG_KEYS:
                close = difflib.get_close_matches(str(name), RUN_CONFIG_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"run config key {name!r} is not known{hint}: expected one of "
                    + ", ".join(repr(known) for known in RUN_CONFIG_KEYS)
                )
        return cls(
            **{
                config_field.name: run_config[key]
                for config_field in fields(cls)
                if (key := _run_config_key(config_field.name)) in run_config
            }
        )

    def to_dict(self) -> dict[str, RunConfigValue]:
        """Return the whole config keyed by run config key, as the run config writes it.

        ``AppConfig.from_run_config(config.to_dict()) == config``.
        """
        result: dict[str, RunConfigValue] = {}
        for config_field in fields(self):
            value = getattr(self, config_field.name)
            to_run_config = config_field.metadata[_TO_RUN_CONFIG]
            key = _run_config_key(config_field.name)
            result[key] = to_run_config(value) if to_run_config else value
        return result

    def local_spec(self) -> NoiseSpec | None:
        """Noise added during local training, or ``None`` when it is off."""
        return self._noise_spec(self.local_noise_std)

    def broadcast_spec(self) -> NoiseSpec | None:
        """Noise added to each client's copy of the global model, or ``None``."""
        return self._noise_spec(self.broadcast_noise_std)

    def aggregation_spec(self) -> NoiseSpec | None:
        """Noise added to the aggregated model, or ``None``."""
        return self._noise_spec(self.aggregation_noise_std)

    def _noise_spec(self, std: float) -> NoiseSpec | None:
        if std == 0:
            return None
        return NoiseSpec(
            std=std,
            distribution=self.noise_distribution,
            mode=self.noise_mode,
            relative=self.noise_relative,
            schedule=self.noise_schedule,
            decay=self.noise_decay,
            gamma=self.noise_gamma,
            schedule_unit=self.noise_schedule_unit,
            include=self.noise_include,
            exclude=self.noise_exclude,
            seed=self.seed,
        )


RUN_CONFIG_KEYS: tuple[str, ...] = tuple(
    _run_config_key(config_field.name) for config_field in fields(AppConfig)
)
DEFAULT_RUN_CONFIG: dict[str, RunConfigValue] = AppConfig().to_dict()
