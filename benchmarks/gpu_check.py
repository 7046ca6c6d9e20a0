"""GPU check: the torch and flax backends on an accelerator, against the reference and the book.

    python benchmarks/gpu_check.py                        # a CUDA machine: under 8 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths on a CPU, tiny sizes (CI)

Made for a CUDA machine whose Python has torch and jax/flax/optax but no TensorFlow, MXNet or
nox, where nothing can be downloaded: install multires with `pip install --no-deps
--no-build-isolation -e .` and run this file. It needs NumPy, multires and the frameworks it
checks (a framework that is not installed is skipped, saying so); pytest and hypothesis are
optional, and nothing here imports rich.

1. Conformance, with TF32 off (`torch.backends.cuda.matmul.allow_tf32` and
   `torch.backends.cudnn.allow_tf32` False, JAX's default matmul precision "highest",
   `NVIDIA_TF32_OVERRIDE=0` for cuBLAS and cuDNN): for each graph in `CASES` (`QUICK_CASES`) and each
   layout the backend has, from random weights with random BatchNorm statistics
   (`multires.random_weights`), an eval-mode forward and two SGD steps with momentum and weight
   decay from those weights, against the float64 NumPy reference (`multires.reference`): the
   first step's logits are the training-mode forward and its weights hold the running statistics;
   the second starts from the first's momentum buffers. Every relative error is reported and must
   be within the conformance suite's budget (`BUDGETS`: 1e-4 for outputs, losses, weights and
   running statistics, 1e-3 for updates and momentum buffers, which are gradients), plus, in
   training mode, the suite's allowance for how far float32 rounding can move the reference
   itself (`NOISE_FACTOR`; tests/conformance/helpers.py explains both). Then, where pytest and
   hypothesis are installed, a quick subset of `tests/conformance` (`PYTEST_SUBSET`) runs with
   `MULTIRES_DEVICE` set, in a subprocess with the same settings.
2. Throughput (`WORKLOADS`): d2l_resnet18 (1 channel, 10 classes) at 96x96, batch 256, and
   torchvision's ResNet-50 at 224x224, batch 128, each in fp32 and bf16. The loop is the trainer's:
   batches `prepare`d in a background thread while `step` runs, after warm-up steps (compilation,
   autotuning), timed in chunks that end with `take_totals` (the host waits for the device there),
   for `--seconds` a workload. d2l_resnet18 is shown next to the book's figures: the MXNet edition's
   57 s per epoch of 60,000 images on one GPU (1053 examples/s) and the DJL edition's 2432.9
   examples/s on 4 GPUs. The fp32 rows are true float32 (TF32 stays off).
3. Results: `gpu_check.json` and `gpu_check.md` in `--out` (default `benchmarks/results`;
   `--quick` without `--out` writes `gpu_check-quick.*`, so a smoke run never replaces a GPU run's files).

The run keeps to `--budget` seconds (default 420; no limit with `--quick`): a workload or pytest run that would start past
it is skipped and reported, and pytest is stopped at it. The exit status is 1 when a conformance
check fails or a check or measurement raises an error, so CI catches it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from common import format_table, framework_versions, machine, time_calls

import multires
from multires import reference
from multires.backend import DEVICE_ENV, SGD, get_backend
from multires.errors import BackendUnavailableError, DeviceError, MultiresError
from multires.graph import Graph
from multires.shapes import infer_shapes
from multires.weights import is_buffer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

FRAMEWORKS = {"torch": ("torch",), "flax": ("jax", "flax", "optax")}
"""The backends checked and the modules each needs."""

DEVICE_NAMES = {"cuda": {"torch": "cuda", "flax": "gpu"}, "cpu": {"torch": "cpu", "flax": "cpu"}}
"""`--device` in each backend's own spelling."""

RTOL = 1e-4
"""The suite's budget for outputs, losses, weights and running statistics: the error relative to
the tensor's largest value (`OUTPUT_RTOL`, `WEIGHT_RTOL` in tests/conformance/helpers.py)."""
DELTA_RTOL, DELTA_ATOL = 1e-3, 1e-5
"""The suite's budget for gradients: an update (or momentum buffer) within `DELTA_RTOL` of that
tensor's largest value plus `DELTA_ATOL` of the largest value of any tensor."""
NOISE, NOISE_FACTOR, NOISE_CAP = 1e-6, 10.0, 1e-3
"""The suite's allowance for ill-conditioning: training-mode results may also differ by
`NOISE_FACTOR` times how far the reference itself moves when its inputs and weights are perturbed
by `NOISE` (relative), capped at `NOISE_CAP` of each tensor's update for weights, updates and
buffers (tests/conformance/helpers.py explains it)."""

