"""The Flax `Runner`: a built linen model, its variables and an optax SGD, driven with NumPy.

Forward passes and the training step are `jax.jit`-compiled once per input shape; gradients
come from `jax.grad`. `optax.add_decayed_weights` followed by `optax.sgd` is exactly
`multires.SGD` (PyTorch's rule): optax's momentum trace starts at zero, so the first step's
buffer is the gradient, as in PyTorch. The learning rate is an argument of the compiled step,
so `set_lr` (a schedule) changes it without recompiling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multires.backend import SGD
from multires.errors import ShapeError, WeightsError
from multires.graph import Graph
from multires.shapes import check_input_shape, from_layout, infer_shapes
from multires.weights import as_weights, from_variables, is_buffer, to_variables

from .. import input_array
from .lowering import Model, build
from .weights import Variables, export_weights


def sgd(optimizer: SGD) -> optax.GradientTransformation:
    """`multires.SGD` as an optax transformation: decay added to the gradient, then momentum SGD
    at unit rate; the runner scales the updates by the learning rate, an argument of its compiled
    step (so a schedule needs no recompilation). `lr * (-1 * buf)` is `optax.sgd(lr)`'s `-lr * buf`
    to the bit."""
    return optax.chain(
        optax.add_decayed_weights(optimizer.weight_decay),
        optax.sgd(1.0, momentum=optimizer.momentum or None),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy for integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _check_labels(labels: np.ndarray, batch: int, classes: int) -> None:
    if labels.shape != (batch,) or labels.dtype.kind not in "iu":
        raise ShapeError(
            f"labels must be {batch} integer class indices (shape ({batch},)); got {labels.dtype} of "
            f"shape {labels.shape}."
        )
    if batch and (labels.min() < 0 or labels.max() >= classes):
        raise ShapeError(
            f"labels must lie in [0, {classes}) for {classes} classes; got values in "
            f"[{labels.min()}, {labels.max()}]."
        )


class FlaxRunner:
    """A `multires.Runner` over a `Model` from `build`, in float32 on JAX's default device."""

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], layout: str, optimizer: SGD) -> None:
        self.graph = graph
        self.layout = layout
        self.model: Model = build(graph, layout)
        self.optimizer = optimizer
        self._tx = sgd(optimizer)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.variables: Variables = self._variables(weights)
        self._shapes = {name: value.shape for name, value in export_weights(self.variables).items()}
        self._opt_state = self._tx.init(self.variables["params"])
        self._buffered: frozenset[str] = frozenset()
        """Parameters whose momentum buffer holds a value (the others start from the gradient)."""
        self._eval = jax.jit(self._eval_fn)
        self._train = jax.jit(self._train_fn)
        self._step = jax.jit(self._step_fn)

    def _eval_fn(self, variables: Variables, x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x, train=False)

    def _train_fn(self, variables: Variables, x: jax.Array) -> tuple[jax.Array, Variables]:
        logits, updates = self.model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, {**variables, **updates}

    def _step_fn(
        self, variables: Variables, opt_state: Any, x: jax.Array, labels: jax.Array, lr: jax.Array
    ) -> tuple[Variables, Any, jax.Array, jax.Array]:
        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Variables]]:
            logits, updated = self._train_fn({**variables, "params": params}, x)
            return cross_entropy(logits, labels), (logits, updated)

        (loss, (logits, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = self._tx.update(grads, opt_state, variables["params"])
        updates = jax.tree_util.tree_map(lambda update: lr * update, updates)
        updated["params"] = optax.apply_updates(variables["params"], updates)
        return updated, opt_state, loss, logits

    def _input(self, x: np.ndarray) -> np.ndarray:
        x = input_array(self.graph, x)
        check_input_shape(self.graph, x.shape, self.layout)
        return x

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits for a float32 batch in `layout`; training mode uses batch statistics and updates
        the running statistics."""
        inputs = self._input(x)
        if not training:
            return np.asarray(self._eval(self.variables, inputs))
        logits, self.variables = self._train(self.variables, inputs)
        return np.asarray(logits)

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy in training mode; returns the loss and the
        logits of the forward pass before the update."""
        inputs = self._input(x)
        labels = np.asarray(labels)
        _check_labels(labels, inputs.shape[0], self._classes(inputs.shape))
        self.variables, self._opt_state, loss, logits = self._step(
            self.variables, self._opt_state, inputs, labels, np.float32(self.optimizer.lr)
        )
        if self.optimizer.momentum:
            self._buffered = frozenset(name for name in self._shapes if not is_buffer(name))
        return float(loss), np.asarray(logits)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        self.optimizer = replace(self.optimizer, lr=lr)

    def _classes(self, shape: tuple[int, ...]) -> int:
        (output,) = self.graph.outputs
        logits = infer_shapes(self.graph, from_layout(shape, self.layout))[output]
        if len(logits) != 2:
            raise ShapeError(
                f"{self.graph.name}: training needs (N, classes) logits; the graph outputs shape "
                f"{logits}. End it with Flatten and Dense."
            )
        return logits[1]

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included."""
        return export_weights(self.variables)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace every weight (a full canonical mapping); the momentum buffers are kept."""
        self.variables = self._variables(weights)

    def _variables(self, weights: Mapping[str, np.ndarray]) -> Variables:
        """Variables from checked canonical weights, which must keep the runner's shapes (a
        Dense after a spatial Flatten has no shape until the first weights fix it)."""
        checked = as_weights(weights, self.graph)
        problems = [
            f"{name}: shape {checked[name].shape}, expected {shape}"
            for name, shape in self._shapes.items()
            if checked[name].shape != shape
        ]
        if problems:
            raise WeightsError(f"weights do not match {self.graph.name!r}:\n  " + "\n  ".join(problems))
        return jax.tree.map(jnp.asarray, to_variables(checked))

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """SGD momentum buffers by canonical parameter name (empty before the first step or
        without momentum), in the canonical layouts."""
        if not self._buffered:
            return {}
        trace = optax.tree_utils.tree_get(self._opt_state, "trace")
        buffers = from_variables({"params": jax.device_get(trace)})
        return {name: value for name, value in buffers.items() if name in self._buffered}

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state` (parameters missing from `state` start
        from the gradient on the next step, as in PyTorch; an empty mapping clears them)."""
        params = {name: shape for name, shape in self._shapes.items() if not is_buffer(name)}
        problems = [f"{name}: not a trainable parameter" for name in state if name not in params]
        problems += [
            f"{name}: shape {np.shape(value)}, expected {params[name]}"
            for name, value in state.items()
            if name in params and np.shape(value) != params[name]
        ]
        if state and not self.optimizer.momentum:
            problems.append("the optimizer has no momentum, so it keeps no buffers")
        if problems:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r} ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems)
            )
        self._opt_state = self._tx.init(self.variables["params"])
        if state:
            full = {name: state.get(name, np.zeros(shape, np.float32)) for name, shape in params.items()}
            trace = jax.tree.map(jnp.asarray, to_variables(full)["params"])
            self._opt_state = optax.tree_utils.tree_set(self._opt_state, trace=trace)
        self._buffered = frozenset(state)
