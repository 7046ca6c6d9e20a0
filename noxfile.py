"""Test, lint, docs and benchmark sessions: one virtualenv per framework, since their pins
conflict (MXNet 1.9.1 needs numpy<1.24, which TensorFlow and JAX refuse)."""

from __future__ import annotations

import nox

nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "lint",
    "tests-core",
    "docs",
    "tests-torch",
    "tests-tf",
    "tests-flax",
    "tests-mxnet",
    "tests-onnx",
    "tests-combined",
]

PYTHON = "3.11"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pyyaml>=6", "safetensors>=0.4", "matplotlib>=3.7"]
PINS = {
    "torch": ["torch==2.13.0"],
    "tf": ["tensorflow-cpu==2.21.0"],
    "flax": ["jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "optax==0.2.8"],
    "mxnet": ["mxnet==1.9.1", "numpy==1.23.5"],
    "onnx": ["onnx==1.23.2", "onnxruntime==1.32.0"],
}
"""Each backend's framework, pinned (torch 2.13.0 is the CPU wheel this machine's pip finds; an
unpinned torch pulls a multi-GB CUDA build)."""

SOURCES = {"torch": ["transformers==5.23.0"]}
"""Libraries whose models `multires.interchange` imports, installed beside a backend's framework
(Keras comes with TensorFlow, the Gluon model zoo with MXNet, Flax with its backend)."""

INTERCHANGE_TESTS = {
    "torch": ["tests/interchange/test_from_transformers.py", "tests/interchange/test_from_torchvision.py"],
    "tf": ["tests/interchange/test_from_keras.py"],
    "flax": ["tests/interchange/test_from_flax.py"],
    "mxnet": ["tests/interchange/test_from_gluon.py"],
    "onnx": [],
}
"""The interchange tests each backend session runs: those whose source library it has installed."""


def _install(session: nox.Session, *pins: str) -> None:
    """Pinned packages with the test tools (resolved together, so the pins hold), then the
    project itself, editable."""
    session.install(*TEST_DEPS, *pins)
    session.install("-e", ".")


def _backend_tests(session: nox.Session, backend: str, *extra: str) -> None:
    """The conformance suite, the backend's own tests, its interchange tests and the docs examples
    of its tabs."""
    _install(session, *PINS[backend], *SOURCES.get(backend, []))
    session.run(
        "pytest",
        "tests/conformance",
        f"tests/backends/test_{backend}.py",
        *INTERCHANGE_TESTS[backend],
        "tests/docs",
        "--backend",
        backend,
        *extra,
        *session.posargs,
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(name="tests-core", python=PYTHON)
def tests_core(session: nox.Session) -> None:
    """The core's tests and the framework-free docs examples, with no framework installed."""
    session.install("-e", ".[dev,yaml]", "matplotlib>=3.7")
    session.run("pytest", "tests/core", "tests/docs", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    session.install("mkdocs==1.6.1", "mkdocs-material==9.8.1")
    session.install("-e", ".")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(name="tests-torch", python=PYTHON)
def tests_torch(session: nox.Session) -> None:
    """PyTorch backend: conformance suite, backend tests, docs examples."""
    _backend_tests(session, "torch")


@nox.session(name="tests-tf", python=PYTHON)
def tests_tf(session: nox.Session) -> None:
    """TensorFlow/Keras backend: conformance suite, backend tests, docs examples."""
    _backend_tests(session, "tf")


@nox.session(name="tests-flax", python=PYTHON)
def tests_flax(session: nox.Session) -> None:
    """Flax backend: conformance suite, backend tests, docs examples."""
    _backend_tests(session, "flax")


@nox.session(name="tests-mxnet", python=PYTHON)
def tests_mxnet(session: nox.Session) -> None:
    """MXNet backend (retired upstream; numpy<1.24): conformance suite eager and hybridized."""
    _install(session, *PINS["mxnet"])
    for hybridize in ("1", "0"):
        session.run(
            "pytest",
            "tests/conformance",
            "--backend",
            "mxnet",
            *session.posargs,
            env={"MULTIRES_MXNET_HYBRIDIZE": hybridize},
        )
    session.run(
        "pytest", "tests/backends/test_mxnet.py", *INTERCHANGE_TESTS["mxnet"], "tests/docs", *session.posargs
    )


@nox.session(name="tests-onnx", python=PYTHON)
def tests_onnx(session: nox.Session) -> None:
    """ONNX backend with onnxruntime (inference-only): eval conformance, backend tests, docs."""
    _backend_tests(session, "onnx")


@nox.session(name="tests-combined", python=PYTHON)
def tests_combined(session: nox.Session) -> None:
    """torch, TensorFlow, Flax and onnxruntime side by side (MXNet cannot join: numpy<1.24): the
    cross-framework docs examples, Keras' and the book's JAX models imported and run in every
    backend, and `multires compare` agreeing with the reference."""
    _install(session, *PINS["torch"], *PINS["tf"], *PINS["flax"], *PINS["onnx"], *SOURCES["torch"])
    session.run(
        "pytest", *INTERCHANGE_TESTS["tf"], *INTERCHANGE_TESTS["flax"], "tests/docs", *session.posargs
    )
    session.run("multires", "compare", "resnet18", "--input", "2,3,64,64", "--backends", "torch,tf,flax,onnx")


def _bench(session: nox.Session, script: str, *pins: str) -> None:
    _install(session, *pins)
    session.run("python", f"benchmarks/{script}", *session.posargs)


@nox.session(name="bench-torch", python=PYTHON)
def bench_torch(session: nox.Session) -> None:
    """multires vs hand-written PyTorch: inference and training images/s (`-- --quick` for a smoke run)."""
    _bench(session, "bench_torch.py", *PINS["torch"])


@nox.session(name="bench-tf", python=PYTHON)
def bench_tf(session: nox.Session) -> None:
    """multires vs hand-written Keras, eager graph and XLA."""
    _bench(session, "bench_tf.py", *PINS["tf"])


@nox.session(name="bench-flax", python=PYTHON)
def bench_flax(session: nox.Session) -> None:
    """multires vs hand-written Flax, jitted."""
    _bench(session, "bench_flax.py", *PINS["flax"])


@nox.session(name="bench-mxnet", python=PYTHON)
def bench_mxnet(session: nox.Session) -> None:
    """multires vs hand-written Gluon, hybridized."""
    _bench(session, "bench_mxnet.py", *PINS["mxnet"])


@nox.session(name="bench-onnx", python=PYTHON)
def bench_onnx(session: nox.Session) -> None:
    """onnxruntime vs the PyTorch backend on the same model and weights."""
    _bench(session, "bench_onnx.py", *PINS["onnx"], *PINS["torch"])


@nox.session(name="bench-train", python=PYTHON)
def bench_train(session: nox.Session) -> None:
    """One epoch of d2l_resnet18 on Fashion-MNIST (28x28) per backend: accuracy and examples/s."""
    _install(session, *PINS["torch"], *PINS["tf"], *PINS["flax"])
    session.run("python", "benchmarks/bench_train.py", *(session.posargs or ["torch", "tf", "flax"]))


@nox.session(name="bench-train-mxnet", python=PYTHON)
def bench_train_mxnet(session: nox.Session) -> None:
    """The training benchmark in MXNet's own environment (numpy<1.24); its row joins bench-train's table."""
    _install(session, *PINS["mxnet"])
    session.run("python", "benchmarks/bench_train.py", "mxnet", *session.posargs)
