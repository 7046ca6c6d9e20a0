"""The `multires.backend.Runner` of the TensorFlow backend.

Every computation is a `tf.function` running one replica function under the `tf.distribute`
strategy of the runner's `Placement` (`execution.py`): a `OneDeviceStrategy` on one device, a
`MirroredStrategy` on several. Each replica takes its contiguous shard of the global batch
(`shard_bounds`, uneven shards included) and its loss is the shard's summed cross-entropy divided
by the global batch size; Keras' TensorFlow optimizer all-reduces the replicas' gradients with
SUM (`TFOptimizer._all_reduce_sum_gradients`), so an update equals one computed on the whole
batch on one device. BatchNorm statistics are the global batch's unless `sync_batchnorm=False`
(see `layers.BatchNorm`).

The optimizer is `SpecSGD`, a Keras optimizer computing the spec's SGD, which is PyTorch's
(Keras' own SGD folds the learning rate into the momentum buffer and decouples weight decay):
`g = grad + wd * w; buf = m * buf + g; w = w - lr * buf` (`buf` starts at zero, so the first
step's `buf = g` needs no special case). In fp16 Keras' `LossScaleOptimizer` wraps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from multires.backend import SGD, Execution, shard_bounds
from multires.errors import DeviceError, ShapeError, SpecError, WeightsError
from multires.graph import Dense, Graph
from multires.shapes import check_input_shape, from_layout, infer_shapes
from multires.weights import CanonicalWeights, is_buffer

from .. import check_batch_statistics, input_array
from .execution import Placement, place
from .layers import BatchNorm
from .lowering import build
from .weights import export_weights, load_weights, slots


class SpecSGD(keras.optimizers.Optimizer):
    """The spec's SGD (`multires.backend.SGD`, PyTorch's) as a Keras optimizer, so that Keras
    distributes its updates and `LossScaleOptimizer` can wrap it."""

    def __init__(self, sgd: SGD, name: str = "spec_sgd") -> None:
        super().__init__(learning_rate=sgd.lr, name=name)
        self.momentum = float(sgd.momentum)
        self.decay = float(sgd.weight_decay)
        self.momentums: list[Any] = []

    def build(self, variables: list[Any]) -> None:
        """One momentum buffer per variable, zero, beside the variable."""
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, name="momentum") for v in variables]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """The update of one variable (a Keras or a TensorFlow variable)."""
        if self.decay:
            gradient = gradient + self.decay * variable
        if self.momentum:
            buffer = self.momentums[self._get_variable_index(variable)].value
            gradient = buffer.assign(self.momentum * buffer + gradient)
        variable.assign_sub(learning_rate * gradient)


@dataclass(frozen=True)
class Batch:
    """A checked training batch, split into the replicas' shards on their devices."""

    x: tuple[tf.Tensor, ...]
    labels: tuple[tf.Tensor, ...]
    size: tf.Tensor
    """The global batch size, as a float32 tensor (the loss divisor)."""


