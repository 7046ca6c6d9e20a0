"""The backend registry: lookup errors, missing frameworks, aliases, layouts, third-party backends.

The registry is replaced by fake entry points, so these tests do not depend on which backends
this environment has installed.
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

import multires
from multires import (
    SGD,
    BackendNotFoundError,
    BackendUnavailableError,
    Dense,
    DeviceError,
    Flatten,
    GlobalAvgPool,
    Graph,
    Input,
    ReLU,
    ShapeError,
    SpecError,
    WeightsError,
)
from multires import backend as registry
from multires.backend import LoweringTable
from multires.weights import save, weight_shapes

GROUP = registry.ENTRY_POINT_GROUP
MISSING = "nonexistent_framework_xyz_backend"


@pytest.fixture
def entries(monkeypatch: pytest.MonkeyPatch) -> dict[str, EntryPoint]:
    """A registry that lists exactly the entry points a test puts in this dict."""
    points: dict[str, EntryPoint] = {}
    monkeypatch.setattr(registry, "_registered", lambda: dict(points))
    registry._load.cache_clear()
    yield points
    registry._load.cache_clear()


def register(points: dict[str, EntryPoint], name: str, module: str) -> None:
    points[name] = EntryPoint(name=name, value=module, group=GROUP)


def tiny_graph() -> Graph:
    return Graph(
        "tiny",
        (Input("x", 2),),
        (
            ReLU("relu", "x"),
            GlobalAvgPool("pool", "relu"),
            Flatten("flatten", "pool"),
            Dense("fc", "flatten", out_features=3),
        ),
        ("fc",),
    )


# A third-party backend: "fakeflow", computing with NumPy through a lowering table. ----------------


class FakeModel:
    """The native model of the fake framework: a graph, a layout and float32 parameters."""

    __module__ = "fakeflow.models"

    def __init__(self, graph: Graph, layout: str) -> None:
        self.graph, self.layout = graph, layout
        self.params = {name: np.zeros(shape, np.float32) for name, shape in weight_shapes(graph).items()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        values = {self.graph.inputs[0].name: x if self.layout == "NCHW" else x.transpose(0, 3, 1, 2)}
        for node in self.graph.nodes:
            values[node.name] = LOWERINGS[type(node)](node, self.params, *(values[s] for s in node.inputs))
        return values[self.graph.outputs[0]]


LOWERINGS = LoweringTable("fakeflow")
LOWERINGS.register(ReLU)(lambda node, params, x: np.maximum(x, 0))
LOWERINGS.register(GlobalAvgPool)(lambda node, params, x: x.mean(axis=(2, 3), keepdims=True))
LOWERINGS.register(Flatten)(lambda node, params, x: x.reshape(len(x), -1))
LOWERINGS.register(Dense)(
    lambda node, params, x: x @ params[f"{node.name}.weight"].T + params[f"{node.name}.bias"]
)


class FakeRunner:
    """Drives a FakeModel with NumPy arrays (inference only: enough for the registry's contract)."""

    def __init__(self, model: FakeModel, optimizer: SGD) -> None:
        self.model, self.optimizer, self.layout = model, optimizer, model.layout

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return self.model(x)

    def weights(self) -> dict[str, np.ndarray]:
        return export_weights(self.model)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        load_weights(self.model, weights)


def export_weights(model: FakeModel) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in model.params.items()}


def load_weights(model: FakeModel, weights: dict[str, np.ndarray]) -> FakeModel:
    model.params = {name: np.array(weights[name], np.float32) for name in model.params}
    return model


def make_runner(graph: Graph, weights: dict, layout: str, optimizer: SGD) -> FakeRunner:
    return FakeRunner(load_weights(FakeModel(graph, layout), weights), optimizer)


def fake_backend_module() -> types.ModuleType:
    module = types.ModuleType("fakeflow_multires_backend")
    module.NAME = "fakeflow"
    module.LAYOUTS = ("NCHW", "NHWC")
    module.FRAMEWORK_MODULES = ("fakeflow",)
    module.LOWERINGS = LOWERINGS
    module.build = FakeModel
    module.export_weights = export_weights
    module.load_weights = load_weights
    module.make_runner = make_runner
    return module


