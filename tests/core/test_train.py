"""The trainer on the NumPy reference (no framework): it takes the reference's SGD steps on the
seeded batches, writes history, plot and checkpoints, and a run killed with SIGKILL mid-epoch
resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import multires as mr
from multires import reference
from multires.backend import SGD
from multires.data import CLASSES, Dataset, batch_indices, to_input
from multires.errors import BackendUnavailableError, ShapeError, SpecError, TrainingError
from multires.reference import ReferenceRunner
from multires.train import History, learning_rate, read_checkpoint, train, xavier_weights
from multires.weights import init_weights, load_file

HERE = Path(__file__).resolve().parent


def tiny_graph(channels: int = 1, classes: int = 10) -> mr.Graph:
    """conv-bn-relu, a residual conv-bn, global pool and a dense head: every trained node type."""
    return mr.Graph(
        "tiny",
        mr.Input("input", channels),
        (
            mr.Conv2d("conv", "input", out_channels=4, kernel=3, padding=1),
            mr.BatchNorm("bn", "conv"),
            mr.ReLU("relu", "bn"),
            mr.Conv2d("conv2", "relu", out_channels=4, kernel=3, padding=1, bias=True),
            mr.BatchNorm("bn2", "conv2"),
            mr.Add("add", ("bn2", "relu")),
            mr.ReLU("relu2", "add"),
            mr.GlobalAvgPool("gap", "relu2"),
            mr.Flatten("flat", "gap"),
            mr.Dense("fc", "flat", out_features=classes),
        ),
        "fc",
    )


def tiny_data(n: int, seed: int, size: int = 6) -> Dataset:
    """Images whose brightness grows with the label, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.integers(0, 60, (n, size, size)) + labels[:, None, None] * 20).astype(np.uint8)
    return Dataset(images, labels, CLASSES)


DATA = (tiny_data(60, 0), tiny_data(20, 1))


class Float32Runner(ReferenceRunner):
    """The reference keeping float32 state between steps, as real backends do, so a checkpoint
    (float32 canonical arrays) holds the whole state and resuming is exact."""

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        result = super().train_step(x, labels)
        self.set_weights(self.weights())
        self.set_optimizer_state(self.optimizer_state())
        return result


class SlowRunner(Float32Runner):
    """Float32Runner that sleeps after each step, so a test can kill it mid-epoch."""

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        result = super().train_step(x, labels)
        time.sleep(0.05)
        return result


def StopAfter(steps: int) -> type[Float32Runner]:  # noqa: N802 (a class factory)
    """A Float32Runner class whose runs exit (SystemExit) at the start of step `steps` + 1."""

    class Stopping(Float32Runner):
        taken = 0

        def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
            if Stopping.taken == steps:
                raise SystemExit(f"stopped after {steps} steps")
            Stopping.taken += 1
            return super().train_step(x, labels)

    return Stopping


RUN = dict(
    epochs=3,
    lr=0.1,
    schedule="constant",
    momentum=0.9,
    weight_decay=1e-3,
    batch_size=8,
    seed=3,
    progress=False,
)
"""The settings of the checkpoint tests: 8 steps per epoch on DATA."""


