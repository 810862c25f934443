"""NoiseSpec: an immutable, validated description of one kind of weight noise."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from flwr_noise.validation import (
    allowed_choices,
    check_bool,
    check_patterns,
    check_real,
    choice_checker,
    is_integer,
    not_allowed,
)

DISTRIBUTIONS = ("gaussian", "uniform", "laplace")
MODES = ("additive", "multiplicative")
SCHEDULES = ("constant", "exponential", "inverse-sqrt", "polynomial")
SCHEDULE_UNITS = ("step", "round")
CORRELATIONS = ("independent", "anticorrelated")
# Upper bound of std: beyond it no noise is meaningful, and draws such as a
# uniform on [-sqrt(3) std, sqrt(3) std] would overflow.
MAX_STD = 1e6
SEED_LIMIT = 2**63
# A ConfigRecord cannot carry None, so "no seed" travels as this value.
CONFIG_NO_SEED = -1

ConfigValue = int | float | str | bool | list[str]


def _validate_std(label: str, value: Any) -> float:
    return check_real(label, value, low=0.0, high=MAX_STD)


def _validate_decay(label: str, value: Any) -> float:
    return check_real(label, value, low=0.0, high=1.0, low_open=True)


def _validate_gamma(label: str, value: Any) -> float:
    return check_real(label, value, low=0.0, low_open=True)


def _validate_seed(label: str, value: Any) -> int | None:
    expected = f"None or an int with 0 <= seed < 2**63 ({SEED_LIMIT})"
    if value is None:
        return None
    if not is_integer(value):
        raise not_allowed(label, value, expected, TypeError)
    if not 0 <= value < SEED_LIMIT:
        raise not_allowed(label, value, expected)
    return int(value)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "std": _validate_std,
    "distribution": choice_checker(DISTRIBUTIONS),
    "mode": choice_checker(MODES),
    "relative": check_bool,
    "schedule": choice_checker(SCHEDULES),
    "decay": _validate_decay,
    "gamma": _validate_gamma,
    "schedule_unit": choice_checker(SCHEDULE_UNITS),
    "include": check_patterns,
    "exclude": check_patterns,
    "seed": _validate_seed,
    "correlation": choice_checker(CORRELATIONS),
}
# Keys that a record from an older sender may lack, with the value they mean.
_OPTIONAL_CONFIG_FIELDS = {"correlation": "independent"}


def _check_combination(values: Mapping[str, Any], label: Callable[[str], str]) -> None:
    if values["relative"] and values["mode"] == "multiplicative":
        raise not_allowed(
            label("relative"),
            True,
            "False with mode='multiplicative': multiplicative noise w * (1 + e) "
            "is already relative to each weight",
        )


@dataclass(frozen=True)
class NoiseSpec:
    """Immutable, validated description of one kind of weight noise.

    Every distribution is zero-mean with standard deviation exactly ``sigma``,
    the scheduled ``std`` at time ``t`` (see :meth:`sigma_at`).

    Parameters
    ----------
    std : float (default: 0.0)
        Base standard deviation, ``0 <= sigma <= 1e6`` (``MAX_STD``); ``0``
        turns the noise off.
    distribution : str (default: "gaussian")
        ``"gaussian"``, ``"uniform"`` (on ``[-sqrt(3) sigma, sqrt(3) sigma]``) or
        ``"laplace"`` (scale ``sigma / sqrt(2)``).
    mode : str (default: "additive")
        ``"additive"``: ``w + e``; ``"multiplicative"``: ``w * (1 + e)``.
    relative : bool (default: False)
        Scale ``sigma`` by each tensor's RMS, ``sqrt(mean(w**2))``, computed on
        the current weights (in at least float32) each time the noise is
        applied. Only with ``mode="additive"``: multiplicative noise is already
        relative to each weight, and the two together are refused.
    schedule : str (default: "constant")
        ``"constant"``: ``std``; ``"exponential"``: ``std * decay**t``;
        ``"inverse-sqrt"``: ``std / sqrt(1 + t)``; ``"polynomial"``
        (Neelakantan et al. 2015): ``sigma_t**2 = std**2 / (1 + t)**gamma``.
    decay : float (default: 0.99)
        Decay factor of the exponential schedule, ``0 < decay <= 1``.
    gamma : float (default: 0.55)
        Exponent of the polynomial schedule, ``gamma > 0``.
    schedule_unit : str (default: "step")
        What ``t`` counts: ``"step"``, noise applications (optimizer steps)
        since the start of training; ``"round"``, ``server_round - 1``.
    include : tuple[str, ...] (default: ())
        Regular expressions (``re.search``) over parameter names; empty means
        every floating-point parameter. One str, a list or a tuple is accepted
        and stored as a tuple. Specs travel from servers to clients, so every
        pattern must match in bounded time: at most 64 patterns of at most 256
        characters, no quantifier or alternation inside a quantified group, no
        backreference, repetition counts <= 1000, at most 2 variable-length
        quantifiers (see ``validation.check_patterns``).
    exclude : tuple[str, ...] (default: ())
        Regular expressions, as ``include``; a name matching any of them is
        never perturbed.
    seed : int | None (default: None)
        ``0 <= seed < 2**63`` for reproducible noise; ``None`` draws fresh
        entropy from the operating system.
    correlation : str (default: "independent")
        How the draws of successive optimizer steps relate (used by
        ``WeightNoise.attach``). ``"independent"``: a fresh draw is added
        after every step and stays in the weights (the paper's noise; the
        weights random-walk, about ``sigma sqrt(t)`` after ``t`` steps).
        ``"anticorrelated"`` (Anti-PGD, Orvieto et al. 2022): before each
        step the previous draw is removed and after it a fresh one is added,
        so the gradient is taken at the perturbed point, the optimizer steps
        the clean weights and the model carries at most one draw (about
        ``sigma`` from the clean weights); removing the hook, or
        ``WeightNoise.clean()``, removes the last draw.

    Raises
    ------
    TypeError
        If a field has the wrong type (``bool`` is not a number).
    ValueError
        If a field is out of range, not an allowed string, not a valid or not
        a safe regular expression, or if ``relative=True`` comes with
        ``mode="multiplicative"``.

    """

    std: float = 0.0
    distribution: str = "gaussian"
    mode: str = "additive"
    relative: bool = False
    schedule: str = "constant"
    decay: float = 0.99
    gamma: float = 0.55
    schedule_unit: str = "step"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int | None = None
    correlation: str = "independent"

    def __post_init__(self) -> None:
        for name, validate in _VALIDATORS.items():
            value = validate(f"NoiseSpec.{name}", getattr(self, name))
            object.__setattr__(self, name, value)
        _check_combination(vars(self), lambda name: f"NoiseSpec.{name}")

    @property
    def enabled(self) -> bool:
        """Whether this spec adds any noise (``std > 0``)."""
        return self.std > 0

    def sigma_at(self, t: int) -> float:
        """Return the scheduled standard deviation at 0-based time ``t``.

        Parameters
        ----------
        t : int
            Schedule time, ``t >= 0``: the number of noise applications so far
            for ``schedule_unit="step"``, ``server_round - 1`` for ``"round"``.

        Returns
        -------
        float
            ``sigma_t`` (before any ``relative`` scaling).

        """
        if not is_integer(t) or t < 0:
            raise not_allowed("t", t, "an int >= 0")
        if self.schedule == "exponential":
            return self.std * self.decay ** int(t)
        if self.schedule == "inverse-sqrt":
            return self.std / math.sqrt(1 + t)
        if self.schedule == "polynomial":
            return self.std * (1 + t) ** (-self.gamma / 2)
        return self.std

    def selects(self, name: str) -> bool:
        """Return whether the parameter called ``name`` gets noise.

        A name is selected if it matches any ``include`` pattern (or
        ``include`` is empty) and matches no ``exclude`` pattern.
        """
        included = not self.include or any(
            re.search(pattern, name) for pattern in self.include
        )
        return included and not any(
            re.search(pattern, name) for pattern in self.exclude
        )

    def to_config(self, prefix: str = "noise.") -> dict[str, ConfigValue]:
        """Return this spec as flat entries valid in a Flower ``ConfigRecord``.

        Keys are ``prefix + field name`` (``"noise.std"``, ...); ``include`` and
        ``exclude`` become lists of str; a ``None`` seed is encoded as ``-1``.
        """
        config: dict[str, ConfigValue] = {}
        for name in _VALIDATORS:
            value = getattr(self, name)
            if name in ("include", "exclude"):
                value = list(value)
            elif name == "seed" and value is None:
                value = CONFIG_NO_SEED
            config[prefix + name] = value
        return config

    @classmethod
    def from_config(
        cls, record: Mapping[str, Any], prefix: str = "noise."
    ) -> NoiseSpec:
        """Build a spec from the flat entries written by :meth:`to_config`.

        Parameters
        ----------
        record : Mapping[str, Any]
            A ``ConfigRecord`` (or any mapping) holding every key
            ``prefix + field name``; other keys are ignored. A record without
            ``prefix + "correlation"`` (from a sender that predates it) means
            ``"independent"``. ``include`` / ``exclude`` may be one str.
        prefix : str (default: "noise.")
            The prefix the entries were written with.

        Raises
        ------
        ValueError
            If a key is missing or its value is out of range; the message names
            the full key.
        TypeError
            If a value has the wrong type; the message names the full key.

        """
        values: dict[str, Any] = {}
        for name in _VALIDATORS:
            key = prefix + name
            label = f"ConfigRecord[{key!r}]"
            if key not in record and name in _OPTIONAL_CONFIG_FIELDS:
                values[name] = _OPTIONAL_CONFIG_FIELDS[name]
                continue
            if key not in record:
                raise ValueError(
                    f"{label} is missing: a NoiseSpec under prefix {prefix!r} "
                    f"needs the keys {[prefix + field for field in _VALIDATORS]}"
                )
            value = record[key]
            if name == "seed" and is_integer(value) and value == CONFIG_NO_SEED:
                value = None
            elif name == "seed" and value is None:
                raise not_allowed(
                    label,
                    value,
                    f"an int with 0 <= seed < 2**63, or {CONFIG_NO_SEED} for no seed",
                    TypeError,
                )
            values[name] = value
        return cls.from_fields(values, lambda name: f"ConfigRecord[{prefix + name!r}]")

    @staticmethod
    def check_field(name: str, label: str, value: Any) -> Any:
        """Return ``value`` validated as the field ``name``, named ``label`` in errors.

        For callers that take a field under their own name (a run config key,
        a command-line flag), so that the error names what their user wrote.

        Parameters
        ----------
        name : str
            A field of ``NoiseSpec`` (``"std"``, ``"include"``, ...).
        label : str
            What the error message calls the value.
        value : Any
            The value to check.

        Returns
        -------
        Any
            The value as the spec stores it (e.g. patterns as a tuple).

        Raises
        ------
        TypeError
            If ``value`` has the wrong type.
        ValueError
            If it is not allowed, or ``name`` is not a field.

        """
        validate = _VALIDATORS.get(name)
        if validate is None:
            raise not_allowed(
                "NoiseSpec field", name, allowed_choices(tuple(_VALIDATORS))
            )
        return validate(label, value)

    @classmethod
    def from_fields(
        cls, values: Mapping[str, Any], label: Callable[[str], str]
    ) -> NoiseSpec:
        """Build a spec whose errors name each field ``label(field name)``.

        Parameters
        ----------
        values : Mapping[str, Any]
            Field values by field name; a missing field takes its default.
        label : Callable[[str], str]
            Maps a field name to what the caller's user wrote it as, e.g.
            ``lambda name: f"ConfigRecord['noise.{name}']"``.

        Raises
        ------
        TypeError
            If a value has the wrong type.
        ValueError
            If a value, or a combination of values, is not allowed, or a name
            is not a field.

        """
        checked = {
            name: cls.check_field(name, label(name), value)
            for name, value in values.items()
        }
        _check_combination({**_DEFAULTS, **checked}, label)
        return cls(**checked)

    @staticmethod
    def in_config(record: Mapping[str, Any], prefix: str = "noise.") -> bool:
        """Return whether ``record`` holds a spec under ``prefix``.

        A spec is present when its ``prefix + "std"`` key is; whether the other
        keys are complete and valid is checked by :meth:`from_config`.
        """
        return prefix + "std" in record


# Field defaults, for combination checks of a partial set of fields.
_DEFAULTS: dict[str, Any] = {field.name: field.default for field in fields(NoiseSpec)}
