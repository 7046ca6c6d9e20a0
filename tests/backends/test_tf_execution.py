"""Where and how the TensorFlow Runner computes: device names and their errors, the trainer's
`prepare` / `step` / `take_totals` against `train_step`, and Keras mixed precision (bf16, fp16
with `LossScaleOptimizer`) against the reference.

Data parallelism needs a TensorFlow started with two logical CPU devices, so
`test_data_parallel_on_two_cpu_devices` runs `test_tf_mirrored.py` in a fresh process with
`MULTIRES_CPU_DEVICES=2`.

Mixed-precision tolerances, measured (one SGD step, lr 0.1, momentum 0.9, weight decay 1e-3,
against the float64 reference): on `tiny` (8 NHWC images of 12x12) bf16 moves the update by
7.6e-3 of its norm, the logits by 9.4e-3 and the loss by 4.2e-5, fp16 by 3.9e-3, 9.8e-4 and
1.6e-6. On d2l_resnet18 (1 channel, 10 classes, 8 images of 28x28) the logits move by 3.9e-2
(bf16) and 5.1e-3 (fp16), the loss by 2.3e-6 and 4.2e-5, and the update by 0.38 (bf16) and 0.094
(fp16) of its norm: eighteen layers of backward pass in 8 (bf16) or 11 (fp16) mantissa bits at
random initialisation. PyTorch's own `torch.autocast` in bfloat16 moves the same update by 0.31.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import multires  # noqa: E402
from multires.backend import CPU_DEVICES_ENV, SGD, Execution, get_backend  # noqa: E402
from multires.errors import DeviceError, ShapeError  # noqa: E402
from multires.reference import ReferenceRunner, relative_error  # noqa: E402
from multires.weights import is_buffer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_tf import nhwc, tiny  # noqa: E402

tfb = get_backend("tf")
OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
CPUS = [name for name in tfb.available_devices() if name.startswith("CPU:")]

# (loss, logits, update) relative errors allowed against the reference: about 3 times those measured.
TOLERANCES = {
    "tiny": {"bf16": (2e-4, 3e-2, 3e-2), "fp16": (1e-5, 3e-3, 1.5e-2)},
    "d2l_resnet18": {"bf16": (1e-4, 0.1, 0.75), "fp16": (2e-4, 2e-2, 0.3)},
}


def tiny_case(
    n: int = 8, seed: int = 0
) -> tuple[multires.Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    graph = tiny()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 12, 12)).astype(np.float32)
    return graph, multires.random_weights(graph, seed=0, input_shape=x.shape), x, rng.integers(0, 4, n)


def update_error(
    new: dict[str, np.ndarray], old: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> float:
    """The error of the parameters' update (all of them as one vector) relative to its norm."""
    names = [name for name in old if not is_buffer(name)]
    got = np.concatenate([(new[k] - old[k]).ravel() for k in names]).astype(np.float64)
    want = np.concatenate([(expected[k] - old[k]).ravel() for k in names]).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# Devices.


def test_available_devices_are_tensorflows_names() -> None:
    devices = multires.backend.available_devices("tf")
    assert devices[0] == "CPU:0" and all(name.split(":")[0] in ("CPU", "GPU") for name in devices)


@pytest.mark.parametrize("device", [None, "CPU", "cpu", "cpu:0", "/device:CPU:0", " CPU:0 "])
def test_device_spellings(device: str | None) -> None:
    graph, weights, _, _ = tiny_case()
    runner = multires.make_runner(graph, weights, "tf", device=device)
    expected = ("GPU:0",) if device is None and tf.config.list_physical_devices("GPU") else ("CPU:0",)
    assert runner.placement.devices == expected
    assert runner.execution == Execution(device=device)


@pytest.mark.parametrize(
    "device, says",
    [("TPU", "Name a device as TensorFlow does"), ("CPU:7", "available: CPU:0"), ("cuda:5", "cuda:5")],
)
def test_unknown_device_lists_the_available_ones(device: str, says: str) -> None:
    graph, weights, _, _ = tiny_case()
    with pytest.raises(DeviceError, match="no device") as error:
        multires.make_runner(graph, weights, "tf", device=device)
    assert says in str(error.value) and "CPU:0" in str(error.value)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="this machine has a GPU")
