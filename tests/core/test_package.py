"""What the distribution declares: every package folder is listed (the wheel would silently lack
one otherwise; the `package` nox session checks the built wheel itself), `py.typed` ships, the
version is one, and the extras declare ranges rather than pins that would replace a user's framework."""

from __future__ import annotations

from pathlib import Path

import pytest

import multires
from multires.cli import main

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    """Dotted names of the folders with an `__init__.py` under multires/ and backends/ (installed
    as multires.backends)."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "multires").rglob("__init__.py")}
    found |= {
        ".".join(("multires", *p.parent.relative_to(ROOT).parts))
        for p in (ROOT / "backends").rglob("__init__.py")
    }
    return found


def test_every_package_folder_is_in_the_distribution() -> None:
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert _package_folders() <= declared, sorted(_package_folders() - declared)


def test_py_typed_ships() -> None:
    assert (ROOT / "multires" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["multires"]


def test_version_is_the_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert PYPROJECT["project"]["version"] == multires.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multires {multires.__version__}"


@pytest.mark.parametrize("extra", ["torch", "tf", "flax", "onnx", "transformers"])
def test_framework_extras_declare_ranges(extra: str) -> None:
    requirements = PYPROJECT["project"]["optional-dependencies"][extra]
    assert requirements and all(">=" in r and "==" not in r for r in requirements), requirements
