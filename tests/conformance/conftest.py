"""The conformance suite's options and fixtures.

Run it for one backend with `pytest tests/conformance --backend NAME`; every backend runs the
same files unchanged. Without `--backend` the suite is skipped. Tests that take a `layout`
argument run once per layout in the backend's `LAYOUTS`; tests that take `trainable` are skipped
for inference-only backends (`TRAINING = False`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

import multires

HERE = Path(__file__).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        default=None,
        help="multires backend the conformance suite tests (e.g. torch, tf, flax, mxnet)",
    )


def _backend_name(config: pytest.Config) -> str | None:
    return config.getoption("--backend", default=None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "layout" in metafunc.fixturenames:
        name = _backend_name(metafunc.config)
        layouts = multires.get_backend(name).LAYOUTS if name else ("NCHW",)
        metafunc.parametrize("layout", layouts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _backend_name(config):
        return
    skip = pytest.mark.skip(
        reason="the conformance suite needs a backend: pytest tests/conformance --backend NAME"
    )
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def backend(pytestconfig: pytest.Config) -> str:
    """The canonical name of the backend under test (`--backend`, aliases resolved)."""
    return multires.backend.canonical_name(_backend_name(pytestconfig))


@pytest.fixture(scope="session")
def backend_module(backend: str) -> ModuleType:
    """The backend module under test (importing its framework)."""
    return multires.get_backend(backend)


@pytest.fixture
def trainable(backend: str, backend_module: ModuleType) -> str:
    """The backend name; skips the test for inference-only backends (`TRAINING = False`)."""
    if not getattr(backend_module, "TRAINING", True):
        pytest.skip(f"backend {backend!r} is inference-only")
    return backend
