"""The backend registry: lazy loading through the entry-point group `multires.backends`.

A backend is a module (named by an entry point in the group `multires.backends`; the entry
point's name is also the pip extra that installs its framework) exposing:

- `NAME`: its registry name; `LAYOUTS`: supported layouts, the default first;
  `FRAMEWORK_MODULES`: top-level modules whose objects it owns (e.g. `("torch",)`).
- `LOWERINGS`: the table from spec node type to a lowering function, one per node type.
- `build(graph, layout) -> model`: a native model.
- `export_weights(model) -> dict[str, np.ndarray]` and `load_weights(model, weights) -> model`:
  canonical weights (see `multires.weights`) out of and into a native model.
- `make_runner(graph, weights, layout, optimizer) -> Runner`: the uniform handle the
  conformance suite and the trainer drive.

Frameworks are imported only when a backend is first used; a missing framework raises
`BackendUnavailableError` with the pip command that installs it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Protocol, TypeVar

import numpy as np

from multires.errors import BackendNotFoundError, BackendUnavailableError, ShapeError, SpecError
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


class Runner(Protocol):
    """A built model with its weights and optimizer state, driven with NumPy arrays."""

    layout: str

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
) -> Runner:
    """A `Runner` for `graph` with canonical `weights` in `backend`."""
    from multires.weights import as_weights

    module = get_backend(backend)
    return module.make_runner(
        graph, as_weights(weights, graph), resolve_layout(module, layout), optimizer or SGD()
    )
