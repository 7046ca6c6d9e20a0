"""MXNet devices, mixed precision and data parallelism (issue 13): contexts and their errors,
`prepare`/`step`/`take_totals` against `train_step`, MXNet AMP's bfloat16 against the reference
(and the precisions it lacks), and SGD steps on 2 CPU contexts against one context and the
reference, with and without synchronised BatchNorm, eager and hybridized."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from mxnet import nd  # noqa: E402

import multires  # noqa: E402
from multires.backend import CPU_DEVICES_ENV, SGD, Execution  # noqa: E402
from multires.errors import DeviceError, ShapeError  # noqa: E402
from multires.graph import Graph  # noqa: E402
from multires.reference import ReferenceRunner, relative_error  # noqa: E402
from multires.weights import random_weights  # noqa: E402
from multires.zoo.blocks import residual_block  # noqa: E402
from multires.zoo.builder import GraphBuilder  # noqa: E402

backend = pytest.importorskip("multires.backends.mxnet")
from multires.backends.mxnet import execution  # noqa: E402
from multires.backends.mxnet import runner as runner_module  # noqa: E402

RTOL = 1e-4
"""Against the float64 reference: the conformance suite's training tolerance."""
ROUNDING = 2e-5
"""Two contexts against one: float32 rounding of sums taken in another order (measured: 1.3e-6)."""
OPTIMIZER = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
RATES = (0.05, 0.02)
SIZE = 12


def small_graph() -> Graph:
    """Stem conv (bias) + BN + ReLU + max-pool, a residual block with a projection, a BatchNorm
    with the biased running variance, and a dense head: every BatchNorm sees 9 or more values per
    channel and example, so the shards of a batch of 7 on 2 devices are well conditioned."""
    b = GraphBuilder("small", 1)
    x = b.relu("stem.relu", b.bn("stem.bn", b.conv("stem.conv", b.input, 8, 3, padding=1, bias=True)))
    x = residual_block(b, "block", b.maxpool("pool", x, 3, stride=2, padding=1), 16, stride=2)
    x = b.bn("head.bn", x, momentum=0.3, running_variance="biased")
    return b.graph(b.dense("fc", b.flatten("flat", b.gap("gap", x)), 10))


GRAPH = small_graph()
WEIGHTS = random_weights(GRAPH, seed=0)


def _batches(size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(size, 1, SIZE, SIZE)).astype(np.float32), rng.integers(0, 10, size)) for _ in RATES
    ]


def _steps(runner: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, np.ndarray]]:
    """`train_step` on each batch at the rates `RATES`; the losses and logits."""
    out = []
    for lr, (x, labels) in zip(RATES, batches, strict=True):
        runner.set_lr(lr)
        out.append(runner.train_step(x, labels))
    return out


def _runner(execution: Execution | None = None, hybridize: bool = True) -> Any:
    return backend.make_runner(GRAPH, WEIGHTS, "NCHW", OPTIMIZER, execution, hybridize=hybridize)


def _assert_close(actual: dict, expected: dict, rtol: float, what: str, floor: bool = False) -> None:
    """Each tensor within `rtol` relative to its own largest value; with `floor`, relative to at
    least the largest value of any tensor (momentum buffers of biases before a BatchNorm, whose
    gradients are zero up to rounding, are weight decay and rounding noise)."""
    assert actual.keys() == expected.keys(), what
    scale = max(float(np.abs(v).max()) for v in expected.values()) if floor else 0.0
    errors = {
        name: float(np.abs(actual[name] - expected[name]).max())
        / max(float(np.abs(expected[name]).max()), scale)
        for name in expected
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{what}: {worst} off by {errors[worst]:.2e}"


@pytest.fixture(params=[False, True], ids=["eager", "hybridized"])
def hybridize(request: pytest.FixtureRequest) -> bool:
    return request.param


# Devices.


def test_contexts_from_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_DEVICES_ENV, "3")
    assert backend.available_devices()[0] == "cpu"
    assert all(name.startswith("gpu(") for name in backend.available_devices()[1:])
    assert execution.resolve_contexts(Execution()) == [mx.cpu(0)]
    assert execution.resolve_contexts(Execution(device="cpu:1")) == [mx.cpu(1)]
    assert execution.resolve_contexts(Execution(device="CPU(1)", devices=2)) == [mx.cpu(1), mx.cpu(2)]


