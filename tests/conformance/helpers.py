"""Cases, reference results and comparisons shared by the conformance tests.

Tolerances. The reference computes in float64; a backend in float32 carries rounding errors of
about 1e-6 relative in every layer's output. Eval-mode outputs are well conditioned, so they must
match to `OUTPUT_RTOL` (1e-4) relative. Training mode is not always: BatchNorm over few values
per channel (deep stages at small test images) amplifies rounding, and ReLU / max-pool gradients
jump where a value sits within rounding of a kink (one such value in a 1x1 map changes the
gradient of a whole channel and of every weight upstream of it). So every training-mode
comparison also allows `NOISE_FACTOR` (10) times how much the *reference itself* moves when its
inputs and weights are perturbed by `NOISE` (1e-6 relative, the rounding a float32 layer output
carries). Where the problem is well conditioned (all per-node-type cases) that allowance is
negligible and the plain tolerances below apply; where it is not (the deep zoo models at 32x32,
ResNet-50 most), a backend is held to what float32 can reproduce at all, measured rather than
guessed. With the torch backend the largest error was 18% of its tolerance on every check
(errors up to 2.5x the reference's own noise), and injected bugs (zero max-pool padding, BN
momentum 1 - m, ignored eps, NHWC flatten order, swapped dilation, a straight-through ReLU
gradient, conv gradients scaled by 1.01) all fail.

Weight deltas (new - old) after one SGD step are compared per tensor to `DELTA_RTOL` (1e-3) of
that tensor's largest delta: float32 gradients summed over a batch of feature maps carry
relative errors of about 1e-4 (measured up to 6e-4 on resnet18 away from kinks), while a wrong
gradient is off by O(1). `DELTA_ATOL` (1e-5 of the largest delta of any tensor) covers tensors
whose exact gradient is zero, such as the bias of a convolution feeding a training-mode
BatchNorm. The noise allowance of the SGD check is capped at `NOISE_CAP` (1e-3) of each
tensor's largest update, so a zero update fails, and so does a gradient off by 1% on any tensor
whose update is over 1/800 of the largest; a case whose allowance exceeds the cap fails as unfit
to check gradients. On the ImageNet zoo models at 32x32 (last stage 1x1, BatchNorm over 4
values) the allowance reaches 3.2e-3 (preact_resnet18) to 10 (wide_resnet50_2) times the update
(resnet50: 3.8; a zero update passed on 62 of its 161 tensors), so their SGD step is
checked on configurations whose last stage is 2x2 (`cases.SGD_MODELS`), where it stays below
3.2e-4 of the update and torch, tf and flax err by at most 8e-5 of it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import numpy as np

import multires
from multires import reference
from multires.backend import SGD
from multires.shapes import infer_shapes, to_layout
from multires.weights import is_buffer

OUTPUT_RTOL = 1e-4
WEIGHT_RTOL = 1e-4
DELTA_RTOL = 1e-3
DELTA_ATOL = 1e-5
NOISE = 1e-6
NOISE_FACTOR = 10.0
NOISE_CAP = 1e-3
SGD_LR = SGD(lr=0.1)

CACHE = Path(os.environ.get("MULTIRES_REFERENCE_CACHE", Path(__file__).parents[2] / ".cache" / "reference"))
"""Where reference results are stored between test sessions (every backend's nox session needs
the same ones). An entry is keyed by the case and a hash of the code that computes it (the
`multires` sources and this file), so any change to them recomputes. `MULTIRES_REFERENCE_CACHE=`
(empty) turns the store off."""


@dataclass(frozen=True)
class Case:
    """A graph with a seeded batch, labels and random canonical weights."""

    id: str
    make_graph: Callable[[], multires.Graph] = field(compare=False)
    input_shape: tuple[int, int, int, int]
    seed: int = 0
    negative: bool = False
    """Inputs all below zero (max-pool padding must never win)."""
    eval_only: bool = False
    """Checked in eval mode only (the deepest models, whose float64 backward is slow)."""
    offsets: tuple[tuple[str, float], ...] = ()
    """`(weight name, value)` pairs added to channel 0 of those random weights: a large conv bias
    (and running mean) before a BatchNorm, where one-pass variance formulas cancel."""

    @cached_property
    def graph(self) -> multires.Graph:
        return self.make_graph()

    @cached_property
    def x(self) -> np.ndarray:
        """The NCHW float32 batch."""
        x = np.random.default_rng(self.seed).standard_normal(self.input_shape).astype(np.float32)
        return -np.abs(x) - 0.5 if self.negative else x

    @cached_property
    def labels(self) -> np.ndarray:
        (out,) = self.graph.outputs
        classes = infer_shapes(self.graph, self.input_shape)[out][1]
        return np.random.default_rng(self.seed + 1).integers(0, classes, self.input_shape[0])

    def make_weights(self) -> dict[str, np.ndarray]:
        """Random canonical weights (BatchNorm statistics included), reproducible from the seed,
        with `offsets` applied."""
        weights = multires.random_weights(self.graph, seed=self.seed, input_shape=self.input_shape)
        for name, offset in self.offsets:
            weights[name][0] += np.float32(offset)
        return weights

    def x_in(self, layout: str) -> np.ndarray:
        """The batch in `layout`."""
        return np.ascontiguousarray(self.x.transpose(0, 2, 3, 1) if layout == "NHWC" else self.x)

    def output_shape(self, layout: str) -> tuple[int, ...]:
        (out,) = self.graph.outputs
        return tuple(to_layout(infer_shapes(self.graph, self.input_shape)[out], layout))


@cache
def _code_hash() -> str:
    """SHA-256 of the sources the reference results depend on."""
    digest = hashlib.sha256()
    for path in sorted(Path(multires.__file__).parent.rglob("*.py")) + [Path(__file__)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingForward:
    """The parts of a training-mode reference forward the tests compare."""

    outputs: dict[str, np.ndarray]
    running: dict[str, np.ndarray]


class Oracle:
    """Reference results for one case, each computed once: on the case's own inputs and weights,
    and on a perturbed copy that measures how much float32 rounding can move them. Results are
    kept in `CACHE` so that the next backend's session reads rather than recomputes them."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def _stored(self, what: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """`compute()`, or its stored copy (float64 arrays by name, saved without pickle)."""
        if not os.environ.get("MULTIRES_REFERENCE_CACHE", "unset"):
            return compute()
        case = self.case
        key = hashlib.sha256(
            repr(
                (
                    _code_hash(),
                    case.graph.to_json(),
                    case.input_shape,
                    case.seed,
                    case.negative,
                    case.offsets,
                    what,
                )
            ).encode()
        ).hexdigest()[:24]
        path = CACHE / f"{case.id}-{what}-{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        result = compute()
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=CACHE, suffix=".npz", delete=False) as handle:
            np.savez(handle, **result)
        os.replace(handle.name, path)
        return result

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        return self.case.make_weights()

    @cached_property
    def _perturbed(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rng = np.random.default_rng(12345)
        x = self.case.x.astype(np.float64)
        x = x * (1 + NOISE * rng.standard_normal(x.shape))
        weights = {
            k: v.astype(np.float64) * (1 + NOISE * rng.standard_normal(v.shape))
            for k, v in self.weights.items()
        }
        return x, weights

    @cached_property
    def eval_output(self) -> np.ndarray:
        def compute() -> dict[str, np.ndarray]:
            return {"output": reference.run(self.case.graph, self.weights, self.case.x)}

        return self._stored("eval", compute)["output"]

    def _training(self, what: str, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> TrainingForward:
        def compute() -> dict[str, np.ndarray]:
            result = reference.forward(self.case.graph, dict(weights), x, training=True)
            return {
                **{f"outputs/{k}": v for k, v in result.outputs.items()},
                **{f"running/{k}": v for k, v in result.running.items()},
            }

        stored = self._stored(what, compute)
        parts: dict[str, dict[str, np.ndarray]] = {"outputs": {}, "running": {}}
        for name, value in stored.items():
            part, key = name.split("/", 1)
            parts[part][key] = value
        return TrainingForward(**parts)

    @cached_property
    def training(self) -> TrainingForward:
        return self._training("training", self.case.x, self.weights)

    @cached_property
    def training_perturbed(self) -> TrainingForward:
        return self._training("training-perturbed", *self._perturbed)

    @cached_property
    def sgd(self) -> dict[str, np.ndarray]:
        """New weights (float64) after one SGD step with `SGD_LR`."""

        def compute() -> dict[str, np.ndarray]:
            case = self.case
            return reference.sgd_step(case.graph, self.weights, case.x, case.labels, SGD_LR)[1]

        return self._stored("sgd", compute)

    @cached_property
    def sgd_perturbed_noise(self) -> dict[str, float]:
        """Per tensor, the largest change of the reference's weight delta under the perturbation."""

        def compute() -> dict[str, np.ndarray]:
            x, weights = self._perturbed
            new = reference.sgd_step(self.case.graph, weights, x, self.case.labels, SGD_LR)[1]
            return {k: np.max(np.abs((new[k] - weights[k]) - (self.sgd[k] - self.weights[k]))) for k in new}

        return {k: float(v) for k, v in self._stored("sgd-perturbed-noise", compute).items()}


def to_layout_array(value: np.ndarray, layout: str) -> np.ndarray:
    """A reference (NCHW) array as the backend returns it in `layout`."""
    return value.transpose(0, 2, 3, 1) if layout == "NHWC" and value.ndim == 4 else value


def _worst(problems: list[tuple[float, str]], what: str) -> str:
    problems.sort(reverse=True)
    lines = [line for _, line in problems[:8]]
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return f"{what}: {len(problems)} tensor(s) out of tolerance:\n  " + "\n  ".join(lines) + more


def assert_output(actual: np.ndarray, expected: np.ndarray, layout: str, what: str) -> None:
    """Eval-mode output within OUTPUT_RTOL (relative to its largest value) of the reference."""
    expected = to_layout_array(expected, layout)
    assert np.shape(actual) == expected.shape, f"{what}: shape {np.shape(actual)}, expected {expected.shape}"
    error = reference.relative_error(actual, expected)
    assert error <= OUTPUT_RTOL, f"{what}: relative error {error:.2e} > {OUTPUT_RTOL:.0e}"


def assert_noisy(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    perturbed: Mapping[str, np.ndarray],
    rtol: float,
    what: str,
) -> None:
    """Each tensor within `rtol` of its largest reference value plus NOISE_FACTOR times the
    reference's own change under the perturbation (see the module docstring)."""
    assert sorted(actual) == sorted(expected), (
        f"{what}: names differ: missing {sorted(set(expected) - set(actual))}, "
        f"unexpected {sorted(set(actual) - set(expected))}"
    )
    problems = []
    for name, value in expected.items():
        value = np.asarray(value, dtype=np.float64)
        got = np.asarray(actual[name], dtype=np.float64)
        assert got.shape == value.shape, f"{what}: {name} has shape {got.shape}, expected {value.shape}"
        scale = float(np.max(np.abs(value), initial=0.0))
        noise = float(np.max(np.abs(np.asarray(perturbed[name]) - value), initial=0.0))
        tolerance = rtol * scale + NOISE_FACTOR * noise
        error = float(np.max(np.abs(got - value), initial=0.0))
        if not error <= tolerance:
            problems.append(
                (
                    error / max(tolerance, 1e-30),
                    f"{name}: max error {error:.2e} > tolerance {tolerance:.2e} "
                    f"(scale {scale:.2e}, reference noise {noise:.2e})",
                )
            )
    assert not problems, _worst(problems, what)


def assert_loss(loss: float, oracle: Oracle, what: str) -> None:
    """The loss of a training step matches the reference's on the training-mode logits."""
    (name,) = oracle.case.graph.outputs
    labels = oracle.case.labels
    expected, _ = reference.softmax_cross_entropy(oracle.training.outputs[name], labels)
    perturbed, _ = reference.softmax_cross_entropy(oracle.training_perturbed.outputs[name], labels)
    assert_noisy(
        {"loss": np.array(loss)}, {"loss": np.array(expected)}, {"loss": np.array(perturbed)}, 1e-4, what
    )


def assert_sgd_step(actual: Mapping[str, np.ndarray], oracle: Oracle) -> None:
    """Updated weights and running statistics match the reference's SGD step, and so do the
    weight deltas, which isolate the gradients (see the module docstring for the tolerances).
    Fails first if the reference's own noise is too large for the check to mean anything."""
    old = oracle.weights
    expected = oracle.sgd
    assert sorted(actual) == sorted(expected), (
        f"weights after the step: names differ: missing {sorted(set(expected) - set(actual))}, "
        f"unexpected {sorted(set(actual) - set(expected))}"
    )
    noise = oracle.sgd_perturbed_noise
    deltas = {k: expected[k] - old[k] for k in expected}
    scales = {k: float(np.max(np.abs(d), initial=0.0)) for k, d in deltas.items()}
    largest = max(scale for k, scale in scales.items() if not is_buffer(k))
    allowances, noisy = {}, []
    for name, new in expected.items():
        allowance, cap = NOISE_FACTOR * noise[name], NOISE_CAP * scales[name]
        # Below the check's absolute term the noise decides nothing (zero gradients, buffers).
        floor = (
            WEIGHT_RTOL * float(np.max(np.abs(new), initial=0.0)) if is_buffer(name) else DELTA_ATOL * largest
        )
        if not allowance <= cap + floor:
            ratio = allowance / max(scales[name], 1e-30)
            noisy.append(
                (ratio, f"{name}: allowance {allowance:.2e} is {ratio:.1e} of its update {scales[name]:.2e}")
            )
        allowances[name] = min(allowance, cap)
    assert not noisy, _worst(
        noisy,
        f"{oracle.case.id}: the reference's own SGD update moves by more than NOISE_CAP ({NOISE_CAP:g}) of "
        "the update under a float32-sized perturbation, so this case cannot check gradients; check "
        "a better-conditioned configuration (deep stages larger than 1x1, another seed) instead",
    )
    weight_problems, delta_problems = [], []
    for name, new in expected.items():
        got = np.asarray(actual[name], dtype=np.float64)
        assert got.shape == new.shape, f"{name}: shape {got.shape}, expected {new.shape}"
        error = float(np.max(np.abs(got - new), initial=0.0))
        tolerance = WEIGHT_RTOL * float(np.max(np.abs(new), initial=0.0)) + allowances[name]
        if not error <= tolerance:
            weight_problems.append(
                (error / max(tolerance, 1e-30), f"{name}: max error {error:.2e} > {tolerance:.2e}")
            )
        if is_buffer(name):
            continue
        delta_error = float(np.max(np.abs((got - old[name]) - deltas[name]), initial=0.0))
        delta_tolerance = DELTA_RTOL * scales[name] + DELTA_ATOL * largest + allowances[name]
        if not delta_error <= delta_tolerance:
            delta_problems.append(
                (
                    delta_error / max(delta_tolerance, 1e-30),
                    f"{name}: delta error {delta_error:.2e} > {delta_tolerance:.2e} (largest delta "
                    f"{scales[name]:.2e}, reference noise {noise[name]:.2e})",
                )
            )
    reports = [
        _worst(problems, what)
        for problems, what in (
            (weight_problems, "weights after one SGD step"),
            (delta_problems, "weight deltas of one SGD step (gradients)"),
        )
        if problems
    ]
    assert not reports, "\n".join(reports)
