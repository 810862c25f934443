"""The App's run config, validated into an ``AppConfig`` and its ``NoiseSpec``s.

Every key of ``[tool.flwr.app.config]`` (and of ``flwr run --run-config``) is
checked before training starts; a bad value raises one ``ValueError`` or
``TypeError`` (``flwr_noise.validation``'s format) that names the key, the
value and what is allowed, e.g.::

    run config 'model'='resnet' is not allowed: expected one of 'linear',
    'mlp', 'cnn', 'deep-tanh'

Keys that become ``NoiseSpec`` fields are checked by ``NoiseSpec``'s own
rules, under the run config key (``NoiseSpec.check_field``)::

    run config 'local-noise-std'=-1 is not allowed: expected a finite number
    in [0, 1e+06]

Types follow TOML: ints are ints (``true`` is not an int; a float with an
integral value such as ``20.0`` is accepted as ``20``), numbers may be ints or
floats, strings are strings and flags are booleans. ``noise-include`` and
``noise-exclude`` are comma-separated lists of regular expressions over
parameter names (so a pattern cannot itself contain a comma).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flwr_noise.spec import NoiseSpec
from flwr_noise.validation import (
    allowed_choices,
    check_integer,
    check_patterns,
    check_real,
    choice_checker,
    is_real,
    not_allowed,
)
from flwr_noise_app.tasks.data import DATASETS, PARTITION_SCHEMES, check_seed
from flwr_noise_app.tasks.models import MODELS

RunConfigValue = bool | int | float | str

# Longest run name: far below every file system's 255-byte limit for the
# folder, with room for the files and temporary files written inside it.
MAX_RUN_NAME_LENGTH = 100
_RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RUN_NAME_EXPECTED = (
    f"at most {MAX_RUN_NAME_LENGTH} letters, digits, '.', '_' and '-', "
    "starting with a letter or digit"
)


def key_label(key: str) -> str:
    """Return how validation messages name the run config key ``key``."""
    return f"run config {key!r}"


def check_run_name(label: str, value: Any) -> str:
    """Return ``value`` if it is a valid run folder name, else raise.

    A valid name has at most ``MAX_RUN_NAME_LENGTH`` letters, digits, ``.``,
    ``_`` and ``-``, and starts with a letter or digit (no path separators,
    no hidden folders).

    Raises
    ------
    TypeError
        If the name is not a str.
    ValueError
        If it is not a valid name.

    """
    if not isinstance(value, str):
        raise not_allowed(label, value, f"a str of {_RUN_NAME_EXPECTED}", TypeError)
    if len(value) > MAX_RUN_NAME_LENGTH or not _RUN_NAME_PATTERN.fullmatch(value):
        raise not_allowed(label, value, _RUN_NAME_EXPECTED)
    return value


def _integral(value: Any) -> Any:
    """TOML convenience: ``20.0`` means ``20``."""
    if is_real(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return value


def _integer(low: int) -> Callable[[str, Any], int]:
    def parse(label: str, value: Any) -> int:
        return check_integer(label, _integral(value), low=low)

    return parse


def _seed(label: str, value: Any) -> int:
    return check_seed(label, _integral(value))


def _real(
    *, above: float | None = None, at_most: float | None = None
) -> Callable[[str, Any], float]:
    def parse(label: str, value: Any) -> float:
        return check_real(label, value, low=above, high=at_most, low_open=True)

    return parse


def _text(*, required: bool = False) -> Callable[[str, Any], str]:
    expected = "a non-empty str" if required else "a str"

    def parse(label: str, value: Any) -> str:
        if not isinstance(value, str):
            raise not_allowed(label, value, expected, TypeError)
        if required and not value.strip():
            raise not_allowed(label, value, expected)
        return value

    return parse


def _run_name(label: str, value: Any) -> str:
    if value == "":
        return value  # an automatic name
    return check_run_name(label, value)


_RESUME_EXPECTED = (
    "'' (a new run), or the name (in results-dir) or the path of the "
    "folder of an earlier run to continue from its last checkpoint"
)


def _resume(label: str, value: Any) -> str:
    if not isinstance(value, str):
        raise not_allowed(label, value, _RESUME_EXPECTED, TypeError)
    if value and (not value.strip() or "\n" in value or "\0" in value):
        raise not_allowed(label, value, _RESUME_EXPECTED)
    return value


def _spec_field(name: str) -> Callable[[str, Any], Any]:
    """Validate one ``NoiseSpec`` field under its run config key.

    ``NoiseSpec`` owns the rules (allowed distributions, ranges, valid
    regular expressions); the error names the run config key.
    ``noise-include`` / ``noise-exclude`` take a comma-separated string.
    """
    if name not in ("include", "exclude"):
        return lambda label, value: NoiseSpec.check_field(name, label, value)

    def parse(label: str, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return check_patterns(label, value)
        if not isinstance(value, str):
            raise not_allowed(
                label, value, "a comma-separated str of regular expressions", TypeError
            )
        parts = tuple(part.strip() for part in value.split(",") if part.strip())
        return check_patterns(label, parts, written=value)

    return parse


def _decay_override(label: str, value: Any) -> float | None:
    """``""`` (``None`` here): the kind takes ``noise-decay``; else a decay."""
    if value == "" or value is None:
        return None
    if not is_real(value):
        raise not_allowed(
            label, value, "'' (use noise-decay) or a number in (0, 1]", TypeError
        )
    return _spec_field("decay")(label, value)


def _decay_to_run_config(value: float | None) -> RunConfigValue:
    return "" if value is None else value


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
        ``model``: a name in ``tasks.models.MODELS`` ("linear", "mlp", "cnn",
        "deep-tanh").
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
        ``run-name``: the run folder's name (at most ``MAX_RUN_NAME_LENGTH``
        letters, digits, ``.``, ``_``, ``-``); empty makes one from the time
        and a hash of the config.
    round_timeout : float
        ``round-timeout``: seconds the server waits for the replies of one
        round, finite and ``> 0``; a SuperNode that has not answered by then
        (dead, disconnected) is left out of that round.
    min_nodes : int
        ``min-nodes``: the server waits (up to ``round-timeout`` seconds) for
        this many connected SuperNodes before the first round, and samples
        from at least this many every round.
    local_noise_decay, broadcast_noise_decay, aggregation_noise_decay
        ``<kind>-noise-decay``: the exponential schedule's decay of that kind
        of noise, in ``(0, 1]``; ``""`` in the run config (``None`` here)
        takes ``noise-decay``. Local noise decays once per step (or round,
        with ``noise-schedule-unit="round"``), broadcast and aggregation noise
        once per round, so one decay rarely suits all three.
    noise_correlation : str
        ``noise-correlation``: ``"independent"`` (the paper's noise) or
        ``"anticorrelated"`` (each step's draw is removed before the next is
        added); local noise only.
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
    model: str = _key("mlp", choice_checker(MODELS))
    dataset: str = _key("digits", choice_checker(DATASETS))
    data_dir: str = _key("", _text())
    seed: int = _key(0, _seed)
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
    partitioning: str = _key("iid", choice_checker(PARTITION_SCHEMES))
    dirichlet_alpha: float = _key(0.5, _real(above=0.0))
    fraction_train: float = _key(1.0, _real(above=0.0, at_most=1.0))
    num_partitions: int = _key(0, _integer(0))
    run_name: str = _key("", _run_name)
    min_nodes: int = _key(1, _integer(1))
    round_timeout: float = _key(300.0, _real(above=0.0))
    resume: str = _key("", _resume)
    local_noise_decay: float | None = _key(None, _decay_override, _decay_to_run_config)
    broadcast_noise_decay: float | None = _key(
        None, _decay_override, _decay_to_run_config
    )
    aggregation_noise_decay: float | None = _key(
        None, _decay_override, _decay_to_run_config
    )
    noise_correlation: str = _key("independent", _spec_field("correlation"))

    def __post_init__(self) -> None:
        for config_field in fields(self):
            parse = config_field.metadata[_PARSE]
            value = getattr(self, config_field.name)
            value = parse(key_label(_run_config_key(config_field.name)), value)
            object.__setattr__(self, config_field.name, value)
        # Combinations NoiseSpec may refuse (checked on the specs the run uses).
        self.local_spec()
        self.broadcast_spec()
        self.aggregation_spec()

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
        _check_run_config_keys(run_config)
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
        extra: dict[str, Any] = {
            "schedule_unit": self.noise_schedule_unit,
            "correlation": self.noise_correlation,
        }
        return _noise_spec(
            self, "local", self.local_noise_std, self.local_noise_decay, extra
        )

    def broadcast_spec(self) -> NoiseSpec | None:
        """Noise added to each client's copy of the global model, or ``None``.

        It is applied once per round, so its schedule counts rounds
        (``schedule_unit="round"``), whatever ``noise-schedule-unit`` says;
        the same holds for the aggregation noise.
        """
        return _noise_spec(
            self, "broadcast", self.broadcast_noise_std, self.broadcast_noise_decay
        )

    def aggregation_spec(self) -> NoiseSpec | None:
        """Noise added to the aggregated model, or ``None``."""
        return _noise_spec(
            self,
            "aggregation",
            self.aggregation_noise_std,
            self.aggregation_noise_decay,
        )


def _check_run_config_keys(run_config: Any) -> None:
    """Raise unless ``run_config`` is a mapping of known run config keys."""
    if not isinstance(run_config, Mapping):
        raise not_allowed(
            "run config",
            run_config,
            "a mapping of run config keys to values",
            TypeError,
        )
    for name in run_config:
        if name not in RUN_CONFIG_KEYS:
            close = difflib.get_close_matches(str(name), RUN_CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise not_allowed(
                "run config key",
                name,
                f"a key of [tool.flwr.app.config]{hint}: "
                + allowed_choices(RUN_CONFIG_KEYS),
            )


def _noise_spec(
    config: AppConfig,
    kind: str,
    std: float,
    decay: float | None,
    extra: Mapping[str, Any] | None = None,
) -> NoiseSpec | None:
    """Return one kind of noise of ``config``; errors name its run config keys."""
    if std == 0:
        return None
    extra = {"schedule_unit": "round", **(extra or {})}
    # The run config key each field comes from, for the error message.
    keys = {
        "std": f"{kind}-noise-std",
        "decay": "noise-decay" if decay is None else f"{kind}-noise-decay",
        "seed": "seed",
    }
    return NoiseSpec.from_fields(
        {
            "std": std,
            "distribution": config.noise_distribution,
            "mode": config.noise_mode,
            "relative": config.noise_relative,
            "schedule": config.noise_schedule,
            "decay": config.noise_decay if decay is None else decay,
            "gamma": config.noise_gamma,
            "include": config.noise_include,
            "exclude": config.noise_exclude,
            "seed": config.seed,
            **extra,
        },
        lambda name: key_label(keys.get(name, "noise-" + _run_config_key(name))),
    )


RUN_CONFIG_KEYS: tuple[str, ...] = tuple(
    _run_config_key(config_field.name) for config_field in fields(AppConfig)
)
DEFAULT_RUN_CONFIG: dict[str, RunConfigValue] = AppConfig().to_dict()


def main(argv: list[str] | None = None) -> int:
    """Check ``--run-config`` overrides before ``flwr run``; name a bad key.

    Flower 1.39's SuperLink refuses a key that ``[tool.flwr.app.config]``
    lacks before the ServerApp runs, and ``flwr run`` prints only "Invalid run
    configuration."; this names the key (and the closest known one)::

        python -m flwr_noise_app.config "local-noize-std=0.1 model='cnn'"

    Returns
    -------
    int
        ``0`` when every key and value is allowed, else ``2``.

    """
    import sys

    from flwr.common.config import parse_config_args

    args = sys.argv[1:] if argv is None else argv
    try:
        config = AppConfig.from_run_config(parse_config_args(args))
    except (TypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, value in config.to_dict().items():
        print(f"{key} = {value!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