def test_an_unknown_device_lists_the_available_ones() -> None:
    with pytest.raises(DeviceError, match=r"no device 'tpu'; available: cpu.*Use cpu, gpu, gpu\(N\)"):
        multires.make_runner(GRAPH, WEIGHTS, "mxnet", device="tpu")
    if mx.context.num_gpus() == 0:
        with pytest.raises(DeviceError, match=r"no device 'gpu:0'; available: cpu\. .*(no CUDA|no such GPU)"):
            multires.make_runner(GRAPH, WEIGHTS, "mxnet", device="gpu:0")


def test_too_many_devices_says_how_to_expose_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_DEVICES_ENV, raising=False)
    more = (os.cpu_count() or 1) + 1
    with pytest.raises(
        DeviceError, match=f"devices={more} but only {more - 1} are available.*{CPU_DEVICES_ENV}={more}"
    ):
        multires.make_runner(GRAPH, WEIGHTS, "mxnet", devices=more)
    monkeypatch.setenv(CPU_DEVICES_ENV, str(more))
    assert len(execution.resolve_contexts(Execution(devices=more))) == more
    monkeypatch.setenv(CPU_DEVICES_ENV, "two")
    with pytest.raises(DeviceError, match="must be a number"):
        execution.resolve_contexts(Execution())


def test_a_runner_on_another_cpu_context_computes_the_same(hybridize: bool) -> None:
    here, there = _runner(hybridize=hybridize), _runner(Execution(device="cpu(1)"), hybridize)
    assert {ctx for p in there.model.collect_params().values() for ctx in p.list_ctx()} == {mx.cpu(1)}
    for (loss, logits), (other_loss, other_logits) in zip(
        _steps(here, _batches(4)), _steps(there, _batches(4)), strict=True
    ):
        assert loss == other_loss
        np.testing.assert_array_equal(logits, other_logits)
    expected = here.weights()
    for name, value in there.weights().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


# Prepared batches and totals kept on the device.


@pytest.mark.parametrize("devices", [1, 2])
def test_prepared_steps_keep_totals_on_the_device(hybridize: bool, devices: int) -> None:
    batches = _batches(7, seed=1) + _batches(4, seed=2)
    plain, prepared = (_runner(Execution(devices=devices), hybridize) for _ in range(2))
    loss_sum, correct = 0.0, 0
    for x, labels in batches:
        loss, logits = plain.train_step(x, labels)
        loss_sum += loss * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        prepared.step(prepared.prepare(x, labels))
    assert isinstance(prepared._totals, nd.NDArray) and prepared._totals.context == prepared.contexts[0]
    totals = prepared.take_totals()
    assert totals[1:] == (correct, sum(len(labels) for _, labels in batches))
    assert totals[0] == pytest.approx(loss_sum, rel=1e-6)
    assert prepared.take_totals() == (0.0, 0, 0)
    expected = plain.weights()
    for name, value in prepared.weights().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_prepare_checks_the_batch() -> None:
    runner = _runner(Execution(devices=2, sync_batchnorm=False))
    x, labels = _batches(4)[0]
    with pytest.raises(ShapeError, match="labels must lie in"):
        runner.prepare(x, labels + 10)
    with pytest.raises(ShapeError, match=r"expects shape \(N, 1, H, W\)"):
        runner.prepare(x.transpose(0, 2, 3, 1), labels)
    # Without sync, each shard's BatchNorm needs two values per channel: 2 examples of 1 x 1 is
    # fine on one device but not in shards of one.
    tiny = np.zeros((2, 1, 1, 1), np.float32)
    with pytest.raises(ShapeError, match="training mode needs more than one value per channel"):
        runner.prepare(tiny, np.array([0, 1]))


# Mixed precision.


def test_bf16_step_matches_the_reference_within_its_measured_tolerance(hybridize: bool) -> None:
    """One SGD step of d2l_resnet18 at 28 x 28 in MXNet AMP's bfloat16 (Convolution and
    FullyConnected; the rest float32) against the float64 reference. Measured on an AVX-512 CPU
    (eager and hybridized alike): eval logits 7.5e-3, loss 9.4e-4, updated weights 9.8e-3 (all
    weights together; per tensor median 1.3e-3, largest 0.26 on the stem convolution, as in
    torch.autocast's bfloat16: 0.28); in float32 the same numbers are 7e-7, 3e-7, 2e-7."""
    graph = multires.spec("d2l_resnet18", in_channels=1, num_classes=10)
    weights = random_weights(graph, seed=0)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
    runner = backend.make_runner(
        graph, weights, "NCHW", OPTIMIZER, Execution(precision="bf16"), hybridize=hybridize
    )
    reference = ReferenceRunner(graph, weights, "NCHW", OPTIMIZER)
    eval_error = relative_error(runner.forward(x), reference.forward(x))
    assert 1e-4 < eval_error < 2e-2  # computed in bfloat16, not float32, and close
    loss, _ = runner.train_step(x, labels)
    expected_loss, _ = reference.train_step(x, labels)
    assert abs(loss - expected_loss) <= 1e-2 * expected_loss
    new, expected = runner.weights(), reference.weights()
    assert {value.dtype for value in new.values()} == {np.dtype(np.float32)}
    difference = np.sqrt(sum(float(((new[k] - expected[k]) ** 2).sum()) for k in expected))
    assert difference / np.sqrt(sum(float((v**2).sum()) for v in expected.values())) < 3e-2
    assert np.median([relative_error(new[k], expected[k]) for k in expected]) < 1e-2
    assert all(state.dtype == np.float32 for state in runner.optimizer_state().values())


