"""Data parallelism on 2 devices against one device and the reference (issue 13).

Every backend that trains runs the same jobs in a fresh process (torch: two processes under
torchrun with gloo; tf, flax, mxnet: one process with two CPU devices), since frameworks fix their
devices when they start:

- With synchronised BatchNorm, SGD steps (momentum, weight decay, a rate set before each step) on
  2 devices give the weights of the same steps on one device to float32 rounding (`ROUNDING`), on
  an even and an uneven global batch, and both match the reference (`RTOL`).
- Without sync, each device normalises with its own shard's statistics: the logits, loss, weights
  and running statistics (device 0's) match the reference's data-parallel semantics,
  `ReferenceRunner(..., Execution(devices=2, sync_batchnorm=False))`.
- `multires.train.train` on 2 devices writes its run folder from the main process only (a second
  writer would be refused by the run's lock) and a run checkpointed on 2 devices resumes on 1 and
  ends where a whole single-device run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import multires as mr
from multires.backend import CPU_DEVICES_ENV, SGD, Execution
from multires.reference import ReferenceRunner
from multires.train import train

from .test_training import TEST, TRAIN, assert_close, small_d2l_resnet

DEVICES = 2
RTOL = 1e-4
"""Against the reference: the suite's training tolerance."""
ROUNDING = 2e-5
"""Two devices against one, same backend: float32 rounding of sums taken in another order
(largest difference relative to each tensor's largest value)."""
OPTIMIZER = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
RATES = (0.05, 0.02)
SIZE = 16
BATCHES = {"even": 8, "uneven": 7}
WORKER = Path(__file__).with_name("data_parallel_worker.py")
TIMEOUT = 900
SEED = 100
"""Batches are drawn from `SEED + size`. Seed 7 put a ReLU input within float32 rounding of zero
in step 2 of the uneven case, where even one device misses the reference by 1e-3 (the suite's
kink problem, see helpers.py): these seeds keep every backend away from kinks."""


def _batches(size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(size, 1, SIZE, SIZE)).astype(np.float32),
            rng.integers(0, 10, size).astype(np.int64),
        )
        for _ in RATES
    ]


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def _command(backend: str, folder: Path) -> list[str]:
    if backend == "torch":
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={DEVICES}",
        ]
        return [*launcher, str(WORKER), str(folder)]
    return [sys.executable, str(WORKER), str(folder)]


@cache
def _run_jobs(backend: str, layout: str, folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every job of this module for `backend` in one worker launch (launches cost seconds)."""
    graph = small_d2l_resnet()
    weights = mr.random_weights(graph, 0, (1, 1, SIZE, SIZE))
    jobs: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for kind, size in BATCHES.items():
        for sync in (True, False):
            name = f"steps-{kind}-{'sync' if sync else 'local'}"
            jobs.append(
                dict(
                    kind="steps", name=name, graph=graph.to_json(), backend=backend, layout=layout,
                    optimizer=vars(OPTIMIZER), rates=list(RATES), devices=DEVICES, sync_batchnorm=sync,
                )
            )  # fmt: skip
            arrays |= {f"{name}/weights/{k}": v for k, v in weights.items()}
            for step, (x, y) in enumerate(_batches(size, seed=SEED + size)):
                arrays[f"{name}/x{step}"], arrays[f"{name}/y{step}"] = _to_layout(x, layout), y
    settings = dict(
        epochs=1, lr=OPTIMIZER.lr, momentum=OPTIMIZER.momentum, weight_decay=OPTIMIZER.weight_decay,
        schedule="constant", batch_size=4, seed=0, layout=layout, devices=DEVICES, out=str(folder / "run"),
    )  # fmt: skip
    jobs.append(dict(kind="train", name="train", graph=graph.to_json(), backend=backend, settings=settings))
    for split, data in (("train", TRAIN), ("test", TEST)):
        arrays[f"train/{split}_images"], arrays[f"train/{split}_labels"] = data.images, data.labels
    shutil.rmtree(folder / "run", ignore_errors=True)  # a failed earlier launch may have left a run
    (folder / "jobs.json").write_text(json.dumps(jobs))
    np.savez(folder / "inputs.npz", **arrays)
    environment = {**os.environ, CPU_DEVICES_ENV: str(DEVICES), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        _command(backend, folder), env=environment, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, (
        f"{backend} data-parallel worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    results = {}
    for job in jobs:
        with np.load(folder / f"{job['name']}.npz") as stored:
            results[job["name"]] = dict(stored)
    return results


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One worker folder per backend and layout, shared by this module's tests."""
    return {}


@pytest.fixture
def jobs(
    trainable: str, layout: str, folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, np.ndarray]]:
    key = f"{trainable}-{layout}"
    if key not in folders:
        folders[key] = tmp_path_factory.mktemp(f"dp-{key}")
    return _run_jobs(trainable, layout, folders[key])