class Counting:
    """A runner factory that builds Float32Runners and counts the steps they take."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, *args: object) -> Float32Runner:
        counter = self

        class Counted(Float32Runner):
            def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
                counter.steps += 1
                return super().train_step(x, labels)

        return Counted(*args)


def run_worker(out: str) -> None:
    """The run the kill test starts in a subprocess (`python -c "import test_train; ..."`)."""
    train(tiny_graph(), SlowRunner, data=DATA, out=out, checkpoint_every=3, **RUN)


def pointer_kill_worker(out: str) -> None:
    """A run that SIGKILLs itself at its second checkpoint, after the arrays are written and before
    `checkpoint.json` is swapped for the new one."""
    import multires.train

    write = multires.train._write_atomic
    pointers = []

    def dying(path: Path, payload: bytes) -> Path:
        if path.name == multires.train.CHECKPOINT:
            pointers.append(path)
            if len(pointers) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return write(path, payload)

    multires.train._write_atomic = dying
    train(tiny_graph(), Float32Runner, data=DATA, out=out, checkpoint_every=3, **RUN)


def run_in_subprocess(worker: str, out: Path) -> subprocess.Popen:
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_train; test_train.{worker}({str(out)!r})"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "0"}, stderr=subprocess.PIPE
    )


def weights_of(history: History) -> dict[str, np.ndarray]:
    assert history.runner is not None
    return history.runner.weights()


def assert_same_weights(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# The loop.


def test_training_takes_the_reference_sgd_steps_on_the_seeded_batches() -> None:
    graph = tiny_graph()
    optimizer = SGD(lr=0.05, momentum=0.9, weight_decay=1e-2)
    history = train(
        graph, "reference", epochs=2, lr=0.05, schedule="constant", momentum=0.9, weight_decay=1e-2,
        batch_size=16, seed=7,
        data=DATA, progress=False,
    )  # fmt: skip
    weights, state = init_weights(graph, 7, (1, 1, 6, 6)), {}
    losses = []
    for epoch in range(2):
        for idx in batch_indices(60, 16, seed=7, epoch=epoch):
            x = to_input(DATA[0].images[idx], "NCHW")
            loss, weights, state = reference.sgd_step(
                graph, weights, x, DATA[0].labels[idx], optimizer, state
            )
            losses.append((loss, len(idx)))
    trained = weights_of(history)
    for name, value in weights.items():
        np.testing.assert_allclose(trained[name], value.astype(np.float32), rtol=0, atol=0, err_msg=name)
    first = sum(loss * n for loss, n in losses[:4]) / 60
    assert history.epochs[0].train_loss == pytest.approx(first, rel=1e-12)
    assert [e.examples for e in history.epochs] == [60, 60]


def test_learning_rate_schedules() -> None:
    assert [learning_rate("constant", 0.1, step, 4) for step in range(4)] == [0.1] * 4
    cosine = [learning_rate("cosine", 0.1, step, 4) for step in range(4)]
    assert cosine == pytest.approx([0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2], rel=1e-15)
    with pytest.raises(TrainingError, match="unknown schedule 'step'; use one of constant, cosine"):
        learning_rate("step", 0.1, 0, 4)


def test_a_cosine_schedule_sets_each_steps_rate_over_the_whole_run() -> None:
    graph = tiny_graph()
    history = train(
        graph, "reference", epochs=2, lr=0.05, schedule="cosine", momentum=0.9, batch_size=16, seed=7,
        data=DATA, progress=False,
    )  # fmt: skip
    weights, state = init_weights(graph, 7, (1, 1, 6, 6)), {}
    steps = [idx for epoch in range(2) for idx in batch_indices(60, 16, seed=7, epoch=epoch)]
    for step, idx in enumerate(steps):
        optimizer = SGD(lr=0.05 * (1 + np.cos(np.pi * step / len(steps))) / 2, momentum=0.9)
        x = to_input(DATA[0].images[idx], "NCHW")
        _, weights, state = reference.sgd_step(graph, weights, x, DATA[0].labels[idx], optimizer, state)
    trained = weights_of(history)
    for name, value in weights.items():
        np.testing.assert_allclose(trained[name], value.astype(np.float32), rtol=0, atol=0, err_msg=name)
    assert history.config["schedule"] == "cosine"


def test_training_learns_and_reports_like_the_book() -> None:
    history = train(tiny_graph(), "reference", epochs=4, lr=0.2, batch_size=10, data=DATA, progress=False)
    first, last = history.epochs[0], history.epochs[-1]
    assert last.train_loss < first.train_loss
    assert last.train_acc > 0.3 and 0 <= last.test_acc <= 1
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert all(e.seconds > 0 and e.examples_per_sec > 0 for e in history.epochs)
    line = history.summary()
    assert line.startswith(
        f"loss {last.train_loss:.3f}, train acc {last.train_acc:.3f}, test acc {last.test_acc:.3f}, "
    )
    assert line.endswith(" examples/sec") and float(line.split(", ")[-1].split()[0]) > 0


def test_the_layout_does_not_change_the_run() -> None:
    kwargs = dict(epochs=1, lr=0.1, momentum=0.9, batch_size=16, data=DATA, progress=False)
    nchw = train(tiny_graph(), "reference", layout="NCHW", **kwargs)
    nhwc = train(tiny_graph(), "reference", layout="NHWC", **kwargs)
    assert nhwc.config["layout"] == "NHWC"
    assert nhwc.epochs[0].train_loss == pytest.approx(nchw.epochs[0].train_loss, rel=1e-12)
    for name, value in weights_of(nchw).items():
        np.testing.assert_allclose(weights_of(nhwc)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_same_seed_same_run_other_seed_other_run() -> None:
    kwargs = dict(epochs=1, lr=0.1, batch_size=16, data=DATA, progress=False)
    a, b = (
        train(tiny_graph(), "reference", seed=1, **kwargs),
        train(tiny_graph(), "reference", seed=1, **kwargs),
    )
    c = train(tiny_graph(), "reference", seed=2, **kwargs)
    assert a.epochs[0].train_loss == b.epochs[0].train_loss != c.epochs[0].train_loss
    assert_same_weights(weights_of(a), weights_of(b))


def test_given_weights_limit_and_resize() -> None:
    graph = tiny_graph()
    start = mr.random_weights(graph, 5, (1, 1, 6, 6))
    history = train(
        graph, Float32Runner, epochs=1, lr=0.1, batch_size=8, limit=24, resize=9, weights=start, data=DATA,
        progress=False,
    )  # fmt: skip
    assert history.config["image_size"] == [9, 9]
    assert (history.config["train_examples"], history.config["test_examples"]) == (24, 20)
    assert history.epochs[0].examples == 24
    assert history.config["backend"].endswith("test_train.Float32Runner")


def test_the_books_xavier_init() -> None:
    graph = mr.spec("d2l_resnet", arch=((1, 64), (1, 128)))
    xavier, kaiming = xavier_weights(graph, 4), init_weights(graph, 4)
    assert xavier.keys() == kaiming.keys() and all(v.dtype == np.float32 for v in xavier.values())
    for name, shape in {
        "b1.0.weight": (64, 1, 7, 7),
        "b3.0.conv1.weight": (128, 64, 3, 3),
        "last.2.weight": (10, 128),
    }.items():
        receptive = int(np.prod(shape[2:]))
        bound = np.sqrt(6 / ((shape[0] + shape[1]) * receptive))
        value = xavier[name]
        assert value.shape == shape and np.abs(value).max() <= bound
        assert np.std(value) == pytest.approx(bound / np.sqrt(3), rel=0.1), name
    for name in ("b1.0.bias", "b1.1.weight", "b1.1.running_var", "last.2.bias"):
        np.testing.assert_array_equal(xavier[name], kaiming[name])
    np.testing.assert_array_equal(xavier_weights(graph, 4)["b1.0.weight"], xavier["b1.0.weight"])
    history = train(tiny_graph(), "reference", init="d2l", epochs=1, data=DATA, progress=False)
    assert history.config["init"] == "d2l"
    plain = train(tiny_graph(), "reference", epochs=1, data=DATA, progress=False)
    assert history.epochs[0].train_loss != plain.epochs[0].train_loss
    with pytest.raises(TrainingError, match="unknown init 'glorot'; use one of torchvision, d2l"):
        train(tiny_graph(), "reference", init="glorot", data=DATA, progress=False)


def test_user_mistakes_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match="takes 3 channels.*in_channels=1"):
        train(tiny_graph(channels=3), "reference", data=DATA, progress=False)
    with pytest.raises(SpecError, match=r"fc \(Dense\): the output \(1, 5\).*num_classes=10"):
        train(tiny_graph(classes=5), "reference", data=DATA, progress=False)
    for bad in (
        dict(epochs=0),
        dict(batch_size=2.5),
        dict(lr=0.0),
        dict(momentum=-1.0),
        dict(lr=float("nan")),
    ):
        with pytest.raises(TrainingError, match="must be"):
            train(tiny_graph(), "reference", data=DATA, progress=False, **bad)
    with pytest.raises(TrainingError, match="needs the run folder"):
        train(tiny_graph(), "reference", data=DATA, resume=True, progress=False)
    with pytest.raises(mr.BackendNotFoundError, match="unknown backend 'torhc'"):
        train(tiny_graph(), "torhc", data=DATA, progress=False)
    empty = Dataset(np.zeros((0, 6, 6), np.uint8), np.zeros(0, np.uint8), CLASSES)
    with pytest.raises(TrainingError, match=r"no examples to train or test on \(0 train, 20 test\)"):
        train(tiny_graph(), "reference", data=(empty, DATA[1]), progress=False)
    mismatched = (DATA[0], Dataset(np.zeros((3, 5, 5), np.uint8), np.zeros(3, np.uint8), CLASSES))
    with pytest.raises(ShapeError, match="test images"):
        train(tiny_graph(), "reference", data=mismatched, progress=False)


@pytest.fixture
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two registered backends on the reference: 'numpyflow' (NHWC by default) and 'inferonly'."""
    from importlib.metadata import EntryPoint

    from multires import backend as registry

    def entry(name: str, training: bool) -> EntryPoint:
        module = types.ModuleType(f"fake_backend_{name}")
        module.NAME, module.LAYOUTS, module.FRAMEWORK_MODULES, module.TRAINING = (
            name,
            ("NHWC", "NCHW"),
            (),
            training,
        )
        module.make_runner = Float32Runner
        monkeypatch.setitem(sys.modules, module.__name__, module)
        return EntryPoint(name=name, value=module.__name__, group=registry.ENTRY_POINT_GROUP)

    points = {"numpyflow": entry("numpyflow", True), "inferonly": entry("inferonly", False)}
    monkeypatch.setattr(registry, "_registered", lambda: dict(points))
    registry._load.cache_clear()
    yield
    registry._load.cache_clear()


