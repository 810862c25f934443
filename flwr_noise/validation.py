"""One message format for every bad value, library and App alike.

Every check raises ``TypeError`` (wrong type) or ``ValueError`` (right type,
not allowed) with one line: ``<label>=<value!r> is not allowed: expected
<what is allowed>``. Callers choose the label (``NoiseSpec.std``,
``ConfigRecord['noise.local.std']``, ``run config 'seed'``, ...), so the
message names whatever the user wrote.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any


def not_allowed(
    label: str, value: Any, expected: str, error: type[Exception] = ValueError
) -> Exception:
    """Return the project's one error for a value that is not allowed.

    Parameters
    ----------
    label : str
        What the user wrote the value as (an argument, a config key).
    value : Any
        The value.
    expected : str
        What is allowed, e.g. ``"a number >= 0"``.
    error : type[Exception] (default: ValueError)
        ``TypeError`` for a value of the wrong type.

    Returns
    -------
    Exception
        The error, to ``raise``.

    """
    return error(f"{label}={value!r} is not allowed: expected {expected}")


def allowed_choices(options: Sequence[str]) -> str:
    """Return ``"one of 'a', 'b'"`` for a list of allowed strings."""
    return "one of " + ", ".join(repr(option) for option in options)


def is_real(value: Any) -> bool:
    """Return whether ``value`` is a real number (``bool`` is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """Return whether ``value`` is an integer (``bool`` is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_real(
    label: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float within the given bounds.

    Parameters
    ----------
    label : str
        Name of the value in the error message.
    value : Any
        The value to check.
    low, high : float | None (default: None)
        Bounds; ``None`` is unbounded.
    low_open, high_open : bool (default: False)
        Whether the bound itself is excluded.

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If it is not finite or out of bounds.

    """
    expected = "a finite number" + _bounds_text(low, high, low_open, high_open)
    if not is_real(value):
        raise not_allowed(label, value, expected, TypeError)
    number = float(value)
    if not math.isfinite(number) or not _within(number, low, high, low_open, high_open):
        raise not_allowed(label, value, expected)
    return number


def check_integer(
    label: str, value: Any, *, low: int | None = None, high: int | None = None
) -> int:
    """Return ``value`` as an int with ``low <= value <= high``.

    Raises
    ------
    TypeError
        If ``value`` is not an integer (``bool`` is not).
    ValueError
        If it is out of bounds.

    """
    expected = "an int" + _bounds_text(low, high, False, False)
    if not is_integer(value):
        raise not_allowed(label, value, expected, TypeError)
    if not _within(int(value), low, high, False, False):
        raise not_allowed(label, value, expected)
    return int(value)


def check_choice(label: str, value: Any, options: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``options`` (strings).

    Raises
    ------
    TypeError
        If ``value`` is not a str.
    ValueError
        If it is not one of ``options``.

    """
    if not isinstance(value, str):
        raise not_allowed(label, value, f"a str, {allowed_choices(options)}", TypeError)
    if value not in options:
        raise not_allowed(label, value, allowed_choices(options))
    return value


def check_bool(label: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False``.

    Raises
    ------
    TypeError
        If it is anything else (``0`` and ``1`` included).

    """
    if not isinstance(value, bool):
        raise not_allowed(label, value, "True or False", TypeError)
    return value


def choice_checker(options: Sequence[str]) -> Callable[[str, Any], str]:
    """Return a ``(label, value) -> value`` check for one of ``options``."""

    def check(label: str, value: Any) -> str:
        return check_choice(label, value, options)

    return check


def _within(
    number: float,
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
) -> bool:
    if low is not None and (number <= low if low_open else number < low):
        return False
    return high is None or (number < high if high_open else number <= high)


def _bounds_text(
    low: float | None, high: float | None, low_open: bool, high_open: bool
) -> str:
    if low is not None and high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return f" in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""
