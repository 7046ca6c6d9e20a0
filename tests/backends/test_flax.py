"""The Flax backend used the Flax way: init/apply, variables, batch_stats, jit, grad, names.

Numerical equivalence on the zoo is the conformance suite's job (`pytest tests/conformance
--backend flax`); here a small graph exercising every node type, with nested and interleaved
namespaces, is checked against the NumPy reference, a graph of SAME windows at even and odd
sizes too, and the book's JAX stem against the same stem written with flax.linen's own modules.
Devices, device-side totals and mixed precision are checked here, data parallelism in
`test_flax_parallel.py`, which `test_data_parallel_on_two_cpu_devices` runs in a process with two
XLA host devices.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import multires  # noqa: E402
from multires import SGD, reference  # noqa: E402
from multires.backend import CPU_DEVICES_ENV, Execution  # noqa: E402
from multires.errors import DeviceError, ShapeError, WeightsError  # noqa: E402
from multires.graph import (  # noqa: E402
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    Input,
    MaxPool2d,
    Pad2d,
    ReLU,
)
from multires.weights import from_variables, init_weights, random_weights, to_variables  # noqa: E402

flax_backend = multires.get_backend("flax")
SHAPE = (3, 4, 12, 12)
"""NCHW input of the small graph."""


def small_graph(outputs: tuple[str, ...] = ("head.fc",)) -> Graph:
    """Every node type; asymmetric and dilated padding; a max pool over negative values; the
    `body` and `head` namespaces are each entered twice in graph order."""
    nodes = [
        Conv2d("stem.conv", "image", out_channels=8, kernel=3, stride=2, padding=((1, 0), (0, 1)), bias=True),
        BatchNorm("stem.bn", "stem.conv", eps=1e-3, momentum=0.25),
        MaxPool2d("stem.pool", "stem.bn", kernel=3, stride=2, padding=((1, 1), (0, 1))),
        Conv2d("body.0.conv", "stem.pool", out_channels=8, kernel=3, padding=2, dilation=2, groups=4),
        ReLU("body.0.relu", "body.0.conv"),
        Conv2d("head.proj", "stem.pool", out_channels=8, kernel=1),
        Add("body.0.add", ("body.0.relu", "head.proj", "stem.pool")),
        AvgPool2d("body.1.pool", "body.0.add", kernel=3, stride=1, padding=1, count_include_pad=False),
        AvgPool2d("body.1.pad", "body.1.pool", kernel=2, stride=1, padding=((1, 0), (0, 1))),
        GlobalAvgPool("gap", "body.0.add"),
        Flatten("head.flatten", "body.1.pad"),
        Dense("head.fc", "head.flatten", out_features=5),
    ]
    return Graph("small", Input("image", 4), nodes, outputs)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return small_graph()


@pytest.fixture(scope="module")
def weights(graph: Graph) -> dict[str, np.ndarray]:
    return random_weights(graph, seed=3, input_shape=SHAPE)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    """Each entry within `rtol` of the largest expected magnitude (gradients of a bias before a
    BatchNorm are zero up to rounding, so a per-entry relative error is meaningless)."""
    scale = max(float(np.abs(expected[name]).max()) for name in actual)
    for name, value in actual.items():
        assert np.abs(value - expected[name]).max() <= rtol * scale, name


def test_namespaces_are_entered_more_than_once(graph: Graph) -> None:
    heads = [node.name.split(".")[0] for node in graph.nodes]
    runs = [h for i, h in enumerate(heads) if i == 0 or heads[i - 1] != h]
    assert runs.count("body") == 2 and runs.count("head") == 2


def test_init_gives_the_canonical_tree() -> None:
    graph = multires.spec("resnet18")
    model = multires.build(graph, backend="flax")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 64, 64, 3)))
    expected = to_variables(init_weights(graph))
    assert jax.tree.structure(shapes) == jax.tree.structure(expected)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, expected)
    assert shapes["params"]["layer1"]["0"]["conv1"]["kernel"].shape == (3, 3, 64, 64)
    assert shapes["params"]["layer2"]["0"]["downsample"]["0"]["kernel"].shape == (1, 1, 64, 128)
    assert shapes["batch_stats"]["layer4"]["1"]["bn2"]["var"].shape == (512,)
    assert shapes["params"]["fc"]["kernel"].shape == (512, 1000)


def test_init_follows_torchvision(graph: Graph, x: np.ndarray) -> None:
    model = flax_backend.build(graph)
    variables = jax.jit(model.init)(jax.random.key(0), nhwc(x))
    kernel = np.asarray(variables["params"]["body"]["0"]["conv"]["kernel"])
    assert kernel.std() == pytest.approx(np.sqrt(2 / (8 * 9)), rel=0.3)
    fc = variables["params"]["head"]["fc"]
    bound = 1 / np.sqrt(fc["kernel"].shape[0])
    assert 0 < np.abs(fc["bias"]).max() <= bound
    assert np.all(variables["batch_stats"]["stem"]["bn"]["var"] == 1)


def test_variables_round_trip(graph: Graph, weights: dict[str, np.ndarray]) -> None:
    variables = to_variables(weights)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 4, 8)
    assert variables["params"]["body"]["0"]["conv"]["kernel"].shape == (3, 3, 2, 8)
    assert variables["params"]["head"]["fc"]["kernel"].shape == (8 * 3 * 3, 5)
    back = from_variables(jax.tree.map(jnp.asarray, variables))
    assert set(back) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_eval_and_train_match_reference(weights: dict[str, np.ndarray], x: np.ndarray, layout: str) -> None:
    graph = small_graph(outputs=("head.fc", "gap"))
    model = multires.build(graph, backend="flax", layout=layout)
    variables = flax_backend.load_variables(model, weights)
    inputs = nhwc(x) if layout == "NHWC" else x
    for train in (False, True):
        expected = reference.forward(graph, weights, x, train)
        if train:
            (logits, gap), updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
            stats = from_variables(updates)
            assert set(stats) == set(expected.running)
            for name, value in expected.running.items():
                assert reference.relative_error(stats[name], value) < 1e-5, name
        else:
            logits, gap = model.apply(variables, inputs)
        ref_gap = expected.outputs["gap"]
        assert gap.shape == (ref_gap.shape if layout == "NCHW" else nhwc(ref_gap).shape)
        assert reference.relative_error(logits, expected.outputs["head.fc"]) < 1e-5
        assert (
            reference.relative_error(gap if layout == "NCHW" else gap.transpose(0, 3, 1, 2), ref_gap) < 1e-5
        )


@pytest.mark.parametrize(("convention", "ddof"), [("unbiased", 1), ("biased", 0)])
def test_running_variance_conventions(convention: str, ddof: int) -> None:
    graph = Graph(
        "bn", Input("x", 2), [BatchNorm("bn", "x", momentum=0.3, running_variance=convention)], ("bn",)
    )
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(2, 3, 3, 2)).astype(np.float32)
    model = flax_backend.build(graph)
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.3 * x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.7 + 0.3 * x.var(axis=(0, 1, 2), ddof=ddof), rtol=1e-6)
    assert np.all(variables["batch_stats"]["bn"]["var"] == 1), "init must not update the statistics"


def same_graph() -> Graph:
    """SAME windows (stride 2, even kernel, strided and dilated, max pooling over negative input,
    average pooling with and without the pads in the divisor), zero padding before a max pool, the
    biased running variance; a global-pool head, so any image size fits."""
    nodes = [
        Pad2d("pad", "x", padding=((1, 0), (0, 1))),
        MaxPool2d("zero_pool", "pad", kernel=3, stride=2),
        Conv2d("stem.conv", "zero_pool", out_channels=8, kernel=(4, 3), stride=2, padding="same", bias=True),
        BatchNorm("stem.bn", "stem.conv", eps=1e-3, momentum=0.01, running_variance="biased"),
        MaxPool2d("stem.pool", "stem.bn", kernel=3, stride=2, padding="same"),
        Conv2d("block.conv", "stem.bn", out_channels=8, kernel=3, stride=2, dilation=2, padding="same"),
        AvgPool2d("block.avg", "stem.bn", kernel=3, stride=2, padding="same", count_include_pad=False),
        AvgPool2d("block.avg_pad", "stem.bn", kernel=(2, 3), stride=2, padding="same"),
        Add("block.sum", ("stem.pool", "block.conv", "block.avg", "block.avg_pad")),
        GlobalAvgPool("gap", "block.sum"),
        Flatten("flatten", "gap"),
        Dense("fc", "flatten", out_features=3),
    ]
    return Graph("same", Input("x", 3), nodes, ("fc",))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_same_pads_follow_each_input_size(layout: str) -> None:
    graph = same_graph()
    weights = random_weights(graph, seed=4)
    model = multires.build(graph, backend="flax", layout=layout)
    variables = flax_backend.load_variables(model, weights)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    rng = np.random.default_rng(4)
    for size in [(16, 16), (17, 13), (18, 21)]:
        x = rng.normal(-1.0, 1.0, size=(2, 3, *size)).astype(np.float32)
        inputs = nhwc(x) if layout == "NHWC" else x
        assert reference.relative_error(apply(variables, inputs), reference.run(graph, weights, x)) < 1e-5
        expected = reference.forward(graph, weights, x, training=True)
        logits, updates = apply(variables, inputs, train=True, mutable=("batch_stats",))
        assert reference.relative_error(logits, expected.outputs["fc"]) < 1e-5
        stats = from_variables(updates)
        for name, value in expected.running.items():
            assert reference.relative_error(stats[name], value) < 1e-5, (size, name)


def test_the_books_jax_stem_is_flax_linen() -> None:
    """The book's JAX stem written with flax.linen's own modules (SAME convolution and max pool,
    `nn.BatchNorm` with its defaults) takes the lowered stem's variables as they are and computes
    the same, in training mode running statistics included, at an odd size."""

    class BookStem(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            x = nn.Conv(8, kernel_size=(7, 7), strides=(2, 2), padding="same", name="conv")(x)
            x = nn.relu(nn.BatchNorm(not train, name="bn")(x))
            return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="same")

    graph = Graph(
        "stem",
        Input("x", 1),
        [
            Conv2d("conv", "x", out_channels=8, kernel=7, stride=2, padding="same", bias=True),
            BatchNorm("bn", "conv", momentum=0.01, running_variance="biased"),
            ReLU("relu", "bn"),
            MaxPool2d("pool", "relu", kernel=3, stride=2, padding="same"),
        ],
        ("pool",),
    )
    x = np.random.default_rng(8).normal(size=(4, 45, 45, 1)).astype(np.float32)
    model = flax_backend.build(graph)
    variables = flax_backend.load_variables(model, random_weights(graph, seed=8))
    book = BookStem()
    assert jax.tree.structure(book.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(book.apply(variables, x), model.apply(variables, x), rtol=1e-5, atol=1e-6)
    ours, ours_stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
    theirs, their_stats = book.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours_stats, their_stats)


def test_train_without_mutable_batch_stats_fails(
    graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray
) -> None:
    model = flax_backend.build(graph)
    variables = flax_backend.load_variables(model, weights)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(variables, nhwc(x), train=True)


def test_jit_matches_eager(graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray) -> None:
    model = flax_backend.build(graph)
    variables = flax_backend.load_variables(model, weights)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    expected = model.apply(variables, nhwc(x))
    np.testing.assert_allclose(apply(variables, nhwc(x)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(flax_backend.load_weights(model, weights)(nhwc(x)), expected)
    jitted, updates = apply(variables, nhwc(x), train=True, mutable=("batch_stats",))
    eager, eager_updates = model.apply(variables, nhwc(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, eager_updates)


def test_jax_grad_matches_reference(graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray) -> None:
    labels = np.array([0, 4, 2])
    model = flax_backend.build(graph)
    variables = flax_backend.load_variables(model, weights)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, nhwc(x), train=True, mutable=["batch_stats"])
        return flax_backend.runner.cross_entropy(logits, labels)

    grads = from_variables({"params": jax.grad(loss)(variables["params"])})
    _, expected, _ = reference.loss_and_grads(graph, weights, x, labels)
    assert set(grads) == set(expected) - {"image"}
    assert_close(grads, expected)


def test_runner_sgd_steps_match_reference(
    graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray
) -> None:
    labels = np.array([1, 0, 3])
    optimizer = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
    runner = flax_backend.make_runner(graph, weights, "NHWC", optimizer)
    assert runner.optimizer_state() == {}
    expected, state = weights, {}
    for _ in range(2):
        loss, logits = runner.train_step(nhwc(x), labels)
        ref_loss, expected, state = reference.sgd_step(graph, expected, x, labels, optimizer, state)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_close(runner.weights(), expected)
    buffers = runner.optimizer_state()
    assert set(buffers) == set(state)
    assert_close(buffers, state)


def test_runner_resumes_from_weights_and_optimizer_state(
    graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray
) -> None:
    labels = np.array([2, 2, 4])
    optimizer = SGD(lr=0.1, momentum=0.5)
    straight = flax_backend.make_runner(graph, weights, "NCHW", optimizer)
    first = flax_backend.make_runner(graph, weights, "NCHW", optimizer)
    for runner in (straight, straight, first):
        runner.train_step(x, labels)
    resumed = flax_backend.make_runner(graph, first.weights(), "NCHW", optimizer)
    resumed.set_optimizer_state(first.optimizer_state())
    resumed.train_step(x, labels)
    for name, value in straight.weights().items():
        np.testing.assert_allclose(resumed.weights()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(WeightsError, match="not a trainable parameter"):
        resumed.set_optimizer_state({"stem.bn.running_mean": np.zeros(8, np.float32)})


def test_shape_errors_are_typed(graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray) -> None:
    model = flax_backend.build(graph)
    variables = flax_backend.load_variables(model, weights)
    with pytest.raises(ShapeError, match="It looks like NCHW"):
        model.apply(variables, x)
    runner = flax_backend.make_runner(graph, weights, "NHWC", SGD())
    with pytest.raises(ShapeError, match="too small"):
        runner.forward(np.zeros((1, 2, 2, 4), np.float32))
    with pytest.raises(ShapeError, match=r"lie in \[0, 5\)"):
        runner.train_step(nhwc(x), np.array([0, 1, 5]))
    bn = Graph("bn", Input("x", 2), [BatchNorm("bn", "x")], ("bn",))
    runner = flax_backend.make_runner(bn, init_weights(bn), "NHWC", SGD())
    with pytest.raises(ShapeError, match=r"bn \(BatchNorm\): training mode needs more than one value"):
        runner.forward(np.ones((1, 1, 1, 2), np.float32), training=True)


def test_load_and_export_weights() -> None:
    graph = multires.spec("resnet18", num_classes=7)
    canonical = random_weights(graph, seed=1)
    model = multires.build(graph, backend="flax")
    variables = flax_backend.load_variables(model, canonical)
    assert set(variables) == {"params", "batch_stats"}
    bound = multires.weights.load(model, canonical)
    assert jax.tree.all(jax.tree.map(np.array_equal, bound.variables, variables))
    unbound, unbound_variables = bound.unbind()
    assert unbound == model and unbound_variables is not None
    exported = multires.weights.export(bound)
    assert all(np.array_equal(exported[name], value) for name, value in canonical.items())
    assert sorted(flax_backend.export_weights(variables)) == sorted(exported)
    with pytest.raises(WeightsError, match="unbound"):
        flax_backend.export_weights(model)
    with pytest.raises(WeightsError, match="missing fc.bias"):
        flax_backend.load_variables(model, {k: v for k, v in canonical.items() if k != "fc.bias"})


def test_several_inputs_and_outputs() -> None:
    graph = Graph(
        "two",
        (Input("a", 2), Input("b", 2)),
        [
            Add("sum", ("a", "b")),
            Conv2d("conv", "sum", out_channels=3, kernel=1),
            GlobalAvgPool("pool", "conv"),
        ],
        ("conv", "pool"),
    )
    weights = random_weights(graph, seed=0)
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(2, 2, 5, 4)).astype(np.float32) for _ in range(2))
    model = flax_backend.build(graph, "NCHW")
    conv, pool = model.apply(flax_backend.load_variables(model, weights), a, b)
    expected = reference.run(graph, weights, {"a": a, "b": b})
    assert reference.relative_error(conv, expected["conv"]) < 1e-6
    assert reference.relative_error(pool, expected["pool"]) < 1e-6
    with pytest.raises(ShapeError, match="expects 2 input"):
        model.apply(flax_backend.load_variables(model, weights), a)
    with pytest.raises(ShapeError, match="cannot add"):
        model.apply(flax_backend.load_variables(model, weights), a, b[:, :, :4])


def test_devices_by_name(graph: Graph, weights: dict[str, np.ndarray]) -> None:
    assert "cpu:0" in flax_backend.available_devices() == multires.available_devices("flax")
    for name in (None, "cpu", "CPU:0"):
        runner = flax_backend.make_runner(graph, weights, "NHWC", SGD(), Execution(device=name))
        assert {leaf.devices().pop() for leaf in jax.tree.leaves(runner.variables)} == {jax.devices("cpu")[0]}
        assert runner.is_main and runner.execution.device == name


@pytest.mark.parametrize("device", ["gpu", "cuda:1", "tpu", "cpu:7", "cpu:x"])
def test_unknown_devices_list_the_available_ones(
    graph: Graph, weights: dict[str, np.ndarray], device: str
) -> None:
    if device in ("gpu", "tpu") and any(name.startswith(device) for name in flax_backend.available_devices()):
        pytest.skip(f"this machine has a {device}")
    with pytest.raises(DeviceError, match=rf"no device '{re.escape(device)}'; available: .*cpu:0"):
        multires.make_runner(graph, weights, "flax", device=device)


def test_too_many_devices_says_how_to_expose_more(graph: Graph, weights: dict[str, np.ndarray]) -> None:
    n = jax.device_count() + 1
    with pytest.raises(
        DeviceError, match=rf"devices={n} but only {n - 1} .*{CPU_DEVICES_ENV}={n} before the first JAX"
    ):
        multires.make_runner(graph, weights, "flax", devices=n)


def test_cpu_device_count_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad count is a typed error; once JAX has started, its count stands (the runner reports a
    shortfall). The count taking effect is `test_data_parallel_on_two_cpu_devices`'s."""
    before = jax.device_count()
    for bad in ("two", "0"):
        monkeypatch.setenv(CPU_DEVICES_ENV, bad)
        with pytest.raises(DeviceError, match=f"{CPU_DEVICES_ENV} must be a positive number"):
            flax_backend.expose_cpu_devices()
    monkeypatch.setenv(CPU_DEVICES_ENV, str(before + 3))
    flax_backend.expose_cpu_devices()
    assert jax.device_count() == before