def test_a_registered_backend_trains_in_its_own_layout(fake_backends: None) -> None:
    history = train(tiny_graph(), "numpyflow", data=DATA, **{**RUN, "epochs": 1})
    assert history.config["backend"] == "numpyflow" and history.config["layout"] == "NHWC"
    expected = train(tiny_graph(), Float32Runner, data=DATA, **{**RUN, "epochs": 1})
    assert history.epochs[0].train_loss == pytest.approx(expected.epochs[0].train_loss, rel=1e-12)


def test_an_inference_only_backend_is_refused_before_loading_data(
    fake_backends: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was loaded before the backend was checked")

    monkeypatch.setattr("multires.train.fashion_mnist", no_loading)
    with pytest.raises(TrainingError, match="backend 'inferonly' runs inference only"):
        train(tiny_graph(), "inferonly", progress=False)


# Files, plot, checkpoints.


def test_run_folder_holds_history_plot_weights_and_a_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'multires[plot]')")
    history = train(tiny_graph(), Float32Runner, data=DATA, out=tmp_path, plot=True, **{**RUN, "epochs": 2})
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved == json.loads(json.dumps(history.to_dict()))
    assert History.from_dict(saved).epochs == history.epochs
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) == history.epochs[1].train_loss
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_same_weights(load_file(tmp_path / "weights.safetensors", tiny_graph()), weights_of(history))
    record = read_checkpoint(tmp_path)
    assert record is not None and record["position"]["epoch"] == 2 and record["position"]["step"] == 0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [Path(record["dir"]).name]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'multires\[plot\]'"):
        train(tiny_graph(), "reference", data=DATA, out=tmp_path, plot=True, progress=False)
    history = train(tiny_graph(), "reference", data=DATA, out=tmp_path, epochs=1, progress=False)
    assert history.epochs and not (tmp_path / "history.png").exists()


