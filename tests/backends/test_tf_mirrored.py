"""Data parallelism in the TensorFlow backend: `MirroredStrategy` over two logical CPU devices.

TensorFlow fixes its devices when it starts, so these tests need a process started with
`MULTIRES_CPU_DEVICES=2`: `test_tf_execution.py::test_data_parallel_on_two_cpu_devices` runs
this file so; in a process with one CPU device they skip.

With synchronised BatchNorm, K SGD steps (momentum, weight decay) on 2 devices give the weights
of K single-device steps on the same global batches to float32 rounding, and both match the
reference; without sync each device normalises with its own shard's statistics, as
`ReferenceRunner(..., Execution(devices=2, sync_batchnorm=False))` defines, and device 0's
running statistics are kept. Even (8 on 2) and uneven (7 on 2) global batches; a training batch
smaller than the device count is refused (TensorFlow's convolutions cannot run an empty shard).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import multires  # noqa: E402
from multires.backend import CPU_DEVICES_ENV, SGD, Execution, get_backend  # noqa: E402
from multires.errors import DeviceError, ShapeError  # noqa: E402
from multires.graph import BatchNorm, Graph  # noqa: E402
from multires.reference import ReferenceRunner, relative_error  # noqa: E402
from multires.weights import is_buffer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_tf import nhwc, tiny  # noqa: E402

tfb = get_backend("tf")
DEVICES = 2
pytestmark = pytest.mark.skipif(
    len([d for d in tfb.available_devices() if d.startswith("CPU:")]) < DEVICES,
    reason=f"needs {DEVICES} CPU devices: {CPU_DEVICES_ENV}={DEVICES} (test_tf_execution.py runs this file so)",
)

OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
RATES = (0.1, 0.05)
ROUNDING = 2e-6
"""Two devices against one: float32 rounding of sums taken in another order (measured up to
2.5e-7 relative to each tensor's largest value)."""
RTOL = 2e-6
"""Against the float64 reference (measured up to 7.7e-7, on momentum buffers)."""


def graph() -> Graph:
    """`tiny` with its second BatchNorm keeping the biased running variance (Keras')."""
    base = tiny()
    nodes = [
        BatchNorm(n.name, n.inputs[0], running_variance="biased") if n.name == "block.bn" else n
        for n in base.nodes
    ]
    return Graph("tiny_biased", base.inputs, nodes, base.outputs)


def batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """One NCHW global batch of `n` per step."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, 3, 10, 10)).astype(np.float32), rng.integers(0, 4, n)) for _ in RATES]


WEIGHTS = multires.random_weights(graph(), seed=1, input_shape=(1, 3, 10, 10))


def train(runner, n: int) -> tuple[list[float], np.ndarray]:
    """`RATES` steps on `batches(n)`: the losses and the first step's logits."""
    losses, first = [], None
    for lr, (x, labels) in zip(RATES, batches(n), strict=True):
        runner.set_lr(lr)
        loss, logits = runner.train_step(x if isinstance(runner, ReferenceRunner) else nhwc(x), labels)
        losses.append(loss)
        first = logits if first is None else first
    return losses, first


def worst(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> tuple[float, str]:
    """The largest error of any tensor relative to that tensor's largest value, and its name."""
    assert sorted(actual) == sorted(expected)
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    name = max(errors, key=lambda k: errors[k])
    return errors[name], name


def mirrored(sync: bool = True, precision: str = "fp32"):
    return multires.make_runner(
        graph(), WEIGHTS, "tf", optimizer=OPTIMIZER, devices=DEVICES, sync_batchnorm=sync, precision=precision
    )


@pytest.mark.parametrize("n", [8, 7])
def test_synchronised_steps_equal_one_device_and_the_reference(n: int) -> None:
    parallel = mirrored()
    assert parallel.placement.devices == ("CPU:0", "CPU:1")
    assert isinstance(parallel.placement.strategy, tf.distribute.MirroredStrategy)
    single = multires.make_runner(graph(), WEIGHTS, "tf", optimizer=OPTIMIZER)
    reference = ReferenceRunner(graph(), WEIGHTS, "NCHW", OPTIMIZER)
    losses, logits = train(parallel, n)
    single_losses, single_logits = train(single, n)
    reference_losses, reference_logits = train(reference, n)
    error, name = worst(parallel.weights(), single.weights())
    assert error <= ROUNDING, f"{name}: {error:.2e} from one device"
    error, name = worst(parallel.weights(), reference.weights())
    assert error <= RTOL, f"{name}: {error:.2e} from the reference"
    error, name = worst(parallel.optimizer_state(), reference.optimizer_state())
    assert error <= RTOL * 5, f"momentum of {name}: {error:.2e} from the reference"
    np.testing.assert_allclose(losses, single_losses, rtol=ROUNDING)
    np.testing.assert_allclose(losses, reference_losses, rtol=RTOL)
    assert relative_error(logits, single_logits) <= ROUNDING
    assert relative_error(logits, reference_logits) <= RTOL


@pytest.mark.parametrize("n", [8, 7])
def test_unsynchronised_devices_use_their_shards_statistics(n: int) -> None:
    parallel = mirrored(sync=False)
    execution = Execution(devices=DEVICES, sync_batchnorm=False)
    reference = ReferenceRunner(graph(), WEIGHTS, "NCHW", OPTIMIZER, execution)
    losses, logits = train(parallel, n)
    reference_losses, reference_logits = train(reference, n)
    error, name = worst(parallel.weights(), reference.weights())
    assert error <= RTOL, f"{name}: {error:.2e} from the reference's per-shard statistics"
    np.testing.assert_allclose(losses, reference_losses, rtol=RTOL)
    assert relative_error(logits, reference_logits) <= RTOL
    # The shards' statistics matter: synchronised ones give other logits.
    assert relative_error(logits, train(mirrored(), n)[1]) > 1e-3


@pytest.mark.parametrize("sync", [True, False])
def test_every_device_holds_the_same_weights_and_device_0s_statistics(sync: bool) -> None:
    parallel = mirrored(sync)
    train(parallel, 7)
    for layer in parallel.model.layers:
        for variable in layer.weights:
            copies = [v.numpy() for v in variable.value.values]
            assert len(copies) == DEVICES
            np.testing.assert_array_equal(copies[1], copies[0], err_msg=variable.path)


@pytest.mark.parametrize("sync", [True, False])
def test_training_forward_and_eval_on_two_devices(sync: bool) -> None:
    x = nhwc(batches(7)[0][0])
    parallel = mirrored(sync)
    execution = Execution(devices=DEVICES, sync_batchnorm=sync)
    reference = ReferenceRunner(graph(), WEIGHTS, "NHWC", execution=execution)
    assert relative_error(parallel.forward(x, training=True), reference.forward(x, training=True)) <= RTOL
    error, name = worst(parallel.weights(), reference.weights())
    assert error <= RTOL, f"{name}: running statistics {error:.2e} from the reference"
    assert relative_error(parallel.forward(x), reference.forward(x)) <= RTOL
    # One image in eval mode runs (padded to a shard per device); in training mode it cannot.
    assert relative_error(parallel.forward(x[:1]), reference.forward(x[:1])) <= RTOL
    with pytest.raises(
        ShapeError, match="a training batch of 1 on 2 devices leaves device 1 without examples"
    ):
        parallel.forward(x[:1], training=True)


def test_prepared_steps_equal_train_step_on_two_devices() -> None:
    direct, prepared = mirrored(), mirrored()
    loss_sum, correct, examples = 0.0, 0, 0
    for x, labels in batches(7) + batches(8, seed=1):
        loss, logits = direct.train_step(nhwc(x), labels)
        loss_sum, examples = loss_sum + loss * len(labels), examples + len(labels)
        correct += int((logits.argmax(axis=1) == labels).sum())
        batch = prepared.prepare(nhwc(x), labels)
        assert [shard.shape[0] for shard in batch.x] == [(len(labels) + 1) // 2, len(labels) // 2]
        assert [shard.device.split("device:")[-1] for shard in batch.x] == ["CPU:0", "CPU:1"]
        prepared.step(batch)
    error, name = worst(prepared.weights(), direct.weights())
    assert error == 0.0, f"{name}: {error:.2e}"
    total_loss, total_correct, total_examples = prepared.take_totals()
    assert (total_correct, total_examples) == (correct, examples)
    assert total_loss == pytest.approx(loss_sum, rel=1e-6)


def test_bf16_on_two_devices_against_the_reference() -> None:
    parallel = mirrored(precision="bf16")
    reference = ReferenceRunner(graph(), WEIGHTS, "NCHW", OPTIMIZER)
    losses, logits = train(parallel, 8)
    reference_losses, reference_logits = train(reference, 8)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-3)
    assert relative_error(logits, reference_logits) <= 3e-2
    names = [k for k in WEIGHTS if not is_buffer(k)]
    update = np.concatenate([(parallel.weights()[k] - WEIGHTS[k]).ravel() for k in names])
    expected = np.concatenate([(reference.weights()[k] - WEIGHTS[k]).ravel() for k in names])
    assert np.linalg.norm(update - expected) / np.linalg.norm(expected) <= 5e-2


def test_fp16_overflow_on_one_device_skips_the_step_on_both() -> None:
    """Keras' LossScaleOptimizer decides per replica; an overflow on device 1 alone must still
    skip the step everywhere (and halve the scale), not apply NaN or split the replicas."""
    parallel = mirrored(sync=False, precision="fp16")
    x, labels = batches(8)[0]
    parallel.train_step(nhwc(x), labels)
    before = parallel.weights()
    assert any(not np.array_equal(before[k], WEIGHTS[k]) for k in WEIGHTS if not is_buffer(k)), (
        "a normal step applies"
    )
    scale = float(parallel._optimizer.dynamic_scale.numpy())
    x[4:] *= 1e6  # device 1's shard overflows float16, device 0's does not
    parallel.train_step(nhwc(x), labels)
    after = parallel.weights()
    for name in WEIGHTS:
        if not is_buffer(name):
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert float(parallel._optimizer.dynamic_scale.numpy()) == scale / 2


def test_more_devices_than_exist_and_per_shard_batch_checks() -> None:
    with pytest.raises(DeviceError, match=f"devices=3 but only 2 are available .*{CPU_DEVICES_ENV}=3"):
        multires.make_runner(graph(), WEIGHTS, "tf", devices=3)
    parallel = mirrored(sync=False)
    x, labels = batches(3)[0]
    with pytest.raises(ShapeError, match="device 1's shard .* sync_batchnorm=True"):
        parallel.train_step(nhwc(x)[:, :1, :1], labels)
    mirrored().train_step(nhwc(x)[:, :1, :1], labels)  # 3 values per channel over the global batch