def test_amp_stays_inside_its_runner() -> None:
    """MXNet's `amp.init()` would rewrite mx.nd and mx.sym for the whole process; the backend's
    casts live in the model's blocks, so float32 runners are unchanged by a bf16 one."""
    x, _ = _batches(4)[0]
    before = _runner().forward(x)
    low = _runner(Execution(precision="bf16"))
    assert low.model.blocks["stem.conv"].compute_dtype is execution.AMP_DTYPES["bf16"]
    assert low.model.blocks["fc"].compute_dtype is execution.AMP_DTYPES["bf16"]
    assert not hasattr(low.model.blocks["stem.bn"], "compute_dtype")
    assert relative_error(low.forward(x), before) > 1e-4
    np.testing.assert_array_equal(_runner().forward(x), before)


def test_precisions_mxnet_amp_lacks_are_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeviceError, match=r"float16 on GPUs only.*use precision='bf16' or 'fp32'"):
        multires.make_runner(GRAPH, WEIGHTS, "mxnet", precision="fp16")
    with pytest.raises(DeviceError, match=r"bfloat16 on the CPU only.*'fp16'.*torch, tf or flax"):
        execution.compute_dtype("bf16", mx.gpu(0))
    assert execution.compute_dtype("fp16", mx.gpu(0)) == np.float16  # AMP's float16, on GPUs
    assert execution.compute_dtype("fp32", mx.cpu()) is None
    assert backend.precisions(mx.gpu(0)) == ("fp32", "fp16") and "fp16" not in backend.PRECISIONS

    class NoOneDNN:
        def is_enabled(self, feature: str) -> bool:
            return False

    monkeypatch.setattr(execution, "Features", NoOneDNN)
    with pytest.raises(
        DeviceError, match=r"cannot compute bfloat16 on this CPU \(this MXNet build has no oneDNN"
    ):
        multires.make_runner(GRAPH, WEIGHTS, "mxnet", precision="bf16")


