"""The backend registry: lazy loading through the entry-point group `multires.backends`.

A backend is a module (named by an entry point in the group `multires.backends`; the entry
point's name is also the pip extra that installs its framework) exposing:

- `NAME`: its registry name; `LAYOUTS`: supported layouts, the default first;
  `FRAMEWORK_MODULES`: top-level modules whose objects it owns (e.g. `("torch",)`).
- `LOWERINGS`: the table from spec node type to a lowering function, one per node type.
- `build(graph, layout) -> model`: a native model.
- `export_weights(model) -> dict[str, np.ndarray]` and `load_weights(model, weights) -> model`:
  canonical weights (see `multires.weights`) out of and into a native model.
- `make_runner(graph, weights, layout, optimizer, execution) -> Runner`: the uniform handle the
  conformance suite and the trainer drive, placed and parallelised as `Execution` says.
- `available_devices() -> list[str]`: the devices this framework build sees, in the backend's
  own spelling (`cpu`, `cuda:0`, ...), for error messages and `multires backends`.

Frameworks are imported only when a backend is first used; a missing framework raises
`BackendUnavailableError` with the pip command that installs it.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Protocol, TypeVar

import numpy as np

from multires.errors import BackendNotFoundError, BackendUnavailableError, DeviceError, ShapeError, SpecError
from multires.graph import Graph, Node
from multires.shapes import check_layout

ENTRY_POINT_GROUP = "multires.backends"

ALIASES = {"pytorch": "torch", "keras": "tf", "tensorflow": "tf", "jax": "flax", "gluon": "mxnet"}
"""Other names people use for a backend."""

FRAMEWORKS = {
    "torch": "PyTorch",
    "tf": "TensorFlow/Keras",
    "flax": "JAX/Flax",
    "mxnet": "MXNet",
    "onnx": "ONNX/onnxruntime",
}


L = TypeVar("L", bound=Callable[..., Any])


class LoweringTable(dict[type[Node], Callable[..., Any]]):
    """A backend's table from spec node type to the function that lowers it, one per type.

    Each backend fills its table with `@LOWERINGS.register(Conv2d)` on one small function per
    node type (the signature is the backend's own); looking up a type it lacks raises a
    `SpecError` naming the backend rather than a bare `KeyError`.
    """

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def register(self, node_type: type[Node]) -> Callable[[L], L]:
        """Decorator registering the lowering of `node_type`; a second one for a type is an error."""

        def decorate(function: L) -> L:
            if node_type in self:
                raise ValueError(
                    f"{node_type.__name__} already has a {self.backend} lowering ({self[node_type].__name__})."
                )
            self[node_type] = function
            return function

        return decorate

    def __missing__(self, node_type: type[Node]) -> Callable[..., Any]:
        raise SpecError(
            f"backend {self.backend!r} has no lowering for node type {node_type.__name__}; "
            f"it lowers {sorted(t.__name__ for t in self)}."
        )


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent as `torch.optim.SGD` defines it (every backend matches it).

    `g = grad + weight_decay * w`; `buf = momentum * buf + g` (`buf = g` on the first step);
    `w = w - lr * buf`. Weight decay applies to every trainable parameter.
    """

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0


PRECISIONS = ("fp32", "bf16", "fp16")
"""Compute precisions a Runner offers: float32, or the framework's own mixed precision in
bfloat16 or float16 (torch.autocast with a GradScaler for fp16, the Keras mixed-precision
policy, a Flax compute dtype, MXNet AMP). Parameters, running statistics, optimizer state and
exported weights stay float32 in every precision."""

DEVICE_ENV = "MULTIRES_DEVICE"
"""Environment variable: the device `make_runner` (and so `multires train`) uses when none is
given, e.g. `MULTIRES_DEVICE=cuda pytest tests/conformance --backend torch` runs the suite on a GPU."""

CPU_DEVICES_ENV = "MULTIRES_CPU_DEVICES"
"""Environment variable: how many CPU devices TensorFlow (logical devices) and JAX (XLA host
devices) expose, so data parallelism runs on a CPU-only machine. Both frameworks fix their
device list when they start, so it must be set before the first model is built; `multires train
--devices N` sets it for you."""


@dataclass(frozen=True)
class Execution:
    """Where and how a Runner computes: device, data-parallel replicas and precision.

    `device` is the framework's device in its own spelling ("cpu", "cuda", "cuda:1", "mps" in
    torch; "CPU", "GPU", "GPU:0" in tf; "cpu", "gpu" in flax; "cpu", "gpu", "gpu(1)" in mxnet);
    None is the framework's default device (the CPU, except in tf, whose default is its first GPU
    where it has one). `devices` > 1 is data parallelism: each step splits the global
    batch into `devices` contiguous shards (`shard_bounds`), each device computes its shard's summed
    loss divided by the global batch size, and the gradients are summed, so the update equals a
    single-device step on the whole batch. `sync_batchnorm` (the default) computes training-mode
    BatchNorm statistics over the global batch, which keeps that equality; without it each device
    normalises with its own shard's statistics and the model keeps device 0's running statistics
    (as DistributedDataParallel's `broadcast_buffers` does).
    """

    device: str | None = None
    devices: int = 1
    precision: str = "fp32"
    sync_batchnorm: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise DeviceError(f"devices must be a positive int; got {self.devices!r}.")
        if self.precision not in PRECISIONS:
            raise DeviceError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}.")
        if self.device is not None and (not isinstance(self.device, str) or not self.device.strip()):
            raise DeviceError(f"device must be a name such as 'cpu' or 'cuda:0'; got {self.device!r}.")