BUDGETS = {
    "eval": RTOL,
    "train_out": RTOL,
    "running": RTOL,
    "loss": RTOL,
    "weights": RTOL,
    "updates": DELTA_RTOL,
    "buffers": DELTA_RTOL,
}
"""What is compared, and its relative budget (before the noise allowance)."""

OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
"""The conformance steps' optimizer: the second step's update uses the first's momentum."""

BOOK_EXAMPLES_PER_SEC = 60_000 / 57
"""The book's d2l_resnet18 figure (MXNet edition, one GPU): 57 s per epoch of 60,000 examples."""
DJL_EXAMPLES_PER_SEC = 2432.9
"""The DJL edition's d2l_resnet18 figure, on 4 GPUs."""


# What is checked and measured.


@dataclass(frozen=True)
class Case:
    """A conformance graph at an input shape (NCHW) with a seed; `sgd`: also two SGD steps
    (otherwise the eval-mode and training-mode forward only)."""

    id: str
    make_graph: Callable[[], Graph] = field(compare=False, repr=False)
    shape: tuple[int, int, int, int]
    seed: int = 0
    sgd: bool = True


def one_block_per_stage(model: str) -> Graph:
    """Zoo ResNet `model` (torchvision's) with one block per stage, its own blocks, 10 classes."""
    from multires.zoo import resnet as zoo

    registered = getattr(zoo, model)  # partial(builder, name, block, layers)
    name, block, _ = registered.args
    return registered.func(f"{name}_1111", block, (1, 1, 1, 1), num_classes=10)


CASES = [
    Case("d2l_resnet18", partial(multires.spec, "d2l_resnet18"), (4, 1, 64, 64), seed=5),
    Case("resnet18", partial(multires.spec, "resnet18", num_classes=10), (4, 3, 64, 64), sgd=False),
    Case("resnet18_1111", partial(one_block_per_stage, "resnet18"), (4, 3, 40, 40)),
    Case(
        "resnext50_32x4d", partial(multires.spec, "resnext50_32x4d", num_classes=10), (4, 3, 64, 64), 4, False
    ),
    Case("resnext50_32x4d_1111", partial(one_block_per_stage, "resnext50_32x4d"), (4, 3, 40, 40), seed=11),
]
"""The suite's choice (tests/conformance/cases.py): the zoo's deep models in eval and training
mode, and their SGD steps with one block per stage at 40x40, where the last stage is 2x2 and the
reference's own gradients are well conditioned enough to compare (seeds where no ReLU input or
max-pool runner-up sits within rounding of its kink)."""

QUICK_CASES = [
    Case("d2l_resnet_1_1", partial(multires.spec, "d2l_resnet", arch=((1, 64), (1, 128))), (4, 1, 16, 16)),
    Case("resnext50_32x4d_1111", partial(one_block_per_stage, "resnext50_32x4d"), (4, 3, 40, 40), seed=11),
]


@dataclass(frozen=True)
class Workload:
    """A throughput measurement: a graph, its input (C, H, W) and batch size."""

    name: str
    make_graph: Callable[[], Graph] = field(compare=False, repr=False)
    image: tuple[int, int, int]
    batch: int
    book: bool = False
    """Whether the book's d2l_resnet18 figures apply (96x96, batch 256)."""


WORKLOADS = [
    Workload("d2l_resnet18", partial(multires.spec, "d2l_resnet18"), (1, 96, 96), 256, book=True),
    Workload("resnet50", partial(multires.spec, "resnet50"), (3, 224, 224), 128),
]
QUICK_WORKLOADS = [
    Workload("d2l_resnet18", partial(multires.spec, "d2l_resnet18"), (1, 32, 32), 16),
    Workload("resnet50_1111", partial(one_block_per_stage, "resnet50"), (3, 64, 64), 4),
]
PRECISIONS = ("fp32", "bf16")

PYTEST_SUBSET = (
    "(test_sgd_steps_match or test_the_trainer_matches or optimizer_state_resume or precision or far_from_zero "
    "or (test_equivalence and (conv_groups or conv_dilation or maxpool_padding_negative or avgpool_exclude_pad "
    "or d2l_resnet18))) and not data_parallel and not d2l_resnet18_tf"
)
"""The `-k` selection of tests/conformance run on the device (48 tests a backend): the Runner and
trainer against the reference over SGD steps, resuming optimizer state, mixed precision, BatchNorm
far from zero, and the equivalence tests of four per-node traps and d2l_resnet18."""
QUICK_PYTEST_SUBSET = (
    "(test_sgd_steps_match or precision or (test_equivalence and (conv_groups or maxpool_padding_negative))) "
    "and not data_parallel"
)


