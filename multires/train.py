"""Training on Fashion-MNIST in any backend: one loop that drives a `multires.backend.Runner`.

`train("d2l_resnet18", backend="torch", epochs=10, lr=0.05, batch_size=256, resize=96,
momentum=0, schedule="constant")` is the book's experiment (*Dive into Deep Learning*, "Residual
Networks"): SGD on mean softmax cross-entropy, with per-epoch train loss and accuracy (averaged
over the epoch's batches, as the book does), test accuracy (eval mode) and examples/s. The
defaults keep the book's learning rate and batch size but add momentum 0.9 and a cosine
schedule, the usual ResNet recipe: on 28 x 28 images two epochs then reach a test accuracy of
0.892, where constant rates got 0.857-0.876 (docs/training.md has the runs). The data, its order
and the initial weights are framework-neutral (`multires.data`,
`multires.weights.init_weights`), so every backend follows the same curve from the same seed.

With `out`, a run writes `history.json`, `history.csv` and `history.png` (the book's plot) after
each epoch, the trained weights as `weights.safetensors` at the end, and a checkpoint at the end
of each epoch and every `checkpoint_every` steps: canonical weights and momentum buffers
(`.safetensors`) in a fresh folder under `checkpoints/`, then `checkpoint.json` (position,
partial-epoch sums, history, config) swapped in atomically, so a run killed at any instant
resumes from the last complete checkpoint; a write that fails (a full disk) leaves the previous
checkpoint in place and raises a TrainingError. Because the batch order is a pure function of
`(seed, epoch)`, `resume=True` replays exactly the batches the killed run had not yet committed
and ends with the same weights as an uninterrupted run (on a deterministic backend). Every file
gets the usual permissions (0666 less the umask). A running run holds a lock on `out`
(`train.lock`), so a second run there is refused with the holder's pid rather than interleaved.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

from multires import weights as weights_io
from multires.backend import (
    SGD,
    Execution,
    HostTotals,
    Runner,
    get_backend,
    make_runner,
    resolve_layout,
)
from multires.data import Dataset, batch_indices, fashion_mnist, num_batches, resize_images, to_input
from multires.errors import BackendUnavailableError, ShapeError, SpecError, TrainingError, WeightsError
from multires.files import atomic_write
from multires.graph import Conv2d, Dense, Graph
from multires.shapes import Shape, check_layout, infer_shapes

RunnerFactory = Callable[..., Runner]
"""A callable building a Runner: `(graph, weights, layout, optimizer) -> Runner`, e.g.
`multires.reference.ReferenceRunner`; given a non-default `Execution` (devices, precision), it is
passed as a fifth argument."""

CHECKPOINT = "checkpoint.json"
CHECKPOINT_FORMAT = "multires.checkpoint"
CHECKPOINT_VERSION = 1

INITS = ("torchvision", "d2l")
"""Initialisations `train` offers: `multires.init_weights` (torchvision's Kaiming-normal), or the
book's `init_cnn` (Xavier-uniform convolution and dense weights, PyTorch's default biases)."""

SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules `train` offers: the book's constant rate, or cosine annealing from
`lr` towards zero over the whole run, set before every step (`learning_rate`)."""

RESUME_KEYS = (
    "graph",
    "init",
    "lr",
    "schedule",
    "momentum",
    "weight_decay",
    "batch_size",
    "seed",
    "resize",
    "antialias",
    "limit",
)
"""Config entries a resumed run must share with its checkpoint (epochs, backend, layout, device,
device count and precision may change: canonical weights and momentum buffers move between
backends and devices; epochs may not under a cosine schedule, whose rates depend on the run's
length)."""