def test_device_totals_match_train_step(graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray) -> None:
    optimizer = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
    stepped, direct = (flax_backend.make_runner(graph, weights, "NHWC", optimizer) for _ in range(2))
    # Labels the first step predicts, so the correct count is not trivially zero.
    labels = (
        flax_backend.make_runner(graph, weights, "NHWC", optimizer).forward(nhwc(x), training=True).argmax(1)
    )
    batches = [(nhwc(x), labels), (nhwc(x)[::-1], np.array([4, 0, 2]))]
    for batch in batches:
        stepped.step(stepped.prepare(*batch))
    results = [direct.train_step(*batch) for batch in batches]
    loss, correct, examples = stepped.take_totals()
    assert examples == 6 and stepped.take_totals() == (0.0, 0, 0)
    assert loss == pytest.approx(sum(step_loss * 3 for step_loss, _ in results), rel=1e-6)
    assert (
        correct
        == sum(
            int((logits.argmax(1) == y).sum()) for (_, logits), (_, y) in zip(results, batches, strict=True)
        )
        >= 3
    )
    assert_close(stepped.weights(), direct.weights(), 1e-6)
    assert_close(stepped.optimizer_state(), direct.optimizer_state(), 1e-6)
    with pytest.raises(ShapeError, match=r"lie in \[0, 5\)"):
        stepped.prepare(nhwc(x), np.array([0, 1, 5]))
    with pytest.raises(TypeError, match="prepare"):
        stepped.step((nhwc(x), labels))