def test_an_existing_run_is_not_overwritten_and_resumes_only_with_its_settings(tmp_path: Path) -> None:
    train(tiny_graph(), Float32Runner, data=DATA, out=tmp_path, **{**RUN, "epochs": 1})
    with pytest.raises(TrainingError, match=r"already holds a run \(1 of 1 epochs done\).*resume=True"):
        train(tiny_graph(), Float32Runner, data=DATA, out=tmp_path, **RUN)
    with pytest.raises(TrainingError, match=r"lr: 0.1 -> 0.2"):
        train(tiny_graph(), Float32Runner, data=DATA, out=tmp_path, resume=True, **{**RUN, "lr": 0.2})
    with pytest.raises(TrainingError, match="a different model graph"):
        train(tiny_graph(classes=11), Float32Runner, data=DATA, out=tmp_path, resume=True, **RUN)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(TrainingError, match="not a readable multires checkpoint"):
        train(tiny_graph(), Float32Runner, data=DATA, out=tmp_path, resume=True, **RUN)


def test_resume_without_a_checkpoint_starts_afresh(tmp_path: Path) -> None:
    fresh = train(tiny_graph(), Float32Runner, data=DATA, out=tmp_path / "a", resume=True, **RUN)
    plain = train(tiny_graph(), Float32Runner, data=DATA, **RUN)
    assert_same_weights(weights_of(fresh), weights_of(plain))


