"""PyTorch data parallelism: DistributedDataParallel over 2 CPU processes (gloo), started by torchrun.

One standalone launch (`--nproc_per_node 2`) runs every scenario of `torch_ddp_worker.py`, and
one two-node launch on localhost (`--nnodes 2`, a process per node) runs the synchronised one;
the tests compare what rank 0 saw with the same steps on one device and in the NumPy reference:

- synchronised BatchNorm: 2 SGD steps (momentum, weight decay, a new learning rate each step)
  on global batches of 8 and 7 give the single-device weights, running statistics, momentum
  buffers, losses and logits, and the reference's, to float32 rounding (measured: 7e-7);
- without sync, the reference's per-shard data parallelism, with rank 0's running statistics;
- `prepare` / `step` / `take_totals` give `train_step`'s weights and the global totals;
- bf16 under data parallelism is the one-device bf16 step to bfloat16 rounding;
- rank 0 is the main process; devices must equal the processes; shards must fit BatchNorm.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from multires.backend import Execution  # noqa: E402
from multires.reference import ReferenceRunner  # noqa: E402

WORKER_PATH = Path(__file__).with_name("torch_ddp_worker.py")
_spec = importlib.util.spec_from_file_location("torch_ddp_worker", WORKER_PATH)
worker = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT = 300
RTOL = 1e-5
"""Data parallel against one device and the reference (float32 rounding; measured at most 7e-7)."""

Results = dict[str, np.ndarray]


def _torchrun(out: Path, *options: str, scenarios: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *options,
        str(WORKER_PATH),
        str(out),
        *scenarios,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*processes: subprocess.Popen[str]) -> None:
    """Wait for the launches; fail with their output if one fails or hangs."""
    for process in processes:
        try:
            output, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"torchrun did not finish in {TIMEOUT} s")
        assert process.returncode == 0, output[-4000:]


def _load(out: Path, rank: int) -> Results:
    with np.load(out / f"rank{rank}.npz") as data:
        return dict(data)


def _scenario(results: Results, name: str) -> Results:
    prefix = f"{name}:"
    return {key[len(prefix) :]: value for key, value in results.items() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> list[Results]:
    """Each rank's results of every scenario, from one `--standalone --nproc_per_node 2` launch."""
    out = tmp_path_factory.mktemp("ddp")
    _finish(_torchrun(out, "--standalone", "--nproc_per_node", "2"))
    return [_load(out, rank) for rank in (0, 1)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> list[Results]:
    """The synchronised scenario on two "nodes" (two torchrun launches on localhost)."""
    out = tmp_path_factory.mktemp("nodes")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    nodes = [
        _torchrun(
            out,
            *("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"),
            *("--master_addr", "127.0.0.1", "--master_port", port),
            scenarios=("sync",),
        )
        for rank in (0, 1)
    ]
    _finish(*nodes)
    return [_load(out, rank) for rank in (0, 1)]


@cache
def one_device(name: str) -> Results:
    scenario = worker.SCENARIOS[name]
    return worker.run(scenario, worker.parallel_runner(scenario, devices=1))


@cache
def reference(name: str) -> Results:
    scenario = worker.SCENARIOS[name]
    execution = Execution(devices=2, sync_batchnorm=scenario.sync_batchnorm)
    runner = ReferenceRunner(
        scenario.graph(), scenario.weights(), scenario.layout, worker.OPTIMIZER, execution
    )
    return worker.run(scenario, runner)


def errors(actual: Results, expected: Results) -> dict[str, float]:
    """Each result's largest difference relative to its own largest value; momentum buffers
    relative to the largest buffer (a conv bias before BatchNorm has a zero gradient but for
    rounding, so its own scale is noise)."""
    assert sorted(actual) == sorted(expected)
    buffers = max(float(np.abs(v).max()) for k, v in expected.items() if k.startswith("m."))
    found = {}
    for key, value in expected.items():
        if value.dtype.kind != "f":
            continue
        scale = buffers if key.startswith("m.") else max(float(np.abs(value).max()), 1e-12)
        found[key] = float(np.abs(actual[key] - value).max()) / scale
    return found


def assert_close(actual: Results, expected: Results, rtol: float, what: str) -> None:
    found = errors(actual, expected)
    worst = max(found, key=found.__getitem__)
    assert found[worst] < rtol, f"{what}: {worst} differs by {found[worst]:.2e} relative (> {rtol:.0e})"


@pytest.mark.parametrize("name", ["sync", "sync_biased_nhwc"])
def test_synchronised_steps_equal_one_device_and_the_reference(standalone: list[Results], name: str) -> None:
    parallel = _scenario(standalone[0], name)
    del parallel["is_main"]
    assert_close(parallel, one_device(name), RTOL, f"{name}: 2 processes vs 1 device")
    assert_close(parallel, reference(name), RTOL, f"{name}: 2 processes vs the reference")
    other = _scenario(standalone[1], name)
    for key in parallel:
        if key.startswith(("w.", "m.", "w_after_forward.")):
            assert np.array_equal(other[key], parallel[key]), f"rank 1's {key} differs from rank 0's"


def test_without_sync_each_device_normalises_its_shard_and_rank_0s_statistics_are_kept(
    standalone: list[Results],
) -> None:
    parallel, other = _scenario(standalone[0], "nosync"), _scenario(standalone[1], "nosync")
    del parallel["is_main"]
    assert_close(parallel, reference("nosync"), RTOL, "nosync: 2 processes vs the reference's shards")
    synced = _scenario(standalone[0], "sync")
    assert errors(parallel, {k: synced[k] for k in parallel})["w.b2.0.bn1.weight"] > 1e-3
    for key in parallel:
        if key.startswith(("w.", "m.")) and "running" not in key:
            assert np.array_equal(other[key], parallel[key]), f"rank 1's {key} differs from rank 0's"
    # Each rank's running statistics are its own shard's until DDP broadcasts rank 0's at the
    # start of the next training-mode forward pass.
    for key in ("w.b2.0.bn1.running_var", "w_after_forward.b2.0.bn1.running_var"):
        assert not np.allclose(other[key], parallel[key], rtol=1e-3), key


def test_prepare_step_and_take_totals_give_train_steps_weights_and_the_global_totals(
    standalone: list[Results],
) -> None:
    stepped, trained = _scenario(standalone[0], "steps"), _scenario(standalone[0], "sync")
    for key in stepped:
        if key.startswith(("w.", "m.")):
            assert np.array_equal(stepped[key], trained[key]), key
    batches = list(worker.SCENARIOS["sync"].batches())
    loss_sum = sum(float(trained[f"loss{i}"]) * len(labels) for i, (_, labels) in enumerate(batches))
    correct = sum(
        int((trained[f"logits{i}"].argmax(1) == labels).sum()) for i, (_, labels) in enumerate(batches)
    )
    totals = stepped["totals"]
    assert totals[0] == pytest.approx(loss_sum, rel=1e-6)
    assert tuple(totals[1:]) == (correct, 15)
    assert tuple(_scenario(standalone[1], "steps")["totals"]) == tuple(totals)


def test_bf16_data_parallel_is_the_one_device_bf16_step_to_bfloat16_rounding(
    standalone: list[Results],
) -> None:
    parallel = _scenario(standalone[0], "bf16")
    del parallel["is_main"]
    assert_close(parallel, one_device("bf16"), 2e-2, "bf16: 2 processes vs 1 device")
    assert max(errors(parallel, reference("bf16")).values()) > 1e-4  # it did compute in bfloat16


def test_rank_0_is_main_and_each_process_gets_its_share_of_the_cores(standalone: list[Results]) -> None:
    for name in worker.SCENARIOS:
        assert bool(standalone[0][f"{name}:is_main"]) and not bool(standalone[1][f"{name}:is_main"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert int(standalone[0]["threads"]) == max(1, cores // 2)


def test_bad_device_counts_and_batches_are_typed_errors(standalone: list[Results]) -> None:
    results = standalone[0]
    assert str(results["error:devices"]) == (
        "DeviceError: devices=3, but this torch.distributed run has 2 processes (WORLD_SIZE): "
        "pass devices=2, or launch 3 processes (torchrun --nproc_per_node)."
    )
    assert str(results["error:empty_shard"]).startswith(
        "ShapeError: a training batch of 1 leaves some of the 2 devices without examples"
    )
    message = str(results["error:shard_statistics"])
    assert message.startswith("ShapeError: b2.0.bn1 (BatchNorm): training mode needs more than one value")
    assert "Without sync_batchnorm each of the 2 devices normalises its own shard" in message


def test_two_nodes_on_localhost_train_as_one_machine_does(
    two_nodes: list[Results], standalone: list[Results]
) -> None:
    nodes = _scenario(two_nodes[0], "sync")
    assert bool(nodes["is_main"]) and not bool(_scenario(two_nodes[1], "sync")["is_main"])
    single_machine = _scenario(standalone[0], "sync")
    assert_close(nodes, single_machine, 1e-6, "2 nodes vs 1 machine")