MIXED_TOLERANCES = {
    # precision: relative tolerances of the loss, logits, weights, running statistics and update
    "bf16": (2e-3, 2e-2, 3e-2, 4e-3, 0.4),
    "fp16": (2e-4, 3e-3, 5e-3, 1e-3, 0.1),
}
"""One SGD step of the small d2l ResNet (batch 8, 16x16) against the float64 reference, about 3x
what was measured: bf16 5.3e-4, 5.2e-3, 8.0e-3, 9.3e-4, 0.15; fp16 (loss scale 2**10) 4.3e-5,
6.8e-4, 1.3e-3, 1.7e-4, 0.023. Errors are relative to the largest expected value of any tensor;
the update's worst is the stem convolution's, whose weight gradient sums many rounded products
that nearly cancel (torch.autocast's bf16 gradient there is off by 0.28 on d2l_resnet18)."""


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_matches_the_reference(precision: str) -> None:
    graph = multires.spec("d2l_resnet", arch=((1, 64), (1, 128)))
    weights = random_weights(graph, seed=0, input_shape=(8, 1, 16, 16))
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(8, 16, 16, 1)).astype(np.float32), rng.integers(0, 10, 8)
    optimizer = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
    expected = reference.ReferenceRunner(graph, weights, "NHWC", optimizer)
    runner = multires.make_runner(graph, weights, "flax", "NHWC", optimizer, precision=precision)
    if precision == "fp16":
        runner.loss_scale = 2.0**10  # 2**16, the default, overflows on this step (see the next test)
    loss_tol, logits_tol, weights_tol, stats_tol, update_tol = MIXED_TOLERANCES[precision]
    eval_logits = runner.forward(x)
    assert (
        1e-5 < reference.relative_error(eval_logits, expected.forward(x)) < logits_tol
    )  # computed in 16 bits
    loss, logits = runner.train_step(x, labels)
    ref_loss, ref_logits = expected.train_step(x, labels)
    assert loss == pytest.approx(ref_loss, rel=loss_tol)
    assert reference.relative_error(logits, ref_logits) < logits_tol
    got, want = runner.weights(), expected.weights()
    assert {value.dtype for value in got.values()} == {np.dtype(np.float32)}
    assert jax.tree.all(jax.tree.map(lambda leaf: leaf.dtype == jnp.float32, runner.variables))
    stats = [name for name in want if name.endswith(("running_mean", "running_var"))]
    params = [name for name in want if name not in stats]
    assert_close({n: got[n] for n in params}, {n: want[n] for n in params}, weights_tol)
    assert_close({n: got[n] for n in stats}, {n: want[n] for n in stats}, stats_tol)
    assert_close(
        {n: got[n] - weights[n] for n in params}, {n: want[n] - weights[n] for n in params}, update_tol
    )