def shard_bounds(batch: int, devices: int) -> list[tuple[int, int]]:
    """The `(start, stop)` rows of each device's shard of a global batch of `batch` examples:
    contiguous, in device order, sizes differing by at most one (the first ones larger), as
    `numpy.array_split` cuts them. A shard may be empty when `batch < devices`."""
    base, extra = divmod(batch, devices)
    bounds, start = [], 0
    for device in range(devices):
        stop = start + base + (device < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


class Runner(Protocol):
    """A built model with its weights and optimizer state, driven with NumPy arrays.

    Two ways to train: `train_step` (NumPy in, loss and logits out: one host synchronisation per
    step, what the conformance suite checks), and the trainer's `prepare` / `step` /
    `take_totals`, which keep batches flowing to the device and the loss and accuracy sums on it,
    so the host waits only when it reads the totals.
    """

    layout: str
    execution: Execution
    is_main: bool
    """Whether this process writes files and prints progress (rank or process 0; always True in a
    single-process run)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits (or the single output) for a float32 batch in `layout`; training mode uses
        batch statistics and updates the running statistics."""

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One optimizer step on mean softmax cross-entropy in training mode; returns the loss
        and the logits of the forward pass before the update."""

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (a schedule sets it before each step); the
        momentum buffers are kept, as when a PyTorch scheduler changes a param group's `lr`."""

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included."""

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace the model's weights (a full canonical mapping)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """SGD momentum buffers by canonical parameter name (empty before the first step or
        without momentum), so a checkpoint can resume exactly."""

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state`."""

    def prepare(self, x: np.ndarray, labels: np.ndarray) -> Any:
        """A training batch (float32 images in `layout`, integer labels) checked and on its way to
        the device(s), split into shards under data parallelism. Called from the trainer's
        prefetch thread while the previous step runs; the result goes to `step`."""

    def step(self, batch: Any) -> None:
        """One optimizer step on a prepared batch (as `train_step`), adding the batch's summed
        loss, correct predictions and example count to totals kept on the device."""

    def take_totals(self) -> tuple[float, int, int]:
        """The summed loss, correct predictions and examples of the `step`s since the last call
        (over the global batch, under data parallelism), then zeroes them: the one point where
        the host waits for the device."""


class HostTotals:
    """`prepare`, `step` and `take_totals` on top of `train_step`, for runners that compute on the
    host anyway (the NumPy reference, onnxruntime) or do not implement them."""

    _totals: tuple[float, int, int] = (0.0, 0, 0)

    def prepare(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch as given; `train_step` checks it."""
        return x, np.asarray(labels)

    def step(self, batch: tuple[np.ndarray, np.ndarray]) -> None:
        """`train_step` on the batch, its loss and correct count added to the totals."""
        x, labels = batch
        loss, logits = self.train_step(x, labels)  # type: ignore[attr-defined]
        loss_sum, correct, examples = self._totals
        self._totals = (
            loss_sum + float(loss) * len(labels),
            correct + int((np.argmax(logits, axis=1) == labels).sum()),
            examples + len(labels),
        )

    def take_totals(self) -> tuple[float, int, int]:
        """The totals since the last call, then zeroed."""
        totals, self._totals = self._totals, (0.0, 0, 0)
        return totals


def _registered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backends() -> list[str]:
    """Names of every registered backend, installed framework or not."""
    return sorted(_registered())


def canonical_name(name: str) -> str:
    """Resolve aliases (`keras` -> `tf`) and raise BackendNotFoundError for unknown names."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    known = _registered()
    if key not in known:
        guess = difflib.get_close_matches(key, list(known) + list(ALIASES), n=1)
        hint = f" Did you mean {ALIASES.get(guess[0], guess[0])!r}?" if guess else ""
        raise BackendNotFoundError(
            f"unknown backend {name!r}; registered: {', '.join(sorted(known)) or 'none'}.{hint}"
        )
    return key


@cache
def _load(key: str) -> ModuleType:
    entry = _registered()[key]
    try:
        return entry.load()
    except ModuleNotFoundError as error:
        framework = FRAMEWORKS.get(key, key)
        raise BackendUnavailableError(
            f"backend {key!r} needs {framework}, which is not installed ({error.name!r} is missing): "
            f"pip install 'multires[{key}]'"
        ) from error


def get_backend(name: str) -> ModuleType:
    """The backend module registered under `name` (or an alias), importing its framework."""
    return _load(canonical_name(name))


def available_backends() -> list[str]:
    """Registered backends whose framework imports in this environment."""
    names = []
    for key in backends():
        try:
            _load(key)
        except BackendUnavailableError:
            continue
        names.append(key)
    return names


def resolve_layout(backend: ModuleType, layout: str | None) -> str:
    """The backend's default layout, or `layout` if the backend supports it."""
    if layout is None:
        return backend.LAYOUTS[0]
    layout = check_layout(layout)
    if layout not in backend.LAYOUTS:
        raise ShapeError(
            f"backend {backend.NAME!r} supports layouts {list(backend.LAYOUTS)}, not {layout!r}."
            + getattr(backend, "LAYOUT_HINT", "")
        )
    return layout


def backend_of(model: Any) -> ModuleType:
    """The backend that owns a native model, judged by the framework its class comes from (the
    first base class outside multires, for models whose class a backend defines)."""
    roots = [cls.__module__.split(".")[0] for cls in type(model).__mro__]
    root = next((r for r in roots if r != "multires"), roots[0])
    first = ALIASES.get(root, root)
    for key in sorted(backends(), key=lambda k: k != first):
        try:
            module = _load(key)
        except BackendUnavailableError:
            continue
        if root in module.FRAMEWORK_MODULES:
            return module
    raise BackendNotFoundError(
        f"no installed multires backend handles {type(model).__module__}.{type(model).__name__}."
    )


def build(
    name_or_graph: str | Graph | None = None,
    backend: str = "torch",
    layout: str | None = None,
    weights: Any = None,
    inference: bool = False,
    **options: Any,
) -> Any:
    """Build a native model of a zoo name (with `options`) or a Graph in `backend`.

    `layout` defaults to the backend's own (NCHW for torch and mxnet, NHWC for tf and flax);
    `weights` (a canonical mapping or a weight-file path) are loaded if given. A `.safetensors`
    file written by multires (e.g. by `multires convert`) carries its graph: pass its path as
    `weights` with no graph, or as the graph itself. `inference=True` (which needs `weights`)
    builds the graph after `multires.passes.fold_batchnorm`: the eval-mode function, faster, with
    the BatchNorms folded into the convolutions and no batch statistics left to train.
    """
    from multires.weights import as_weights, file_graph
    from multires.zoo import spec

    module = get_backend(backend)
    if options and not isinstance(name_or_graph, str):
        raise TypeError(f"options {sorted(options)} apply to zoo names, not to a Graph.")
    if isinstance(name_or_graph, (str, os.PathLike)) and str(name_or_graph).endswith(".safetensors"):
        name_or_graph, weights = None, name_or_graph if weights is None else weights
    if name_or_graph is None:
        stored = file_graph(weights) if isinstance(weights, (str, os.PathLike)) else None
        if stored is None:
            raise SpecError(
                "build needs a zoo name or a Graph, or a .safetensors weight file that carries its graph "
                f"(written by multires); got weights={weights!r}."
            )
        name_or_graph = stored
    graph = spec(name_or_graph, **options) if isinstance(name_or_graph, str) else name_or_graph
    layout = resolve_layout(module, layout)
    if inference:
        if weights is None:
            raise SpecError(
                f"{graph.name}: inference=True folds BatchNorm into the convolutions, which needs the "
                "weights; pass weights= (a canonical mapping or a weight file)."
            )
        from multires.passes import fold_batchnorm

        graph, weights = fold_batchnorm(graph, as_weights(weights, graph))
    model = module.build(graph, layout)
    if weights is not None:
        model = module.load_weights(model, as_weights(weights, graph))
    return model


def make_runner(
    graph: Graph,
    weights: Any,
    backend: str,
    layout: str | None = None,
    optimizer: SGD | None = None,
    *,
    device: str | None = None,
    devices: int = 1,
    precision: str = "fp32",
    sync_batchnorm: bool = True,
) -> Runner:
    """A `Runner` for `graph` with canonical `weights` in `backend`, on `device` (default: the
    `DEVICE_ENV` variable's, else the framework's CPU), data parallel over `devices` replicas,
    computing in `precision` (see `Execution` and `PRECISIONS`)."""
    from multires.weights import as_weights

    module = get_backend(backend)
    execution = Execution(device or os.environ.get(DEVICE_ENV) or None, devices, precision, sync_batchnorm)
    arguments = (graph, as_weights(weights, graph), resolve_layout(module, layout), optimizer or SGD())
    if "execution" in inspect.signature(module.make_runner).parameters:
        return module.make_runner(*arguments, execution)
    if execution != Execution():
        raise DeviceError(
            f"backend {module.NAME!r} takes no device, devices or precision (its make_runner has no `execution` "
            f"parameter); got {execution}. Use the defaults, or a backend that has them."
        )
    return module.make_runner(*arguments)


def available_devices(backend: str) -> list[str]:
    """The devices `backend`'s framework sees here, in its own spelling (e.g. `['cpu', 'cuda:0']`)."""
    return list(get_backend(backend).available_devices())


def unknown_device(backend: str, device: str, available: list[str], hint: str = "") -> DeviceError:
    """The error for a device the framework does not have: it lists those it has."""
    return DeviceError(
        f"backend {backend!r} has no device {device!r}; available: {', '.join(available) or 'none'}.{hint}"
    )


def too_many_devices(backend: str, devices: int, available: list[str], how: str) -> DeviceError:
    """The error for `devices` beyond what exists: it says how to expose more."""
    return DeviceError(
        f"backend {backend!r}: devices={devices} but only {len(available)} are available "
        f"({', '.join(available) or 'none'}). {how}"
    )