def test_gpu_on_a_build_without_one_says_to_use_the_cpu() -> None:
    graph, weights, _, _ = tiny_case()
    with pytest.raises(DeviceError, match=r"sees no GPU .*use device='CPU'"):
        multires.make_runner(graph, weights, "tf", device="GPU")


def test_too_many_devices_says_how_to_expose_more() -> None:
    graph, weights, _, _ = tiny_case()
    wanted = len(CPUS) + 1
    with pytest.raises(DeviceError, match=f"devices={wanted} but only {len(CPUS)}") as error:
        multires.make_runner(graph, weights, "tf", devices=wanted)
    assert f"{CPU_DEVICES_ENV}={wanted}" in str(error.value)


def test_use_cpu_devices_after_tensorflow_started() -> None:
    tfb.use_cpu_devices(len(CPUS))  # as many as there are: nothing to do
    with pytest.raises(DeviceError, match=f"already started with {len(CPUS)} CPU device") as error:
        tfb.use_cpu_devices(len(CPUS) + 1)
    assert f"{CPU_DEVICES_ENV}={len(CPUS) + 1} before the first use" in str(error.value)
    with pytest.raises(DeviceError, match="positive number"):
        tfb.use_cpu_devices(0)


def test_bf16_on_a_gpu_without_it_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A V100 (compute capability 7.0) has float16 but no bfloat16 arithmetic."""
    execution_module = sys.modules["multires.backends.tf.execution"]
    monkeypatch.setattr(execution_module, "available_devices", lambda: ["CPU:0", "GPU:0"])
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["a V100"])
    monkeypatch.setattr(
        tf.config.experimental,
        "get_device_details",
        lambda device: {"device_name": "Tesla V100", "compute_capability": (7, 0)},
    )
    with pytest.raises(
        DeviceError, match=r"GPU:0 \(Tesla V100, compute capability 7.0\) has no bfloat16.*'fp16'"
    ):
        execution_module.place(Execution(device="GPU", precision="bf16"))


def test_nchw_on_the_cpu_says_to_use_nhwc_or_a_gpu() -> None:
    graph, weights, _, _ = tiny_case()
    with pytest.raises(DeviceError, match="NHWC only; use layout='NHWC' on the CPU, or device='GPU'"):
        tfb.make_runner(graph, weights, "NCHW", SGD(), Execution(device="CPU"))


# The trainer's path.


def test_prepared_steps_equal_train_step_and_keep_totals_on_the_device() -> None:
    graph, weights, _, _ = tiny_case()
    batches = [tiny_case(n, seed)[2:] for n, seed in ((8, 1), (5, 2), (8, 3))]
    direct = multires.make_runner(graph, weights, "tf", optimizer=OPTIMIZER)
    prepared = multires.make_runner(graph, weights, "tf", optimizer=OPTIMIZER)
    loss_sum, correct = 0.0, 0
    for x, labels in batches:
        loss, logits = direct.train_step(nhwc(x), labels)
        loss_sum += loss * len(labels)
        correct += int((logits.argmax(axis=1) == labels).sum())
        prepared.step(prepared.prepare(nhwc(x), labels))
    for name, value in direct.weights().items():
        np.testing.assert_array_equal(prepared.weights()[name], value, err_msg=name)
    total_loss, total_correct, examples = prepared.take_totals()
    assert (total_correct, examples) == (correct, 21)
    assert total_loss == pytest.approx(loss_sum, rel=1e-6)
    assert prepared.take_totals() == (0.0, 0, 0)


def test_prepare_checks_the_batch() -> None:
    graph, weights, x, labels = tiny_case()
    runner = multires.make_runner(graph, weights, "tf")
    with pytest.raises(ShapeError, match=r"labels must lie in \[0, 4\)"):
        runner.prepare(nhwc(x), labels + 4)
    with pytest.raises(ShapeError, match="real numbers"):
        runner.prepare(nhwc(x).astype(np.complex64), labels)
    with pytest.raises(ShapeError, match="more than one value per channel"):
        runner.prepare(nhwc(x)[:1, :1, :1], labels[:1])


# Mixed precision.


def precision_step(
    graph: multires.Graph, weights: dict, x: np.ndarray, labels: np.ndarray, precision: str
) -> tuple:
    """One SGD step in `precision` from `weights`; in fp16 retried from the same weights while
    `LossScaleOptimizer` skips steps whose gradients overflow (halving its scale each time)."""
    runner = multires.make_runner(graph, weights, "tf", optimizer=OPTIMIZER, precision=precision)
    for _ in range(8):
        runner.set_weights(weights)
        loss, logits = runner.train_step(nhwc(x), labels)
        if any(not np.array_equal(runner.weights()[k], v) for k, v in weights.items() if not is_buffer(k)):
            return runner, loss, logits
    raise AssertionError(f"{precision}: every step was skipped")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("case", ["tiny", "d2l_resnet18"])
def test_mixed_precision_step_against_the_reference(case: str, precision: str) -> None:
    if case == "tiny":
        graph, weights, x, labels = tiny_case()
    else:
        graph = multires.zoo.spec("d2l_resnet18", in_channels=1, num_classes=10)
        rng = np.random.default_rng(0)
        x, labels = rng.normal(size=(8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
        weights = multires.random_weights(graph, seed=0, input_shape=x.shape)
    reference = ReferenceRunner(graph, weights, "NCHW", OPTIMIZER)
    expected_loss, expected_logits = reference.train_step(x, labels)
    runner, loss, logits = precision_step(graph, weights, x, labels, precision)
    errors = (
        abs(loss - expected_loss) / expected_loss,
        relative_error(logits, expected_logits),
        update_error(runner.weights(), weights, reference.weights()),
    )
    allowed = TOLERANCES[case][precision]
    assert all(e <= a for e, a in zip(errors, allowed, strict=True)), (
        f"{case} {precision}: loss, logits, update errors {errors} (allowed {allowed})"
    )
    assert {v.dtype for v in runner.weights().values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in runner.optimizer_state().values()} == {np.dtype(np.float32)}


def test_mixed_precision_is_this_models_policy_alone() -> None:
    graph, weights, x, _ = tiny_case()
    mixed = multires.make_runner(graph, weights, "tf", precision="bf16")
    conv = mixed.model.get_layer("conv1")
    assert (conv.compute_dtype, conv.kernel.dtype) == ("bfloat16", "float32")
    assert mixed.model.get_layer("bn1").moving_variance.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"
    plain = multires.make_runner(graph, weights, "tf")
    assert plain.model.get_layer("conv1").compute_dtype == "float32"
    # Eval mode computes in bfloat16 too: off by its rounding, not float32's.
    error = relative_error(mixed.forward(nhwc(x)), plain.forward(nhwc(x)))
    assert 1e-4 < error < 3e-2


def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale() -> None:
    graph, weights, x, labels = tiny_case()
    runner = multires.make_runner(graph, weights, "tf", optimizer=OPTIMIZER, precision="fp16")
    scale = float(runner._optimizer.dynamic_scale.numpy())
    huge = nhwc(x) * 1e6  # float16 overflows in the first convolution
    runner.train_step(huge, labels)
    after = runner.weights()
    for name, value in weights.items():
        if not is_buffer(name):
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert float(runner._optimizer.dynamic_scale.numpy()) == scale / 2


# Data parallelism, in a process that starts TensorFlow with two CPU devices.


def test_data_parallel_on_two_cpu_devices() -> None:
    environment = {**os.environ, CPU_DEVICES_ENV: "2"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__).with_name("test_tf_mirrored.py")),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and " passed" in done.stdout and "skipped" not in done.stdout, (
        done.stdout[-6000:] + done.stderr[-3000:]
    )
