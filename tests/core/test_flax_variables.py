"""`multires.weights.to_variables` / `from_variables`: canonical weights <-> Flax linen variable
trees, in NumPy alone (the Flax backend's tests check the trees against `model.init`)."""

from __future__ import annotations

import numpy as np
import pytest

import multires
from multires.errors import WeightsError
from multires.weights import from_variables, random_weights, to_variables


def test_trees_nest_by_name_with_flax_layouts() -> None:
    graph = multires.spec("resnext50_32x4d", num_classes=10)
    weights = random_weights(graph, seed=0)
    variables = to_variables(weights, graph)
    assert set(variables) == {"params", "batch_stats"}
    conv = variables["params"]["layer1"]["0"]["conv2"]["kernel"]
    np.testing.assert_array_equal(conv, weights["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
    assert conv.shape == (3, 3, 4, 128) and conv.flags.c_contiguous
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], weights["fc.weight"].T)
    bn = "layer2.0.downsample.1"
    np.testing.assert_array_equal(
        variables["params"]["layer2"]["0"]["downsample"]["1"]["scale"], weights[f"{bn}.weight"]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer2"]["0"]["downsample"]["1"]["var"], weights[f"{bn}.running_var"]
    )


def test_round_trip_is_exact() -> None:
    graph = multires.spec("d2l_resnet18")
    weights = random_weights(graph, seed=1)
    back = from_variables(to_variables(weights), graph)
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_a_graph_checks_the_weights() -> None:
    graph = multires.spec("resnet18")
    weights = random_weights(graph)
    del weights["fc.bias"]
    with pytest.raises(WeightsError, match="missing fc.bias"):
        to_variables(weights, graph)
    with pytest.raises(WeightsError, match="missing fc.bias"):
        from_variables(to_variables(weights), graph)


@pytest.mark.parametrize(
    ("name", "value"),
    [("conv.kernel", np.zeros(8)), ("bias", np.zeros(3)), ("conv.weight", np.zeros((1, 2, 3)))],
)
def test_to_variables_rejects_non_canonical_names(name: str, value: np.ndarray) -> None:
    with pytest.raises(WeightsError, match=name):
        to_variables({name: value})


@pytest.mark.parametrize(
    "variables",
    [
        {"params": {"conv": {"w": np.zeros(3)}}},
        {"batch_stats": {"conv": {"kernel": np.zeros((3, 3))}}},
        {"params": {"kernel": np.zeros((3, 3))}},
    ],
)
def test_from_variables_rejects_foreign_leaves(variables: dict) -> None:
    with pytest.raises(WeightsError, match="no canonical weight|outside any node"):
        from_variables(variables)