def learning_rate(schedule: str, lr: float, step: int, total: int) -> float:
    """The rate of step `step` (0-based) of a run of `total` steps: `lr` ("constant"), or
    `lr * (1 + cos(pi * step / total)) / 2` ("cosine": `torch.optim.lr_scheduler.CosineAnnealingLR`
    with `T_max=total`, stepped after every batch)."""
    _check_schedule(schedule)
    if schedule == "cosine":
        return lr * (1.0 + math.cos(math.pi * step / total)) / 2.0
    return lr


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise TrainingError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")


@dataclass(frozen=True)
class Epoch:
    """One epoch's figures: mean train loss and accuracy over its batches, test accuracy, and
    the training examples and seconds (evaluation and checkpoints excluded)."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    examples: int
    seconds: float

    @property
    def examples_per_sec(self) -> float:
        """Training throughput of the epoch."""
        return self.examples / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        """The book's line for this epoch: `loss 0.277, train acc 0.898, test acc 0.892, 255.6 examples/sec`."""
        return _line(self.train_loss, self.train_acc, self.test_acc, self.examples_per_sec)


def _line(loss: float, train_acc: float, test_acc: float, examples_per_sec: float) -> str:
    return f"loss {loss:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}, {examples_per_sec:.1f} examples/sec"


@dataclass
class History:
    """The configuration of a run and its epochs so far; after `train`, `runner` holds the trained
    model (`history.runner.weights()` are its canonical weights), as Keras's `History.model` does."""

    config: dict[str, Any]
    epochs: list[Epoch] = field(default_factory=list)
    runner: Runner | None = field(default=None, repr=False, compare=False)

    @property
    def examples_per_sec(self) -> float:
        """Training examples per second over every epoch, as the book reports it."""
        seconds = sum(e.seconds for e in self.epochs)
        return sum(e.examples for e in self.epochs) / seconds if seconds > 0 else float("nan")

    def summary(self) -> str:
        """The book's final line, e.g. `loss 0.277, train acc 0.898, test acc 0.892, 255.6 examples/sec`."""
        if not self.epochs:
            return "no epoch trained yet"
        last = self.epochs[-1]
        return _line(last.train_loss, last.train_acc, last.test_acc, self.examples_per_sec)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the config and one record per epoch (with examples_per_sec)."""
        return {
            "config": self.config,
            "epochs": [{**asdict(e), "examples_per_sec": e.examples_per_sec} for e in self.epochs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Rebuild a history from `to_dict` output."""
        fields = ("epoch", "train_loss", "train_acc", "test_acc", "examples", "seconds")
        return cls(dict(data["config"]), [Epoch(**{k: e[k] for k in fields}) for e in data["epochs"]])

    def to_csv(self) -> str:
        """One row per epoch: epoch, train_loss, train_acc, test_acc, examples, seconds, examples_per_sec."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            ["epoch", "train_loss", "train_acc", "test_acc", "examples", "seconds", "examples_per_sec"]
        )
        for e in self.epochs:
            writer.writerow(
                [e.epoch, e.train_loss, e.train_acc, e.test_acc, e.examples, e.seconds, e.examples_per_sec]
            )
        return buffer.getvalue()

    def save(self, folder: str | os.PathLike, plot: bool = True) -> None:
        """Write `history.json`, `history.csv` and (with `plot`) `history.png` into `folder`, atomically."""
        folder = Path(folder)
        _write_atomic(folder / "history.json", json.dumps(self.to_dict(), indent=2).encode())
        _write_atomic(folder / "history.csv", self.to_csv().encode())
        if plot:
            plot_history(self, folder / "history.png")


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BackendUnavailableError(
            "plotting training curves needs matplotlib: pip install 'multires[plot]'."
        ) from None
    return Figure, FigureCanvasAgg


def plot_history(history: History, path: str | os.PathLike) -> Path:
    """Plot train loss, train accuracy and test accuracy by epoch as the book does, to a PNG.

    Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left alone.
    """
    figure_cls, canvas_cls = _matplotlib()
    figure = figure_cls(figsize=(3.5, 2.5), layout="constrained")
    canvas_cls(figure)
    axes = figure.add_subplot()
    x = [e.epoch for e in history.epochs]
    axes.plot(x, [e.train_loss for e in history.epochs], "-", marker=".", label="train loss")
    axes.plot(x, [e.train_acc for e in history.epochs], "m--", marker=".", label="train acc")
    axes.plot(x, [e.test_acc for e in history.epochs], "g-.", marker=".", label="test acc")
    total = int(history.config.get("epochs") or (x[-1] if x else 1))
    if total > 1:
        axes.set_xlim(1, total)
    axes.set_xlabel("epoch")
    axes.grid(True)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    return _write_atomic(Path(path), buffer.getvalue())


def evaluate(runner: Runner, dataset: Dataset, batch_size: int = 256) -> float:
    """Accuracy of the runner's eval-mode predictions on `dataset`."""
    correct = 0
    for idx in batch_indices(len(dataset), batch_size):
        logits = runner.forward(to_input(dataset.images[idx], runner.layout), training=False)
        correct += int((np.argmax(logits, axis=1) == dataset.labels[idx]).sum())
    return correct / len(dataset) if len(dataset) else float("nan")