class KerasRunner:
    """A Keras model built from `graph` under the strategy `execution` asks for, with its
    canonical weights and SGD state."""

    is_main = True
    """One process drives all devices."""

    def __init__(
        self,
        graph: Graph,
        weights: CanonicalWeights,
        layout: str,
        optimizer: SGD,
        execution: Execution | None = None,
    ) -> None:
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise SpecError(
                f"{graph.name}: a runner drives graphs with one input and one output; this one has inputs "
                f"{[i.name for i in graph.inputs]} and outputs {list(graph.outputs)}."
            )
        self.graph = graph
        self.layout = layout
        self.optimizer = optimizer
        self.execution = execution or Execution()
        self.placement: Placement = place(self.execution)
        if layout == "NCHW" and self.placement.devices[0].startswith("CPU"):
            raise DeviceError(
                "backend 'tf': TensorFlow's CPU convolution and pooling kernels run NHWC only; use "
                "layout='NHWC' on the CPU, or device='GPU' for NCHW."
            )
        strategy = self.placement.strategy
        with strategy.scope():
            self.model = load_weights(build(graph, layout, weights, self.placement.policy), weights)
            self._params = {name: slot for name, slot in slots(self.model).items() if not is_buffer(name)}
            self._variables = [slot.variable for slot in self._params.values()]
            self._sgd = SpecSGD(optimizer)
            self._optimizer: keras.optimizers.Optimizer = self._sgd
            if self.execution.precision == "fp16":
                self._optimizer = keras.optimizers.LossScaleOptimizer(self._sgd)
            self._optimizer.build(self._variables)
        for layer in self.model.layers:
            if isinstance(layer, BatchNorm):
                layer.synchronized = self.execution.sync_batchnorm
        with tf.device(self.placement.devices[0]):
            self._totals = (
                tf.Variable(0.0, dtype=tf.float64, trainable=False, name="loss_sum"),
                tf.Variable(0, dtype=tf.int64, trainable=False, name="correct"),
                tf.Variable(0, dtype=tf.int64, trainable=False, name="examples"),
            )
        shapes = infer_shapes(graph)
        self._widths = {
            node.name: int(self.model.get_layer(node.name).kernel.shape[0])
            for node in graph.nodes
            if isinstance(node, Dense) and shapes[node.inputs[0]][1] is None
        }
        """Dense input widths that depend on the image size, as the weights fixed them."""
        output = shapes[graph.outputs[0]]
        self._classes = output[1] if len(output) == 2 else None
        self._steps = 0
        # Unknown shapes, so that any batch runs the one trace (and the same kernels as ever).
        images = (tf.TensorSpec([None] * 4, tf.float32),) * self.placement.replicas
        labels = (tf.TensorSpec([None], tf.int64),) * self.placement.replicas
        size = tf.TensorSpec([], tf.float32)
        self._eval = tf.function(partial(self._distributed_forward, training=False), input_signature=[images])
        self._forward_train = tf.function(
            partial(self._distributed_forward, training=True), input_signature=[images]
        )
        self._train = tf.function(
            partial(self._distributed_step, accumulate=False), input_signature=[images, labels, size]
        )
        self._train_and_count = tf.function(
            partial(self._distributed_step, accumulate=True), input_signature=[images, labels, size]
        )

    # Checks and input placement.

    def _check(self, x: np.ndarray, training: bool) -> np.ndarray:
        """`x` as float32 after the checks the reference makes, raising ShapeError; in training
        mode every BatchNorm needs two values per channel in the batch its statistics cover (each
        device's shard when devices do not synchronise them)."""
        x = input_array(self.graph, x)
        check_input_shape(self.graph, x.shape, self.layout)
        shapes = infer_shapes(self.graph, from_layout(x.shape, self.layout))
        for name, width in self._widths.items():
            features = shapes[self.graph[name].inputs[0]][1]
            if features != width:
                raise ShapeError(
                    f"{name} (Dense): an input of shape {x.shape} ({self.layout}) gives it {features} "
                    f"features, but its weights take {width}. Use images of the size it was trained on."
                )
        if training and self.placement.replicas > max(len(x), 1):
            raise ShapeError(
                f"{self.graph.name}: a training batch of {len(x)} on {self.placement.replicas} devices leaves "
                f"device {len(x)} without examples, and TensorFlow's convolutions cannot run an empty batch; "
                f"use at least {self.placement.replicas} examples per step, or fewer devices."
            )
        if training and (self.execution.sync_batchnorm or self.placement.replicas == 1):
            check_batch_statistics(self.graph, x.shape, self.layout)
        elif training:
            for device, (start, stop) in enumerate(shard_bounds(len(x), self.placement.replicas)):
                try:
                    check_batch_statistics(self.graph, x[start:stop].shape, self.layout)
                except ShapeError as error:
                    raise ShapeError(
                        f"{error} That is device {device}'s shard of the global batch {x.shape}: "
                        "without synchronised BatchNorm each device's shard needs its own statistics, "
                        "so use a larger batch or sync_batchnorm=True."
                    ) from None
        return x

    def _check_labels(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """`labels` as int64, one class index per image of `x`, or a ShapeError."""
        if self._classes is None:
            raise ShapeError(
                f"{self.graph.name}: cross-entropy needs (N, classes) logits, but output "
                f"{self.graph.outputs[0]!r} is a 4-D map. End the graph with Flatten and Dense."
            )
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],) or labels.dtype.kind not in "iu":
            raise ShapeError(
                f"{self.graph.name}: labels must be integers of shape ({x.shape[0]},), one per image; "
                f"got {labels.dtype} {labels.shape}."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self._classes):
            raise ShapeError(
                f"{self.graph.name}: labels must lie in [0, {self._classes}) for {self._classes} classes; "
                f"got values in [{labels.min()}, {labels.max()}]."
            )
        return labels.astype(np.int64)

    def _shards(self, array: np.ndarray) -> tuple[tf.Tensor, ...]:
        """`array` cut into the replicas' shards, each copied to its replica's device."""
        bounds = shard_bounds(len(array), self.placement.replicas)
        shards = []
        for device, (start, stop) in zip(self.placement.devices, bounds, strict=True):
            with tf.device(device):
                shards.append(tf.identity(array[start:stop]))
        return tuple(shards)

    def _per_replica(self, shards: tuple[tf.Tensor, ...]) -> Any:
        """The shards as one distributed value, each replica's its own."""
        return self.placement.strategy.experimental_distribute_values_from_function(
            lambda context: shards[context.replica_id_in_sync_group]
        )

    # The compiled computations.

    def _distributed_forward(self, x: tuple[tf.Tensor, ...], training: bool) -> tuple[tf.Tensor, ...]:
        outputs = self.placement.strategy.run(
            lambda shard: tf.cast(self.model(shard, training=training), tf.float32),
            args=(self._per_replica(x),),
        )
        return self.placement.strategy.experimental_local_results(outputs)

    def _replica_step(self, x: tf.Tensor, labels: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """One replica's share of an SGD step: its shard's summed loss / the global batch size,
        differentiated (scaled in fp16) and handed to the optimizer, which sums over replicas.

        On one device in float32 or bfloat16 there is nothing to sum or unscale, and the update
        is `SpecSGD.update_step` applied directly: the graph of Keras' `apply` (its distribution
        wrappers) lets Grappler's arithmetic optimizer regroup the update's sums, which would move
        the single-device results by float32 roundings from what this backend always computed."""
        scaling = isinstance(self._optimizer, keras.optimizers.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            logits = tf.cast(self.model(x, training=True), tf.float32)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.reduce_sum(losses) / size
            if scaling:
                loss = self._optimizer.scale_loss(loss)
        grads = tape.gradient(loss, self._variables)
        if scaling or self.placement.replicas > 1:
            if scaling and self.placement.replicas > 1:
                grads = self._agree_on_overflow(grads)
            self._optimizer.apply(grads, self._variables)
        else:
            for variable, grad in zip(self._variables, grads, strict=True):
                self._sgd.update_step(grad, variable, self._sgd.learning_rate)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.int64))
        return tf.reduce_sum(losses), correct, logits

    def _agree_on_overflow(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """The gradients, made non-finite on every replica if they are on any. Keras'
        `LossScaleOptimizer` decides whether to apply the step or to skip it and halve the scale
        from the first replica's own gradients, before they are summed: an overflow on another
        replica alone would be applied, NaN in every weight (`test_tf_mirrored.py` checks it)."""
        overflow = tf.cast(tf.logical_not(self._optimizer.check_finite(grads)), tf.float32)
        anywhere = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, overflow)
        poison = tf.where(anywhere > 0.0, tf.constant(np.nan, grads[0].dtype), tf.zeros([], grads[0].dtype))
        return [grads[0] + poison, *grads[1:]]

    def _distributed_step(
        self, x: tuple[tf.Tensor, ...], labels: tuple[tf.Tensor, ...], size: tf.Tensor, accumulate: bool
    ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        """The global mean loss and each replica's logits; `accumulate` adds the batch's summed
        loss, correct predictions and size to the totals on the first device."""
        strategy = self.placement.strategy
        loss_sums, correct, logits = strategy.run(
            self._replica_step, args=(self._per_replica(x), self._per_replica(labels), size)
        )
        loss_sum = strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sums, axis=None)
        if accumulate:
            self._totals[0].assign_add(tf.cast(loss_sum, tf.float64))
            self._totals[1].assign_add(strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))
            self._totals[2].assign_add(tf.cast(size, tf.int64))
        return loss_sum / size, strategy.experimental_local_results(logits)

    # The Runner protocol.

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Output for a float32 batch in `layout`; training mode updates the running statistics."""
        x = self._check(x, training)
        n = len(x)
        if n < self.placement.replicas:  # eval mode only: pad, as examples are independent there
            x = np.concatenate([x, np.zeros((self.placement.replicas - n, *x.shape[1:]), np.float32)])
        outputs = (self._forward_train if training else self._eval)(self._shards(x))
        return np.concatenate([part.numpy() for part in outputs])[:n]

    def prepare(self, x: np.ndarray, labels: np.ndarray) -> Batch:
        """A training batch checked (as `train_step` checks it) and its shards copied to their devices."""
        x = self._check(x, training=True)
        labels = self._check_labels(x, labels)
        return Batch(self._shards(x), self._shards(labels), tf.constant(float(len(x)), tf.float32))

    def step(self, batch: Batch) -> None:
        """One SGD step on a prepared batch, its loss, correct count and size added on the device."""
        self._train_and_count(batch.x, batch.labels, batch.size)
        self._steps += 1

    def take_totals(self) -> tuple[float, int, int]:
        """The summed loss, correct predictions and examples since the last call, then zeroed."""
        totals = (float(self._totals[0].numpy()), int(self._totals[1].numpy()), int(self._totals[2].numpy()))
        for total in self._totals:
            total.assign(tf.zeros_like(total))
        return totals

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy; the loss and the logits before the update."""
        batch = self.prepare(x, labels)
        loss, logits = self._train(batch.x, batch.labels, batch.size)
        self._steps += 1
        return float(loss), np.concatenate([part.numpy() for part in logits])

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        self.optimizer = replace(self.optimizer, lr=lr)
        self._sgd.learning_rate.assign(lr)

    def weights(self) -> CanonicalWeights:
        """The current canonical weights, running statistics included (the first device's)."""
        return export_weights(self.model)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace every weight (a full canonical mapping), on every device."""
        load_weights(self.model, weights)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by canonical parameter name (empty before a step or without momentum)."""
        if not self._steps or not self.optimizer.momentum:
            return {}
        return {
            name: np.ascontiguousarray(slot.to_canonical(buffer.numpy()), dtype=np.float32)
            for (name, slot), buffer in zip(self._params.items(), self._sgd.momentums, strict=True)
        }

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state` (an empty mapping resets them)."""
        if not state:
            for buffer in self._sgd.momentums:
                buffer.assign(tf.zeros_like(buffer))
            self._steps = 0
            return
        missing = sorted(set(self._params) - set(state))
        unexpected = sorted(set(state) - set(self._params))
        if missing or unexpected:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r}: missing {missing}, unexpected {unexpected}."
            )
        values = []
        for name, slot in self._params.items():
            shape = tuple(np.shape(state[name]))
            if shape != slot.shape:
                raise WeightsError(f"optimizer state {name}: shape {shape}, expected {slot.shape}.")
            values.append(np.ascontiguousarray(slot.to_keras(np.asarray(state[name], dtype=np.float32))))
        for buffer, value in zip(self._sgd.momentums, values, strict=True):
            buffer.assign(value)
        self._steps = max(self._steps, 1)


def make_runner(
    graph: Graph,
    weights: CanonicalWeights,
    layout: str,
    optimizer: SGD,
    execution: Execution | None = None,
) -> KerasRunner:
    """A runner for `graph` with `weights` loaded, in `layout`, placed and parallelised as
    `execution` says (one CPU or TensorFlow's default device, float32, by default)."""
    return KerasRunner(graph, weights, layout, optimizer, execution)