def test_resuming_from_every_checkpoint_is_exact(tmp_path: Path) -> None:
    """Stop after epoch 1 (epoch checkpoint), resume to 3 epochs; then resume from a mid-epoch
    checkpoint kept aside: both end on the weights and losses of an uninterrupted run."""
    whole = train(tiny_graph(), Float32Runner, data=DATA, **RUN)
    part = tmp_path / "part"
    train(tiny_graph(), Float32Runner, data=DATA, out=part, **{**RUN, "epochs": 1})
    resumed = train(tiny_graph(), Float32Runner, data=DATA, out=part, resume=True, **RUN)
    assert_same_weights(weights_of(resumed), weights_of(whole))
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in whole.epochs]
    assert [e.test_acc for e in resumed.epochs] == [e.test_acc for e in whole.epochs]
    assert resumed.config["epochs"] == 3


def test_a_cosine_run_resumes_exactly_and_only_with_its_length(tmp_path: Path) -> None:
    cosine = {**RUN, "schedule": "cosine"}
    whole = train(tiny_graph(), Float32Runner, data=DATA, **cosine)
    part = tmp_path / "part"
    with pytest.raises(SystemExit):
        train(tiny_graph(), StopAfter(14), data=DATA, out=part, checkpoint_every=5, **cosine)
    record = read_checkpoint(part)
    assert record is not None and (record["position"]["epoch"], record["position"]["step"]) == (1, 5)
    with pytest.raises(TrainingError, match=r"epochs: 3 -> 4"):
        train(tiny_graph(), Float32Runner, data=DATA, out=part, resume=True, **{**cosine, "epochs": 4})
    resumed = train(tiny_graph(), Float32Runner, data=DATA, out=part, resume=True, **cosine)
    assert_same_weights(weights_of(resumed), weights_of(whole))
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in whole.epochs]


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    out = tmp_path / "run"
    worker = run_in_subprocess("run_worker", out)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            record = read_checkpoint(out)  # never half-written: the pointer is swapped in atomically
            if record and record["position"]["epoch"] == 1 and record["position"]["step"] >= 3:
                break
            time.sleep(0.01)
        with pytest.raises(
            TrainingError, match=rf"in use by a running multires train \(pid {worker.pid} on "
        ):
            train(tiny_graph(), Float32Runner, data=DATA, out=out, resume=True, **RUN)
        time.sleep(0.12)  # let it take a couple of steps past the checkpoint, which the kill loses
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == -signal.SIGKILL, worker.stderr.read().decode() if worker.stderr else ""
    killed_at = read_checkpoint(out)
    assert killed_at is not None and killed_at["position"]["epoch"] == 1, (
        "the kill was meant to land in epoch 2"
    )
    assert 3 <= killed_at["position"]["step"] < 8
    counting = Counting()
    resumed = train(tiny_graph(), counting, data=DATA, out=out, resume=True, **RUN)
    assert counting.steps == 3 * 8 - (8 + killed_at["position"]["step"]), "resume must run only the rest"
    whole = train(tiny_graph(), Float32Runner, data=DATA, **RUN)
    assert_same_weights(weights_of(resumed), weights_of(whole))
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in whole.epochs]
    assert_same_weights(load_file(out / "weights.safetensors"), weights_of(whole))