# Settings.


def exact_fp32(backend: str) -> None:
    """Turn TF32 off in `backend`'s framework, so float32 means float32 on Ampere and later GPUs."""
    if backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif backend == "flax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


PROCESS_ENV = {
    "NVIDIA_TF32_OVERRIDE": "0",  # cuBLAS and cuDNN: no TF32 in float32, whatever a framework asks
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # JAX takes memory as it needs it, leaving torch room
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
"""Environment set before any framework starts (in this process and pytest's)."""


class Clock:
    """Seconds since the start, and whether the budget still allows a stage of `need` seconds."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.budget - self.elapsed

    def allows(self, need: float) -> bool:
        return self.left >= need

    def say(self, message: str) -> None:
        print(f"[{self.elapsed:5.0f}s] {message}", flush=True)


# Conformance.


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _max(value: Any) -> float:
    return float(np.max(np.abs(np.asarray(value, dtype=np.float64)), initial=0.0))


@dataclass
class Worst:
    """The largest relative error of one kind, and the largest error over its tolerance (with where)."""

    error: float = 0.0
    ratio: float = 0.0
    where: str = ""

    def add(self, error: float, scale: float, tolerance: float, where: str) -> None:
        """One tensor's `max|got - expected|`, reported relative to `scale`, judged against `tolerance`."""
        relative, ratio = error / max(scale, 1e-30), error / max(tolerance, 1e-30)
        if not relative <= self.error:  # NaN wins
            self.error = relative
        if not ratio <= self.ratio:
            self.ratio, self.where = ratio, where


@dataclass(frozen=True)
class Results:
    """Reference results for one set of inputs and weights."""

    eval: np.ndarray
    train_out: np.ndarray
    running: dict[str, np.ndarray]
    losses: list[float]
    after: list[dict[str, np.ndarray]]
    buffers: list[dict[str, np.ndarray]]


class Expected:
    """A case's input, weights and float64 reference results: the eval-mode and training-mode
    outputs and running statistics, and (for `Case.sgd`) the loss, weights and momentum buffers of
    two SGD steps on the batch from the same weights, the first from no momentum and the second
    from the first's buffers (rounded to float32), so the momentum term counts. (A second step from
    the weights each side reached, with its own rounding, or on a second batch, could meet a ReLU
    or max-pool kink that makes the comparison meaningless.) Also the same results from the input
    and weights perturbed by `NOISE`, which measure how far float32 rounding can move them."""

    def __init__(self, case: Case) -> None:
        self.case = case
        graph = self.graph = case.make_graph()
        (output,) = graph.outputs
        classes = infer_shapes(graph, case.shape)[output][1]
        self.x = np.random.default_rng(case.seed).standard_normal(case.shape).astype(np.float32)
        self.labels = np.random.default_rng(case.seed + 1).integers(0, classes, case.shape[0])
        self.weights = multires.random_weights(graph, case.seed, case.shape)
        self.nominal = self._results(self.x, self.weights, None)
        self.states = [
            {},
            *({k: v.astype(np.float32) for k, v in b.items()} for b in self.nominal.buffers[:1]),
        ]
        noise = np.random.default_rng(12345)

        def perturb(value: np.ndarray) -> np.ndarray:
            return value.astype(np.float64) * (1 + NOISE * noise.standard_normal(value.shape))

        self.perturbed_weights = {k: perturb(v) for k, v in self.weights.items()}
        self.perturbed = self._results(perturb(self.x), self.perturbed_weights, self.states)

    def _results(
        self, x: np.ndarray, weights: dict[str, np.ndarray], states: list[dict[str, np.ndarray]] | None
    ) -> Results:
        graph = self.graph
        (output,) = graph.outputs
        training = reference.forward(graph, weights, x, training=True)
        losses: list[float] = []
        after: list[dict[str, np.ndarray]] = []
        buffers: list[dict[str, np.ndarray]] = []
        for step in range(2 if self.case.sgd else 0):
            state: dict[str, np.ndarray] = {}
            if step:
                state = states[step] if states else {k: v.astype(np.float32) for k, v in buffers[0].items()}
            loss, new, buffer = reference.sgd_step(graph, weights, x, self.labels, OPTIMIZER, state)
            losses.append(loss)
            after.append(new)
            buffers.append(buffer)
        evaluated = reference.run(graph, weights, x)
        assert isinstance(evaluated, np.ndarray)  # one output
        return Results(
            evaluated,
            training.outputs[output],
            training.running,
            losses,
            after,
            buffers,
        )


def check_case(backend: str, device: str, layout: str, expected: Expected) -> dict[str, Any]:
    """The relative errors of `backend` on one case in one layout (see `BUDGETS`), each judged
    against its budget plus the noise allowance, with where the worst one is."""
    graph = expected.graph
    runner = multires.make_runner(graph, expected.weights, backend, layout, OPTIMIZER, device=device)
    nominal, perturbed = expected.nominal, expected.perturbed
    worst = {kind: Worst() for kind in BUDGETS}
    capped = 0
    x = _nhwc(expected.x) if layout == "NHWC" else expected.x

    def noisy(kind: str, got: Any, want: Any, moved: Any, where: str) -> None:
        scale = _max(want)
        worst[kind].add(_max(np.asarray(got) - want), scale, RTOL * scale + NOISE_FACTOR * _max(moved), where)

    def training(logits: np.ndarray, weights: Mapping[str, np.ndarray]) -> None:
        noisy("train_out", logits, nominal.train_out, perturbed.train_out - nominal.train_out, "logits")
        for name, value in nominal.running.items():
            noisy("running", weights[name], value, perturbed.running[name] - value, name)

    out = runner.forward(x)
    worst["eval"].add(_max(out - nominal.eval), _max(nominal.eval), RTOL * _max(nominal.eval), "output")
    if not expected.case.sgd:
        training(runner.forward(x, training=True), runner.weights())
    old, old_perturbed = expected.weights, expected.perturbed_weights
    for step, new in enumerate(nominal.after):
        if step:
            runner.set_weights(old)
            runner.set_optimizer_state(expected.states[step])
        loss, logits = runner.train_step(x, expected.labels)
        weights, state = runner.weights(), runner.optimizer_state()
        new_perturbed = perturbed.after[step]
        label = f"step {step + 1}"
        if step == 0:
            training(logits, weights)
        noisy("loss", loss, nominal.losses[step], perturbed.losses[step] - nominal.losses[step], label)
        deltas = {k: new[k] - old[k] for k in new}
        scales = {k: _max(d) for k, d in deltas.items()}
        largest = max(scales[k] for k in new if not is_buffer(k))
        for name, value in new.items():
            moved = _max((new_perturbed[name] - old_perturbed[name]) - deltas[name])
            allowance = min(NOISE_FACTOR * moved, NOISE_CAP * scales[name])
            floor = RTOL * _max(value) if is_buffer(name) else DELTA_ATOL * largest
            capped += NOISE_FACTOR * moved > NOISE_CAP * scales[name] + floor
            where = f"{label} {name}"
            worst["weights"].add(
                _max(weights[name] - value), _max(value), RTOL * _max(value) + allowance, where
            )
            if not is_buffer(name):
                error = _max((weights[name] - old[name]) - deltas[name])
                tolerance = DELTA_RTOL * scales[name] + DELTA_ATOL * largest + allowance
                worst["updates"].add(
                    error, scales[name] + DELTA_ATOL / DELTA_RTOL * largest, tolerance, where
                )
        want, want_perturbed = nominal.buffers[step], perturbed.buffers[step]
        if sorted(state) != sorted(want):
            worst["buffers"].add(
                float("inf"), 1.0, 1.0, f"{label}: names differ {sorted(set(state) ^ set(want))[:3]}"
            )
            continue
        largest = max((_max(v) for v in want.values()), default=0.0)
        for name, value in want.items():
            scale = _max(value)
            allowance = min(NOISE_FACTOR * _max(want_perturbed[name] - value), NOISE_CAP * scale)
            tolerance = DELTA_RTOL * scale + DELTA_ATOL * largest + allowance
            worst["buffers"].add(
                _max(state[name] - value),
                scale + DELTA_ATOL / DELTA_RTOL * largest,
                tolerance,
                f"{label} {name}",
            )
    kinds = [k for k in BUDGETS if expected.case.sgd or k in ("eval", "train_out", "running")]
    failed = [kind for kind in kinds if not worst[kind].ratio <= 1.0]
    return {
        "errors": {kind: worst[kind].error for kind in kinds},
        "ratios": {kind: worst[kind].ratio for kind in kinds},
        "worst": {kind: worst[kind].where for kind in failed},
        "failed": failed,
        "ratio": max(worst[kind].ratio for kind in kinds),
        "capped_allowances": int(capped),
    }


SYSTEMATIC = (DeviceError, BackendUnavailableError, TypeError)
"""Errors that every later check of the backend would raise too (no such device, a backend that
does not take `device=`): the backend's remaining checks report it without running."""


def conformance(
    backends: list[str],
    devices: Mapping[str, str],
    cases: list[Case],
    clock: Clock,
    broken: dict[str, str],
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """`check_case` for every backend, case and layout; a row per check."""
    rows = []
    for case in cases:
        if all(backend in broken for backend in backends):
            expected = None  # every check reports its backend's error: no reference needed
        else:
            clock.say(f"reference: {case.id} {'x'.join(map(str, case.shape))}")
            expected = Expected(case)
        for backend in backends:
            for layout in get_backend(backend).LAYOUTS:
                row: dict[str, Any] = {
                    "backend": backend,
                    "device": devices[backend],
                    "layout": layout,
                    "case": case.id,
                    "input": "x".join(map(str, case.shape)),
                }
                if backend in broken or expected is None:
                    rows.append({**row, "status": "error", "error": broken[backend]})
                    continue
                try:
                    result = check_case(backend, devices[backend], layout, expected)
                except Exception as error:  # noqa: BLE001  (reported, and fails the run)
                    rows.append({**row, "status": "error", "error": _describe(error)})
                    clock.say(f"{backend} {layout} {case.id}: ERROR {_describe(error)}")
                    if verbose:
                        traceback.print_exc()
                    if isinstance(error, SYSTEMATIC):
                        broken[backend] = _describe(error)
                    continue
                status = "fail" if result["failed"] else "pass"
                rows.append({**row, **result, "status": status})
                errors = ", ".join(f"{k} {v:.1e}" for k, v in result["errors"].items())
                worst = f"; over tolerance: {result['worst']}" if result["failed"] else ""
                clock.say(f"{backend} {layout} {case.id}: {status} ({errors}){worst}")
        gc.collect()
    return rows


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# pytest.

RESULT_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def pytest_subset(
    backend: str, device: str, selection: str, out: Path, clock: Clock, reserve: float
) -> dict[str, Any]:
    """`pytest tests/conformance --backend B -k selection` with `MULTIRES_DEVICE=device` and TF32
    off, in a subprocess stopped when the budget (less `reserve`) runs out; counts by outcome."""
    row: dict[str, Any] = {"backend": backend, "device": device, "selection": selection}
    missing = [m for m in ("pytest", "hypothesis") if find_spec(m) is None]
    if missing:
        return {**row, "status": "skipped", "note": f"{' and '.join(missing)} not installed"}
    if not (ROOT / "tests" / "conformance").is_dir():
        return {**row, "status": "skipped", "note": "no tests/conformance next to this script"}
    timeout = None if math.isinf(clock.left) else clock.left - reserve
    if timeout is not None and timeout < 20:
        return {**row, "status": "skipped", "note": "no time left in the budget"}
    launch = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import gpu_check; gpu_check.exact_fp32({backend!r}); "
        "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", launch, "tests/conformance", "--backend", backend, "-k", selection]
    command += ["-v", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=short", "-rfE"]
    env = {**os.environ, **PROCESS_ENV, DEVICE_ENV: device}
    log = out / f"gpu_check-pytest-{backend}.log"
    limit = f", at most {timeout:.0f} s" if timeout is not None else ""
    clock.say(f"pytest {backend} on {device} (-k {selection!r}), log {log}{limit}")
    began = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
    text = log.read_text(errors="replace")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    names = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}
    failures = []
    for line in text.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            counts[names.get(match[2], "skipped")] += 1
            if match[2] in ("FAILED", "ERROR"):
                failures.append(match[1])
    if code is None:
        status = "fail" if failures else "incomplete"
        note = f"stopped at the budget after {time.perf_counter() - began:.0f} s"
    elif code in (0, 5):  # 5: nothing selected
        status, note = "pass", "" if code == 0 else "no test selected"
    else:
        status = "fail"
        note = f"pytest exit status {code}" + ("" if failures else ": " + _tail(text))
    return {
        **row,
        **counts,
        "seconds": round(time.perf_counter() - began, 1),
        "status": status,
        "note": note,
        "failures": failures,
        "log": log.name,
    }


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:400]


