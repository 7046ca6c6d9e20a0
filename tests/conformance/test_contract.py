"""The backend-module contract (multires.backend): the lowering table, exact canonical weight
round trips with full mismatch reports, input checks naming the expected shape, and Runner
state for checkpoints."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

import multires
from multires.backend import LoweringTable
from multires.graph import NODE_TYPES
from multires.shapes import LAYOUTS

from .cases import DEEP, MODELS, NODES, SPATIAL
from .helpers import Case

BN_CASE = next(case for case in NODES if case.id == "batchnorm_eps_momentum")


def _expected_shape(case: Case, layout: str) -> str:
    channels = case.graph.inputs[0].channels
    return f"(N, {channels}, H, W)" if layout == "NCHW" else f"(N, H, W, {channels})"


def test_the_module_declares_the_contract(backend: str, backend_module: ModuleType) -> None:
    assert backend == backend_module.NAME
    assert backend_module.LAYOUTS and set(backend_module.LAYOUTS) <= set(LAYOUTS)
    assert backend_module.FRAMEWORK_MODULES
    for function in ("build", "export_weights", "load_weights", "make_runner"):
        assert callable(getattr(backend_module, function)), function


def test_lowerings_cover_every_node_type(backend_module: ModuleType) -> None:
    lowerings = backend_module.LOWERINGS
    assert isinstance(lowerings, LoweringTable), "LOWERINGS must be a multires.backend.LoweringTable"
    missing = sorted(cls.__name__ for cls in NODE_TYPES.values() if cls not in lowerings)
    assert not missing, f"no lowering for {missing}"
    extra = sorted(str(key) for key in lowerings if key not in NODE_TYPES.values())
    assert not extra, f"lowerings for unknown node types {extra}"
    assert all(callable(function) for function in lowerings.values())


@pytest.mark.parametrize("case", [*NODES, SPATIAL, *MODELS, *DEEP], ids=lambda case: case.id)
def test_weights_round_trip_exactly(backend_module: ModuleType, layout: str, case: Case) -> None:
    weights = case.make_weights()
    model = backend_module.load_weights(backend_module.build(case.graph, layout), weights)
    exported = backend_module.export_weights(model)
    assert sorted(exported) == sorted(weights)
    for name, value in weights.items():
        assert exported[name].dtype == np.float32, name
        assert np.array_equal(exported[name], value), name


def test_core_build_and_weight_functions_dispatch_to_the_backend(backend: str, layout: str) -> None:
    case = BN_CASE
    weights = case.make_weights()
    model = multires.build(case.graph, backend=backend, layout=layout, weights=weights)
    exported = multires.weights.export(model)
    assert sorted(exported) == sorted(weights)
    assert all(np.array_equal(exported[k], v) for k, v in weights.items())
    other = multires.random_weights(case.graph, seed=99, input_shape=case.input_shape)
    reloaded = multires.weights.export(multires.weights.load(model, other))
    assert all(np.array_equal(reloaded[k], v) for k, v in other.items())


def test_load_weights_reports_every_mismatch_at_once(backend_module: ModuleType) -> None:
    case = BN_CASE
    weights = case.make_weights()
    del weights["bn.running_var"]
    weights["conv.weight"] = np.zeros((4, 3, 1, 3), np.float32)
    weights["ghost.weight"] = np.zeros((2,), np.float32)
    model = backend_module.build(case.graph, backend_module.LAYOUTS[0])
    with pytest.raises(multires.WeightsError) as info:
        backend_module.load_weights(model, weights)
    message = str(info.value)
    for name in ("bn.running_var", "conv.weight", "ghost.weight"):
        assert name in message, f"{name} not reported in: {message}"


@pytest.mark.parametrize("case", [BN_CASE, SPATIAL, MODELS[0]], ids=lambda case: case.id)
def test_wrong_input_shapes_raise_shape_errors_naming_the_expected_shape(
    backend: str, layout: str, case: Case
) -> None:
    runner = multires.make_runner(case.graph, case.make_weights(), backend, layout)
    x = case.x_in(layout)
    expected = _expected_shape(case, layout)
    swapped = case.x_in("NHWC" if layout == "NCHW" else "NCHW")
    wrong_channels = np.concatenate([x, x], axis=1 if layout == "NCHW" else 3)
    for bad in (swapped, wrong_channels, x[0], x[..., None]):
        with pytest.raises(multires.ShapeError) as info:
            runner.forward(bad)
        assert expected in str(info.value), str(info.value)
    with pytest.raises(multires.ShapeError, match="NHWC" if layout == "NCHW" else "NCHW"):
        runner.forward(swapped)


def test_an_input_too_small_for_the_graph_raises_a_shape_error(backend: str, layout: str) -> None:
    case = next(case for case in NODES if case.id == "dense_without_bias")  # an unpadded 3x3 conv
    runner = multires.make_runner(case.graph, case.make_weights(), backend, layout)
    tiny = np.zeros((1, 3, 2, 2) if layout == "NCHW" else (1, 2, 2, 3), np.float32)
    with pytest.raises(multires.ShapeError, match="too small"):
        runner.forward(tiny)


def test_runner_weights_and_optimizer_state_resume_exactly(trainable: str, layout: str) -> None:
    """Two steps with momentum and weight decay equal one step, a checkpoint (weights and
    optimizer state) restored into a fresh runner, and another step."""
    case = BN_CASE
    weights = case.make_weights()
    optimizer = multires.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, labels = case.x_in(layout), case.labels

    straight = multires.make_runner(case.graph, weights, trainable, layout, optimizer)
    assert all(np.array_equal(straight.weights()[k], v) for k, v in weights.items())
    assert straight.optimizer_state() == {}
    straight.train_step(x, labels)
    straight.train_step(x[::-1], labels[::-1])

    first = multires.make_runner(case.graph, weights, trainable, layout, optimizer)
    first.train_step(x, labels)
    saved_weights, saved_state = first.weights(), first.optimizer_state()
    trainable_names = {k for k in weights if not multires.weights.is_buffer(k)}
    assert set(saved_state) == trainable_names

    resumed = multires.make_runner(
        case.graph,
        multires.init_weights(case.graph, input_shape=case.input_shape),
        trainable,
        layout,
        optimizer,
    )
    resumed.set_weights(saved_weights)
    resumed.set_optimizer_state(saved_state)
    resumed.train_step(x[::-1], labels[::-1])
    expected, got = straight.weights(), resumed.weights()
    for name, value in expected.items():
        error = multires.reference.relative_error(got[name], value)
        assert error <= 1e-6, f"{name}: resumed run differs by {error:.2e}"


def _pooled_bn_graph() -> multires.Graph:
    """Conv 1x1, BatchNorm, global pool, Dense: runs at any image size, 1x1 included."""
    return multires.Graph(
        "pooled_bn",
        multires.Input("x", 3),
        (
            multires.Conv2d("conv", "x", out_channels=4, kernel=1),
            multires.BatchNorm("bn", "conv"),
            multires.GlobalAvgPool("gap", "bn"),
            multires.Flatten("flatten", "gap"),
            multires.Dense("fc", "flatten", out_features=5),
        ),
        "fc",
    )


def test_training_with_one_value_per_channel_raises_a_shape_error(trainable: str, layout: str) -> None:
    """A batch variance needs two values per channel: training mode on a single 1x1 image is a
    ShapeError naming the BatchNorm (PyTorch's own check raises a bare ValueError); eval mode runs."""
    graph = _pooled_bn_graph()
    runner = multires.make_runner(graph, multires.random_weights(graph, seed=1), trainable, layout)
    one = np.ones((1, 3, 1, 1) if layout == "NCHW" else (1, 1, 1, 3), np.float32)
    assert runner.forward(one).shape == (1, 5)
    for call in (lambda: runner.forward(one, training=True), lambda: runner.train_step(one, np.array([0]))):
        with pytest.raises(multires.ShapeError, match=r"bn \(BatchNorm\).*one value per channel"):
            call()


def test_inputs_of_any_real_dtype_run_and_others_raise_shape_errors(backend: str, layout: str) -> None:
    """Integer and float64 batches run as float32 (the same output); complex, boolean, string and
    object arrays are a ShapeError naming the dtype, never a framework's own error or a silent
    cast (NumPy drops imaginary parts with only a warning). NaN and inf are not bad inputs: they
    propagate as IEEE arithmetic says, as in every framework."""
    case = BN_CASE
    runner = multires.make_runner(case.graph, case.make_weights(), backend, layout)
    x = case.x_in(layout)
    expected = runner.forward(x)
    assert np.array_equal(runner.forward(x.astype(np.float64)), expected)
    rounded = np.round(x * 4)
    assert np.array_equal(
        runner.forward(rounded.astype(np.int32)), runner.forward(rounded.astype(np.float32))
    )
    for bad in (x.astype(np.complex64), x > 0, x.astype(str), x.astype(object)):
        with pytest.raises(multires.ShapeError, match=str(bad.dtype)):
            runner.forward(bad)


def test_labels_that_do_not_fit_raise_shape_errors(trainable: str, layout: str) -> None:
    case = BN_CASE
    runner = multires.make_runner(case.graph, case.make_weights(), trainable, layout)
    x, labels = case.x_in(layout), case.labels
    for bad in (labels[:-1], labels.astype(np.float32), labels + 5, labels - 5, labels[:, None]):
        with pytest.raises(multires.ShapeError, match="labels"):
            runner.train_step(x, bad)


def test_weights_and_optimizer_state_that_do_not_match_raise_weights_errors(
    backend: str, layout: str
) -> None:
    """A missing, misshapen, complex or unexpected weight is a WeightsError naming it, from
    `make_runner` and `set_weights` alike; so is optimizer state of the wrong names or shapes."""
    case = BN_CASE
    good = case.make_weights()
    problems = {
        "bn.running_var": {k: v for k, v in good.items() if k != "bn.running_var"},
        "conv.weight": {**good, "conv.weight": good["conv.weight"][:, :2]},
        "bn.weight": {**good, "bn.weight": good["bn.weight"].astype(np.complex64)},
        "ghost.weight": {**good, "ghost.weight": np.zeros(2, np.float32)},
    }
    runner = multires.make_runner(case.graph, good, backend, layout)
    for name, bad in problems.items():
        with pytest.raises(multires.WeightsError, match=name.replace(".", r"\.")):
            multires.make_runner(case.graph, bad, backend, layout)
        with pytest.raises(multires.WeightsError, match=name.replace(".", r"\.")):
            runner.set_weights(bad)
    if not getattr(multires.get_backend(backend), "TRAINING", True):
        return
    state = {k: np.zeros_like(v) for k, v in good.items() if not multires.weights.is_buffer(k)}
    with pytest.raises(multires.WeightsError, match=r"conv\.weight"):
        runner.set_optimizer_state({**state, "conv.weight": np.zeros((1, 1), np.float32)})
    with pytest.raises(multires.WeightsError, match=r"ghost\.weight"):
        runner.set_optimizer_state({**state, "ghost.weight": np.zeros(2, np.float32)})
