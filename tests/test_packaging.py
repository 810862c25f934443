"""What a user gets from `pip install flwr-noise`, and what the App gets at run time.

- The wheel carries the library only (``flwr_noise``), with requirements that
  are ranges over what it supports, so it drops into a user's project without
  replacing its Flower or PyTorch.
- The App's exact pins live twice: in the ``[app]`` extra (pip users:
  ``pip install -e '.[app]'``) and in the PEP 735 dependency group ``app``,
  which uv installs by default (``[tool.uv] default-groups``). Flower's runtime
  dependency installation runs ``uv sync --no-install-project`` in the App's
  folder, which installs ``[project].dependencies`` and the default groups but
  never extras; pip 23.2 has no ``--group``. The two lists must not drift.

These checks read ``pyproject.toml`` and build the wheel offline from a copy of
the project; ``.ci/compat`` checks a real install into a user's environment.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomli
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomli.loads((PROJECT_ROOT / "pyproject.toml").read_text())
LIBRARY_REQUIREMENTS = {"flwr", "torch", "numpy"}
# The Flower releases whose Message API and legacy API the library supports,
# and the oldest torch and numpy verified to pass tests/library (see
# benchmarks/README.md, "Packaging").
SUPPORTED = {"flwr": ["1.39.0", "1.40.0", "1.41.0", "1.42.0"], "torch": ["2.4.1"]}
UNSUPPORTED = {"flwr": ["1.38.0", "1.43.0"], "torch": ["2.3.1"]}
APP_PINNED = {"flwr", "flwr-datasets", "torch", "torchvision"}
# The App's packages: they run from the project folder or the FAB, never
# from a user's site-packages.
APP_PACKAGES = ("flwr_noise_app", "server_app", "client_app")


def requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines]
    by_name = {canonicalize_name(req.name): req for req in parsed}
    assert len(by_name) == len(parsed), f"a requirement is listed twice: {lines}"
    return by_name


def test_library_requirements_are_ranges_of_flwr_torch_and_numpy_only() -> None:
    deps = requirements(PYPROJECT["project"]["dependencies"])

    assert set(deps) == LIBRARY_REQUIREMENTS
    for req in deps.values():
        assert not req.extras and req.marker is None, req
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators, f"{req}: no lower bound"
        assert operators <= {">=", "<"}, f"{req}: not a range"


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_library_ranges_cover_the_supported_releases_only(name: str) -> None:
    specifier = requirements(PYPROJECT["project"]["dependencies"])[name].specifier

    assert [v for v in SUPPORTED[name] if not specifier.contains(v)] == []
    assert [v for v in UNSUPPORTED[name] if specifier.contains(v)] == []


def test_app_extra_and_default_dependency_group_hold_the_same_pins() -> None:
    extra = requirements(PYPROJECT["project"]["optional-dependencies"]["app"])
    group = requirements(PYPROJECT["dependency-groups"]["app"])

    assert {name: str(req) for name, req in extra.items()} == {
        name: str(req) for name, req in group.items()
    }
    assert PYPROJECT["tool"]["uv"]["default-groups"] == ["app"]
    for name in APP_PINNED:
        (spec,) = extra[name].specifier
        assert spec.operator == "==", f"the App must pin {name}: {extra[name]}"
    # gRPC between SuperNodes and the SuperLink: Flower 1.39.0 is the last.
    assert str(extra["flwr"].specifier) == "==1.39.0"
    assert "simulation" in extra["flwr"].extras


def test_app_pins_lie_inside_the_library_ranges() -> None:
    library = requirements(PYPROJECT["project"]["dependencies"])
    app = requirements(PYPROJECT["project"]["optional-dependencies"]["app"])

    for name, req in library.items():
        if name in app:
            (pin,) = app[name].specifier
            assert req.specifier.contains(pin.version), (req, app[name])


def test_the_wheel_holds_the_library_package_only(tmp_path: Path) -> None:
    (backend,) = map(Requirement, PYPROJECT["build-system"]["requires"])
    if not backend.specifier.contains(importlib.metadata.version("setuptools")):
        pytest.skip(f"this environment's setuptools does not satisfy {backend}")
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".venv*", ".git", "build", "*.egg-info", "__pycache__", "results", ".*cache"
    )
    shutil.copytree(PROJECT_ROOT, source, ignore=ignore)
    out = tmp_path / "dist"
    build = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.build_wheel(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("flwr_noise-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    (dist_info,) = {top for top in top_level if top.endswith(".dist-info")}
    assert top_level == {"flwr_noise", dist_info}
    assert "flwr_noise/__init__.py" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    required = [
        line.removeprefix("Requires-Dist: ")
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    ]
    assert requirements(required) == requirements(PYPROJECT["project"]["dependencies"])
    for package in APP_PACKAGES:
        assert (PROJECT_ROOT / package).is_dir(), f"{package} moved: update this test"