# Throughput.


def _prepared(
    runner: Any, host: list[tuple[np.ndarray, np.ndarray]], ahead: int = 2
) -> Generator[Any, None, None]:
    """Batches `prepare`d by the runner in a background thread, `ahead` of the step that takes
    them (as `multires.train` prefetches), cycling through the host batches."""
    with ThreadPoolExecutor(1, thread_name_prefix="gpu-check-prefetch") as pool:
        pending: deque[Future[Any]] = deque()
        index = 0
        try:
            while True:
                while len(pending) <= ahead:
                    pending.append(pool.submit(runner.prepare, *host[index % len(host)]))
                    index += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def throughput(
    backend: str, device: str, workload: Workload, precision: str, warmup: int, seconds: float, chunk: int
) -> dict[str, Any]:
    """Training examples/s of `workload` in `backend` (SGD with momentum; see the module docstring)."""
    graph = workload.make_graph()
    shape = (workload.batch, *workload.image)
    runner = multires.make_runner(
        graph,
        multires.init_weights(graph, 0, shape),
        backend,
        None,
        SGD(lr=0.05, momentum=0.9),
        device=device,
        precision=precision,
    )
    (output,) = graph.outputs
    classes = infer_shapes(graph, shape)[output][1]
    rng = np.random.default_rng(0)
    host = []
    for _ in range(2):
        x = rng.random(shape, dtype=np.float32)
        host.append((_nhwc(x) if runner.layout == "NHWC" else x, rng.integers(0, classes, workload.batch)))
    batches = _prepared(runner, host)
    try:
        began = time.perf_counter()
        for _ in range(warmup):
            runner.step(next(batches))
        runner.take_totals()
        first = time.perf_counter() - began
        steps, wall = 0, 0.0
        while steps == 0 or wall < seconds:
            per_step, _ = time_calls(lambda: runner.step(next(batches)), chunk, runner.take_totals)
            steps += chunk
            wall += per_step * chunk
    finally:
        batches.close()
    rate = steps * workload.batch / wall
    row = {
        "examples_per_sec": round(rate, 1),
        "ms_per_step": round(1000 * wall / steps, 2),
        "steps": steps,
        "warmup_s": round(first, 1),
        "layout": runner.layout,
    }
    if workload.book:
        row.update(
            epoch_s=round(60_000 / rate, 1),
            vs_book=round(rate / BOOK_EXAMPLES_PER_SEC, 2),
            vs_djl=round(rate / DJL_EXAMPLES_PER_SEC, 2),
        )
    return row