def test_fp16_loss_scaling_skips_overflowing_steps(
    graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray
) -> None:
    labels = np.array([1, 0, 3])
    runner = flax_backend.make_runner(
        graph, weights, "NHWC", SGD(lr=0.1, momentum=0.9), Execution(precision="fp16")
    )
    assert runner.loss_scale == 2.0**16
    runner.loss_scale = 2.0**40  # float16 gradients overflow
    runner.train_step(nhwc(x), labels)
    after = runner.weights()
    assert runner.loss_scale == 2.0**39
    assert all(np.array_equal(after[name], weights[name]) for name in weights if "running" not in name)
    assert not np.array_equal(after["stem.bn.running_mean"], weights["stem.bn.running_mean"])  # as torch's
    runner.loss_scale = 2.0**8
    runner.train_step(nhwc(x), labels)
    assert runner.loss_scale == 2.0**8 and not np.array_equal(
        runner.weights()["head.fc.weight"], weights["head.fc.weight"]
    )
    with pytest.raises(DeviceError, match="loss scaling is for precision 'fp16'"):
        flax_backend.make_runner(graph, weights, "NHWC", SGD(), Execution(precision="bf16")).loss_scale = 2.0
    assert flax_backend.make_runner(graph, weights, "NHWC", SGD()).loss_scale is None


