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
import re
from collections.abc import Callable, Sequence
from typing import Any

# Longest repr of a value that an error message shows.
MAX_SHOWN = 200


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
        The error, to ``raise``; its message is one line, also for a value
        whose ``repr`` spans several (numpy arrays, tensors, modules).

    """
    shown = repr(value)
    if "\n" in shown:
        shown = " ".join(line.strip() for line in shown.splitlines())
    # A value off the wire can be megabytes long; the message (and the log
    # line it becomes) names it, it need not carry all of it.
    if len(shown) > MAX_SHOWN:
        shown = f"{shown[:MAX_SHOWN]}... ({len(shown)} characters)"
    return error(f"{label}={shown} is not allowed: expected {expected}")


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


def _number_text(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _bounds_text(
    low: float | None, high: float | None, low_open: bool, high_open: bool
) -> str:
    if low is not None and high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return f" in {left}{_number_text(low)}, {_number_text(high)}{right}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_number_text(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_number_text(high)}"
    return ""


# --- regular expressions that may come over the wire --------------------------

MAX_PATTERN_LENGTH = 256
MAX_PATTERNS = 64
MAX_REPEAT_COUNT = 1000
MAX_VARIABLE_REPEATS = 2
SAFE_PATTERNS = (
    f"one regular expression (str) or a list of at most {MAX_PATTERNS}, each of "
    f"at most {MAX_PATTERN_LENGTH} characters, with no quantifier inside a "
    "quantified group, no alternation inside a quantified group, no "
    f"backreference, repetition counts <= {MAX_REPEAT_COUNT} and at most "
    f"{MAX_VARIABLE_REPEATS} variable-length quantifiers (*, +, ?, {{m,n}})"
)


def check_patterns(label: str, value: Any, *, written: Any = None) -> tuple[str, ...]:
    """Return regular expressions that ``re.search`` matches in bounded time.

    Patterns can come from a server, so each is bounded in size and refused
    when backtracking could blow up: nested quantifiers (``(a+)+``),
    quantified alternations (``(a|a)*``), backreferences, repetition counts
    over ``MAX_REPEAT_COUNT`` (``a{99999999999}``) and more than
    ``MAX_VARIABLE_REPEATS`` variable-length quantifiers (``.*.*.*X``, whose
    search time grows like the name's length to that power).

    Parameters
    ----------
    label : str
        Name of the value in the error message.
    value : Any
        One pattern (str) or a list or tuple of them.
    written : Any (default: None)
        What the user wrote, shown in the error instead of ``value`` when it
        is not ``None`` (e.g. the comma-separated str that ``value`` was
        split from).

    Returns
    -------
    tuple[str, ...]
        The patterns (one str gives a 1-tuple).

    Raises
    ------
    TypeError
        If ``value`` is neither a str nor a list or tuple of str.
    ValueError
        If a pattern is not a valid regular expression or not safe as above.

    """
    patterns = (value,) if isinstance(value, str) else value
    shown = value if written is None else written
    if not isinstance(patterns, list | tuple) or not all(
        isinstance(pattern, str) for pattern in patterns
    ):
        raise not_allowed(label, shown, SAFE_PATTERNS, TypeError)
    if len(patterns) > MAX_PATTERNS:
        raise not_allowed(label, shown, SAFE_PATTERNS)
    for pattern in patterns:
        reason = _unsafe_pattern_reason(pattern)
        if reason is not None:
            raise not_allowed(label, shown, f"{SAFE_PATTERNS}; {pattern!r} {reason}")
    return tuple(patterns)


try:  # Python >= 3.11
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_REPEATS = {
    _sre_constants.MAX_REPEAT,
    _sre_constants.MIN_REPEAT,
    getattr(_sre_constants, "POSSESSIVE_REPEAT", _sre_constants.MAX_REPEAT),
}
_BACKREFERENCES = {
    _sre_constants.GROUPREF,
    _sre_constants.GROUPREF_EXISTS,
    getattr(_sre_constants, "GROUPREF_IGNORE", _sre_constants.GROUPREF),
}


def _unsafe_pattern_reason(pattern: str) -> str | None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"has {len(pattern)} characters"
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as error:
        return f"is not a valid regular expression ({error})"
    variable = 0
    # (items, inside a quantified group?) still to visit.
    pending: list[tuple[Any, bool]] = [(parsed, False)]
    while pending:
        items, quantified = pending.pop()
        for op, argument in items:
            if op in _BACKREFERENCES:
                return "has a backreference"
            if op in _REPEATS:
                low, high, body = argument
                if quantified:
                    return "has a quantifier inside a quantified group"
                if max(low, 0 if high == _sre_constants.MAXREPEAT else high) > (
                    MAX_REPEAT_COUNT
                ):
                    return f"has a repetition count over {MAX_REPEAT_COUNT}"
                if high != low:
                    variable += 1
                pending.append((body, True))
            elif op == _sre_constants.BRANCH:
                if quantified:
                    return "has an alternation inside a quantified group"
                pending.extend((branch, quantified) for branch in argument[1])
            elif op == _sre_constants.SUBPATTERN:
                pending.append((argument[-1], quantified))
            elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
                pending.append((argument[1], quantified))
            elif op == getattr(_sre_constants, "ATOMIC_GROUP", None):
                pending.append((argument, quantified))
    if variable > MAX_VARIABLE_REPEATS:
        return f"has {variable} variable-length quantifiers"
    return None
