"""The MXNet `Runner`: a built Gluon model, a `gluon.Trainer` with PyTorch's SGD, driven with NumPy,
placed as its `Execution` says (see `execution`).

Set `MULTIRES_MXNET_HYBRIDIZE=0` to run the model eagerly (default `1`: hybridized with
`static_alloc`), so the conformance suite checks both ways without changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.contrib import amp
from mxnet.contrib.amp.loss_scaler import LossScaler

from multires.backend import SGD, Execution, shard_bounds
from multires.errors import MultiresError, ShapeError, SpecError, WeightsError
from multires.graph import Graph
from multires.shapes import infer_shapes
from multires.weights import is_buffer

from .. import input_array
from .execution import compute_dtype, resolve_contexts, synchronised_forward
from .lowering import GraphBlock, build, set_compute_dtype
from .weights import export_weights, load_weights, parameters

HYBRIDIZE_ENV = "MULTIRES_MXNET_HYBRIDIZE"


class HybridizeSettingError(MultiresError, ValueError):
    """An unreadable MULTIRES_MXNET_HYBRIDIZE value."""


def hybridize_default() -> bool:
    """Whether runners hybridize: `MULTIRES_MXNET_HYBRIDIZE` (`0`/`1`), on by default."""
    value = os.environ.get(HYBRIDIZE_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise HybridizeSettingError(f"{HYBRIDIZE_ENV} must be 0 or 1; got {value!r}.")


class PyTorchSGD(mx.optimizer.Optimizer):
    """`multires.SGD` (PyTorch's rule) as an MXNet optimizer for `gluon.Trainer`.

    MXNet's own `sgd` keeps `mom = momentum * mom - lr * g` and adds it to the weight: the same
    steps for a fixed learning rate, but its state carries the learning rate, so it differs from
    PyTorch after a learning-rate change and its state is not PyTorch's buffer. Here the state
    is PyTorch's `buf = momentum * buf + (grad + weight_decay * w)` (held in `buffers`, by
    context, then parameter index) and `w -= lr * buf`, both with MXNet's fused update kernels.
    Without momentum it is MXNet's `sgd_update`, `w = (1 - lr * wd) * w - lr * grad`. A
    `gluon.Trainer` over several contexts calls it for each context's copy of a parameter with the
    same summed gradient, so every context keeps the same weights and buffers.
    """

    def __init__(self, learning_rate: float, momentum: float = 0.0, wd: float = 0.0, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, wd=wd, **kwargs)
        self.momentum = momentum
        self.buffers: dict[mx.Context, dict[int, nd.NDArray]] = {}
        self._scratch: dict[tuple[mx.Context, int], nd.NDArray] = {}

    def create_state(self, index: int, weight: nd.NDArray) -> None:
        """No Trainer-held state: the momentum buffers live in `buffers`."""
        return None

    def update(self, index: int, weight: nd.NDArray, grad: nd.NDArray, state: None) -> None:
        """One step for the parameter at `index`, in place."""
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        clip = -1.0 if self.clip_gradient is None else self.clip_gradient
        if not self.momentum:
            nd.sgd_update(
                weight, grad, out=weight, lr=lr, wd=wd, rescale_grad=self.rescale_grad, clip_gradient=clip
            )
            return
        buffers = self.buffers.setdefault(weight.context, {})
        if index not in buffers:
            buffers[index] = nd.zeros_like(weight)  # momentum * 0 + g == g: PyTorch's first step
        key = (weight.context, index)
        if key not in self._scratch:
            self._scratch[key] = nd.empty(weight.shape, weight.context, weight.dtype)
        buffer = buffers[index]
        # sgd_mom_update with lr = -1 computes mom = momentum * mom + wd * w + rescale * grad in
        # place; its weight output (w + mom) is not needed and goes to scratch.
        nd.sgd_mom_update(
            weight,
            grad,
            buffer,
            out=self._scratch[key],
            lr=-1.0,
            momentum=self.momentum,
            wd=wd,
            rescale_grad=self.rescale_grad,
            clip_gradient=clip,
        )
        nd.sgd_update(weight, buffer, out=weight, lr=lr, wd=0.0, rescale_grad=1.0)


@dataclass
class Batch:
    """A training batch made ready by `MXNetRunner.prepare`: each non-empty shard's inputs and
    float32 class indices on its context (on their way there: the copies are engine operations),
    and the global batch size."""

    shards: list[tuple[list[nd.NDArray], nd.NDArray]]
    examples: int


class MXNetRunner:
    """A `multires.Runner` over a model from `build`, placed as `execution` says.

    Training-mode forward passes run under `autograd.train_mode()`; a step records with
    `autograd.record(train_mode=True)`, takes the batch-mean softmax cross-entropy, calls
    `backward()` and `trainer.step(1)` (so `rescale_grad` is 1: the loss is already a mean).

    With `devices` > 1 every parameter has a copy on each context; each context computes its shard
    (`shard_bounds`) and its loss is the shard's summed loss / global n; the Trainer's kvstore
    sums the gradients and every context applies the same update. With `sync_batchnorm` the
    training forward is `execution.synchronised_forward` (hybridized blocks run as their own cached
    ops there, BatchNorm between them over all contexts); without it each context runs the whole
    model on its shard, and `weights()` gives the first context's running statistics. Mixed
    precision is MXNet AMP's (`execution.compute_dtype`), with AMP's dynamic loss scaling in fp16.
    """

    def __init__(
        self,
        graph: Graph,
        weights: Mapping[str, np.ndarray],
        layout: str = "NCHW",
        optimizer: SGD | None = None,
        hybridize: bool | None = None,
        execution: Execution | None = None,
    ) -> None:
        optimizer = optimizer or SGD()
        self.graph = graph
        self.layout = layout
        self.execution = execution = execution or Execution()
        self.is_main = True
        self.contexts = resolve_contexts(execution)
        self.compute_dtype = compute_dtype(execution.precision, self.contexts[0])
        model = set_compute_dtype(build(graph, layout, initialize=False), self.compute_dtype)
        self.model: GraphBlock = load_weights(model, weights)
        if self.contexts != [mx.cpu()]:
            self.model.collect_params().reset_ctx(self.contexts)
        self.hybridized = hybridize_default() if hybridize is None else hybridize
        if self.hybridized:
            self.model.hybridize(static_alloc=True)
        params = parameters(self.model)
        self._trainable = [name for name in params if not is_buffer(name)]
        self.sgd = PyTorchSGD(optimizer.lr, momentum=optimizer.momentum, wd=optimizer.weight_decay)
        kvstore = None
        if len(self.contexts) > 1:
            kvstore = mx.kv.create("device" if self.contexts[0].device_type == "gpu" else "local")
        self._params = [params[name] for name in self._trainable]
        self.trainer = gluon.Trainer(
            self._params,
            self.sgd,
            kvstore=kvstore,
            update_on_kvstore=False if kvstore else None,
        )
        if execution.precision == "fp16":
            # What amp.init_trainer does, without the process-wide amp.init() it insists on.
            self.trainer._amp_loss_scaler = LossScaler()
            self.trainer._amp_original_scale = self.trainer._scale
        self._loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self._totals: nd.NDArray | None = None
        self._examples = 0

    def _arrays(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's inputs as float32 NumPy arrays (ShapeError for a missing one or a bad dtype)."""
        if isinstance(x, Mapping):
            missing = [i.name for i in self.graph.inputs if i.name not in x]
            if missing:
                raise ShapeError(f"{self.graph.name}: no array given for input(s) {missing}.")
            arrays = [x[i.name] for i in self.graph.inputs]
        else:
            arrays = [x]
        return [input_array(self.graph, a) for a in arrays]

    def _on(self, array: np.ndarray, context: mx.Context) -> nd.NDArray:
        """`array` as a float32 NDArray on `context`, through pinned host memory for a GPU (the
        host-to-device copy is then an asynchronous engine operation)."""
        if context.device_type == "gpu":
            return nd.array(array, ctx=mx.cpu_pinned(), dtype="float32").as_in_context(context)
        return nd.array(array, ctx=context, dtype="float32")

    def _rows(self, n: int) -> list[tuple[mx.Context, slice]]:
        """Each context with a non-empty shard of a global batch of `n`, and its rows."""
        return [
            (context, slice(start, stop))
            for context, (start, stop) in zip(self.contexts, shard_bounds(n, len(self.contexts)), strict=True)
            if stop > start
        ]

    def _per_shard_statistics(self) -> bool:
        """Whether training-mode BatchNorm sees each context's shard rather than the global batch."""
        return len(self.contexts) > 1 and not self.execution.sync_batchnorm

    def forward(self, x: np.ndarray | Mapping[str, np.ndarray], training: bool = False) -> Any:
        """The float32 output (a dict by name for several) for a batch in NCHW; training mode
        uses batch statistics (each context's shard's without synchronised BatchNorm) and
        updates the running statistics."""
        arrays = self._arrays(x)
        if training and len(self.contexts) > 1:
            shards = [
                [self._on(a[rows], context) for a in arrays] for context, rows in self._rows(len(arrays[0]))
            ]
            with autograd.train_mode():
                out = self._gather(self._training_outputs(shards))
        else:
            inputs = [self._on(a, self.contexts[0]) for a in arrays]
            with autograd.train_mode() if training else autograd.predict_mode():
                out = self.model(*inputs)
        if isinstance(out, tuple):
            return {name: value.asnumpy() for name, value in zip(self.graph.outputs, out, strict=True)}
        return out.asnumpy()

    def _training_outputs(self, shards: Sequence[list[nd.NDArray]]) -> list[Any]:
        """The model's training-mode outputs for each context's shard (see the class docstring)."""
        if self.execution.sync_batchnorm and len(self.contexts) > 1:
            return synchronised_forward(self.model, shards)
        return [self.model(*inputs) for inputs in shards]

    def _gather(self, outputs: list[Any]) -> Any:
        """The shards' outputs (NDArrays, or tuples for several) as one batch on the first context."""
        if len(outputs) == 1:
            return outputs[0]
        first = self.contexts[0]
        if isinstance(outputs[0], tuple):
            return tuple(self._gather(list(parts)) for parts in zip(*outputs, strict=True))
        return nd.concat(*(out.as_in_context(first) for out in outputs), dim=0)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (`Trainer.set_learning_rate`)."""
        self.trainer.set_learning_rate(lr)

    def prepare(self, x: np.ndarray | Mapping[str, np.ndarray], labels: np.ndarray) -> Batch:
        """A checked training batch (ShapeError or SpecError otherwise), each context's shard of
        it on its way to that context."""
        if len(self.graph.outputs) != 1:
            raise SpecError(
                f"{self.graph.name}: training needs a graph with one output (the logits); it has "
                f"{list(self.graph.outputs)}."
            )
        arrays = self._arrays(x)
        shapes = tuple(a.shape for a in arrays)
        rows = self._rows(len(arrays[0]))
        if self._per_shard_statistics():
            for _, part in rows:
                self.model._plan(tuple((part.stop - part.start, *s[1:]) for s in shapes), True)
        else:
            self.model._plan(shapes, True)
        targets = self._labels(shapes, labels).astype(np.float32)
        shards = [
            ([self._on(a[part], context) for a in arrays], self._on(targets[part], context))
            for context, part in rows
        ]
        return Batch(shards, len(targets))

    def _update(self, batch: Batch) -> tuple[nd.NDArray, list[nd.NDArray]]:
        """One SGD step on a prepared batch: the global batch's mean loss (on the first context)
        and each shard's logits of the forward pass before the update."""
        if len(self.contexts) == 1:
            ((inputs, targets),) = batch.shards
            with autograd.record(train_mode=True):
                logits = self.model(*inputs)
                loss = self._loss(logits, targets).mean()
                heads = self._scaled([loss])
            heads[0].backward()
            self.trainer.step(1)
            return loss, [logits]
        with autograd.record(train_mode=True):
            outputs = self._training_outputs([inputs for inputs, _ in batch.shards])
            losses = [
                self._loss(logits, targets).sum() / batch.examples
                for logits, (_, targets) in zip(outputs, batch.shards, strict=True)
            ]
            heads = self._scaled(losses)
        autograd.backward(heads)
        self._zero_idle_gradients(len(batch.shards))
        self.trainer.step(1)
        first = self.contexts[0]
        return nd.add_n(*(loss.as_in_context(first) for loss in losses)), outputs

    def _scaled(self, losses: list[nd.NDArray]) -> list[nd.NDArray]:
        """The losses to differentiate (inside `autograd.record`): times AMP's loss scale in fp16,
        where the Trainer unscales the gradients and skips a step whose gradients overflow."""
        if self.execution.precision != "fp16":
            return losses
        with amp.scale_loss(losses, self.trainer) as scaled:
            return list(scaled)

    def _zero_idle_gradients(self, busy: int) -> None:
        """Zero gradients on the contexts past the first `busy` (those with an empty shard of a
        batch smaller than the device count), so the kvstore sums only the others'."""
        for context in self.contexts[busy:]:
            for param in self._params:
                param.grad(context)[:] = 0
                param.data(context)._fresh_grad = True  # as backward marks it: the Trainer checks

    def train_step(
        self, x: np.ndarray | Mapping[str, np.ndarray], labels: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy in training mode; returns the loss and the
        logits of the forward pass before the update (of the global batch, under data parallelism)."""
        loss, logits = self._update(self.prepare(x, labels))
        return float(loss.asscalar()), self._gather(logits).asnumpy()

    def step(self, batch: Batch) -> None:
        """`train_step` on a prepared batch, its summed loss and correct predictions added to
        totals on the first context (no wait for the device)."""
        loss, logits = self._update(batch)
        first = self.contexts[0]
        with autograd.pause():
            correct = nd.add_n(
                *(
                    (nd.argmax(out, axis=1) == targets).sum().as_in_context(first)
                    for out, (_, targets) in zip(logits, batch.shards, strict=True)
                )
            )
            totals = nd.concat(loss.reshape((1,)) * batch.examples, correct.reshape((1,)), dim=0)
            totals = totals.astype("float64")
            self._totals = totals if self._totals is None else self._totals + totals
        self._examples += batch.examples

    def take_totals(self) -> tuple[float, int, int]:
        """The summed loss, correct predictions and examples since the last call, then zeroed:
        one read of the device."""
        totals, examples = self._totals, self._examples
        self._totals, self._examples = None, 0
        if totals is None:
            return 0.0, 0, 0
        loss_sum, correct = totals.asnumpy().tolist()
        return loss_sum, round(correct), examples

    def _labels(self, shapes: tuple[tuple[int, ...], ...], labels: np.ndarray) -> np.ndarray:
        """Labels as integer class indices checked against the batch and the class count."""
        labels = np.asarray(labels)
        named = {i.name: shape for i, shape in zip(self.graph.inputs, shapes, strict=True)}
        try:
            out_shape = infer_shapes(self.graph, named)[self.graph.outputs[0]]
        except SpecError as error:
            raise ShapeError(f"{self.graph.name}: the input does not fit: {error}") from None
        if len(out_shape) != 2:
            raise ShapeError(
                f"cross-entropy needs (N, classes) logits; got shape {out_shape}. "
                "End the graph with Flatten and Dense (or GlobalAvgPool, Flatten)."
            )
        n, k = out_shape
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ShapeError(
                f"labels must be {n} integer class indices (shape ({n},)); got {labels.dtype} of shape "
                f"{labels.shape}."
            )
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ShapeError(
                f"labels must lie in [0, {k}) for {k} classes; got values in [{labels.min()}, {labels.max()}]."
            )
        return labels

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included (float32; the first
        context's, which are every context's but for the running statistics without sync)."""
        return export_weights(self.model)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the weights in place on every context (the trainer keeps its parameter references)."""
        load_weights(self.model, weights)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers (PyTorch's `buf`) by canonical parameter name; empty before the first
        step or without momentum."""
        buffers = self.sgd.buffers.get(self.contexts[0], {})
        return {self._trainable[i]: buffer.asnumpy() for i, buffer in sorted(buffers.items())}

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state` on every context (an empty mapping clears them)."""
        params = parameters(self.model)
        problems = []
        for name, value in state.items():
            if name not in params or is_buffer(name):
                problems.append(f"{name}: not a trainable parameter")
            elif tuple(np.shape(value)) != tuple(params[name].shape):
                problems.append(
                    f"{name}: shape {tuple(np.shape(value))}, expected {tuple(params[name].shape)}"
                )
        if problems:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r} ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems)
            )
        index = {name: i for i, name in enumerate(self._trainable)}
        self.sgd.buffers = {
            context: {
                index[name]: nd.array(np.asarray(value, dtype=np.float32), ctx=context, dtype="float32")
                for name, value in state.items()
            }
            for context in self.contexts
        }


def make_runner(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    layout: str,
    optimizer: SGD,
    execution: Execution | None = None,
    hybridize: bool | None = None,
) -> MXNetRunner:
    """A `multires.Runner` for `graph` with canonical `weights`, placed as `execution` says
    (default: one CPU, float32); `hybridize` defaults to `MULTIRES_MXNET_HYBRIDIZE` (on unless
    set to 0)."""
    return MXNetRunner(graph, weights, layout, optimizer, hybridize, execution)