def test_data_parallel_on_two_cpu_devices() -> None:
    """`test_flax_parallel.py` in a process started with two XLA host devices, where none of its
    tests may skip."""
    if jax.device_count() >= 2:
        pytest.skip("this process has several devices: pytest runs test_flax_parallel.py itself")
    environment = {**os.environ, CPU_DEVICES_ENV: "2"}
    command = [sys.executable, "-m", "pytest", str(Path(__file__).with_name("test_flax_parallel.py"))]
    done = subprocess.run(
        [*command, "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and re.fullmatch(r"\d+ passed in .*", summary), (
        done.stdout[-8000:] + done.stderr[-2000:]
    )


def test_initialize_distributed_errors_are_typed() -> None:
    jax.devices()  # JAX has started in this process
    with pytest.raises(DeviceError, match=r"process_id must be in \[0, 2\)"):
        flax_backend.initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(DeviceError, match="num_processes must be a positive int"):
        flax_backend.initialize_distributed("localhost:1234", 0, 0)
    with pytest.raises(DeviceError, match="before any other JAX use"):
        flax_backend.initialize_distributed("localhost:1234", 2, 0)


CONV_CASES = [
    # kernel, stride, padding, channels in, input size: every branch of `matmul_pays`
    ((1, 1), (1, 1), ((0, 0), (0, 0)), 8, (5, 7), "1x1"),
    ((1, 1), (2, 2), ((0, 0), (0, 0)), 8, (5, 7), "strided 1x1"),
    ((3, 3), (2, 2), ((1, 0), (0, 1)), 16, (5, 7), "strided 3x3, asymmetric pads"),
    ((3, 3), (2, 2), "SAME", 16, (5, 7), "strided 3x3, SAME at an odd size"),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 4, (3, 2), "3x3 on a small map"),
    ((2, 3), (1, 2), ((0, 1), (2, 0)), 20, (5, 7), "2x3 window, mixed strides"),
]