@pytest.fixture
def fakeflow(entries: dict[str, EntryPoint], monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = fake_backend_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    register(entries, "fakeflow", module.__name__)
    return module


def expected_logits(weights: dict[str, np.ndarray], x_nchw: np.ndarray) -> np.ndarray:
    features = np.maximum(x_nchw, 0).mean(axis=(2, 3))
    return features @ weights["fc.weight"].T + weights["fc.bias"]


def test_third_party_backend_end_to_end(fakeflow: types.ModuleType, tmp_path: Path) -> None:
    graph = tiny_graph()
    weights = multires.init_weights(graph, 0)
    x = np.random.default_rng(0).normal(size=(4, 2, 5, 3)).astype(np.float32)

    assert multires.backends() == ["fakeflow"]
    assert multires.available_backends() == ["fakeflow"]
    assert multires.get_backend("FakeFlow") is fakeflow

    model = multires.build(
        graph, backend="fakeflow", weights={k: v.astype(np.float64) for k, v in weights.items()}
    )
    assert isinstance(model, FakeModel)
    assert model.layout == "NCHW"
    np.testing.assert_allclose(model(x), expected_logits(weights, x), rtol=1e-6)

    nhwc = multires.build(
        graph, backend="fakeflow", layout="nhwc", weights=save(weights, tmp_path / "w.safetensors")
    )
    assert nhwc.layout == "NHWC"
    np.testing.assert_allclose(nhwc(x.transpose(0, 2, 3, 1)), expected_logits(weights, x), rtol=1e-6)

    exported = multires.weights.export(nhwc)
    assert list(exported) == list(weights)
    for name in weights:
        np.testing.assert_array_equal(exported[name], weights[name])

    other = multires.init_weights(graph, 1)
    assert multires.weights.load(model, save(other, tmp_path / "other.npz")) is model
    np.testing.assert_allclose(model(x), expected_logits(other, x), rtol=1e-6)

    runner = multires.make_runner(graph, weights, "fakeflow", layout="NHWC")
    assert runner.layout == "NHWC"
    assert runner.optimizer == SGD()
    np.testing.assert_allclose(
        runner.forward(x.transpose(0, 2, 3, 1)), expected_logits(weights, x), rtol=1e-6
    )
    runner = multires.make_runner(graph, weights, "fakeflow", optimizer=SGD(lr=0.01, momentum=0.9))
    assert (runner.layout, runner.optimizer.momentum) == ("NCHW", 0.9)


def test_every_node_type_of_the_tiny_graph_has_a_lowering(fakeflow: types.ModuleType) -> None:
    assert {type(n) for n in tiny_graph().nodes} <= set(fakeflow.LOWERINGS)


def test_build_checks_weights_and_layout(fakeflow: types.ModuleType) -> None:
    graph = tiny_graph()
    weights = multires.init_weights(graph, 0)
    del weights["fc.bias"]
    with pytest.raises(WeightsError, match="missing fc.bias"):
        multires.build(graph, backend="fakeflow", weights=weights)
    with pytest.raises(WeightsError, match="missing fc.bias"):
        multires.make_runner(graph, weights, "fakeflow")
    with pytest.raises(ShapeError, match="unknown layout 'NWHC'"):
        multires.build(graph, backend="fakeflow", layout="NWHC")
    with pytest.raises(TypeError, match="zoo names"):
        multires.build(graph, backend="fakeflow", num_classes=3)


def test_backend_of_unknown_model(fakeflow: types.ModuleType) -> None:
    with pytest.raises(BackendNotFoundError, match="no installed multires backend handles builtins.dict"):
        multires.weights.export({})


# Lookup errors --------------------------------------------------------------------------------


@pytest.fixture
def four(entries: dict[str, EntryPoint]) -> dict[str, EntryPoint]:
    for name in ("torch", "tf", "flax", "mxnet"):
        register(entries, name, f"{MISSING}_{name}")
    return entries


@pytest.mark.parametrize(
    ("name", "guess"),
    [
        ("torhc", "torch"),
        ("Torchh", "torch"),
        ("kears", "tf"),
        ("tensorflw", "tf"),
        ("flx", "flax"),
        ("mxnt", "mxnet"),
    ],
)
def test_unknown_backend_lists_known_ones_and_guesses(four, name: str, guess: str) -> None:
    with pytest.raises(BackendNotFoundError) as info:
        multires.get_backend(name)
    assert str(info.value) == (
        f"unknown backend {name!r}; registered: flax, mxnet, tf, torch. Did you mean {guess!r}?"
    )
    assert isinstance(info.value, LookupError)


def test_unknown_backend_without_a_close_match(four) -> None:
    with pytest.raises(BackendNotFoundError, match=r"registered: flax, mxnet, tf, torch\.$"):
        multires.build(tiny_graph(), backend="caffe")


def test_unknown_backend_with_nothing_registered(entries) -> None:
    with pytest.raises(BackendNotFoundError, match="registered: none"):
        multires.get_backend("torch")
    assert multires.backends() == []
    assert multires.available_backends() == []


def test_registered_backend_with_missing_framework(entries) -> None:
    register(entries, "fake", MISSING)
    assert multires.backends() == ["fake"]
    assert multires.available_backends() == []
    with pytest.raises(BackendUnavailableError) as info:
        multires.get_backend("fake")
    message = str(info.value)
    assert f"{MISSING!r} is missing" in message
    assert message.endswith("pip install 'multires[fake]'")
    assert isinstance(info.value, ImportError)
    with pytest.raises(BackendUnavailableError, match=r"multires\[fake\]"):
        multires.build(tiny_graph(), backend="fake")


def test_missing_known_framework_names_it(four) -> None:
    with pytest.raises(
        BackendUnavailableError, match=r"needs TensorFlow/Keras.*pip install 'multires\[tf\]'"
    ):
        multires.get_backend("tf")


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("keras", "tf"),
        ("Keras", "tf"),
        ("tensorflow", "tf"),
        ("pytorch", "torch"),
        ("jax", "flax"),
        ("gluon", "mxnet"),
    ],
)
def test_aliases(four, alias: str, key: str) -> None:
    assert registry.canonical_name(alias) == key
    with pytest.raises(BackendUnavailableError, match=rf"pip install 'multires\[{key}\]'"):
        multires.get_backend(alias)


