"""Devices, precision and data parallelism in the core: `Execution`, `shard_bounds`, the
reference's definition of unsynchronised data parallelism, and the trainer and CLI on several
devices (issue 13). Backends are checked against these in tests/conformance/test_data_parallel.py."""

from __future__ import annotations

import functools
import os
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_train import DATA, Float32Runner, tiny_graph  # type: ignore[import-not-found]

import multires as mr
from multires import cli
from multires.backend import CPU_DEVICES_ENV, SGD, Execution, shard_bounds
from multires.errors import DeviceError, ShapeError, TrainingError
from multires.reference import ReferenceRunner, loss_and_grads
from multires.train import train

OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)


def test_execution_checks_its_settings() -> None:
    assert Execution() == Execution(None, 1, "fp32", True)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(DeviceError, match="devices must be a positive int"):
            Execution(devices=bad)  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="unknown precision 'fp8'; use one of fp32, bf16, fp16"):
        Execution(precision="fp8")
    with pytest.raises(DeviceError, match="device must be a name"):
        Execution(device=" ")


@pytest.mark.parametrize("batch, devices", [(8, 2), (7, 2), (10, 3), (1, 2), (0, 2), (256, 8)])
def test_shards_are_contiguous_and_differ_by_at_most_one(batch: int, devices: int) -> None:
    bounds = shard_bounds(batch, devices)
    expected = [
        (int(part[0]), int(part[-1]) + 1) if len(part) else None
        for part in np.array_split(np.arange(batch), devices)
    ]
    assert len(bounds) == devices and bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert [b if b[1] > b[0] else None for b in bounds] == expected


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 6, 6)).astype(np.float32), rng.integers(0, 10, n)


def test_synchronised_data_parallelism_is_the_global_batch() -> None:
    graph = tiny_graph()
    weights = mr.random_weights(graph, 0, (1, 1, 6, 6))
    one = ReferenceRunner(graph, weights, "NCHW", OPTIMIZER)
    two = ReferenceRunner(graph, weights, "NCHW", OPTIMIZER, Execution(devices=2))
    x, y = batch(7)
    for _ in range(2):
        assert one.train_step(x, y)[0] == two.train_step(x, y)[0]
    for name, value in one.weights().items():
        np.testing.assert_array_equal(two.weights()[name], value, err_msg=name)


def test_unsynchronised_data_parallelism_sums_the_shards_and_keeps_device_0s_statistics() -> None:
    """The definition the backends are checked against, written out by hand: each shard's own
    training-mode pass, gradients weighted by shard size, device 0's running statistics."""
    graph = tiny_graph()
    weights = mr.random_weights(graph, 0, (1, 1, 6, 6))
    x, y = batch(7)
    runner = ReferenceRunner(graph, weights, "NHWC", SGD(lr=0.1), Execution(devices=2, sync_batchnorm=False))
    loss, logits = runner.train_step(x.transpose(0, 2, 3, 1), y)
    first = loss_and_grads(graph, weights, x[:4], y[:4])
    second = loss_and_grads(graph, weights, x[4:], y[4:])
    assert loss == pytest.approx((4 * first[0] + 3 * second[0]) / 7, rel=1e-12)
    expected_logits = np.concatenate([first[2].outputs["fc"], second[2].outputs["fc"]])
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-6)
    got = runner.weights()
    for name in ("conv.weight", "fc.bias", "bn.weight"):
        grad = (4 * first[1][name] + 3 * second[1][name]) / 7
        np.testing.assert_allclose(got[name], weights[name] - 0.1 * grad, rtol=1e-6, atol=1e-7, err_msg=name)
    for name in ("bn.running_mean", "bn.running_var", "bn2.running_var"):
        np.testing.assert_allclose(got[name], first[2].running[name], rtol=1e-6, err_msg=name)
        assert not np.allclose(got[name], second[2].running[name], rtol=1e-3), name
    forward = ReferenceRunner(graph, weights, "NCHW", SGD(), Execution(devices=2, sync_batchnorm=False))
    np.testing.assert_allclose(forward.forward(x, training=True), expected_logits, rtol=1e-6)
    np.testing.assert_array_equal(forward.weights()["bn.running_mean"], got["bn.running_mean"])


def test_the_reference_computes_in_float64_on_the_host() -> None:
    graph = tiny_graph()
    for execution in (Execution(precision="bf16"), Execution(device="cuda")):
        with pytest.raises(DeviceError, match="the reference computes in float64 on the host"):
            ReferenceRunner(graph, mr.random_weights(graph, 0, (1, 1, 6, 6)), "NCHW", SGD(), execution)


def test_host_totals_sum_loss_and_correct_predictions() -> None:
    graph = tiny_graph()
    runner = ReferenceRunner(graph, mr.random_weights(graph, 0, (1, 1, 6, 6)), "NCHW", SGD(lr=0.01))
    check = ReferenceRunner(graph, mr.random_weights(graph, 0, (1, 1, 6, 6)), "NCHW", SGD(lr=0.01))
    expected_loss, expected_correct = 0.0, 0
    for seed, n in ((1, 5), (2, 3)):
        x, y = batch(n, seed)
        runner.step(runner.prepare(x, y))
        loss, logits = check.train_step(x, y)
        expected_loss += loss * n
        expected_correct += int((logits.argmax(1) == y).sum())
    loss_sum, correct, examples = runner.take_totals()
    assert (loss_sum, correct, examples) == (pytest.approx(expected_loss, rel=1e-12), expected_correct, 8)
    assert runner.take_totals() == (0.0, 0, 0)


