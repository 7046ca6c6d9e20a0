"""Canonical weights: initialisation statistics, checks, and safetensors/npz files (corrupt ones too)."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from multires import (
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    Input,
    ReLU,
    WeightsError,
    init_weights,
    random_weights,
)
from multires.weights import as_weights, check_weights, file_graph, is_buffer, load_file, save, weight_shapes


def small_net() -> Graph:
    return Graph(
        "small",
        (Input("x", 3),),
        (
            Conv2d("conv1", "x", out_channels=8, kernel=3, padding=1, bias=True),
            BatchNorm("bn1", "conv1"),
            ReLU("relu", "bn1"),
            Conv2d("conv2", "relu", out_channels=4, kernel=(1, 3), groups=2),
            BatchNorm("bn2", "conv2"),
            GlobalAvgPool("pool", "bn2"),
            Flatten("flatten", "pool"),
            Dense("fc", "flatten", out_features=5),
        ),
        ("fc",),
        description="a small net for weight tests",
    )


EXPECTED_SHAPES = {
    "conv1.weight": (8, 3, 3, 3),
    "conv1.bias": (8,),
    "bn1.weight": (8,),
    "bn1.bias": (8,),
    "bn1.running_mean": (8,),
    "bn1.running_var": (8,),
    "conv2.weight": (4, 4, 1, 3),
    "bn2.weight": (4,),
    "bn2.bias": (4,),
    "bn2.running_mean": (4,),
    "bn2.running_var": (4,),
    "fc.weight": (5, 4),
    "fc.bias": (5,),
}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# Initialisation -------------------------------------------------------------------------------


def test_names_shapes_and_dtype() -> None:
    g = small_net()
    assert weight_shapes(g) == EXPECTED_SHAPES
    weights = init_weights(g, 0)
    assert list(weights) == list(EXPECTED_SHAPES)
    assert {k: v.shape for k, v in weights.items()} == EXPECTED_SHAPES
    assert all(v.dtype == np.float32 for v in weights.values())
    assert [k for k in weights if is_buffer(k)] == [
        "bn1.running_mean",
        "bn1.running_var",
        "bn2.running_mean",
        "bn2.running_var",
    ]


def test_kaiming_normal_fan_out_on_a_big_conv() -> None:
    g = Graph(
        "big", (Input("x", 64),), (Conv2d("conv", "x", out_channels=256, kernel=3, bias=True),), ("conv",)
    )
    weights = init_weights(g, 0)
    w = weights["conv.weight"].astype(np.float64)
    std = math.sqrt(2.0 / (256 * 3 * 3))  # fan-out, ReLU gain, as torchvision's ResNet
    assert w.size == 147456
    assert abs(w.std() / std - 1) < 0.02
    assert abs(w.mean()) < 4 * std / math.sqrt(w.size)
    # a fan-in init would give std sqrt(2 / (64 * 9)), twice as large
    assert abs(w.std() - math.sqrt(2.0 / (64 * 9))) > 0.4 * std
    bound = 1 / math.sqrt(64 * 3 * 3)
    bias = weights["conv.bias"]
    assert np.all(np.abs(bias) <= bound)
    assert np.abs(bias).max() > 0.8 * bound


def test_grouped_conv_fan_out_uses_the_weight_shape() -> None:
    g = Graph(
        "grouped",
        (Input("x", 64),),
        (Conv2d("conv", "x", out_channels=512, kernel=3, groups=32),),
        ("conv",),
    )
    w = init_weights(g, 1)["conv.weight"]
    assert w.shape == (512, 2, 3, 3)
    assert abs(w.std() / math.sqrt(2.0 / (512 * 9)) - 1) < 0.03


def test_batchnorm_is_identity_at_init() -> None:
    weights = init_weights(small_net(), 0)
    for bn in ("bn1", "bn2"):
        np.testing.assert_array_equal(weights[f"{bn}.weight"], 1)
        np.testing.assert_array_equal(weights[f"{bn}.bias"], 0)
        np.testing.assert_array_equal(weights[f"{bn}.running_mean"], 0)
        np.testing.assert_array_equal(weights[f"{bn}.running_var"], 1)


def test_dense_uniform_bounds() -> None:
    g = Graph(
        "dense",
        (Input("x", 400),),
        (Flatten("f", "x"), Dense("fc", "f", out_features=300)),
        ("fc",),
    )
    weights = init_weights(g, 0, input_shape=(1, 400, 1, 1))
    bound = 1 / math.sqrt(400)
    w, b = weights["fc.weight"], weights["fc.bias"]
    assert w.shape == (300, 400)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound
    # uniform on [-bound, bound] has std bound / sqrt(3)
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.02
    assert np.abs(b).max() <= bound
    assert np.abs(b).max() > 0.9 * bound


def test_determinism_from_seed() -> None:
    g = small_net()
    assert_same(init_weights(g, 7), init_weights(g, 7))
    assert_same(random_weights(g, 7), random_weights(g, 7))
    a, b = init_weights(g, 7), init_weights(g, 8)
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "fc.weight", "fc.bias"):
        assert not np.array_equal(a[name], b[name]), name


def test_random_weights_differ_for_batchnorm_only() -> None:
    g = small_net()
    init, rand = init_weights(g, 3), random_weights(g, 3)
    assert list(rand) == list(init)
    for name in init:
        if name.startswith("bn"):
            assert not np.allclose(rand[name], init[name]), name
            assert rand[name].dtype == np.float32
        else:
            np.testing.assert_array_equal(rand[name], init[name])
    assert np.all(rand["bn1.running_var"] > 0)
    assert np.all(rand["bn1.weight"] > 0)


def test_dense_after_flatten_needs_the_input_shape() -> None:
    g = Graph(
        "flat",
        (Input("x", 2),),
        (Flatten("f", "x"), Dense("fc", "f", out_features=3)),
        ("fc",),
    )
    with pytest.raises(WeightsError, match=re.escape("fc (Dense)") + ".*input_shape"):
        init_weights(g, 0)
    assert init_weights(g, 0, input_shape=(1, 2, 4, 4))["fc.weight"].shape == (3, 32)


# Checking -------------------------------------------------------------------------------------


def test_check_weights_accepts_matching_weights() -> None:
    g = small_net()
    check_weights(g, init_weights(g, 0))


def test_check_weights_reports_every_problem_at_once() -> None:
    g = small_net()
    weights = init_weights(g, 0)
    del weights["bn1.running_var"]
    weights["conv2.weight"] = np.zeros((4, 8, 1, 3), np.float32)
    weights["fc.bias"] = weights["fc.bias"].astype(np.float64)
    weights["conv1.bias"] = [0.0] * 8
    weights["conv3.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError) as info:
        check_weights(g, weights)
    message = str(info.value)
    assert "'small' (5 problem(s))" in message
    assert "missing bn1.running_var (8,)" in message
    assert "conv2.weight: shape (4, 8, 1, 3), expected (4, 4, 1, 3)" in message
    assert "fc.bias: dtype float64, expected float32" in message
    assert "conv1.bias: expected a numpy array, got list" in message
    assert "unexpected conv3.weight" in message


def test_as_weights_converts_floats_and_checks() -> None:
    g = small_net()
    weights = {k: v.astype(np.float64) for k, v in init_weights(g, 0).items()}
    converted = as_weights(weights, g)
    assert all(v.dtype == np.float32 for v in converted.values())
    weights["fc.weight"] = np.zeros((5, 5))
    with pytest.raises(WeightsError, match="fc.weight: shape"):
        as_weights(weights, g)


def test_weights_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        check_weights(small_net(), {})


# Files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    g = small_net()
    weights = random_weights(g, 5)
    path = save(weights, tmp_path / f"w{suffix}", graph=g)
    assert path == tmp_path / f"w{suffix}"
    loaded = load_file(path, graph=g)
    assert_same(weights, loaded)
    assert_same(weights, as_weights(str(path), g))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_safetensors_keeps_other_dtypes_and_byte_order(tmp_path: Path) -> None:
    arrays = {
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "double": np.linspace(0, 1, 5),
        "half": np.ones(3, np.float16),
        "step": np.array(7, np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
    }
    loaded = load_file(save(arrays, tmp_path / "w.safetensors"))
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype.newbyteorder("="), name
        assert loaded[name].dtype.isnative
        np.testing.assert_array_equal(loaded[name], value)


def test_safetensors_refuses_unsupported_dtypes_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="flag: dtype bool"):
        save({"ok": np.ones(2, np.float32), "flag": np.ones(2, bool)}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"\.safetensors or \.npz"):
        save({"ok": np.ones(2, np.float32)}, tmp_path / "w.pt")
    assert list(tmp_path.iterdir()) == []


def test_interop_with_the_safetensors_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    g = small_net()
    weights = random_weights(g, 2)
    ours = save(weights, tmp_path / "ours.safetensors", graph=g)
    theirs_view = st.load_file(str(ours))
    assert_same(dict(weights), {k: theirs_view[k] for k in weights})
    assert set(theirs_view) == set(weights)

    theirs = tmp_path / "theirs.safetensors"
    st.save_file(weights, str(theirs), metadata={"note": "written by safetensors"})
    assert_same(weights, {k: load_file(theirs, graph=g)[k] for k in weights})
    assert file_graph(theirs) is None


def test_file_graph_metadata_round_trip(tmp_path: Path) -> None:
    g = small_net()
    path = save(init_weights(g, 0), tmp_path / "w.safetensors", graph=g)
    stored = file_graph(path)
    assert stored == g
    assert stored.description == g.description
    assert file_graph(save(init_weights(g, 0), tmp_path / "bare.safetensors")) is None


def test_load_file_checks_against_the_graph(tmp_path: Path) -> None:
    g = small_net()
    weights = init_weights(g, 0)
    del weights["fc.bias"]
    path = save(weights, tmp_path / "w.npz")
    assert "fc.weight" in load_file(path)
    with pytest.raises(WeightsError, match="missing fc.bias"):
        load_file(path, graph=g)


# Corrupt files --------------------------------------------------------------------------------


def _good_file(tmp_path: Path) -> Path:
    g = small_net()
    return save(init_weights(g, 0), tmp_path / "good.safetensors", graph=g)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    ("keep", "complaint"), [(0, "no header length"), (5, "no header length"), (40, "corrupt")]
)
def test_truncated_header(tmp_path: Path, keep: int, complaint: str) -> None:
    good = _good_file(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good[:keep])
    with pytest.raises(WeightsError, match=complaint):
        load_file(path)


def test_truncated_data(tmp_path: Path) -> None:
    good = _good_file(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good[:-10])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_file(path)


@pytest.mark.parametrize(
    "header_bytes",
    [b"\xff\xfe not json at all", b"[1, 2, 3]", b'{"a": {"dtype": "F32"', b"\x00" * 16],
)
def test_garbage_header(tmp_path: Path, header_bytes: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"\x00" * 8)
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_file(path)


def test_header_length_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(WeightsError, match="header of 1099511627776 bytes in a 10-byte file"):
        load_file(path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]},  # past the 16 bytes of data
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 4]},  # backwards
        {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},  # shape needs 12 bytes
        {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
    ],
)
def test_offsets_that_do_not_fit(tmp_path: Path, entry: dict) -> None:
    path = _raw_safetensors(tmp_path / "bad.safetensors", {"w": entry}, b"\x00" * 16)
    with pytest.raises(WeightsError, match="'w' claims bytes"):
        load_file(path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
        {"dtype": "F32", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": ["two"], "data_offsets": [0, 4]},
        "not a dict",
    ],
)
def test_malformed_entries(tmp_path: Path, entry) -> None:
    path = _raw_safetensors(tmp_path / "bad.safetensors", {"w": entry}, b"\x00" * 16)
    with pytest.raises(WeightsError, match="corrupt or unsupported entry 'w'"):
        load_file(path)


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickle.npz"
    np.savez(path, conv=np.array([{"payload": 1}, None], dtype=object))
    with pytest.raises(WeightsError, match="not a readable .npz"):
        load_file(path)


def test_npz_truncated_or_garbage(tmp_path: Path) -> None:
    good = save(init_weights(small_net(), 0), tmp_path / "good.npz").read_bytes()
    for name, content in [("cut.npz", good[: len(good) // 2]), ("junk.npz", b"PK\x03\x04" + b"\x00" * 64)]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsError, match="not a readable .npz"):
            load_file(path)
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="not a readable .npz"):
        load_file(path)


def test_npz_holding_a_single_npy_array(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as handle:
        np.save(handle, np.ones(3, np.float32))
    with pytest.raises(WeightsError, match="single unnamed .npy array"):
        load_file(path)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such weight file"):
        load_file(tmp_path / "nope.safetensors")
    path = tmp_path / "w.pt"
    path.write_bytes(b"\x00")
    with pytest.raises(WeightsError, match=r"\.safetensors or \.npz"):
        load_file(path)
