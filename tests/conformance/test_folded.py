"""Graphs after `multires.passes.fold_batchnorm` run in the backend as the original runs in the
reference (eval mode): the folded convolutions gain biases, some BatchNorms stay (a conv that
also feeds a shortcut, a BatchNorm after an Add), and `multires.build(..., inference=True)` loads
exactly the folded weights."""

from __future__ import annotations

from functools import partial
from types import ModuleType

import numpy as np
import pytest

import multires
from multires import Add, BatchNorm, Conv2d, Dense, Flatten, Graph, Input, ReLU
from multires.passes import fold_batchnorm

from .helpers import Case, Oracle, assert_output


def _shared_shortcut() -> Graph:
    """A grouped conv without bias and a SAME stride-2 conv with bias fold; the 1x1 conv that
    also feeds the sum keeps its BatchNorm, as does the one after the Add."""
    nodes = (
        Conv2d("stem", "x", out_channels=6, kernel=3, stride=2, padding="same", bias=True),
        BatchNorm("stem_bn", "stem", eps=1e-3),
        ReLU("stem_relu", "stem_bn"),
        Conv2d("grouped", "stem_relu", out_channels=6, kernel=3, padding=1, groups=3),
        BatchNorm("grouped_bn", "grouped"),
        Conv2d("shared", "stem_relu", out_channels=6, kernel=1),
        BatchNorm("shared_bn", "shared"),
        Add("add", ("grouped_bn", "shared_bn", "shared")),
        BatchNorm("add_bn", "add"),
        ReLU("relu", "add_bn"),
        Flatten("flatten", "relu"),
        Dense("fc", "flatten", out_features=5),
    )
    return Graph("shared_shortcut", Input("x", 3), nodes, "fc")


CASES = [
    Case("folded_shared_shortcut", _shared_shortcut, (2, 3, 9, 8), seed=11),
    Case("folded_resnet18", partial(multires.spec, "resnet18", num_classes=10), (2, 3, 32, 32), seed=12),
    Case(
        "folded_d2l_resnet18_tf",
        partial(multires.spec, "d2l_resnet18", edition="tf"),
        (2, 1, 45, 45),
        seed=13,
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.id)
def oracle(request: pytest.FixtureRequest) -> Oracle:
    """The case's eval-mode reference output, computed on the graph before folding."""
    return Oracle(request.param)


def test_folded_graph_matches_the_original_in_eval_mode(backend: str, layout: str, oracle: Oracle) -> None:
    case = oracle.case
    graph, weights = fold_batchnorm(case.graph, oracle.weights)
    runner = multires.make_runner(graph, weights, backend, layout)
    assert_output(runner.forward(case.x_in(layout)), oracle.eval_output, layout, f"{case.id} ({layout})")


def test_build_for_inference_loads_the_folded_weights(
    backend: str, backend_module: ModuleType, layout: str
) -> None:
    case = CASES[0]
    weights = case.make_weights()
    model = multires.build(case.graph, backend, layout, weights, inference=True)
    exported = backend_module.export_weights(model)
    _, expected = fold_batchnorm(case.graph, weights)
    assert sorted(exported) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(exported[name], value, rtol=1e-6, atol=0, err_msg=name)


def test_build_for_inference_needs_weights(backend: str) -> None:
    with pytest.raises(
        multires.SpecError, match=r"resnet18: inference=True folds BatchNorm .* pass weights="
    ):
        multires.build("resnet18", backend, inference=True)


def test_export_fold_bn_writes_the_folded_graph(backend_module: ModuleType, tmp_path, capsys) -> None:
    if not hasattr(backend_module, "save"):
        pytest.skip("`multires export` writes the formats of backends that save files (onnx)")
    import onnx

    from multires.cli import main
    from multires.weights import save

    case = CASES[0]
    weights = case.make_weights()
    save(weights, tmp_path / "w.safetensors", case.graph)
    out = tmp_path / "folded.onnx"
    code = main(["export", str(tmp_path / "w.safetensors"), "--fold-bn", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "BatchNorm folded" in capsys.readouterr().out
    model = onnx.load(out)
    graph, expected = fold_batchnorm(case.graph, weights)
    assert backend_module.model_graph(model) == graph
    exported = backend_module.export_weights(model)
    assert sorted(exported) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
