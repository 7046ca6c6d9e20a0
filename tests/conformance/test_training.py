"""Training equivalence with the NumPy reference: from the same canonical weights and the same
seeded batches, a few SGD steps with momentum, weight decay and a learning rate changed before
every step (`set_lr`, as a schedule does) in the backend give the reference's losses, weights,
running statistics and momentum buffers to 1e-4 relative, in every layout the backend supports,
both through its Runner and through `multires.train.train` (with a cosine schedule)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

import multires as mr
from multires import reference
from multires.backend import SGD
from multires.data import CLASSES, Dataset, batch_indices, to_input
from multires.train import train

RTOL = 1e-4
OPTIMIZER = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
RATES = (0.05, 0.02, 0.08)
"""The learning rate of each step of the Runner test, set with `set_lr`."""
SEED = 0
SIZE = 16
BATCH = 4


def small_d2l_resnet() -> mr.Graph:
    """The book's ResNet (stem conv with bias, BN, max-pool, identity and 1x1-projection residual
    blocks, global pool, dense) with one block per stage, so the float64 reference stays quick."""
    return mr.spec("d2l_resnet", arch=((1, 64), (1, 128)))


def fake_fashion(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8), CLASSES
    )


TRAIN, TEST = fake_fashion(12, 1), fake_fashion(8, 2)


def assert_close(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str, floor: bool = False
) -> None:
    """Each tensor within RTOL of the reference, relative to its own largest value; with `floor`,
    relative to at least the largest value of any tensor."""
    assert sorted(actual) == sorted(expected), f"{what}: different names"
    scale = (
        max((float(np.max(np.abs(v))) for v in expected.values() if v.size), default=0.0) if floor else 0.0
    )
    errors = {
        name: float(np.max(np.abs(actual[name] - expected[name]), initial=0.0))
        / max(float(np.max(np.abs(expected[name]), initial=0.0)), scale, 1e-12)
        for name in expected
    }
    worst = max(errors, key=lambda name: errors[name], default=None)
    assert worst is None or errors[worst] <= RTOL, f"{what}: {worst} is off by {errors[worst]:.2e} relative"


def test_sgd_steps_match_the_reference(trainable: str, layout: str) -> None:
    graph = small_d2l_resnet()
    weights = mr.random_weights(graph, SEED, (1, 1, SIZE, SIZE))
    runner = mr.make_runner(graph, weights, trainable, layout, OPTIMIZER)
    state: dict[str, np.ndarray] = {}
    for step, idx in enumerate(batch_indices(len(TRAIN), BATCH, seed=SEED, epoch=0)):
        labels = TRAIN.labels[idx].astype(np.int64)
        x = to_input(TRAIN.images[idx], "NCHW")
        optimizer = replace(OPTIMIZER, lr=RATES[step])
        runner.set_lr(optimizer.lr)
        loss, weights, state = reference.sgd_step(graph, weights, x, labels, optimizer, state)
        got_loss, logits = runner.train_step(to_input(TRAIN.images[idx], layout), labels)
        where = f"{trainable} {layout} step {step}"
        assert got_loss == pytest.approx(loss, rel=RTOL), where
        assert logits.shape == (len(idx), 10), where
        assert_close(runner.weights(), weights, f"{where} weights")
        # A conv bias before BatchNorm has a zero gradient, so its buffer is weight_decay * bias
        # plus float32 noise: buffers are compared relative to the largest one.
        assert_close(runner.optimizer_state(), state, f"{where} momentum buffers", floor=True)


def test_the_trainer_matches_the_reference(trainable: str, layout: str) -> None:
    graph = small_d2l_resnet()
    settings = dict(
        epochs=2, lr=OPTIMIZER.lr, schedule="cosine", momentum=OPTIMIZER.momentum,
        weight_decay=OPTIMIZER.weight_decay, batch_size=BATCH, seed=SEED, data=(TRAIN, TEST), progress=False,
    )  # fmt: skip
    expected = train(graph, "reference", **settings)
    got = train(graph, trainable, layout=layout, **settings)
    assert got.config["layout"] == layout
    assert expected.runner is not None and got.runner is not None
    for ours, reference_epoch in zip(got.epochs, expected.epochs, strict=True):
        assert ours.train_loss == pytest.approx(reference_epoch.train_loss, rel=RTOL)
    assert_close(got.runner.weights(), expected.runner.weights(), f"{trainable} {layout} trained weights")
