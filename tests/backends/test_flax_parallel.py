"""Data parallelism in the Flax backend: `jax.jit` over a mesh of two XLA host devices, and two
JAX processes on localhost.

JAX fixes its device count when it starts, so these tests need a process started with
`MULTIRES_CPU_DEVICES=2`: `test_flax.py::test_data_parallel_on_two_cpu_devices` runs this file
so; in a process with one device they skip.

Synchronised BatchNorm makes K data-parallel SGD steps equal K single-device steps on the
global batches (to float32 rounding), and both the reference; without sync each device
normalises with its shard's statistics, as `ReferenceRunner(execution=Execution(devices=2,
sync_batchnorm=False))` defines. A global batch of 7 is padded to two shards of 4 with a masked
row, which must change nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import multires  # noqa: E402
from multires import SGD  # noqa: E402
from multires.backend import CPU_DEVICES_ENV, Execution  # noqa: E402
from multires.errors import DeviceError, ShapeError  # noqa: E402
from multires.reference import ReferenceRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from flax_distributed_worker import OPTIMIZER, distributed_case  # noqa: E402
from test_flax import assert_close, small_graph  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 2,
    reason=f"needs 2 JAX devices: {CPU_DEVICES_ENV}=2 (test_flax.py runs this file so)",
)

STEPS = 2
MOMENTUM = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
SHAPE = (4, 12, 12)
"""Channels and size of the small graph's NCHW input."""


def batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`STEPS` NHWC global batches of `n` examples for the small graph."""
    rng = np.random.default_rng(seed)
    c, h, w = SHAPE
    return [(rng.normal(size=(n, h, w, c)).astype(np.float32), rng.integers(0, 5, n)) for _ in range(STEPS)]


def train(
    runner: multires.Runner, data: list[tuple[np.ndarray, np.ndarray]]
) -> list[tuple[float, np.ndarray]]:
    return [runner.train_step(x, labels) for x, labels in data]


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return multires.random_weights(small_graph(), seed=3, input_shape=(2, *SHAPE))


@pytest.mark.parametrize("n", [6, 7])
def test_synchronised_steps_equal_one_device_and_the_reference(
    weights: dict[str, np.ndarray], n: int
) -> None:
    graph, data = small_graph(), batches(n)
    parallel = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM, devices=2)
    single = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM)
    reference = ReferenceRunner(graph, weights, "NHWC", MOMENTUM)
    got, one, expected = train(parallel, data), train(single, data), train(reference, data)
    for (loss, logits), (one_loss, one_logits), (ref_loss, ref_logits) in zip(
        got, one, expected, strict=True
    ):
        assert logits.shape == (n, 5)
        assert loss == pytest.approx(one_loss, rel=1e-6) and loss == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(logits, one_logits, rtol=0, atol=1e-5 * np.abs(one_logits).max())
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5 * np.abs(ref_logits).max())
    assert_close(parallel.weights(), single.weights(), 1e-5)
    assert_close(parallel.weights(), reference.weights(), 1e-4)
    assert_close(parallel.optimizer_state(), single.optimizer_state(), 1e-5)
    assert_close(parallel.optimizer_state(), reference.optimizer_state(), 1e-4)
    x = data[0][0]
    expected = reference.forward(x)
    np.testing.assert_allclose(parallel.forward(x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    leaf = jax.tree.leaves(parallel.variables)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
    assert parallel.is_main and parallel.weights()["stem.conv.weight"].dtype == np.float32


@pytest.mark.parametrize("n", [6, 7])
def test_without_sync_each_device_uses_its_shard(weights: dict[str, np.ndarray], n: int) -> None:
    graph, data = small_graph(), batches(n, seed=1)
    parallel = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM, devices=2, sync_batchnorm=False)
    reference = ReferenceRunner(graph, weights, "NHWC", MOMENTUM, Execution(devices=2, sync_batchnorm=False))
    synchronised = ReferenceRunner(graph, weights, "NHWC", MOMENTUM)
    for (loss, logits), (ref_loss, ref_logits) in zip(
        train(parallel, data), train(reference, data), strict=True
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5 * np.abs(ref_logits).max())
    train(synchronised, data)
    # The running statistics kept are device 0's, and the update differs from a synchronised one.
    assert_close(parallel.weights(), reference.weights(), 1e-4)
    assert_close(parallel.optimizer_state(), reference.optimizer_state(), 1e-4)
    mean = "stem.bn.running_mean"
    assert np.abs(parallel.weights()[mean] - synchronised.weights()[mean]).max() > 1e-3
    assert (
        np.abs(parallel.weights()["head.fc.weight"] - synchronised.weights()["head.fc.weight"]).max() > 1e-4
    )


@pytest.mark.parametrize("sync", [True, False])
def test_device_totals_match_train_step(weights: dict[str, np.ndarray], sync: bool) -> None:
    graph, data = small_graph(), batches(7, seed=2)
    stepped = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM, devices=2, sync_batchnorm=sync)
    direct = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM, devices=2, sync_batchnorm=sync)
    for x, labels in data:
        stepped.step(stepped.prepare(x, labels))
    results = train(direct, data)
    loss, correct, examples = stepped.take_totals()
    assert examples == 14 and stepped.take_totals() == (0.0, 0, 0)
    assert loss == pytest.approx(sum(step_loss * 7 for step_loss, _ in results), rel=1e-5)
    assert correct == sum(
        int((logits.argmax(1) == y).sum()) for (_, logits), (_, y) in zip(results, data, strict=True)
    )
    assert_close(stepped.weights(), direct.weights(), 1e-6)


def test_mixed_precision_data_parallel(weights: dict[str, np.ndarray]) -> None:
    """bfloat16 on two devices is bfloat16 on one, to rounding; weights stay float32."""
    graph, data = small_graph(), batches(7, seed=3)
    parallel = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM, devices=2, precision="bf16")
    single = multires.make_runner(graph, weights, "flax", "NHWC", MOMENTUM, precision="bf16")
    for (loss, _), (one_loss, _) in zip(train(parallel, data), train(single, data), strict=True):
        assert loss == pytest.approx(one_loss, rel=1e-2)
    assert_close(parallel.weights(), single.weights(), 1e-2)
    assert {value.dtype for value in parallel.weights().values()} == {np.dtype(np.float32)}


def test_shards_too_small_and_too_many_devices(weights: dict[str, np.ndarray]) -> None:
    graph, _, _ = distributed_case()
    tiny = multires.random_weights(graph, seed=0, input_shape=(3, 3, 1, 1))
    x, labels = np.ones((3, 1, 1, 3), np.float32), np.array([0, 1, 2])
    # BatchNorm sees one value per channel on 1x1 images: fine over 3, not in a shard of 1.
    multires.make_runner(graph, tiny, "flax", "NHWC", devices=2).train_step(x, labels)
    unsynced = multires.make_runner(graph, tiny, "flax", "NHWC", devices=2, sync_batchnorm=False)
    with pytest.raises(ShapeError, match=r"bn \(BatchNorm\).*N\*H\*W = 1"):
        unsynced.prepare(x, labels)
    with pytest.raises(DeviceError, match=f"devices={jax.device_count() + 1}.*{CPU_DEVICES_ENV}="):
        multires.make_runner(small_graph(), weights, "flax", devices=jax.device_count() + 1)
    with pytest.raises(DeviceError, match=f"devices={jax.device_count()} but only"):
        multires.make_runner(small_graph(), weights, "flax", device="cpu:1", devices=jax.device_count())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_train_as_one(tmp_path: Path) -> None:
    """Two JAX processes on localhost with one CPU device each (gloo collectives): each feeds
    its rows of the global batch, both end with the reference's weights, only process 0 is main."""
    worker = Path(__file__).parent / "flax_distributed_worker.py"
    coordinator = f"localhost:{_free_port()}"
    environment = {key: value for key, value in os.environ.items() if key != CPU_DEVICES_ENV}
    outputs = [tmp_path / f"process{rank}.npz" for rank in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), coordinator, "2", str(rank), str(output)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, output in enumerate(outputs)
    ]
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            process.kill()
            logs.append(process.communicate()[0] + "\n(timed out)")
    assert all(process.returncode == 0 for process in processes), "\n----\n".join(logs)[-6000:]
    results = [np.load(output) for output in outputs]
    graph, weights, data = distributed_case()
    reference = ReferenceRunner(graph, weights, "NHWC", OPTIMIZER)
    losses = [reference.train_step(x, labels)[0] for x, labels in data]
    for rank, result in enumerate(results):
        assert int(result["devices"]) == 2 and int(result["local_devices"]) == 1
        assert bool(result["is_main"]) == (rank == 0)
        np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
        loss_sum, correct, examples = result["totals"]
        assert examples == 14 and loss_sum == pytest.approx(7 * sum(losses), rel=1e-5)
        for prefix in ("weights", "stepped"):
            got = {
                name.split("/", 1)[1]: result[name] for name in result.files if name.startswith(prefix + "/")
            }
            assert sorted(got) == sorted(reference.weights())
            assert_close(got, reference.weights(), 1e-4)
    for name in (name for name in results[0].files if "/" in name):
        np.testing.assert_array_equal(
            results[0][name], results[1][name], err_msg=f"{name} differs between processes"
        )
