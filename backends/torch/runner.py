"""The PyTorch `Runner`: a built model with its weights and a `torch.optim.SGD`, driven with NumPy,
placed as its `Execution` says (see `execution`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from multires.backend import SGD, Execution, shard_bounds
from multires.errors import ShapeError, WeightsError
from multires.graph import Graph
from multires.shapes import check_input_shape, from_layout, infer_shapes

from .. import check_batch_statistics, input_array
from .execution import (
    FP16_INITIAL_SCALE,
    SyncBatchNorm2d,
    autocast,
    distributed,
    gather_rows,
    join_processes,
    resolve_device,
)
from .lowering import build
from .weights import export_weights, load_weights


@dataclass
class Batch:
    """A training batch made ready by `TorchRunner.prepare`: this process's rows of it on the
    device (or on their way there: `ready` is the CUDA copy's event) and the global batch size."""

    x: torch.Tensor
    labels: torch.Tensor
    examples: int
    ready: torch.cuda.Event | None = None


class TorchRunner:
    """A `multires.Runner` over a model from `build`, placed as `execution` says.

    `torch.optim.SGD` with dampening 0 and no Nesterov is exactly `multires.SGD`'s rule,
    weight decay included on every parameter. Mixed precision is `torch.autocast` (forward and
    loss) with a `torch.amp.GradScaler` for float16, which skips a step whose gradients overflow
    and lowers its scale. With `devices` > 1 the model is wrapped in `DistributedDataParallel`:
    each process takes its shard of the global batch, and its loss is the shard's summed loss
    times `devices / n`, so DDP's gradient average is the gradient of the global batch's mean loss.
    BatchNorm layers become `SyncBatchNorm2d` unless `sync_batchnorm=False`; then each process
    keeps its shard's running statistics until DDP broadcasts rank 0's at the start of the next
    training-mode forward pass (rank 0, which writes the files, always has its own).
    """

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
        model = build(graph, layout)
        if execution.devices > 1:
            processes = join_processes(execution)
            self.device, self.rank = processes.device, processes.rank
            if execution.sync_batchnorm:
                SyncBatchNorm2d.convert(model)
        else:
            self.device, self.rank = resolve_device(execution.device), 0
        self.is_main = self.rank == 0
        self.compute = autocast(self.device, execution.precision)
        self.model = load_weights(model, weights).to(self.device)
        self.network: torch.nn.Module = self.model
        if execution.devices > 1:
            self.network = distributed(self.model, self.device, execution.sync_batchnorm)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=optimizer.lr,
            momentum=optimizer.momentum,
            weight_decay=optimizer.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, FP16_INITIAL_SCALE, enabled=execution.precision == "fp16"
        )
        self._totals: torch.Tensor | None = None
        self._examples = 0
        self._copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _input(self, x: np.ndarray, training: bool) -> np.ndarray:
        """`x` as a float32 array after the checks the reference makes (ShapeError), in training
        mode that every device gets examples and each BatchNorm two values per channel (over the
        global batch, or over each device's shard without sync)."""
        array = input_array(self.graph, x)
        check_input_shape(self.graph, array.shape, self.layout)
        if not training:
            return array
        devices = self.execution.devices
        if len(array) < devices:
            raise ShapeError(
                f"a training batch of {len(array)} leaves some of the {devices} devices without "
                f"examples; use a global batch of at least {devices}."
            )
        if devices == 1 or self.execution.sync_batchnorm:
            check_batch_statistics(self.graph, array.shape, self.layout)
            return array
        smallest = len(array) // devices
        try:
            check_batch_statistics(self.graph, (smallest, *array.shape[1:]), self.layout)
        except ShapeError as error:
            raise ShapeError(
                f"{error} Without sync_batchnorm each of the {devices} devices normalises its own "
                f"shard of the global batch of {len(array)} (here {smallest} examples): use a larger "
                "global batch, or sync_batchnorm=True."
            ) from None
        return array

    def _shard(self, n: int) -> slice:
        """This process's rows of a global batch of `n`."""
        return slice(*shard_bounds(n, self.execution.devices)[self.rank])

    def _send(self, *arrays: np.ndarray) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """The arrays as tensors on the device; on CUDA copied from pinned memory on a side
        stream, so a prefetch thread overlaps the step (`_wait` before use: the event marks the
        end of the copies)."""
        tensors = [torch.from_numpy(array) for array in arrays]
        if self._copies is None:
            return [tensor.to(self.device) for tensor in tensors], None
        with torch.cuda.stream(self._copies):
            moved = [tensor.pin_memory().to(self.device, non_blocking=True) for tensor in tensors]
            ready = torch.cuda.Event()
            ready.record(self._copies)
        return moved, ready

    def _wait(self, batch: Batch) -> None:
        """Make the compute stream wait for the batch's copies (CUDA) before using it."""
        if batch.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(batch.ready)
            batch.x.record_stream(stream)
            batch.labels.record_stream(stream)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits for a float32 batch in `layout`; training mode updates the running statistics.
        Eval mode computes the whole batch in this process; training mode under data parallelism
        is sharded as a step is (every process must call it), with the outputs gathered."""
        array = self._input(x, training)
        parallel = training and self.execution.devices > 1
        rows = self._shard(len(array)) if parallel else slice(None)
        inputs = torch.from_numpy(array[rows]).to(self.device)
        self.network.train(training)
        with torch.no_grad(), self.compute():
            outputs = (self.network if parallel else self.model)(inputs).float()
        if parallel:
            outputs = gather_rows(outputs, self._sizes(len(array)))
        return outputs.cpu().numpy()

    def _sizes(self, n: int) -> list[int]:
        return [stop - start for start, stop in shard_bounds(n, self.execution.devices)]

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (every param group's `lr`, as a scheduler sets it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def prepare(self, x: np.ndarray, labels: np.ndarray) -> Batch:
        """A checked training batch (ShapeError otherwise), this process's shard of it on its way
        to the device."""
        array = self._input(x, training=True)
        output_shape = infer_shapes(self.graph, from_layout(array.shape, self.layout))[self.graph.outputs[0]]
        targets = _labels(labels, output_shape)
        rows = self._shard(len(array))
        (inputs, targets_on_device), ready = self._send(array[rows], targets[rows])
        return Batch(inputs, targets_on_device, len(array), ready)

    def _update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on a prepared batch; the logits before it and the loss (detached,
        float32): the batch's mean loss on one device, this process's summed loss under data
        parallelism."""
        self._wait(batch)
        self.network.train()
        with self.compute():
            logits = self.network(batch.x)
            if self.execution.devices == 1:
                loss = reported = F.cross_entropy(logits, batch.labels)
            else:
                reported = F.cross_entropy(logits, batch.labels, reduction="sum")
                loss = reported * (self.execution.devices / batch.examples)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # DDP's reducer warns once about a weight gradient whose strides differ from its
            # parameter's only on a size-1 axis (a 1-channel stem convolution's): the same layout.
            warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
            self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logits.detach().float(), reported.detach().float()

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy in training mode; returns the loss and the
        logits before the update (of the global batch, under data parallelism)."""
        batch = self.prepare(x, labels)
        logits, loss = self._update(batch)
        if self.execution.devices == 1:
            return float(loss), logits.cpu().numpy()
        dist.all_reduce(loss)
        return float(loss) / batch.examples, gather_rows(logits, self._sizes(batch.examples)).cpu().numpy()

    def step(self, batch: Batch) -> None:
        """`train_step` on a prepared batch, its summed loss and correct predictions added to
        totals on the device (no wait for the device)."""
        logits, loss = self._update(batch)
        summed = loss * batch.examples if self.execution.devices == 1 else loss
        correct = (logits.argmax(1) == batch.labels).sum()
        if self._totals is None:
            dtype = torch.float32 if self.device.type == "mps" else torch.float64
            self._totals = torch.zeros(2, dtype=dtype, device=self.device)
        self._totals += torch.stack([summed.to(self._totals.dtype), correct.to(self._totals.dtype)])
        self._examples += batch.examples

    def take_totals(self) -> tuple[float, int, int]:
        """The summed loss, correct predictions and examples since the last call, over the
        global batch (all-reduced under data parallelism: every process calls it), then zeroed."""
        totals, examples = self._totals, self._examples
        self._totals, self._examples = None, 0
        if totals is None:  # no step since the last call, in every process alike
            return 0.0, 0, 0
        if self.execution.devices > 1:
            dist.all_reduce(totals)
        loss_sum, correct = totals.tolist()
        return loss_sum, round(correct), examples

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included (float32; this process's,
        which are every process's but for the running statistics without sync, where rank 0's
        are the model's)."""
        return export_weights(self.model)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace the weights in place (the optimizer keeps its parameter references); under
        data parallelism every process loads the same weights."""
        load_weights(self.model, weights)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """SGD momentum buffers by canonical parameter name."""
        state = {}
        for name, param in self.model.named_parameters():
            buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                state[name] = buffer.detach().cpu().numpy().copy()
        return state

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore momentum buffers saved by `optimizer_state` (an empty mapping clears them)."""
        params = dict(self.model.named_parameters())
        problems = [f"unexpected {name}" for name in state if name not in params]
        problems += [
            f"{name}: shape {np.shape(value)}, expected {tuple(params[name].shape)}"
            for name, value in state.items()
            if name in params and tuple(np.shape(value)) != tuple(params[name].shape)
        ]
        if problems:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r} ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems)
            )
        self.optimizer.state.clear()
        for name, value in state.items():
            param = params[name]
            buffer = torch.tensor(np.asarray(value), dtype=param.dtype, device=param.device)
            self.optimizer.state[param]["momentum_buffer"] = buffer


def _labels(labels: np.ndarray, output_shape: tuple[int | None, ...]) -> np.ndarray:
    """`labels` as int64 class indices, or a ShapeError saying what fits the logits."""
    labels = np.asarray(labels)
    if len(output_shape) != 2:
        raise ShapeError(
            f"cross-entropy needs (N, classes) logits; the model returns shape {output_shape}. "
            "End the graph with Flatten and Dense."
        )
    n, classes = output_shape
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ShapeError(
            f"labels must be {n} integer class indices (shape ({n},)); got {labels.dtype} of shape {labels.shape}."
        )
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ShapeError(
            f"labels must lie in [0, {classes}) for {classes} classes; got values in [{labels.min()}, {labels.max()}]."
        )
    return np.ascontiguousarray(labels, dtype=np.int64)