@dataclass
class _Position:
    """Where a run stands: completed epochs, steps done in the current one, and its partial sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    examples: int = 0
    seconds: float = 0.0

    def finish(self, test_acc: float) -> Epoch:
        """The record of the epoch these sums cover."""
        return Epoch(
            epoch=self.epoch + 1,
            train_loss=self.loss_sum / self.examples,
            train_acc=self.correct / self.examples,
            test_acc=test_acc,
            examples=self.examples,
            seconds=self.seconds,
        )


def _due(step: int, every: int | None, steps: int) -> bool:
    """Whether a mid-epoch checkpoint falls after `step` (the epoch's end writes its own)."""
    return every is not None and step % every == 0 and step < steps


PREFETCH = 2
"""Batches the trainer's background thread prepares ahead of the step that runs."""

TOTALS_PER_EPOCH = 50
"""How often per epoch the trainer reads the device's loss and accuracy totals (which waits for
the device), besides checkpoints and the epoch's end: the progress display's refresh. The device
runs ahead in between; the points are steps, not seconds, so the sums add up in the same order in
an interrupted and resumed run as in a whole one."""


class _StepAdapter(HostTotals):
    """`prepare`/`step`/`take_totals` for a Runner that implements only `train_step`."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        return self.runner.train_step(x, labels)


def _stepper(runner: Runner) -> Runner | _StepAdapter:
    """The runner itself where it keeps totals on its device, else a host-side adapter."""
    return runner if hasattr(runner, "step") else _StepAdapter(runner)


def _prefetched(
    stepper: Runner | _StepAdapter, layout: str, dataset: Dataset, order: Iterator[np.ndarray]
) -> Iterator[Any]:
    """The runner's prepared batches in `order`, each made ready (images converted, checked and
    sent towards the device) in a background thread while the steps before it run."""

    def prepare(idx: np.ndarray) -> Any:
        return stepper.prepare(to_input(dataset.images[idx], layout), dataset.labels[idx].astype(np.int64))

    with ThreadPoolExecutor(1, thread_name_prefix="multires-prefetch") as pool:
        pending: deque[Future[Any]] = deque()
        try:
            for idx in order:
                pending.append(pool.submit(prepare, idx))
                if len(pending) > PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _collect(stepper: Runner | _StepAdapter, position: _Position, since: float) -> float:
    """Add the device's totals and the seconds since `since` to the position; returns the time now."""
    loss_sum, correct, examples = stepper.take_totals()
    now = time.perf_counter()
    position.loss_sum += float(loss_sum)
    position.correct += int(correct)
    position.examples += int(examples)
    position.seconds += now - since
    return now