def _part(results: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


def _single_device(backend: str, layout: str, size: int) -> tuple[Any, list[float]]:
    graph = small_d2l_resnet()
    runner = mr.make_runner(
        graph, mr.random_weights(graph, 0, (1, 1, SIZE, SIZE)), backend, layout, OPTIMIZER
    )
    losses = []
    for lr, (x, y) in zip(RATES, _batches(size, seed=SEED + size), strict=True):
        runner.set_lr(lr)
        losses.append(runner.train_step(_to_layout(x, layout), y)[0])
    return runner, losses


def _reference(size: int, sync: bool) -> tuple[ReferenceRunner, list[float], np.ndarray]:
    graph = small_d2l_resnet()
    execution = Execution(devices=DEVICES, sync_batchnorm=sync)
    runner = ReferenceRunner(
        graph, mr.random_weights(graph, 0, (1, 1, SIZE, SIZE)), "NCHW", OPTIMIZER, execution
    )
    losses, first = [], None
    for lr, (x, y) in zip(RATES, _batches(size, seed=SEED + size), strict=True):
        runner.set_lr(lr)
        loss, logits = runner.train_step(x, y)
        losses.append(loss)
        first = logits if first is None else first
    assert first is not None
    return runner, losses, first


def _assert_within(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], rtol: float, what: str
) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: different names"
    errors = {
        k: float(np.max(np.abs(actual[k] - expected[k]), initial=0.0))
        / max(float(np.max(np.abs(expected[k]), initial=0.0)), 1e-12)
        for k in expected
    }
    worst = max(errors, key=lambda k: errors[k])
    assert errors[worst] <= rtol, (
        f"{what}: {worst} is off by {errors[worst]:.2e} relative (allowed {rtol:.0e})"
    )


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_synchronised_data_parallel_steps_equal_one_device(
    jobs: dict[str, dict[str, np.ndarray]], trainable: str, layout: str, batch: str
) -> None:
    results = jobs[f"steps-{batch}-sync"]
    single, single_losses = _single_device(trainable, layout, BATCHES[batch])
    where = f"{trainable} {layout} {batch} batch of {BATCHES[batch]} on {DEVICES} devices"
    _assert_within(
        _part(results, "weights/"), single.weights(), ROUNDING, f"{where}: weights against one device"
    )
    np.testing.assert_allclose(results["losses"], single_losses, rtol=ROUNDING, err_msg=where)
    reference, losses, logits = _reference(BATCHES[batch], sync=True)
    assert_close(_part(results, "weights/"), reference.weights(), f"{where}: weights against the reference")
    assert_close(
        _part(results, "state/"), reference.optimizer_state(), f"{where}: momentum buffers", floor=True
    )
    np.testing.assert_allclose(results["losses"], losses, rtol=RTOL, err_msg=where)
    expected_logits = _to_layout(logits, layout) if logits.ndim == 4 else logits
    np.testing.assert_allclose(results["logits0"], expected_logits, rtol=RTOL, atol=RTOL, err_msg=where)


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_unsynchronised_devices_use_their_own_shards_statistics(
    jobs: dict[str, dict[str, np.ndarray]], trainable: str, layout: str, batch: str
) -> None:
    results = jobs[f"steps-{batch}-local"]
    where = f"{trainable} {layout} {batch} batch of {BATCHES[batch]}, per-device BatchNorm"
    reference, losses, logits = _reference(BATCHES[batch], sync=False)
    # The shards' statistics must matter here, or the test could not tell the two modes apart.
    assert not np.allclose(logits, _reference(BATCHES[batch], sync=True)[2], rtol=1e-3)
    np.testing.assert_allclose(results["logits0"], logits, rtol=RTOL, atol=RTOL, err_msg=f"{where}: logits")
    np.testing.assert_allclose(results["losses"], losses, rtol=RTOL, err_msg=where)
    assert_close(
        _part(results, "weights/"), reference.weights(), f"{where}: weights and device 0's statistics"
    )


def test_the_trainer_writes_from_the_main_process_and_resumes_on_one_device(
    jobs: dict[str, dict[str, np.ndarray]], trainable: str, layout: str, folders: dict[str, Path]
) -> None:
    """The worker trained one epoch on 2 devices into `run` (every process ran `train`; a second
    writer would have been refused by the run's lock); it resumes here on one device."""
    run = folders[f"{trainable}-{layout}"] / "run"
    assert (run / "history.json").is_file() and (run / "weights.safetensors").is_file()
    history = json.loads((run / "history.json").read_text())
    assert history["config"]["devices"] == DEVICES
    settings = dict(
        lr=OPTIMIZER.lr, momentum=OPTIMIZER.momentum, weight_decay=OPTIMIZER.weight_decay, schedule="constant",
        batch_size=4, seed=0, layout=layout, data=(TRAIN, TEST), progress=False,
    )  # fmt: skip
    graph = small_d2l_resnet()
    one_epoch = train(graph, trainable, epochs=1, **settings)
    assert one_epoch.runner is not None
    where = f"{trainable} {layout}: one epoch on {DEVICES} devices against one device"
    _assert_within(_part(jobs["train"], "weights/"), one_epoch.runner.weights(), ROUNDING, where)
    resumed = train(graph, trainable, epochs=2, out=run, resume=True, **settings)
    whole = train(graph, trainable, epochs=2, **settings)
    assert resumed.runner is not None and whole.runner is not None
    assert [e.epoch for e in resumed.epochs] == [1, 2]
    assert resumed.config["devices"] == 1
    assert_close(
        resumed.runner.weights(), whole.runner.weights(), f"{trainable} {layout}: resumed on one device"
    )
