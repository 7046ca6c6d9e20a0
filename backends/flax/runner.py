"""The Flax `Runner`: a built linen model, its variables and an optax SGD, driven with NumPy.

Forward passes and the training step are `jax.jit`-compiled once per input shape; gradients
come from `jax.grad`. `optax.add_decayed_weights` followed by `optax.sgd` is exactly
`multires.SGD` (PyTorch's rule): optax's momentum trace starts at zero, so the first step's
buffer is the gradient, as in PyTorch. The learning rate is an argument of the compiled step,
so `set_lr` (a schedule) changes it without recompiling.

Placement and scale follow `multires.Execution`. The variables, optimizer state and totals live on
the chosen device (`execution.resolve`); the compiled step takes them as donated buffers and
returns their successors, and `step` adds the loss, correct count and example count to totals
kept on the device, so the host waits only in `take_totals`. Data parallelism is `jax.jit` over
a 1-D mesh (axis "data"): everything replicated but the batch, which is sharded along its first
axis, so XLA partitions the step and sums the gradients (and, with synchronised BatchNorm,
computes the global batch statistics) across devices. Shards follow `shard_bounds`; a batch
that does not divide evenly is padded to equal shards with masked rows, which count in no loss,
accuracy or statistic. Without synchronised BatchNorm the model keeps one set of statistics per
device (`Model.groups`). Mixed precision is a Flax compute dtype (float32 parameters), float16
with Flax's `DynamicScale` loss scaling, whose overflowing steps change no weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from multires.backend import SGD, Execution, shard_bounds
from multires.errors import DeviceError, ShapeError, WeightsError
from multires.graph import Graph
from multires.shapes import check_input_shape, from_layout, infer_shapes
from multires.weights import as_weights, from_variables, is_buffer, to_variables

from .. import check_batch_statistics, input_array
from .execution import resolve
from .lowering import Model, build
from .weights import Variables, export_weights

DTYPES = {"fp32": None, "bf16": jnp.bfloat16, "fp16": jnp.float16}
"""The Flax compute dtype of each `multires.PRECISIONS` (None: float32 throughout)."""


def sgd(optimizer: SGD) -> optax.GradientTransformation:
    """`multires.SGD` as an optax transformation: decay added to the gradient, then momentum SGD
    at unit rate; the runner scales the updates by the learning rate, an argument of its compiled
    step (so a schedule needs no recompilation). `lr * (-1 * buf)` is `optax.sgd(lr)`'s `-lr * buf`
    to the bit."""
    return optax.chain(
        optax.add_decayed_weights(optimizer.weight_decay),
        optax.sgd(1.0, momentum=optimizer.momentum or None),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy for integer labels, over the rows where `mask` is 1 if given."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.mean() if mask is None else jnp.sum(losses * mask) / jnp.sum(mask)


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


def _host(tree: Any) -> Any:
    """NumPy copies of replicated (or single-device) arrays, one device's copy each, so it works
    when the devices span several processes."""
    return jax.tree.map(lambda value: np.asarray(value.addressable_data(0)), tree)


@dataclass(frozen=True)
class Batch:
    """A batch on its way to the device(s), from `FlaxRunner.prepare`: the images and labels
    (None in a forward pass), padded to equal shards under data parallelism with `mask` marking
    the real rows and `rows` their positions (both None when nothing is padded)."""

    x: jax.Array
    labels: jax.Array | None
    mask: jax.Array | None
    rows: np.ndarray | None


class FlaxRunner:
    """A `multires.Runner` over a `Model` from `build`, placed, parallelised and in the precision
    that `execution` says (one CPU device in float32 by default)."""

    def __init__(
        self,
        graph: Graph,
        weights: Mapping[str, np.ndarray],
        layout: str,
        optimizer: SGD,
        execution: Execution | None = None,
    ) -> None:
        self.graph = graph
        self.layout = layout
        self.execution = execution = execution or Execution()
        self.devices = resolve(execution)
        self.is_main = jax.process_index() == 0
        dtype = DTYPES[execution.precision]
        groups = 1 if execution.sync_batchnorm else execution.devices
        # Mixed precision leaves the convolution precision to the device (bfloat16 tensor cores);
        # convolutions run as matmuls where that pays on the CPU (`lowering.matmul_pays`).
        on_cpu = self.devices[0].platform == "cpu"
        precision = "highest" if dtype is None else None
        self.model: Model = build(graph, layout, precision, dtype, groups, conv_as_matmul=on_cpu)
        if len(self.devices) == 1:
            self._replicated: Sharding = SingleDeviceSharding(self.devices[0])
            self._sharded: Sharding = self._replicated
        else:
            mesh = Mesh(np.array(self.devices), ("data",))
            self._replicated = NamedSharding(mesh, PartitionSpec())
            self._sharded = NamedSharding(mesh, PartitionSpec("data"))
        self.optimizer = optimizer
        self._tx = sgd(optimizer)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.variables: Variables = self._variables(weights)
        self._shapes = {name: value.shape for name, value in export_weights(_host(self.variables)).items()}
        replicated = self._replicated
        self._init_state = jax.jit(self._tx.init, out_shardings=replicated)
        self._opt_state = self._init_state(self.variables["params"])
        self._buffered: frozenset[str] = frozenset()
        """Parameters whose momentum buffer holds a value (the others start from the gradient)."""
        self._scale: DynamicScale | None = None
        if execution.precision == "fp16":
            self.loss_scale = 2.0**16
        self._totals = self._zeros()
        self._eval = jax.jit(self._eval_fn, out_shardings=replicated)
        self._train = jax.jit(self._train_fn, out_shardings=replicated)
        self._step = jax.jit(self._step_fn, donate_argnums=(0, 1, 2), out_shardings=replicated)
        self._count = jax.jit(self._count_fn, donate_argnums=(0, 1, 2, 3), out_shardings=replicated)

    def _place(self, tree: Any, sharding: Sharding | None = None) -> Any:
        """Host arrays onto the device(s), replicated unless `sharding` says otherwise; each
        process supplies the pieces its own devices hold."""

        def put(value: Any) -> jax.Array:
            value = np.asarray(value)
            target = sharding or self._replicated
            return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

        return jax.tree.map(put, tree)

    def _zeros(self) -> dict[str, jax.Array]:
        """Fresh device totals: summed loss, correct predictions, examples."""
        return self._place({"loss": np.float32(0), "correct": np.int32(0), "examples": np.int32(0)})

    def _eval_fn(self, variables: Variables, x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x, train=False).astype(jnp.float32)

    def _train_fn(
        self, variables: Variables, x: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, Variables]:
        logits, updates = self.model.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
        return logits.astype(jnp.float32), {**variables, **updates}

    def _step_fn(
        self,
        variables: Variables,
        opt_state: Any,
        scale: DynamicScale | None,
        x: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None,
        lr: jax.Array,
    ) -> tuple[Variables, Any, DynamicScale | None, jax.Array, jax.Array]:
        params = variables["params"]

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Variables]]:
            logits, updated = self._train_fn({**variables, "params": params}, x, mask)
            loss = cross_entropy(logits, labels, mask)
            return loss, (loss, logits, updated)

        if scale is None:
            (_, (loss, logits, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        else:
            scale, finite, (_, (loss, logits, updated)), grads = scale.value_and_grad(loss_fn, has_aux=True)(
                params
            )
        updates, new_state = self._tx.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map(lambda update: lr * update, updates)
        new_params = optax.apply_updates(params, updates)
        if scale is not None:
            # An overflowing float16 step changes no weight or momentum (as torch's GradScaler).
            new_params, new_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (new_params, new_state), (params, opt_state)
            )
        updated["params"] = new_params
        return updated, new_state, scale, loss, logits

    def _count_fn(
        self,
        variables: Variables,
        opt_state: Any,
        scale: DynamicScale | None,
        totals: dict[str, jax.Array],
        x: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None,
        lr: jax.Array,
    ) -> tuple[Variables, Any, DynamicScale | None, dict[str, jax.Array]]:
        variables, opt_state, scale, loss, logits = self._step_fn(
            variables, opt_state, scale, x, labels, mask, lr
        )
        weight = jnp.ones(labels.shape, jnp.float32) if mask is None else mask
        examples = jnp.sum(weight)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weight)
        totals = {
            "loss": totals["loss"] + loss * examples,
            "correct": totals["correct"] + correct.astype(jnp.int32),
            "examples": totals["examples"] + examples.astype(jnp.int32),
        }
        return variables, opt_state, scale, totals

    def _input(self, x: np.ndarray) -> np.ndarray:
        x = input_array(self.graph, x)
        check_input_shape(self.graph, x.shape, self.layout)
        return x

    def _statistics_check(self, shape: tuple[int, ...]) -> None:
        """Under data parallelism, a ShapeError for a BatchNorm that would see a single value per
        channel: in the global batch, or in the smallest non-empty shard without sync (one
        device's own batch is checked where its BatchNorm is traced)."""
        if len(self.devices) == 1:
            return
        sizes = [stop - start for start, stop in shard_bounds(shape[0], len(self.devices))]
        smallest = shape[0] if self.execution.sync_batchnorm else min(size for size in sizes if size)
        check_batch_statistics(self.graph, (smallest, *shape[1:]), self.layout)

    def _put(self, x: np.ndarray, labels: np.ndarray | None = None) -> Batch:
        """The batch on its way to the device(s): as it is on one device; under data parallelism
        cut into `shard_bounds` shards, each padded to the largest one, and sharded."""
        devices, n = len(self.devices), len(x)
        size = -(-n // devices)  # the largest shard's
        mask = rows = None
        if size * devices != n:
            bounds = shard_bounds(n, devices)
            rows = np.concatenate(
                [np.arange(size * d, size * d + stop - start) for d, (start, stop) in enumerate(bounds)]
            )
            mask = self._pad(np.ones(n, np.float32), rows, size * devices)
            x = self._pad(x, rows, size * devices)
            labels = None if labels is None else self._pad(labels, rows, size * devices)

        def place(values: np.ndarray | None) -> jax.Array | None:
            return None if values is None else self._place(values, self._sharded)

        return Batch(self._place(x, self._sharded), place(labels), place(mask), rows)

    @staticmethod
    def _pad(values: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
        """`values` at `rows` of `total` rows, zeros elsewhere."""
        padded = np.zeros((total, *values.shape[1:]), values.dtype)
        padded[rows] = values
        return padded

    def _output(self, value: jax.Array, rows: np.ndarray | None) -> np.ndarray:
        """The host copy of a replicated batch output, padding rows dropped."""
        array = _host(value)
        return array if rows is None else array[rows]

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits for a float32 batch in `layout`, computed in the runner's precision and returned
        in float32; training mode uses batch statistics and updates the running statistics."""
        inputs = self._input(x)
        if training:
            self._statistics_check(inputs.shape)
        batch = self._put(inputs)
        if not training:
            return self._output(self._eval(self.variables, batch.x), batch.rows)
        logits, self.variables = self._train(self.variables, batch.x, batch.mask)
        return self._output(logits, batch.rows)

    def prepare(self, x: np.ndarray, labels: np.ndarray) -> Batch:
        """A training batch checked (as `train_step` checks it) and on its way to the device(s),
        sharded under data parallelism: JAX copies asynchronously, so this returns at once."""
        inputs = self._input(x)
        labels = np.asarray(labels)
        _check_labels(labels, inputs.shape[0], self._classes(inputs.shape))
        self._statistics_check(inputs.shape)
        return self._put(inputs, labels.astype(np.int32))

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy in training mode; returns the loss and the
        logits of the forward pass before the update (of the whole global batch)."""
        batch = self.prepare(x, labels)
        self.variables, self._opt_state, self._scale, loss, logits = self._step(
            self.variables, self._opt_state, self._scale, batch.x, batch.labels, batch.mask, self._lr()
        )
        self._note_buffers()
        return float(_host(loss)), self._output(logits, batch.rows)

    def step(self, batch: Batch) -> None:
        """One SGD step on a prepared batch, its summed loss, correct predictions and examples
        added to the totals on the device (no host synchronisation)."""
        if not isinstance(batch, Batch) or batch.labels is None:
            raise TypeError(
                f"step takes a batch from this runner's prepare(x, labels); got {type(batch).__name__}."
            )
        self.variables, self._opt_state, self._scale, self._totals = self._count(
            self.variables,
            self._opt_state,
            self._scale,
            self._totals,
            batch.x,
            batch.labels,
            batch.mask,
            self._lr(),
        )
        self._note_buffers()

    def take_totals(self) -> tuple[float, int, int]:
        """The summed loss, correct predictions and examples of the `step`s since the last call,
        then zeroed: the host waits for the device here."""
        totals, self._totals = _host(self._totals), self._zeros()
        return float(totals["loss"]), int(totals["correct"]), int(totals["examples"])

    @property
    def loss_scale(self) -> float | None:
        """The current float16 loss scale (None in other precisions): Flax's `DynamicScale`
        starts at 2**16, halves after a step whose gradients overflow (that step changes no
        weight) and doubles after 2000 steps without overflow."""
        return None if self._scale is None else float(_host(self._scale.scale))

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        if self.execution.precision != "fp16":
            raise DeviceError(
                f"loss scaling is for precision 'fp16'; this runner computes in {self.execution.precision}."
            )
        if not np.isfinite(value) or value <= 0:
            raise DeviceError(f"the loss scale must be a positive finite number; got {value!r}.")
        self._scale = self._place(DynamicScale(fin_steps=np.int32(0), scale=np.float32(value)))

    def _lr(self) -> jax.Array:
        return self._place(np.float32(self.optimizer.lr))

    def _note_buffers(self) -> None:
        if self.optimizer.momentum:
            self._buffered = frozenset(name for name in self._shapes if not is_buffer(name))

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
        return export_weights(_host(self.variables))

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
        return self._place(to_variables(checked))

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """SGD momentum buffers by canonical parameter name (empty before the first step or
        without momentum), in the canonical layouts."""
        if not self._buffered:
            return {}
        trace = optax.tree_utils.tree_get(self._opt_state, "trace")
        buffers = from_variables({"params": _host(trace)})
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
        self._opt_state = self._init_state(self.variables["params"])
        if state:
            full = {name: state.get(name, np.zeros(shape, np.float32)) for name, shape in params.items()}
            trace = self._place(to_variables(full)["params"])
            self._opt_state = optax.tree_utils.tree_set(self._opt_state, trace=trace)
        self._buffered = frozenset(state)