def throughputs(
    backends: list[str],
    devices: Mapping[str, str],
    workloads: list[Workload],
    args: argparse.Namespace,
    clock: Clock,
    broken: dict[str, str],
) -> list[dict[str, Any]]:
    rows = []
    warmup, chunk = (1, 2) if args.quick else (args.warmup, 5)
    for workload in workloads:
        for backend in backends:
            for precision in PRECISIONS:
                row: dict[str, Any] = {
                    "model": workload.name,
                    "image": "x".join(map(str, workload.image)),
                    "batch": workload.batch,
                    "backend": backend,
                    "device": devices[backend],
                    "precision": precision,
                }
                if backend in broken:
                    rows.append({**row, "status": "error", "error": broken[backend]})
                    continue
                if not clock.allows(args.seconds + 30):
                    rows.append({**row, "status": "skipped", "error": "no time left in the budget"})
                    clock.say(f"{workload.name} {backend} {precision}: skipped (budget)")
                    continue
                clock.say(f"{workload.name} {row['image']} batch {workload.batch} {backend} {precision} ...")
                try:
                    row.update(
                        throughput(
                            backend, devices[backend], workload, precision, warmup, args.seconds, chunk
                        )
                    )
                except Exception as error:  # noqa: BLE001  (reported, and fails the run)
                    rows.append({**row, "status": "error", "error": _describe(error)})
                    clock.say(f"  ERROR {_describe(error)}")
                    if args.verbose:
                        traceback.print_exc()
                    continue
                finally:
                    _release(backend)
                rows.append({**row, "status": "ok"})
                book = f", {row['epoch_s']} s/epoch ({row['vs_book']}x the book)" if "epoch_s" in row else ""
                clock.say(
                    f"  {row['examples_per_sec']:.1f} examples/s, {row['ms_per_step']} ms/step over {row['steps']} "
                    f"steps (warm-up {row['warmup_s']} s){book}"
                )
    return rows