def test_a_kill_between_the_arrays_and_the_pointer_swap_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    worker = run_in_subprocess("pointer_kill_worker", out)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == -signal.SIGKILL, err.decode()
    record = read_checkpoint(out)
    assert record is not None and (record["position"]["epoch"], record["position"]["step"]) == (0, 3)
    folders = sorted((out / "checkpoints").iterdir())
    (orphan,) = [f for f in folders if f != out / record["dir"]]
    assert orphan.name.startswith("epoch-0000-step-000006-"), "the kill came at the step-6 checkpoint"
    assert {p.name for p in orphan.iterdir()} == {"weights.safetensors", "optimizer.safetensors"}
    load_file(out / record["dir"] / "weights.safetensors", tiny_graph())
    counting = Counting()
    resumed = train(tiny_graph(), counting, data=DATA, out=out, checkpoint_every=3, resume=True, **RUN)
    assert counting.steps == 3 * 8 - 3
    assert_same_weights(weights_of(resumed), weights_of(train(tiny_graph(), Float32Runner, data=DATA, **RUN)))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [Path(read_checkpoint(out)["dir"]).name]


class FullDisk:
    """Files opened for an atomic write ("xb") on a disk that fills up: once armed, the `fail`-th
    such file takes 7 bytes and then raises ENOSPC, as a full disk does mid-write."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: int) -> None:
        self.armed, self.fail, self.opened = False, fail, 0
        real_open = Path.open
        disk = self

        class Handle:
            def __init__(self, handle: Any, full: bool) -> None:
                self.handle, self.full = handle, full

            def write(self, data: bytes) -> int:
                if self.full:
                    self.handle.write(bytes(data)[:7])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.handle.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.handle, name)

            def __enter__(self) -> Handle:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

        def open_(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(path, mode, *args, **kwargs)
            if mode != "xb" or not disk.armed:
                return handle
            disk.opened += 1
            return Handle(handle, disk.opened == disk.fail + 1)

        monkeypatch.setattr(Path, "open", open_)


@pytest.mark.parametrize("fail", [0, 1, 2], ids=["weights", "optimizer", "pointer"])
def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: int
) -> None:
    disk = FullDisk(monkeypatch, fail)

    class Filling(Float32Runner):
        def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
            disk.armed = disk.armed or self.steps_taken == 4
            self.steps_taken += 1
            return super().train_step(x, labels)

        steps_taken = 0

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"No space left on device\); the previous checkpoint is intact"):
        train(tiny_graph(), Filling, data=DATA, out=out, checkpoint_every=3, **RUN)
    assert disk.opened == fail + 1, "the fault hit the checkpoint after step 6"
    record = read_checkpoint(out)
    assert record is not None and (record["position"]["epoch"], record["position"]["step"]) == (0, 3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [Path(record["dir"]).name]
    assert not list(out.rglob("*.tmp"))
    load_file(out / record["dir"] / "optimizer.safetensors")
    disk.armed = False
    counting = Counting()
    resumed = train(tiny_graph(), counting, data=DATA, out=out, checkpoint_every=3, resume=True, **RUN)
    assert counting.steps == 3 * 8 - 3
    assert_same_weights(weights_of(resumed), weights_of(train(tiny_graph(), Float32Runner, data=DATA, **RUN)))


def test_run_files_get_the_usual_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        train(
            tiny_graph(),
            Float32Runner,
            data=DATA,
            out=tmp_path / "run",
            checkpoint_every=3,
            **{**RUN, "epochs": 1},
        )
        mr.weights.save(init_weights(tiny_graph()), tmp_path / "run" / "extra.npz")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"checkpoint.json", "history.json", "weights.safetensors", "train.lock"}
    assert {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path): "0o640" for p in files
    }
    folders = [p for p in (tmp_path / "run").rglob("*") if p.is_dir()]
    assert folders and all(p.stat().st_mode & 0o777 == 0o750 for p in folders)


def test_a_log_gets_a_progress_line_every_tenth_of_an_epoch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train(tiny_graph(), Float32Runner, data=DATA, **{**RUN, "epochs": 1, "batch_size": 2, "progress": True})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines[:-1]] == [f"epoch 1/1: step {s}/30" for s in range(3, 30, 3)]
    assert re.fullmatch(r"epoch 1/1: step 3/30, loss \d\.\d{3} acc \d\.\d{3} \d+ ex/s", lines[0])
    assert lines[-1].startswith("epoch 1/1: loss ")
    monkeypatch.setattr("multires.train.PROGRESS_SECONDS", 0.0)
    train(tiny_graph(), Float32Runner, data=DATA, **{**RUN, "epochs": 1, "batch_size": 2, "progress": True})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 30 and lines[28].startswith("epoch 1/1: step 29/30,"), (
        "at most PROGRESS_SECONDS apart"
    )


# The command line.


def write_fashion_mnist(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated IDX files under the official names, with the loader's checksums made theirs."""
    import gzip
    import hashlib
    import struct

    from multires import data

    folder.mkdir(parents=True)
    sums = {}
    for split, dataset in zip(("train", "test"), DATA, strict=True):
        for name, array in zip(data.FILES[split], (dataset.images, dataset.labels), strict=True):
            payload = (
                bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
            )
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            sums[name] = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(data, "SHA256", sums)