SETTINGS = dict(
    epochs=2, lr=0.1, schedule="cosine", momentum=0.9, batch_size=8, seed=3, data=DATA, progress=False
)


def test_the_trainer_on_two_devices_trains_like_one_and_resumes_on_one(tmp_path: Path) -> None:
    constant = {**SETTINGS, "schedule": "constant"}
    whole = train(tiny_graph(), Float32Runner, **constant)
    run = tmp_path / "run"
    first = train(tiny_graph(), Float32Runner, out=run, devices=2, **{**constant, "epochs": 1})
    assert first.config["devices"] == 2 and first.runner is not None
    assert first.runner.execution == Execution(devices=2)
    assert first.epochs[0] == replace(whole.epochs[0], seconds=first.epochs[0].seconds)
    resumed = train(tiny_graph(), Float32Runner, out=run, resume=True, **constant)
    assert resumed.config["devices"] == 1 and [e.epoch for e in resumed.epochs] == [1, 2]
    for name, value in whole.runner.weights().items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(resumed.runner.weights()[name], value, err_msg=name)  # type: ignore[union-attr]


def test_unsynchronised_training_differs_and_is_recorded() -> None:
    local = train(tiny_graph(), "reference", devices=2, sync_batchnorm=False, **{**SETTINGS, "epochs": 1})
    synced = train(tiny_graph(), "reference", devices=2, **{**SETTINGS, "epochs": 1})
    assert local.config["sync_batchnorm"] is False and synced.config["sync_batchnorm"] is True
    assert local.epochs[0].train_loss != synced.epochs[0].train_loss


def test_every_batch_must_give_each_device_an_example() -> None:
    with pytest.raises(
        TrainingError, match=r"devices=3 needs at least 3 examples in every batch.*last batch has 2"
    ):
        train(tiny_graph(), "reference", devices=3, **{**SETTINGS, "batch_size": 29})


class FailingPrepare(Float32Runner):
    """A runner whose third batch fails its check in `prepare`, which runs in the prefetch thread."""

    def prepare(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.prepared = getattr(self, "prepared", 0) + 1
        if self.prepared == 3:
            raise ShapeError("batch 3 does not fit")
        return super().prepare(x, labels)


def test_a_batch_failing_in_the_prefetch_thread_raises_its_typed_error() -> None:
    with pytest.raises(ShapeError, match="batch 3 does not fit"):
        train(tiny_graph(), FailingPrepare, **{**SETTINGS, "epochs": 1})


class StepOnly:
    """A Runner with only `train_step` (no prepare/step/take_totals): the trainer adapts it."""

    def __init__(self, *args: object) -> None:
        self.inner = Float32Runner(*args)  # type: ignore[arg-type]
        self.layout = self.inner.layout

    def __getattr__(self, name: str) -> object:
        if name in ("prepare", "step", "take_totals"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_a_runner_with_only_train_step_still_trains() -> None:
    adapted = train(tiny_graph(), StepOnly, **{**SETTINGS, "epochs": 1})
    direct = train(tiny_graph(), Float32Runner, **{**SETTINGS, "epochs": 1})
    assert not hasattr(adapted.runner, "step")
    assert adapted.epochs[0].train_loss == direct.epochs[0].train_loss


def test_cli_devices_in_torch_relaunch_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    monkeypatch.setitem(sys.modules, "torch.distributed.run", types.ModuleType("torch.distributed.run"))
    monkeypatch.setattr("subprocess.call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.setattr(cli.registry, "canonical_name", lambda name: name)
    argv = ["multires", "train", "d2l_resnet18", "--backend", "torch", "--devices", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli.main(argv[1:]) == 0
    ((command, env),) = calls
    assert command[:6] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
    ]
    assert command[6:] == ["multires", *argv[1:]]
    assert env["OMP_NUM_THREADS"]


def test_cli_devices_on_the_cpu_expose_that_many_cpu_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setenv(CPU_DEVICES_ENV, "unset at teardown")
    monkeypatch.delenv(CPU_DEVICES_ENV)
    monkeypatch.setattr(cli.registry, "canonical_name", lambda name: name)

    @functools.wraps(train)  # the parser reads train's defaults from its signature
    def fake_train(graph: object, backend: str, **settings: object) -> object:
        seen.update(settings, env=os.environ.get(CPU_DEVICES_ENV))
        raise TrainingError("stop here")

    monkeypatch.setattr("multires.train.train", fake_train)
    assert (
        cli.main(
            [
                "train",
                "d2l_resnet18",
                "--backend",
                "flax",
                "--devices",
                "2",
                "--precision",
                "bf16",
                "--no-sync-bn",
            ]
        )
        == 2
    )
    assert seen["env"] == "2" and seen["devices"] == 2 and seen["precision"] == "bf16"
    assert seen["sync_batchnorm"] is False and seen["device"] is None
    assert cli.main(["train", "d2l_resnet18", "--backend", "tf", "--coordinator", "h:1"]) == 2
