"""Test, lint and benchmark sessions: one virtualenv per framework, since their pins conflict
(MXNet 1.9.1 needs numpy<1.24, which TensorFlow and JAX refuse)."""

from __future__ import annotations

import nox

nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "tests-core"]

PYTHON = "3.11"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pyyaml>=6", "safetensors>=0.4", "matplotlib>=3.7"]


def _install(session: nox.Session, *pins: str) -> None:
    """A framework's pinned packages with the test tools (resolved together, so the pins hold),
    then the project itself, editable."""
    session.install(*TEST_DEPS, *pins)
    session.install("-e", ".")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(name="tests-core", python=PYTHON)
def tests_core(session: nox.Session) -> None:
    """The core's tests, with no deep-learning framework installed."""
    session.install("-e", ".[dev,yaml]", "matplotlib>=3.7")
    session.run("pytest", "tests/core", *session.posargs)