def train(
    model: str | Graph = "d2l_resnet18",
    backend: str | RunnerFactory = "torch",
    *,
    epochs: int = 10,
    lr: float = 0.05,
    schedule: str = "cosine",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    resize: int | tuple[int, int] | None = None,
    antialias: bool = True,
    limit: int | None = None,
    layout: str | None = None,
    weights: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    init: str = "torchvision",
    root: str | os.PathLike | None = None,
    data: tuple[Dataset, Dataset] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = 100,
    plot: bool | None = None,
    progress: bool = True,
    device: str | None = None,
    devices: int = 1,
    precision: str = "fp32",
    sync_batchnorm: bool = True,
) -> History:
    """Train `model` (a zoo name or a Graph) on Fashion-MNIST with SGD in `backend`; returns the History.

    `backend` is a registered backend name, "reference" (the float64 NumPy interpreter, slow) or a
    `RunnerFactory`. `schedule` (see `SCHEDULES`) sets the learning rate of each step from `lr`
    through the Runner's `set_lr`. The initial weights are drawn from `seed` by `init` (see
    `INITS`) unless `weights` (a canonical mapping or a weight file) is given; `seed` also fixes the batch order. `resize`
    resizes the images (`multires.data.resize_images`); `limit` keeps the first `limit` examples
    of both the training and the test set. `data` replaces Fashion-MNIST by a (train, test) pair
    of `Dataset`s; otherwise the files are found or downloaded as `fashion_mnist(root)` does.

    With `out`, history files and checkpoints are written there (see the module docstring);
    `checkpoint_every` adds mid-epoch checkpoints every that many steps (None: only at epoch
    ends). `resume=True` continues the checkpoint in `out` (or starts afresh if there is none);
    without it an existing checkpoint is an error rather than silently overwritten. `plot`
    (default: when matplotlib is installed) writes `history.png`. `progress` shows a progress
    bar per epoch and a line per epoch on stderr; where stderr is not a terminal (a log file), a
    progress line every tenth of an epoch or `PROGRESS_SECONDS` replaces the bar.

    `device`, `devices`, `precision` and `sync_batchnorm` place the Runner (`multires.backend.Execution`):
    with `devices` > 1 each step splits its batch over the devices and gives the same update as one
    device on the whole batch (with synchronised BatchNorm), so a run may resume with another device
    count. Batches are prepared in a background thread (`PREFETCH` ahead) and the loss and accuracy
    are summed on the device, read `TOTALS_PER_EPOCH` times an epoch. Under multi-process data parallelism
    (torchrun, `jax.distributed`) every process runs `train`; only the main one (rank 0) prints,
    locks `out` and writes files.
    """
    from multires.zoo import spec

    graph = spec(model) if isinstance(model, str) else model
    _check_settings(
        {"epochs": epochs, "batch_size": batch_size, "checkpoint_every": checkpoint_every},
        {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
    )
    if init not in INITS:
        raise TrainingError(f"unknown init {init!r}; use one of {', '.join(INITS)}.")
    _check_schedule(schedule)
    if resume and out is None:
        raise TrainingError("resume=True needs the run folder `out` that holds the checkpoint.")
    execution = Execution(device, devices, precision, sync_batchnorm)
    if out is not None and not resume and (existing := read_checkpoint(out)) is not None:
        raise _existing_run(Path(out), existing)
    build_runner = _runner_factory(backend, layout, execution)
    if plot is None:
        plot = out is not None and _has_matplotlib()
    elif plot:
        _matplotlib()
    train_set, test_set = _datasets(data, root, resize, antialias, limit, progress)
    height, width = train_set.images.shape[1:]
    _check_graph(graph, (1, 1, height, width), len(train_set.classes))
    _check_shards(len(train_set), batch_size, execution.devices)

    config = {
        "model": graph.name,
        "graph": graph.to_dict(),
        "backend": backend if isinstance(backend, str) else _qualname(backend),
        "epochs": epochs,
        "init": init if weights is None else "given",
        "lr": lr,
        "schedule": schedule,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "seed": seed,
        "resize": list(resize) if isinstance(resize, tuple) else resize,
        "antialias": antialias,
        "limit": limit,
        "image_size": [int(height), int(width)],
        "train_examples": len(train_set),
        "test_examples": len(test_set),
    }
    optimizer = SGD(lr=lr, momentum=momentum, weight_decay=weight_decay)
    start = _initial_weights(graph, weights, init, seed, (1, 1, height, width))
    runner = build_runner(graph, start, optimizer)
    config["layout"] = runner.layout
    config.update(asdict(getattr(runner, "execution", execution)))  # with a device from MULTIRES_DEVICE
    main = getattr(runner, "is_main", True)
    folder = Path(out) if out is not None else None
    writes = folder if main else None
    with _run_lock(writes) if writes is not None else nullcontext():
        history = History(config)
        position = _Position()
        console = _console(progress and main)
        steps = num_batches(len(train_set), batch_size)
        if folder is not None:
            position, history = _start(folder, resume, runner, graph, config, console, steps)
        stepper = _stepper(runner)
        while position.epoch < epochs:
            title = f"epoch {position.epoch + 1}/{epochs}"
            order = batch_indices(len(train_set), batch_size, seed, position.epoch, position.step)
            every = max(1, steps // TOTALS_PER_EPOCH)
            with _progress_bar(console, progress and main, title, steps, position.step) as show:
                since = time.perf_counter()
                for batch in _prefetched(stepper, runner.layout, train_set, order):
                    if schedule != "constant":
                        done = position.epoch * steps + position.step
                        runner.set_lr(learning_rate(schedule, lr, done, epochs * steps))
                    stepper.step(batch)
                    position.step += 1
                    checkpoint = folder is not None and _due(position.step, checkpoint_every, steps)
                    if checkpoint or position.step == steps or position.step % every == 0:
                        since = _collect(stepper, position, since)
                    show(position)
                    if checkpoint and writes is not None:
                        with _disk(writes):
                            _save_checkpoint(writes, runner, graph, position, history)
                        since = time.perf_counter()
            record = position.finish(evaluate(runner, test_set, batch_size))
            history.epochs.append(record)
            position = _Position(epoch=record.epoch)
            console.print(f"{title}: {record.summary()}", highlight=False)
            if writes is not None:
                with _disk(writes):
                    _save_checkpoint(writes, runner, graph, position, history)
                    history.save(writes, plot=plot)
        if writes is not None:
            with _disk(writes):
                weights_io.save(runner.weights(), writes / "weights.safetensors", graph)
        history.runner = runner
        return history


def train_defaults() -> dict[str, Any]:
    """`train`'s keyword defaults (epochs, lr, schedule, momentum, batch size, ...): the one
    source the CLI and the training benchmark read theirs from."""
    return {
        name: p.default
        for name, p in inspect.signature(train).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _check_settings(counts: Mapping[str, Any], rates: Mapping[str, Any]) -> None:
    """Raise TrainingError unless every count (None: unused) is a positive int and every rate a
    finite number >= 0 (the learning rate > 0)."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TrainingError(f"{name} must be a positive int; got {value!r}.")
    for name, value in rates.items():
        bound = "> 0" if name == "lr" else ">= 0"
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        if not number or value < 0 or (name == "lr" and value == 0):
            raise TrainingError(f"{name} must be a finite number {bound}; got {value!r}.")


def _has_matplotlib() -> bool:
    try:
        _matplotlib()
    except BackendUnavailableError:
        return False
    return True


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _datasets(
    data: tuple[Dataset, Dataset] | None,
    root: str | os.PathLike | None,
    resize: int | tuple[int, int] | None,
    antialias: bool,
    limit: int | None,
    progress: bool,
) -> tuple[Dataset, Dataset]:
    if data is None:
        sets = [fashion_mnist(root, split, progress=progress) for split in ("train", "test")]
    else:
        sets = list(data)
    sets = [s.head(limit) for s in sets]
    if resize is not None:
        sets = [Dataset(resize_images(s.images, resize, antialias), s.labels, s.classes) for s in sets]
    train_set, test_set = sets
    if not len(train_set) or not len(test_set):
        raise TrainingError(
            f"no examples to train or test on ({len(train_set)} train, {len(test_set)} test)."
        )
    if train_set.images.shape[1:] != test_set.images.shape[1:]:
        raise ShapeError(
            f"train images are {train_set.images.shape[1:]} but test images {test_set.images.shape[1:]}; "
            "give data of one image size (or pass resize)."
        )
    return train_set, test_set


def _check_graph(graph: Graph, input_shape: tuple[int, int, int, int], classes: int) -> None:
    """Raise a typed error unless the graph takes one-channel images and outputs `classes` logits."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise SpecError(
            f"{graph.name}: training needs one input and one output (the logits); it has inputs "
            f"{[i.name for i in graph.inputs]} and outputs {list(graph.outputs)}."
        )
    (entry,) = graph.inputs
    if entry.channels != 1:
        raise ShapeError(
            f"{graph.name}: input {entry.name!r} takes {entry.channels} channels, but Fashion-MNIST images "
            "have 1. Build the model with in_channels=1 (e.g. spec(name, in_channels=1))."
        )
    output = infer_shapes(graph, input_shape)[graph.outputs[0]]
    if len(output) != 2 or output[1] is None or output[1] < classes:
        raise SpecError(
            f"{graph.outputs[0]} ({type(graph[graph.outputs[0]]).__name__}): the output {output} must be "
            f"(N, {classes}) logits for {classes} classes. Build the model with num_classes={classes}."
        )


def _check_shards(examples: int, batch_size: int, devices: int) -> None:
    """Raise TrainingError unless every batch of the epoch gives each device at least one example."""
    last = examples % batch_size or batch_size
    if min(batch_size, last) < devices:
        raise TrainingError(
            f"devices={devices} needs at least {devices} examples in every batch, but with {examples} examples "
            f"and batch size {batch_size} the last batch has {last}. Change the batch size, limit or devices."
        )


def xavier_weights(graph: Graph, seed: int = 0, input_shape: Shape | None = None) -> dict[str, np.ndarray]:
    """The book's initialisation (d2l's `init_cnn`): `init_weights`, with every convolution and
    dense weight redrawn Xavier-uniform, `U(-a, a)` with `a = sqrt(6 / (fan_in + fan_out))` as
    `torch.nn.init.xavier_uniform_` computes the fans; reproducible from `seed`."""
    weights = weights_io.init_weights(graph, seed, input_shape)
    rng = np.random.default_rng([seed, 1])
    for name, value in weights.items():
        node_name, kind = name.rsplit(".", 1)
        if kind == "weight" and isinstance(graph[node_name], (Conv2d, Dense)):
            receptive = int(np.prod(value.shape[2:], dtype=np.int64))
            bound = np.sqrt(6.0 / ((value.shape[0] + value.shape[1]) * receptive))
            weights[name] = rng.uniform(-bound, bound, value.shape).astype(np.float32)
    return weights


def _initial_weights(
    graph: Graph,
    weights: Mapping[str, np.ndarray] | str | os.PathLike | None,
    init: str,
    seed: int,
    input_shape: tuple[int, int, int, int],
) -> dict[str, np.ndarray]:
    """Weights drawn by `init`, or the given mapping or weight file, checked against the graph."""
    if weights is None:
        if init == "d2l":
            return xavier_weights(graph, seed, input_shape)
        return weights_io.init_weights(graph, seed, input_shape)
    if isinstance(weights, (str, os.PathLike)):
        arrays = weights_io.load_file(weights)
    else:
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    weights_io.check_weights(graph, arrays, input_shape)
    return arrays


def _runner_factory(
    backend: str | RunnerFactory, layout: str | None, execution: Execution
) -> Callable[[Graph, Mapping[str, np.ndarray], SGD], Runner]:
    """A function building the backend's Runner in `layout` as `execution` places it; checks the
    backend can train before any data is loaded."""
    if isinstance(backend, str) and backend.lower() == "reference":
        from multires.reference import ReferenceRunner

        # A Runner for the single-output graphs training drives (its forward then returns an array).
        backend = cast(RunnerFactory, ReferenceRunner)
    if not isinstance(backend, str):
        factory, chosen = backend, check_layout(layout or "NCHW")
        extra = () if execution == Execution() else (execution,)
        return lambda graph, weights, optimizer: factory(graph, weights, chosen, optimizer, *extra)
    module = get_backend(backend)
    if not getattr(module, "TRAINING", True):
        raise TrainingError(
            f"backend {module.NAME!r} runs inference only. Train in another backend (multires backends "
            "lists them) and export the trained weights to it."
        )
    resolved = resolve_layout(module, layout)
    return lambda graph, weights, optimizer: make_runner(
        graph, weights, module.NAME, resolved, optimizer, **asdict(execution)
    )


# Checkpoints.


def _write_atomic(path: Path, payload: bytes) -> Path:
    """Write bytes to `path` through a synced temporary file and an atomic rename (0666 less the umask)."""
    return atomic_write(path, lambda handle: handle.write(payload))


LOCK = "train.lock"
"""The lock file a run holds in its folder while it runs."""


@contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the run, so a second run there is refused rather than
    interleaved. The lock is the OS's (`flock`), so it ends with the process, even under SIGKILL;
    the file names its holder for the refusal message. (No lock where `fcntl` is missing: Windows.)"""
    if fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that is starting"
            raise TrainingError(
                f"{folder} is in use by a running multires train ({holder}). Wait for it to end (or stop "
                "it), or choose another out folder."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        handle.flush()
        yield


@contextmanager
def _disk(folder: Path) -> Iterator[None]:
    """Turn a failed write in the run folder (a full disk, a lost mount) into a TrainingError; the
    files are written atomically, so the previous checkpoint and history stay intact."""
    try:
        yield
    except OSError as error:
        raise TrainingError(
            f"{folder}: could not write the run's files ({error.strerror or error}); the previous checkpoint "
            "is intact. Free some space and continue the run with resume=True (--resume)."
        ) from None


def _save_checkpoint(
    folder: Path, runner: Runner, graph: Graph, position: _Position, history: History
) -> None:
    """Arrays into a fresh folder, then `checkpoint.json` pointing at it swapped in atomically;
    older checkpoint folders are removed only after the swap."""
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"epoch-{position.epoch:04d}-step-{position.step:06d}-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    pointer = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "dir": target.relative_to(folder).as_posix(),
        "position": asdict(position),
        "history": history.to_dict(),
    }
    try:
        for file, arrays in (
            ("weights.safetensors", runner.weights()),
            ("optimizer.safetensors", runner.optimizer_state()),
        ):
            weights_io.save(arrays, target / file, graph)
        _write_atomic(folder / CHECKPOINT, json.dumps(pointer, indent=1).encode())
    except OSError:  # the pointer was not swapped: the previous checkpoint stands
        shutil.rmtree(target, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint record in run folder `folder` (None when there is none); raises
    TrainingError when it is unreadable."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record["format"] != CHECKPOINT_FORMAT or record["version"] != CHECKPOINT_VERSION:
            raise ValueError(f"format {record['format']!r} version {record['version']!r}")
        History.from_dict(record["history"])
        _Position(**record["position"])
        str(record["dir"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainingError(
            f"{path}: not a readable multires checkpoint ({error}). Delete the run folder or choose another out."
        ) from None
    return record


def _existing_run(folder: Path, record: Mapping[str, Any]) -> TrainingError:
    """The error for starting a run in a folder that holds one: runs are never overwritten."""
    saved = History.from_dict(record["history"])
    return TrainingError(
        f"{folder} already holds a run ({len(saved.epochs)} of {saved.config.get('epochs')} epochs "
        "done). Pass resume=True (--resume) to continue it, or choose another out folder."
    )


def _start(
    folder: Path, resume: bool, runner: Runner, graph: Graph, config: dict[str, Any], console: Any, steps: int
) -> tuple[_Position, History]:
    """The position and history to start from: a fresh run, or the checkpoint in `folder` (saying
    where it continues, on `console`)."""
    record = read_checkpoint(folder)
    if record is None:
        if resume:
            console.print(f"no checkpoint in {folder}: starting a new run", highlight=False)
        return _Position(), History(config)
    if not resume:
        raise _existing_run(folder, record)
    saved = History.from_dict(record["history"])
    keys = RESUME_KEYS if config["schedule"] == "constant" else (*RESUME_KEYS, "epochs")
    changed = [k for k in keys if saved.config.get(k) != config.get(k)]
    if changed:
        details = ", ".join(
            f"{k}: {saved.config.get(k)!r} -> {config.get(k)!r}" for k in changed if k != "graph"
        )
        if "graph" in changed:
            details = ", ".join(filter(None, ["a different model graph", details]))
        raise TrainingError(
            f"{folder}: cannot resume with a different run configuration ({details}). Use the settings "
            "of the checkpointed run, or choose another out folder."
        )
    arrays = folder / record["dir"]
    try:
        runner.set_weights(weights_io.load_file(arrays / "weights.safetensors", graph))
        runner.set_optimizer_state(weights_io.load_file(arrays / "optimizer.safetensors"))
    except WeightsError as error:
        raise TrainingError(f"{arrays}: the checkpoint's arrays are unusable: {error}") from None
    changeable = ("epochs", "backend", "layout", "device", "devices", "precision", "sync_batchnorm")
    saved.config = {**saved.config, **{k: config[k] for k in changeable}}
    position = _Position(**record["position"])
    console.print(
        f"resuming {folder} at epoch {position.epoch + 1}/{config['epochs']}, step {position.step}/{steps} "
        f"({position.epoch * steps + position.step} steps done)",
        highlight=False,
    )
    return position, saved


# Console output.


def _console(progress: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=not progress)


PROGRESS_SECONDS = 30.0
"""Where stderr is not a terminal (a log under nohup), the longest wait between progress lines;
a line also comes every tenth of an epoch."""


@contextmanager
def _progress_bar(
    console: Any, enabled: bool, title: str, total: int, done: int
) -> Iterator[Callable[[_Position], None]]:
    """A rich progress bar for one epoch, or plain progress lines where the console is not a
    terminal (see `PROGRESS_SECONDS`); yields a function updating it from the position."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    lines = enabled and not console.is_terminal
    every = max(1, math.ceil(total / 10))
    last = time.monotonic()
    with Progress(*columns, console=console, disable=not enabled or lines, transient=True) as bar:
        task = bar.add_task(title, total=total, completed=done, stats="")

        def update(position: _Position) -> None:
            nonlocal last
            stats = (
                f"loss {position.loss_sum / position.examples:.3f} acc {position.correct / position.examples:.3f} "
                f"{position.examples / position.seconds if position.seconds else 0:.0f} ex/s"
                if position.examples
                else ""
            )
            bar.update(task, completed=position.step, stats=stats)
            now = time.monotonic()
            if (
                lines
                and position.step < total
                and (position.step % every == 0 or now - last >= PROGRESS_SECONDS)
            ):
                console.print(f"{title}: step {position.step}/{total}, {stats}", highlight=False)
                last = now

        yield update
