"""Shape inference, parameter counts and MACs checked by hand; layouts; input checks; summaries."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multires import (
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
    ReLU,
    ShapeError,
    SpecError,
    infer_shapes,
    macs,
    param_count,
    summarize,
)
from multires.shapes import check_input_shape, check_layout, from_layout, to_layout


def small_net() -> Graph:
    """Every node type, with sizes worked out by hand in the tests below."""
    return Graph(
        "small",
        (Input("x", 3),),
        (
            Conv2d("stem.conv", "x", out_channels=16, kernel=3, stride=2, padding=1, bias=True),
            BatchNorm("stem.bn", "stem.conv"),
            ReLU("stem.relu", "stem.bn"),
            MaxPool2d("stem.pool", "stem.relu", kernel=3, stride=2, padding=1),
            Conv2d("grouped", "stem.pool", out_channels=32, kernel=3, padding=1, groups=4),
            Conv2d("dilated", "grouped", out_channels=8, kernel=3, dilation=2),
            AvgPool2d("avg", "dilated", kernel=2),
            GlobalAvgPool("head.pool", "avg"),
            Flatten("head.flatten", "head.pool"),
            Dense("head.fc", "head.flatten", out_features=5),
        ),
        ("head.fc",),
    )


# (shape for input (2, 3, 32, 32), params, MACs), by hand:
#   stem.conv: (32 + 2 - 3) // 2 + 1 = 16; 16*3*3*3 + 16 = 448; 2*16*16*16 * 3*3*3 = 221184
#   stem.pool: (16 + 2 - 3) // 2 + 1 = 8
#   grouped:   32 * (16/4) * 3*3 = 1152; 2*32*8*8 * 4*3*3 = 147456
#   dilated:   8 - 2*(3-1) = 4; 8*32*3*3 = 2304; 2*8*4*4 * 32*3*3 = 73728
#   head.fc:   8*5 + 5 = 45; 2*8*5 = 80
EXPECTED = {
    "stem.conv": ((2, 16, 16, 16), 448, 221184),
    "stem.bn": ((2, 16, 16, 16), 32, 0),
    "stem.relu": ((2, 16, 16, 16), 0, 0),
    "stem.pool": ((2, 16, 8, 8), 0, 0),
    "grouped": ((2, 32, 8, 8), 1152, 147456),
    "dilated": ((2, 8, 4, 4), 2304, 73728),
    "avg": ((2, 8, 2, 2), 0, 0),
    "head.pool": ((2, 8, 1, 1), 0, 0),
    "head.flatten": ((2, 8), 0, 0),
    "head.fc": ((2, 5), 45, 80),
}
TOTAL_PARAMS = 448 + 32 + 1152 + 2304 + 45
TOTAL_MACS = 221184 + 147456 + 73728 + 80


def test_hand_checked_shapes() -> None:
    shapes = infer_shapes(small_net(), (2, 3, 32, 32))
    assert shapes == {"x": (2, 3, 32, 32), **{name: row[0] for name, row in EXPECTED.items()}}


def test_hand_checked_params_and_macs() -> None:
    g = small_net()
    assert param_count(g) == TOTAL_PARAMS == 3981
    assert param_count(g, (2, 3, 32, 32)) == TOTAL_PARAMS
    assert macs(g, (2, 3, 32, 32)) == TOTAL_MACS == 442448
    assert macs(g, (6, 3, 32, 32)) == 3 * TOTAL_MACS


def test_unknown_spatial_sizes_without_an_input_shape() -> None:
    shapes = infer_shapes(small_net())
    assert shapes["grouped"] == (None, 32, None, None)
    assert shapes["head.flatten"] == (None, 8)
    assert shapes["head.fc"] == (None, 5)


def test_asymmetric_padding_and_rectangular_kernels() -> None:
    g = Graph(
        "g",
        (Input("x", 2),),
        (
            Conv2d("c", "x", out_channels=4, kernel=(3, 1), stride=(1, 2), padding=((0, 1), (1, 0))),
            MaxPool2d("p", "c", kernel=(2, 3), stride=(2, 1), padding=((1, 0), (0, 1))),
        ),
        ("p",),
    )
    shapes = infer_shapes(g, (1, 2, 5, 6))
    # c: h = 5 + 0 + 1 - 3 + 1 = 4; w = (6 + 1 + 0 - 1) // 2 + 1 = 4
    assert shapes["c"] == (1, 4, 4, 4)
    # p: h = (4 + 1 - 2) // 2 + 1 = 2; w = 4 + 1 - 3 + 1 = 3
    assert shapes["p"] == (1, 4, 2, 3)
    assert param_count(g) == 4 * 2 * 3 * 1
    assert macs(g, (1, 2, 5, 6)) == 4 * 4 * 4 * 2 * 3


@given(
    size=st.integers(1, 20),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    before=st.integers(0, 3),
    after=st.integers(0, 3),
)
def test_conv_size_counts_window_positions(size, kernel, stride, dilation, before, after) -> None:
    """The output size is the number of strided window starts whose last tap lies inside the
    padded input, counted directly."""
    padded = before + size + after
    expected = len(range(0, padded - dilation * (kernel - 1), stride))
    g = Graph(
        "g",
        (Input("x", 1),),
        (
            Conv2d(
                "c",
                "x",
                out_channels=1,
                kernel=(kernel, 1),
                stride=(stride, 1),
                padding=((before, after), (0, 0)),
                dilation=(dilation, 1),
            ),
        ),
        ("c",),
    )
    if expected < 1:
        with pytest.raises(SpecError, match=re.escape("c (Conv2d)")):
            infer_shapes(g, (1, 1, size, 1))
    else:
        assert infer_shapes(g, (1, 1, size, 1))["c"] == (1, 1, expected, 1)


def test_flatten_without_global_pool_needs_the_image_size() -> None:
    g = Graph(
        "g",
        (Input("x", 2),),
        (Conv2d("c", "x", out_channels=3, kernel=3), Flatten("f", "c"), Dense("fc", "f", out_features=4)),
        ("fc",),
    )
    with pytest.raises(SpecError, match=re.escape("fc (Dense)") + ".*input shape"):
        param_count(g)
    # f: 3 * 4 * 5 = 60 features; fc: 60 * 4 + 4
    assert infer_shapes(g, (1, 2, 6, 7))["f"] == (1, 60)
    assert param_count(g, (1, 2, 6, 7)) == 3 * 2 * 9 + 60 * 4 + 4
    assert macs(g, (1, 2, 6, 7)) == 3 * 4 * 5 * 2 * 9 + 60 * 4


def test_running_statistics_are_not_parameters() -> None:
    g = Graph("g", (Input("x", 7),), (BatchNorm("bn", "x"),), ("bn",))
    assert param_count(g) == 14


def test_multi_input_graph() -> None:
    g = Graph(
        "two",
        (Input("a", 4), Input("b", 4)),
        (Add("s", ("a", "b")), ReLU("r", "s")),
        ("r",),
    )
    assert infer_shapes(g, {"a": (1, 4, 5, 5), "b": (1, 4, 5, 5)})["r"] == (1, 4, 5, 5)
    with pytest.raises(ShapeError, match="give a shape for each"):
        infer_shapes(g, (1, 4, 5, 5))
    with pytest.raises(ShapeError, match="no shape given for input 'b'"):
        infer_shapes(g, {"a": (1, 4, 5, 5)})
    with pytest.raises(SpecError, match=re.escape("s (Add)")):
        infer_shapes(g, {"a": (1, 4, 5, 5), "b": (1, 4, 5, 6)})


@pytest.mark.parametrize("shape", [(1, 4, 5), (1, 3, 5, 5), (0, 4, 5, 5), (1, 4, -5, 5), (1, 4, 5.0, 5)])
def test_infer_shapes_rejects_bad_input_shapes(shape) -> None:
    g = Graph("g", (Input("x", 4),), (ReLU("r", "x"),), ("r",))
    with pytest.raises(ShapeError, match=re.escape("(N, 4, H, W)")):
        infer_shapes(g, shape)


# Layouts --------------------------------------------------------------------------------------


def test_layout_conversions() -> None:
    assert to_layout((1, 3, 4, 5), "NHWC") == (1, 4, 5, 3)
    assert to_layout((1, 3, 4, 5), "NCHW") == (1, 3, 4, 5)
    assert from_layout((1, 4, 5, 3), "NHWC") == (1, 3, 4, 5)
    assert from_layout((1, 3, 4, 5), "nchw") == (1, 3, 4, 5)
    assert to_layout((2, 10), "NHWC") == (2, 10)
    assert from_layout((2, 10), "NHWC") == (2, 10)
    shape = (2, 7, 9, 11)
    assert from_layout(to_layout(shape, "NHWC"), "NHWC") == shape
    assert check_layout("nhwc") == "NHWC"


@pytest.mark.parametrize("layout", ["NWHC", "CHW", "", "channels_last"])
def test_unknown_layout(layout: str) -> None:
    with pytest.raises(ShapeError, match="unknown layout.*NCHW.*NHWC"):
        to_layout((1, 2, 3, 4), layout)


def test_check_input_shape_accepts_fitting_shapes() -> None:
    g = small_net()
    check_input_shape(g, (2, 3, 32, 32))
    check_input_shape(g, (2, 32, 32, 3), "NHWC")


def test_nhwc_array_given_to_nchw_model_gets_the_hint() -> None:
    with pytest.raises(ShapeError) as info:
        check_input_shape(small_net(), (2, 32, 32, 3), "NCHW")
    message = str(info.value)
    assert "expects shape (N, 3, H, W) in NCHW; got (2, 32, 32, 3)" in message
    assert "looks like NHWC" in message
    assert "layout='NHWC'" in message


def test_nchw_array_given_to_nhwc_model_gets_the_hint() -> None:
    with pytest.raises(ShapeError, match=r"\(N, H, W, 3\) in NHWC.*looks like NCHW"):
        check_input_shape(small_net(), (2, 3, 32, 32), "NHWC")


@pytest.mark.parametrize("shape", [(2, 5, 32, 32), (32, 32, 3), (2, 1, 32, 32, 3)])
def test_wrong_channels_or_rank_has_no_layout_hint(shape) -> None:
    with pytest.raises(ShapeError, match=re.escape("expects shape (N, 3, H, W)")) as info:
        check_input_shape(small_net(), shape)
    assert "looks like" not in str(info.value)


def test_too_small_input_names_the_node() -> None:
    # 8 -> stem.conv 4 -> stem.pool 2 -> grouped 2 -> dilated 2 - 4 = -2
    with pytest.raises(ShapeError, match=r"too small.*dilated \(Conv2d\)"):
        check_input_shape(small_net(), (1, 3, 8, 8))


def test_shape_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        check_input_shape(small_net(), (1, 5, 8, 8))


# Summaries ------------------------------------------------------------------------------------


def test_summarize_rows_and_totals() -> None:
    summary = summarize(small_net(), (2, 3, 32, 32))
    assert [r.name for r in summary.rows] == list(EXPECTED)
    assert {r.name: (r.shape, r.params, r.macs) for r in summary.rows} == EXPECTED
    assert [r.op for r in summary.rows][:4] == ["Conv2d", "BatchNorm", "ReLU", "MaxPool2d"]
    assert summary.params == TOTAL_PARAMS
    assert summary.macs == TOTAL_MACS
    assert summary.layout == "NCHW"


def test_summarize_nhwc() -> None:
    nchw = summarize(small_net(), (2, 3, 32, 32))
    nhwc = summarize(small_net(), (2, 32, 32, 3), "nhwc")
    assert nhwc.layout == "NHWC"
    assert nhwc.input_shape == (2, 32, 32, 3)
    assert [r.shape for r in nhwc.rows] == [to_layout(r.shape, "NHWC") for r in nchw.rows]
    assert nhwc.rows[0].shape == (2, 16, 16, 16)
    assert nhwc.rows[4].shape == (2, 8, 8, 32)
    assert nhwc.rows[-1].shape == (2, 5)
    assert (nhwc.params, nhwc.macs) == (nchw.params, nchw.macs)


def test_summarize_refuses_the_wrong_layout() -> None:
    with pytest.raises(ShapeError, match="looks like NHWC"):
        summarize(small_net(), (2, 32, 32, 3))


def test_summary_to_dict_is_json() -> None:
    data = json.loads(json.dumps(summarize(small_net(), (2, 32, 32, 3), "NHWC").to_dict()))
    assert data["graph"] == "small"
    assert data["layout"] == "NHWC"
    assert data["input_shape"] == [2, 32, 32, 3]
    assert data["total_params"] == TOTAL_PARAMS
    assert data["total_macs"] == TOTAL_MACS
    assert sum(n["params"] for n in data["nodes"]) == TOTAL_PARAMS
    assert data["nodes"][1] == {
        "name": "stem.bn",
        "op": "BatchNorm",
        "shape": [2, 16, 16, 16],
        "params": 32,
        "macs": 0,
    }
