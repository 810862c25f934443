"""One message format for bad values: only ``flwr_noise/validation.py`` writes it.

Every "<label>=<value> is not allowed: expected <what>" message is built by
``validation.not_allowed`` (or the checks on top of it). This scans the
source for string literals, f-strings included, that spell "not allowed"
themselves; docstrings may describe errors and are skipped.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flwr_noise.validation import not_allowed

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flwr_noise", "flwr_noise_app", "server_app", "client_app")
HELPER = "flwr_noise/validation.py"
HAND_WRITTEN = re.compile(r"\bnot\s+allowed\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """Return the ids of the docstring nodes of ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(
            node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        ):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                found.add(id(body[0].value))
    return found


def _literal_text(node: ast.AST) -> str | None:
    """Return the text of a str literal or f-string ({} for each field)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value
            if isinstance(part, ast.Constant) and isinstance(part.value, str)
            else "{}"
            for part in node.values
        )
    return None


def hand_written_messages(source: str) -> list[tuple[int, str]]:
    """Return (line, text) of each literal, not a docstring, that says "not allowed".

    Adjacent literals (``"is not " "allowed"``) are one node in the AST, so a
    message split over lines is found too. Parts of an f-string are not
    visited on their own.
    """
    tree = ast.parse(source)
    skipped = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skipped.update(id(part) for part in node.values)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        text = _literal_text(node)
        if text is not None and HAND_WRITTEN.search(text):
            found.append((node.lineno, text))
    return found


def _scan() -> dict[str, list[tuple[int, str]]]:
    found = {}
    for package in PACKAGES:
        assert (ROOT / package).is_dir(), f"no source folder {ROOT / package}"
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == HELPER:
                continue
            messages = hand_written_messages(path.read_text(encoding="utf-8"))
            if messages:
                found[name] = messages
    return found


def test_only_the_validation_helper_writes_not_allowed() -> None:
    found = _scan()
    assert not found, (
        "hand-written 'not allowed' messages: raise "
        "flwr_noise.validation.not_allowed(label, value, expected) instead: "
        f"{found}"
    )


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        ('raise ValueError(f"x={x!r} is not allowed: expected 1")', [1]),
        ('raise ValueError(\n    f"{n} rounds are not "\n    "allowed"\n)', [2]),
        ('message = "model %s is not allowed"', [1]),
        ('def f():\n    """Raise if x is not allowed."""\n', []),
        ("# a comment: x is not allowed\nx = 1", []),
        ('raise not_allowed("x", x, "an int")', []),
    ],
)
def test_the_scan_finds_hand_written_messages(source: str, lines: list[int]) -> None:
    assert [line for line, _ in hand_written_messages(source)] == lines


def test_not_allowed_is_the_one_format_on_one_line() -> None:
    error = not_allowed("labels", [[1, 2]] * 2, "a 1-D array")
    assert type(error) is ValueError
    assert str(error) == "labels=[[1, 2], [1, 2]] is not allowed: expected a 1-D array"
    multi_line = type("MultiLine", (), {"__repr__": lambda self: "first\n  second"})
    error = not_allowed("model", multi_line(), "a torch.nn.Module", TypeError)
    assert type(error) is TypeError
    assert str(error) == (
        "model=first second is not allowed: expected a torch.nn.Module"
    )


def test_not_allowed_shortens_a_huge_value() -> None:
    error = not_allowed("ConfigRecord['noise.local.std']", "x" * 10_000_000, "a number")
    message = str(error)
    assert len(message) < 400
    assert message.startswith("ConfigRecord['noise.local.std']='xxx")
    assert "(10000002 characters) is not allowed: expected a number" in message