def test_cli_train_prints_the_book_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from multires.cli import main

    write_fashion_mnist(tmp_path / "fashion", monkeypatch)
    monkeypatch.chdir(tmp_path)
    args = [
        "train", "d2l_resnet", "--option", "arch=((1, 64),)", "--backend", "reference", "--epochs", "1",
        "--lr", "0.05", "--batch-size", "16", "--limit", "32", "--resize", "8", "--data", "fashion",
        "--schedule", "constant", "--no-plot",
    ]  # fmt: skip
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}, \d+\.\d examples/sec", line
    )
    run = tmp_path / "runs" / "d2l_resnet-reference"
    history = json.loads((run / "history.json").read_text())
    assert history["config"]["image_size"] == [8, 8] and history["config"]["train_examples"] == 32
    assert f"loss {history['epochs'][0]['train_loss']:.3f}," in line
    assert not (run / "history.png").exists()

    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "--epochs", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "resuming runs/d2l_resnet-reference at epoch 2/2, step 0/2 (2 steps done)"
    assert err[1].startswith("epoch 2/2: step 1/2, loss "), "stderr is no terminal: a progress line per step"
    assert err[2].startswith("epoch 2/2: loss ") and len(err) == 3, "the resumed run trains epoch 2 only"
    assert len(json.loads((run / "history.json").read_text())["epochs"]) == 2
    assert main([*args[:-3], "--out", "defaults", "--no-plot"]) == 0
    defaults = json.loads((tmp_path / "defaults" / "history.json").read_text())["config"]
    assert (defaults["schedule"], defaults["momentum"], defaults["lr"]) == ("cosine", 0.9, 0.05)
    capsys.readouterr()
    assert main([*args[:-1], "--out", "other", "--lr", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: lr must be a finite number > 0")
