"""`multires compare`: one model, the same weights and input, every backend side by side.

`compare` builds the model in each requested backend that is installed, loads the same random
canonical weights (`multires.random_weights`, so BatchNorm is not the identity), runs the same
float32 input (converted to each backend's default layout) in eval mode, and measures the
output against the NumPy float64 reference with `multires.reference.relative_error`, the
conformance metric. Backends whose framework is missing are rows with the pip command that
installs it, so one table shows the state of an environment. Frameworks are reached only
through the backend registry; this module imports none.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np

from multires import backend as registry
from multires import reference
from multires.errors import BackendUnavailableError, ShapeError
from multires.graph import Graph
from multires.shapes import check_input_shape, param_count
from multires.weights import CanonicalWeights, as_weights, is_buffer, random_weights

REFERENCE = "reference"
"""The name of the NumPy reference's row."""

TOLERANCE = 1e-4
"""The largest relative difference to the reference that counts as agreeing (the conformance
suite's eval-mode bound)."""

OK, DIFFERS, NOT_INSTALLED, FAILED = "ok", "differs", "not installed", "failed"
"""Row statuses: agrees with the reference within the tolerance; runs but disagrees; framework
not installed; raised an error while building or running."""


@dataclass(frozen=True)
class Row:
    """One backend's result. Measurements are None where the backend did not run.

    `output_shape` is in the backend's `layout`; `params` counts the trainable weights the
    backend's model actually holds (exported as canonical weights, running statistics left
    out); `latency_ms` is the median wall time of an eval-mode forward pass, NumPy in and out.
    `note` is the install command or the error.
    """

    backend: str
    framework: str
    status: str
    layout: str | None = None
    output_shape: tuple[int, ...] | None = None
    params: int | None = None
    max_rel_diff: float | None = None
    latency_ms: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["output_shape"] = None if self.output_shape is None else list(self.output_shape)
        return data


@dataclass(frozen=True)
class Comparison:
    """Every row of one comparison, the reference first, with what was compared."""

    model: str
    input_shape: tuple[int, ...]
    seed: int
    repeats: int
    tolerance: float
    rows: tuple[Row, ...]

    @property
    def ok(self) -> bool:
        """True if every installed backend ran and agrees with the reference."""
        return all(row.status in (OK, NOT_INSTALLED) for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "layout": "NCHW",
            "seed": self.seed,
            "repeats": self.repeats,
            "tolerance": self.tolerance,
            "ok": self.ok,
            "rows": [row.to_dict() for row in self.rows],
        }


def _median_ms(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" and x.ndim == 4 else x


def _to_nchw(array: np.ndarray, layout: str) -> np.ndarray:
    return array.transpose(0, 3, 1, 2) if layout == "NHWC" and array.ndim == 4 else array


def _backend_row(
    name: str,
    graph: Graph,
    weights: CanonicalWeights,
    x: np.ndarray,
    expected: np.ndarray,
    repeats: int,
    tolerance: float,
) -> Row:
    framework = registry.FRAMEWORKS.get(name, name)
    try:
        module = registry.get_backend(name)
    except BackendUnavailableError:
        return Row(name, framework, NOT_INSTALLED, note=f"pip install 'multires[{name}]'")
    layout = module.LAYOUTS[0]
    # A comparison table reports a backend that breaks as a failed row and goes on to the
    # others, whatever the framework raised.
    try:
        runner = registry.make_runner(graph, weights, name, layout)
        x_in = _to_layout(x, layout)
        output = np.asarray(runner.forward(x_in))
        latency = _median_ms(lambda: runner.forward(x_in), repeats)
        diff = reference.relative_error(_to_nchw(output, layout), expected)
        params = sum(value.size for key, value in runner.weights().items() if not is_buffer(key))
    except Exception as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())
        return Row(name, framework, FAILED, layout=layout, note=message)
    status = OK if diff <= tolerance else DIFFERS
    return Row(name, framework, status, layout, tuple(output.shape), int(params), diff, latency)


def compare(
    graph: Graph,
    input_shape: Sequence[int],
    backends: Sequence[str] | None = None,
    seed: int = 0,
    repeats: int = 5,
    tolerance: float = TOLERANCE,
    weights: Mapping[str, Any] | None = None,
) -> Comparison:
    """Run `graph` in the reference and in each of `backends` (default: every registered one) on
    the same weights (`weights`, default random ones) and NCHW input of `input_shape`, both
    drawn from `seed`.

    Unknown backend names raise BackendNotFoundError before anything runs; backends that are not
    installed or fail become rows saying so. Latencies are medians of `repeats` forward passes
    after one warm-up pass (the reference, float64 and slow by design, is timed once).
    """
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ShapeError(
            f"{graph.name}: compare drives graphs with one input and one output; this one has inputs "
            f"{[i.name for i in graph.inputs]} and outputs {list(graph.outputs)}."
        )
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}.")
    shape = tuple(int(d) for d in input_shape)
    check_input_shape(graph, shape, "NCHW")
    names = list(
        dict.fromkeys(
            registry.canonical_name(b) for b in (registry.backends() if backends is None else backends)
        )
    )
    weights = random_weights(graph, seed, shape) if weights is None else as_weights(weights, graph)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    start = time.perf_counter()
    expected = cast(np.ndarray, reference.run(graph, weights, x))  # one output: an array
    reference_ms = 1000.0 * (time.perf_counter() - start)
    rows = [
        Row(
            REFERENCE,
            "NumPy (float64)",
            OK,
            "NCHW",
            tuple(expected.shape),
            param_count(graph, shape),
            0.0,
            reference_ms,
        )
    ]
    rows += [_backend_row(name, graph, weights, x, expected, repeats, tolerance) for name in names]
    return Comparison(graph.name, shape, seed, repeats, tolerance, tuple(rows))


__all__ = [
    "DIFFERS",
    "FAILED",
    "NOT_INSTALLED",
    "OK",
    "REFERENCE",
    "TOLERANCE",
    "Comparison",
    "Row",
    "compare",
]
