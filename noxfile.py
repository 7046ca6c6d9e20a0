"""Test, lint, docs and benchmark sessions: one virtualenv per framework, since their pins
conflict (MXNet 1.9.1 needs numpy<1.24, which TensorFlow and JAX refuse)."""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "lint",
    "tests-core",
    "docs",
    "package",
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

OLDEST = {
    "flax": ["jax==0.4.30", "jaxlib==0.4.30", "flax==0.10.0", "optax==0.2.3"],
}
"""The oldest releases of a range that pyproject.toml's extras declare, tested by
`tests-<backend>-oldest` (not a default session). torch has none: only 2.13.0 exists here. tf has
none yet: with Keras 3.0.5, 3.3.3 (TensorFlow 2.16.1) and 3.8.0 (2.18.1) the NHWC training step
fails in Keras' Flatten ('Only one input size may be -1'), so the tf extra starts at the tested pin."""

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


def backend_test_files(backend: str) -> list[str]:
    """`tests/backends/test_<backend>.py` and `test_<backend>_*.py` (devices, data parallelism, ...)."""
    folder = Path("tests/backends")
    return [
        str(path)
        for path in sorted(folder.glob(f"test_{backend}.py")) + sorted(folder.glob(f"test_{backend}_*.py"))
    ]


def _backend_tests(session: nox.Session, backend: str, *extra: str) -> None:
    """The conformance suite, the backend's own tests, its interchange tests and the docs examples
    of its tabs."""
    _install(session, *PINS[backend], *SOURCES.get(backend, []))
    session.run(
        "pytest",
        "tests/conformance",
        *backend_test_files(backend),
        *INTERCHANGE_TESTS[backend],
        "tests/docs",
        "--backend",
        backend,
        *extra,
        *session.posargs,
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check; mypy on `multires/` (settings in pyproject.toml)."""
    session.install(
        "ruff>=0.6", "mypy==1.20.2", "numpy==2.4.6", "rich==15.0.0", "pyyaml==6.0.4", "types-PyYAML"
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(name="tests-core", python=PYTHON)
def tests_core(session: nox.Session) -> None:
    """The core's tests and the framework-free docs examples, with no framework installed."""
    session.install("-e", ".[dev,yaml]", "matplotlib>=3.7")
    session.run("pytest", "tests/core", "tests/docs", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    session.install(
        "mkdocs==1.6.1", "mkdocs-material==9.8.1", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11"
    )
    session.install("-e", ".")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})


WHEEL_PACKAGES = [
    "multires",
    "multires/zoo",
    "multires/interchange",
    "multires/backends",
    *(f"multires/backends/{name}" for name in PINS),
]
"""Every package the wheel must hold (`backends/` is mapped to `multires.backends`)."""


@nox.session(python=PYTHON)
def package(session: nox.Session) -> None:
    """Build the sdist and wheel, `twine check` them, install the wheel into a fresh virtualenv
    outside the repository and run the README's framework-free example and `multires summary` there."""
    session.install("build==1.6.1", "twine==7.0.0")
    outside = Path(tempfile.mkdtemp(prefix="multires-package-"))
    dist = outside / "dist"
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    (wheel,) = dist.glob("multires-*.whl")
    session.run("twine", "check", "--strict", *(str(p) for p in dist.iterdir()))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in WHEEL_PACKAGES if f"{p}/__init__.py" not in names]
    missing += [] if "multires/py.typed" in names else ["multires/py.typed"]
    if missing:
        session.error(f"{wheel.name} lacks {missing}: fix [tool.setuptools] in pyproject.toml.")
    venv = outside / "venv"
    session.run("python", "-m", "venv", str(venv))
    session.run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel), external=True)
    readme = Path("README.md").read_text()
    example = re.search(r"need no framework:\n\n```python\n(.*?)```", readme, re.S)
    if example is None:
        session.error("README.md: the framework-free example (after 'need no framework:') is gone.")
    (outside / "example.py").write_text(example[1] + "print('README example: ok')\n")
    with session.chdir(outside):
        session.run(str(venv / "bin" / "python"), "example.py", external=True)
        session.run(
            str(venv / "bin" / "python"),
            "-c",
            "import multires, sys; assert 'site-packages' in "
            "multires.__file__, multires.__file__; print(multires.__file__)",
            external=True,
        )
        session.run(str(venv / "bin" / "multires"), "--version", external=True)
        session.run(
            str(venv / "bin" / "multires"), "summary", "d2l_resnet18", "--input", "1,1,96,96", external=True
        )
    shutil.rmtree(outside)


@nox.session(name="tests-torch", python=PYTHON)
def tests_torch(session: nox.Session) -> None:
    """PyTorch backend: conformance suite, backend tests, docs examples."""
    _backend_tests(session, "torch", "tests/backends/test_gpu_check.py")


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
        "pytest", *backend_test_files("mxnet"), *INTERCHANGE_TESTS["mxnet"], "tests/docs", *session.posargs
    )


@nox.session(name="tests-onnx", python=PYTHON)
def tests_onnx(session: nox.Session) -> None:
    """ONNX backend with onnxruntime (inference-only): eval conformance, backend tests, docs, and an
    exported model run by onnxruntime-node (Node.js; skipped without node and npm)."""
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
    with tempfile.TemporaryDirectory() as out:
        session.run("python", "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", out)


@nox.session(name="tests-flax-oldest", python=PYTHON)
def tests_flax_oldest(session: nox.Session) -> None:
    """The Flax backend on the oldest JAX, Flax and Optax of the `flax` extra's range."""
    _install(session, *OLDEST["flax"])
    session.run(
        "pytest",
        "tests/conformance",
        *backend_test_files("flax"),
        *INTERCHANGE_TESTS["flax"],
        "--backend",
        "flax",
        *session.posargs,
    )


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
    """onnxruntime vs the PyTorch backend on the same model and weights, as built and BN-folded."""
    _bench(session, "bench_onnx.py", *PINS["onnx"], *PINS["torch"])


@nox.session(name="bench-peers", python=PYTHON)
def bench_peers(session: nox.Session) -> None:
    """multires vs Keras 3's keras.applications.ResNet50 on torch, JAX and TensorFlow (a process each)."""
    _bench(session, "bench_peers.py", *PINS["torch"], *PINS["tf"], *PINS["flax"])


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