@pytest.mark.parametrize(
    "kernel, stride, padding, channels, size, what", CONV_CASES, ids=[c[-1] for c in CONV_CASES]
)
def test_conv_as_matmul_equals_xla_convolution(kernel, stride, padding, channels, size, what):
    """The matmul path computes the same convolution as XLA's, forward and both gradients, and
    takes it where `matmul_pays` says so."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, *size, channels), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((*kernel, channels, 6), dtype=np.float32))
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=numbers)

    def matmul(x, w):
        return flax_backend.conv_as_matmul(x, w, stride, padding, dimension_numbers=numbers)

    expected, got = xla(x, w), matmul(x, w)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    for grad_xla, grad_matmul in zip(
        jax.grad(lambda x, w: (xla(x, w) ** 2).sum(), argnums=(0, 1))(x, w),
        jax.grad(lambda x, w: (matmul(x, w) ** 2).sum(), argnums=(0, 1))(x, w),
        strict=True,
    ):
        np.testing.assert_allclose(
            grad_matmul, grad_xla, rtol=1e-5, atol=1e-5 * float(jnp.abs(grad_xla).max())
        )
    assert flax_backend.matmul_pays(kernel, stride, channels, expected.shape[1:3])
    program = str(jax.make_jaxpr(matmul)(x, w))
    assert "dot_general" in program and "conv_general_dilated" not in program


def test_conv_as_matmul_keeps_xla_convolution_where_it_is_faster():
    """A 3x3 stride-1 convolution on a map larger than 3 x 3, a grouped and a dilated one stay
    XLA's; the model built either way computes the same function with the same variables."""
    assert not flax_backend.matmul_pays((3, 3), (1, 1), 64, (4, 4))
    assert not flax_backend.matmul_pays((7, 7), (2, 2), 1, (48, 48))
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 2, 4))
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    grouped = jax.make_jaxpr(
        lambda x, w: flax_backend.conv_as_matmul(
            x, w, (1, 1), "SAME", dimension_numbers=numbers, feature_group_count=2
        )
    )(x, w)
    assert "conv_general_dilated" in str(grouped)
    dilated = jax.make_jaxpr(
        lambda x, w: flax_backend.conv_as_matmul(
            x, w[:, :, :1], (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=numbers
        )
    )(x[..., :1], w)
    assert "conv_general_dilated" in str(dilated)

    graph = small_graph()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    variables = to_variables(random_weights(graph, seed=1, input_shape=SHAPE), graph)
    outputs = [
        flax_backend.build(graph, "NCHW", conv_as_matmul=flag).apply(variables, x) for flag in (False, True)
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