def test_alias_of_an_unregistered_backend_is_unknown(entries) -> None:
    register(entries, "torch", MISSING)
    with pytest.raises(BackendNotFoundError, match="unknown backend 'keras'; registered: torch"):
        multires.get_backend("keras")


def test_alias_reaches_an_installed_backend(fakeflow, entries) -> None:
    entries["tf"] = EntryPoint(name="tf", value=fakeflow.__name__, group=GROUP)
    assert multires.get_backend("keras") is fakeflow


# Layouts --------------------------------------------------------------------------------------


def test_resolve_layout() -> None:
    nchw_only = types.SimpleNamespace(
        NAME="mx", LAYOUTS=("NCHW",), LAYOUT_HINT=" Transpose the input instead."
    )
    both = types.SimpleNamespace(NAME="tf", LAYOUTS=("NHWC", "NCHW"))
    assert registry.resolve_layout(nchw_only, None) == "NCHW"
    assert registry.resolve_layout(both, None) == "NHWC"
    assert registry.resolve_layout(both, "nchw") == "NCHW"
    with pytest.raises(ShapeError) as info:
        registry.resolve_layout(nchw_only, "NHWC")
    assert (
        str(info.value) == "backend 'mx' supports layouts ['NCHW'], not 'NHWC'. Transpose the input instead."
    )
    with pytest.raises(ShapeError, match=r"unknown layout 'HWC'; use one of \('NCHW', 'NHWC'\)"):
        registry.resolve_layout(both, "HWC")


def test_a_lowering_table_takes_one_lowering_per_node_type() -> None:
    table = LoweringTable("fakeflow")
    relu = table.register(ReLU)(lambda node: "relu")
    assert table[ReLU] is relu
    with pytest.raises(ValueError, match="ReLU already has a fakeflow lowering"):
        table.register(ReLU)(lambda node: "again")
    with pytest.raises(
        SpecError, match=r"backend 'fakeflow' has no lowering for node type Dense; it lowers \['ReLU'\]"
    ):
        table[Dense]


def test_a_backend_without_execution_runs_only_the_default_placement(fakeflow: types.ModuleType) -> None:
    """A backend written before devices existed (a 4-argument make_runner) keeps working, and a
    device, device count or precision it cannot take is a DeviceError naming it."""
    graph = tiny_graph()
    weights = multires.init_weights(graph, 0)
    assert multires.make_runner(graph, weights, "fakeflow").layout == "NCHW"
    for setting in ({"device": "cuda"}, {"devices": 2}, {"precision": "bf16"}):
        with pytest.raises(DeviceError, match="backend 'fakeflow' takes no device, devices or precision"):
            multires.make_runner(graph, weights, "fakeflow", **setting)