def test_fp16_loss_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 runs on GPUs only; on the CPU the loss scaling around it (AMP's `LossScaler` on the
    Trainer, `amp.scale_loss`) runs with float32 compute: a power-of-two scale is exact, so the
    steps equal float32 ones bit for bit, and a step whose gradients overflow is skipped (weights
    and momentum unchanged) and halves the scale."""
    monkeypatch.setattr(runner_module, "compute_dtype", lambda precision, context: None)
    for devices in (1, 2):
        scaled, plain = (
            _runner(Execution(devices=devices, precision="fp16")),
            _runner(Execution(devices=devices)),
        )
        scaler = scaled.trainer._amp_loss_scaler
        assert scaler.loss_scale == 2.0**16
        _steps(scaled, _batches(5))
        _steps(plain, _batches(5))
        expected = plain.weights()
        for name, value in scaled.weights().items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
        before, state = scaled.weights(), scaled.optimizer_state()
        x, labels = _batches(5)[0]
        scaled.train_step(x * 1e38, labels)  # the convolutions overflow: infinite gradients
        after = scaled.weights()
        for name, value in before.items():
            if not name.endswith(("running_mean", "running_var")):  # BatchNorm updates in forward
                np.testing.assert_array_equal(after[name], value, err_msg=name)
        for name, value in scaled.optimizer_state().items():
            np.testing.assert_array_equal(value, state[name], err_msg=name)
        assert scaler._next_loss_scale == 2.0**15


# Data parallelism on 2 CPU contexts.


def _contexts_agree(runner: Any, buffers_too: bool) -> None:
    """Every context holds the same weights (and running statistics with sync) after the steps."""
    for name, param in runner.model.collect_params().items():
        if buffers_too or not name.endswith(("running_mean", "running_var")):
            first, *others = (value.asnumpy() for value in param.list_data())
            for other in others:
                np.testing.assert_array_equal(other, first, err_msg=name)


@pytest.mark.parametrize("size", [8, 7], ids=["even", "uneven"])
def test_synchronised_steps_on_two_contexts_equal_one(hybridize: bool, size: int) -> None:
    batches = _batches(size, seed=size)
    single, parallel = _runner(hybridize=hybridize), _runner(Execution(devices=2), hybridize)
    reference = ReferenceRunner(GRAPH, WEIGHTS, "NCHW", OPTIMIZER)
    results = zip(_steps(single, batches), _steps(parallel, batches), _steps(reference, batches), strict=True)
    for (loss, logits), (dp_loss, dp_logits), (ref_loss, ref_logits) in results:
        assert dp_logits.shape == (size, 10)
        assert dp_loss == pytest.approx(loss, rel=ROUNDING) and dp_loss == pytest.approx(ref_loss, rel=RTOL)
        assert relative_error(dp_logits, logits) <= ROUNDING and relative_error(dp_logits, ref_logits) <= RTOL
    _assert_close(parallel.weights(), single.weights(), ROUNDING, "2 contexts against 1")
    _assert_close(parallel.weights(), reference.weights(), RTOL, "2 contexts against the reference")
    _assert_close(parallel.optimizer_state(), reference.optimizer_state(), RTOL, "momentum buffers", True)
    _contexts_agree(parallel, buffers_too=True)
    if hybridize:  # the blocks between the synchronised BatchNorms ran as their own cached ops
        assert parallel.model.blocks["stem.conv"]._cached_op is not None


@pytest.mark.parametrize("size", [8, 7], ids=["even", "uneven"])
def test_unsynchronised_contexts_use_their_own_shards_statistics(hybridize: bool, size: int) -> None:
    batches = _batches(size, seed=size)
    local = Execution(devices=2, sync_batchnorm=False)
    parallel = _runner(local, hybridize)
    reference = ReferenceRunner(GRAPH, WEIGHTS, "NCHW", OPTIMIZER, local)
    synchronised = ReferenceRunner(GRAPH, WEIGHTS, "NCHW", OPTIMIZER)
    results = zip(
        _steps(parallel, batches), _steps(reference, batches), _steps(synchronised, batches), strict=True
    )
    for (loss, logits), (ref_loss, ref_logits), (_, sync_logits) in results:
        assert not np.allclose(ref_logits, sync_logits, rtol=1e-3)  # the shards' statistics matter
        assert loss == pytest.approx(ref_loss, rel=RTOL) and relative_error(logits, ref_logits) <= RTOL
    _assert_close(parallel.weights(), reference.weights(), RTOL, "weights and context 0's statistics")
    _contexts_agree(parallel, buffers_too=False)
    running = parallel.model.blocks["stem.bn"].running_mean.list_data()
    assert not np.allclose(running[0].asnumpy(), running[1].asnumpy())  # each context's own
    x, _ = batches[0]
    assert relative_error(parallel.forward(x, training=True), reference.forward(x, training=True)) <= RTOL


def test_a_batch_smaller_than_the_device_count(hybridize: bool) -> None:
    """One example on 2 contexts: the second has nothing to do and adds nothing to the sums."""
    batches = [(x[:1], labels[:1]) for x, labels in _batches(2)]
    for sync in (True, False):
        parallel = _runner(Execution(devices=2, sync_batchnorm=sync), hybridize)
        reference = ReferenceRunner(GRAPH, WEIGHTS, "NCHW", OPTIMIZER)
        for (loss, logits), (ref_loss, ref_logits) in zip(
            _steps(parallel, batches), _steps(reference, batches), strict=True
        ):
            assert loss == pytest.approx(ref_loss, rel=RTOL) and relative_error(logits, ref_logits) <= RTOL
        _assert_close(parallel.weights(), reference.weights(), RTOL, f"sync={sync}")
        _contexts_agree(parallel, buffers_too=sync)


def test_two_contexts_resume_from_saved_state() -> None:
    batches = _batches(6)
    straight = _runner(Execution(devices=2))
    _steps(straight, batches)
    first = _runner(Execution(devices=2))
    first.train_step(*batches[0])
    resumed = backend.make_runner(GRAPH, first.weights(), "NCHW", OPTIMIZER, Execution(devices=2))
    resumed.set_optimizer_state(first.optimizer_state())
    resumed.set_lr(RATES[1])
    resumed.train_step(*batches[1])
    end, expected = resumed.weights(), straight.weights()
    for name in expected:
        np.testing.assert_array_equal(end[name], expected[name], err_msg=name)
    _contexts_agree(resumed, buffers_too=True)
