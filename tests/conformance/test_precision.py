"""Mixed precision against the reference: one SGD step in bf16 and fp16 (issue 13).

A backend lists the mixed precisions it implements in `PRECISIONS` (its module attribute, the
framework's own mechanism: torch.autocast, the Keras mixed-precision policy, a Flax compute dtype,
MXNet AMP); any other precision must be refused with a `DeviceError` that says so. For each one it
implements, one SGD step on the book's ResNet (one block per stage, 16x16, batch 8) is compared
with the float64 reference, and parameters, running statistics and momentum buffers stay float32.

Tolerances (measured, see docs/devices.md): bfloat16 keeps 8 significant bits (unit roundoff
2**-8 = 3.9e-3) and float16 11 (4.9e-4); activations, gradients and the loss carry several such
roundings. `TOLERANCES` bounds, per precision, the loss's relative error and the update's: the
norm of (backend update - reference update) over the norm of the reference update, over all
trainable tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

import multires as mr
from multires import reference
from multires.backend import PRECISIONS, SGD
from multires.errors import DeviceError
from multires.weights import is_buffer

from .test_training import small_d2l_resnet

MIXED = [p for p in PRECISIONS if p != "fp32"]
TOLERANCES = {"bf16": {"loss": 1e-2, "update": 0.25}, "fp16": {"loss": 2e-3, "update": 0.1}}
"""Largest relative errors allowed, about 3 times the largest measured in any backend (2026-12-03,
this case, both layouts): bf16 update 8.8e-2 (torch; tf 8.6e-2, flax 8.0e-2, mxnet 7.5e-2) and
loss 1.0e-3; fp16 update 3.0e-2 (tf, flax; torch 1.9e-2) and loss 1.3e-4. The update error grows
backwards through the layers (about 1% at the dense layer, 30% at the stem), as torch.autocast's
own does; a float32 step of d2l_resnet18 at 28 x 28 errs by 4e-6 (torch)."""
SIZE, BATCH = 16, 8
OPTIMIZER = SGD(lr=0.1, momentum=0.9)


def _batch(layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, 1, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH).astype(np.int64)
    return x, (x.transpose(0, 2, 3, 1).copy() if layout == "NHWC" else x), labels


def update_error(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> float:
    """|backend update - reference update| / |reference update| over every trainable tensor."""
    names = [n for n in expected if not is_buffer(n)]
    difference = np.sqrt(sum(float(np.sum((after[n] - expected[n]) ** 2)) for n in names))
    update = np.sqrt(sum(float(np.sum((expected[n] - before[n]) ** 2)) for n in names))
    return difference / update


@pytest.mark.parametrize("precision", MIXED)
def test_one_mixed_precision_sgd_step_against_the_reference(
    trainable: str, backend_module: object, layout: str, precision: str
) -> None:
    graph = small_d2l_resnet()
    weights = mr.random_weights(graph, 0, (1, 1, SIZE, SIZE))
    if precision not in getattr(backend_module, "PRECISIONS", ("fp32",)):
        with pytest.raises(DeviceError, match=precision):
            mr.make_runner(graph, weights, trainable, layout, OPTIMIZER, precision=precision)
        return
    runner = mr.make_runner(graph, weights, trainable, layout, OPTIMIZER, precision=precision)
    x_nchw, x, labels = _batch(layout)
    loss, logits = runner.train_step(x, labels)
    expected_loss, expected, state = reference.sgd_step(graph, weights, x_nchw, labels, OPTIMIZER, {})
    got = runner.weights()
    where = f"{trainable} {layout} {precision}"
    assert logits.shape == (BATCH, 10) and np.isfinite(logits).all(), where
    assert all(v.dtype == np.float32 for v in got.values()), f"{where}: weights must stay float32"
    buffers = runner.optimizer_state()
    assert sorted(buffers) == sorted(state) and all(v.dtype == np.float32 for v in buffers.values()), where
    loss_error = abs(loss - expected_loss) / abs(expected_loss)
    step_error = update_error(weights, got, expected)
    print(f"{where}: loss {loss_error:.2e}, update {step_error:.2e} relative")
    assert loss_error <= TOLERANCES[precision]["loss"], f"{where}: loss off by {loss_error:.2e} relative"
    assert step_error <= TOLERANCES[precision]["update"], f"{where}: update off by {step_error:.2e} relative"
    # The update must be the mixed-precision one, not a float32 step in disguise.
    fp32 = mr.make_runner(graph, weights, trainable, layout, OPTIMIZER)
    fp32.train_step(x, labels)
    assert update_error(weights, fp32.weights(), expected) < step_error, f"{where}: ran in float32"


@pytest.mark.parametrize("precision", MIXED)
def test_mixed_precision_inference_keeps_float32_outputs(
    backend: str, backend_module: object, layout: str, precision: str
) -> None:
    graph = small_d2l_resnet()
    weights = mr.random_weights(graph, 0, (1, 1, SIZE, SIZE))
    if precision not in getattr(backend_module, "PRECISIONS", ("fp32",)):
        pytest.skip(f"{backend} has no {precision} (refused with a DeviceError, checked above)")
    runner = mr.make_runner(graph, weights, backend, layout, precision=precision)
    x_nchw, x, _ = _batch(layout)
    expected = reference.forward(graph, weights, x_nchw).outputs[graph.outputs[0]]
    got = runner.forward(x)
    assert got.dtype == np.float32
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    assert error <= TOLERANCES[precision]["loss"], (
        f"{backend} {layout} {precision}: eval logits off by {error:.2e}"
    )
