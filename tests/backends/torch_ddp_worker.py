"""A data-parallel torch run, started by torchrun from `test_torch_parallel.py`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 torch_ddp_worker.py OUT [SCENARIO...]

Every process runs each scenario (a TorchRunner with `devices` = WORLD_SIZE, a few SGD steps on
seeded global batches) and writes what it saw to `OUT/rank{RANK}.npz`, with the errors that
bad arguments raise. The test imports this module too, to run the same scenarios on one device
and on the NumPy reference.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import multires
from multires.backend import SGD
from multires.errors import MultiresError

OPTIMIZER = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
RATES = (0.05, 0.08)
"""The learning rate of each step, set with `set_lr` as a schedule does."""
SIZE = 16


@dataclass(frozen=True)
class Scenario:
    """One run: the book's small ResNet in `edition`, a step per global batch size."""

    name: str
    edition: str = "pytorch"
    layout: str = "NCHW"
    batch_sizes: tuple[int, ...] = (8, 7)
    sync_batchnorm: bool = True
    precision: str = "fp32"
    stepper: bool = False
    """Train with `prepare` / `step` / `take_totals` rather than `train_step`."""

    def graph(self) -> multires.Graph:
        return multires.spec("d2l_resnet", arch=((1, 64), (1, 32)), edition=self.edition)

    def weights(self) -> dict[str, np.ndarray]:
        return multires.random_weights(self.graph(), seed=0)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(1)
        for n in self.batch_sizes:
            x = rng.standard_normal((n, 1, SIZE, SIZE), dtype=np.float32)
            yield (x.transpose(0, 2, 3, 1).copy() if self.layout == "NHWC" else x), rng.integers(0, 10, n)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("sync"),
        Scenario("sync_biased_nhwc", edition="mxnet", layout="NHWC", batch_sizes=(7, 6)),
        Scenario("nosync", sync_batchnorm=False),
        Scenario("steps", stepper=True),
        Scenario("bf16", precision="bf16", batch_sizes=(8,)),
    )
}


def run(scenario: Scenario, runner: Any) -> dict[str, np.ndarray]:
    """The scenario's steps on `runner`: losses and logits (or the totals), then the weights,
    momentum buffers, and a training-mode and an eval-mode forward pass of the last batch."""
    results: dict[str, Any] = {}
    for step, (x, labels) in enumerate(scenario.batches()):
        runner.set_lr(RATES[step])
        if scenario.stepper:
            runner.step(runner.prepare(x, labels))
        else:
            results[f"loss{step}"], results[f"logits{step}"] = runner.train_step(x, labels)
    if scenario.stepper:
        results["totals"] = runner.take_totals()
    results |= {f"w.{name}": value for name, value in runner.weights().items()}
    results |= {f"m.{name}": value for name, value in runner.optimizer_state().items()}
    results["eval_forward"] = runner.forward(x)
    results["train_forward"] = runner.forward(x, training=True)
    results["w_after_forward.b2.0.bn1.running_var"] = runner.weights()["b2.0.bn1.running_var"]
    return {key: np.asarray(value) for key, value in results.items()}


def parallel_runner(scenario: Scenario, devices: int) -> Any:
    return multires.make_runner(
        scenario.graph(),
        scenario.weights(),
        "torch",
        scenario.layout,
        OPTIMIZER,
        devices=devices,
        precision=scenario.precision,
        sync_batchnorm=scenario.sync_batchnorm,
    )


def error(call: Any) -> str:
    """The message of the multires error `call()` raises ('' if none)."""
    try:
        call()
    except MultiresError as problem:
        return f"{type(problem).__name__}: {problem}"
    return ""


def main(out: Path, names: list[str]) -> None:
    import torch

    world = int(os.environ["WORLD_SIZE"])
    results: dict[str, np.ndarray] = {}
    for name in names:
        scenario = SCENARIOS[name]
        runner = parallel_runner(scenario, world)
        results |= {f"{name}:{key}": value for key, value in run(scenario, runner).items()}
        results[f"{name}:is_main"] = np.asarray(runner.is_main)
    sync = SCENARIOS["sync"]
    results["error:devices"] = np.asarray(error(lambda: parallel_runner(sync, world + 1)))
    nosync = parallel_runner(SCENARIOS["nosync"], world)
    one = np.zeros((1, 1, SIZE, SIZE), np.float32)
    results["error:empty_shard"] = np.asarray(error(lambda: nosync.train_step(one, np.array([0]))))
    tiny = np.zeros((2, 1, 4, 4), np.float32)  # one value per channel after the stem, on each shard
    results["error:shard_statistics"] = np.asarray(error(lambda: nosync.train_step(tiny, np.array([0, 1]))))
    results["threads"] = np.asarray(torch.get_num_threads())
    np.savez(out / f"rank{os.environ['RANK']}.npz", **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(SCENARIOS))