def _release(backend: str) -> None:
    """Free the last workload's device memory before the next one."""
    gc.collect()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# Report.


def hardware(backends: list[str], devices: Mapping[str, str]) -> dict[str, str]:
    """The accelerator (or CPU) each backend computes on."""
    found = {"host": machine()}
    for backend in backends:
        try:
            if backend == "torch":
                import torch

                kind = torch.device(devices[backend]).type
                found[backend] = (
                    f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
                    if kind == "cuda" and torch.cuda.is_available()
                    else kind
                )
            elif backend == "flax":
                import jax

                chosen = jax.devices(devices[backend])
                found[backend] = f"{chosen[0].device_kind} x{len(chosen)} ({jax.default_backend()} backend)"
        except Exception as error:  # noqa: BLE001
            found[backend] = f"unavailable: {_describe(error)}"
    return found


def _cells(
    rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[dict[str, Any]], str]]]
) -> str:
    """A Markdown table of `rows`, each cell a string from its column's function."""
    if not rows:
        return "(none)"
    table = [{key: make(row) for key, _, make in columns} for row in rows]
    return format_table(
        table, [(key, header, ">" if key.startswith("#") else "") for key, header, _ in columns]
    )


def _e(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: f"{row['errors'][key]:.1e}" if key in row.get("errors", {}) else "-"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: conformance, pytest and throughput tables."""
    meta = report["meta"]
    lines = [
        "# GPU check: torch and flax on the device",
        "",
        f"Written by `benchmarks/gpu_check.py{' --quick' if meta['quick'] else ''}` on {meta['date']} "
        f"({meta['seconds']:.0f} s). Device `{meta['device']}`: "
        + "; ".join(f"{k}: {v}" for k, v in meta["hardware"].items())
        + f". Python {meta['python']}; "
        + "; ".join(meta["versions"].values())
        + ". TF32 off (fp32 is float32).",
        "",
        f"**Result: {'pass' if report['ok'] else 'FAIL'}.**",
        "",
        "## Conformance against the float64 reference",
        "",
        "Largest relative error of each kind over the eval-mode forward and two SGD steps (lr 0.1, momentum 0.9, "
        "weight decay 1e-4) from random weights and BatchNorm statistics; budgets: "
        + ", ".join(f"{k} {v:g}" for k, v in BUDGETS.items())
        + f" (updates and buffers are gradients), each plus {NOISE_FACTOR:g} times the reference's own change under a "
        f"{NOISE:g} relative perturbation in training mode (capped at {NOISE_CAP:g} of the update); `worst / tolerance` "
        "must be at most 1. `train out` is the first step's training-mode logits; the second step starts from "
        "the first's momentum buffers. The deep models' SGD steps are checked with one block per stage (`_1111`), "
        "as the suite does: at small images their full-depth gradients are too ill-conditioned to compare.",
        "",
    ]
    columns = [
        ("backend", "backend", lambda r: r["backend"]),
        ("layout", "layout", lambda r: r["layout"]),
        ("case", "case", lambda r: r["case"]),
        ("input", "input", lambda r: r["input"]),
        *((f"#{k}", k.replace("_", " "), _e(k)) for k in BUDGETS),
        ("#ratio", "worst / tolerance", lambda r: f"{r['ratio']:.2f}" if "ratio" in r else "-"),
        ("status", "result", lambda r: r["status"] + (f": {r['error']}" if r.get("error") else "")),
    ]
    lines += [_cells(report["conformance"], columns), ""]
    if report["pytest"]:
        lines += ["## tests/conformance subset", ""]
        columns = [
            ("backend", "backend", lambda r: r["backend"]),
            ("device", "MULTIRES_DEVICE", lambda r: r["device"]),
            ("#passed", "passed", lambda r: str(r.get("passed", "-"))),
            ("#failed", "failed", lambda r: str(r.get("failed", "-"))),
            ("#errors", "errors", lambda r: str(r.get("errors", "-"))),
            ("#skipped", "skipped", lambda r: str(r.get("skipped", "-"))),
            ("#seconds", "s", lambda r: str(r.get("seconds", "-"))),
            ("status", "result", lambda r: r["status"] + (f" ({r['note']})" if r.get("note") else "")),
        ]
        lines += [
            f'Selection: `-k "{report["pytest"][0]["selection"]}"`.',
            "",
            _cells(report["pytest"], columns),
            "",
        ]
    lines += [
        "## Training throughput",
        "",
        "SGD with momentum, batches prepared in a background thread, examples/s after warm-up (compilation), "
        "fp32 without TF32; "
        f"the book's d2l_resnet18 (96x96, batch 256): {BOOK_EXAMPLES_PER_SEC:.0f} examples/s on one GPU "
        f"(MXNet edition, 57 s per 60,000-example epoch); DJL edition: {DJL_EXAMPLES_PER_SEC} examples/s on 4 GPUs.",
        "",
    ]
    columns = [
        ("model", "model", lambda r: r["model"]),
        ("image", "image", lambda r: r["image"]),
        ("#batch", "batch", lambda r: str(r["batch"])),
        ("backend", "backend", lambda r: r["backend"]),
        ("precision", "precision", lambda r: r["precision"]),
        ("#rate", "examples/s", lambda r: f"{r['examples_per_sec']:.1f}" if "examples_per_sec" in r else "-"),
        ("#ms", "ms/step", lambda r: f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "-"),
        ("#warm", "warm-up s", lambda r: f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"),
        ("#epoch", "s/epoch (60k)", lambda r: f"{r['epoch_s']:.1f}" if "epoch_s" in r else "-"),
        ("#book", "x book (1 GPU)", lambda r: f"{r['vs_book']:.2f}" if "vs_book" in r else "-"),
        ("#djl", "x DJL (4 GPUs)", lambda r: f"{r['vs_djl']:.2f}" if "vs_djl" in r else "-"),
        ("status", "result", lambda r: r["status"] + (f": {r['error']}" if r.get("error") else "")),
    ]
    lines += [_cells(report["throughput"], columns), ""]
    return "\n".join(lines)


# Main.


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--device", choices=sorted(DEVICE_NAMES), default="cuda", help="where to run (default cuda)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny graphs and few steps: the CI smoke run")
    parser.add_argument("--backends", nargs="+", choices=sorted(FRAMEWORKS), default=list(FRAMEWORKS))
    parser.add_argument("--out", type=Path, help=f"folder for gpu_check.json and .md (default {RESULTS})")
    parser.add_argument(
        "--budget", type=float, help="seconds the whole run may take (default 420; --quick: no limit)"
    )
    parser.add_argument(
        "--seconds", type=float, help="timed seconds per throughput workload (default 5; --quick 0)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    parser.add_argument("--pytest-k", help="the tests/conformance selection (default: a quick subset)")
    parser.add_argument("--no-pytest", action="store_true", help="skip the tests/conformance subset")
    parser.add_argument("--no-throughput", action="store_true", help="conformance only")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (math.inf if args.quick else 420.0)
    args.seconds = args.seconds if args.seconds is not None else (0.0 if args.quick else 5.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    clock = Clock(args.budget)
    out = args.out or RESULTS
    stem = "gpu_check-quick" if args.quick and args.out is None else "gpu_check"
    out.mkdir(parents=True, exist_ok=True)

    backends, skipped = [], {}
    for backend in args.backends:
        missing = [m for m in FRAMEWORKS[backend] if find_spec(m) is None]
        if missing:
            skipped[backend] = f"{', '.join(missing)} not installed"
            continue
        try:
            get_backend(backend)
        except MultiresError as error:
            skipped[backend] = _describe(error)
            continue
        exact_fp32(backend)
        backends.append(backend)
    for backend, why in skipped.items():
        clock.say(f"skipping {backend}: {why}")
    if not backends:
        print("no backend to check: install torch or jax/flax/optax", file=sys.stderr)
        return 1
    devices = {b: DEVICE_NAMES[args.device][b] for b in backends}
    found = hardware(backends, devices)
    clock.say("devices: " + "; ".join(f"{k}: {v}" for k, v in found.items()))

    broken: dict[str, str] = {}
    report: dict[str, Any] = {"conformance": [], "pytest": [], "throughput": []}
    cases = QUICK_CASES if args.quick else CASES
    report["conformance"] = conformance(backends, devices, cases, clock, broken, args.verbose)
    if not args.no_throughput:
        workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
        report["throughput"] = throughputs(backends, devices, workloads, args, clock, broken)
    if not args.no_pytest:
        selection = args.pytest_k or (QUICK_PYTEST_SUBSET if args.quick else PYTEST_SUBSET)
        for index, backend in enumerate(backends):
            # Share what is left between the backends still to run; keep 10 s to write the report.
            reserve = 10 + max(clock.left - 10, 0) * (len(backends) - index - 1) / (len(backends) - index)
            result = pytest_subset(backend, devices[backend], selection, out, clock, reserve)
            clock.say(
                f"pytest {backend}: {result['status']}"
                + "".join(
                    f", {result[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if k in result
                )
                + (f" ({result['note']})" if result.get("note") else "")
            )
            for failure in result.get("failures", [])[:10]:
                clock.say(f"  failed: {failure}")
            report["pytest"].append(result)

    failures = [r for r in report["conformance"] + report["throughput"] if r["status"] in ("fail", "error")]
    failures += [r for r in report["pytest"] if r["status"] == "fail"]
    report["ok"] = not failures
    report["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
        "quick": args.quick,
        "hardware": found,
        "python": platform.python_version(),
        "versions": {b: framework_versions(b) for b in backends},
        "skipped_backends": skipped,
        "tf32": "off",
        "budget_s": None if math.isinf(args.budget) else args.budget,
        "seconds": round(clock.elapsed, 1),
    }
    report = {"meta": report.pop("meta"), "ok": report.pop("ok"), **report}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    clock.say(
        f"wrote {out / stem}.json and .md: {'pass' if report['ok'] else f'FAIL ({len(failures)} problem(s))'}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
