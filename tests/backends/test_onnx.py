"""ONNX backend: what the conformance suite does not cover.

The lowering of every node against the reference on a graph that hits each porting trap, run
by onnxruntime and by ONNX's own reference evaluator (so the model relies on the ONNX spec, not
on one runtime's quirks); the file's structure (checker, opset, node and initializer names,
BatchNorm attributes, a symbolic batch); canonical weights in and out; the inference-only
Runner; `multires export` and `multires compare` with this backend. SAME padding: one model
serves even and odd sizes in both runtimes, and which operator carries the pads.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import multires  # noqa: E402
from multires import reference  # noqa: E402
from multires.backend import backend_of, get_backend  # noqa: E402
from multires.cli import main  # noqa: E402
from multires.compare import OK, compare  # noqa: E402
from multires.errors import MultiresError, ShapeError, SpecError, TrainingError, WeightsError  # noqa: E402
from multires.graph import (  # noqa: E402
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    Graph,
    Input,
    MaxPool2d,
    Node,
    Pad2d,
    ReLU,
)
from multires.weights import init_weights, random_weights, save, weight_shapes  # noqa: E402

ob = get_backend("onnx")
TOLERANCE = 1e-5
SHAPE = (2, 3, 10, 11)


def traps() -> Graph:
    """Every node type with the settings frameworks disagree on; the Flatten of a spatial map makes
    the Dense width depend on the image size."""
    nodes = [
        Conv2d("stem.conv", "x", out_channels=8, kernel=3, stride=2, padding=((1, 0), (0, 1)), bias=True),
        BatchNorm("stem.bn", "stem.conv", momentum=0.3, eps=1e-3),
        MaxPool2d("stem.pool", "stem.bn", kernel=3, stride=1, padding=((1, 0), (1, 1))),
        Conv2d("block.conv", "stem.pool", out_channels=8, kernel=3, padding=2, dilation=2, groups=4),
        Conv2d("block.strided", "stem.pool", out_channels=8, kernel=3, stride=2, padding=2, dilation=2),
        ReLU("block.relu", "block.conv"),
        Add("block.add", ("block.relu", "stem.pool")),
        AvgPool2d(
            "block.avg", "block.add", kernel=3, stride=2, padding=((1, 0), (1, 1)), count_include_pad=False
        ),
        AvgPool2d("block.avg_pad", "block.add", kernel=3, stride=2, padding=((0, 1), (1, 1))),
        Add("block.sum", ("block.avg", "block.avg_pad", "block.strided")),
        Flatten("flat", "block.sum"),
        Dense("fc", "flat", out_features=5),
    ]
    return Graph("traps", (Input("x", 3),), tuple(nodes), ("fc",))


@pytest.fixture(scope="module")
def case() -> tuple[Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    graph = traps()
    weights = random_weights(graph, 3, SHAPE)
    x = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32) - 1.0
    return graph, weights, x, reference.run(graph, weights, x)


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ob.inference_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def attributes(model: onnx.ModelProto, name: str) -> dict[str, object]:
    (node,) = (node for node in model.graph.node if node.name == name)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_traps_match_the_reference_in_onnxruntime(case, layout: str) -> None:
    graph, weights, x, expected = case
    model = ob.build(graph, layout, weights)
    x_in = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    assert reference.relative_error(ort_run(model, x_in), expected) <= TOLERANCE


def test_traps_match_the_reference_in_the_onnx_reference_evaluator(case) -> None:
    from onnx.reference import ReferenceEvaluator

    graph, weights, x, expected = case
    (got,) = ReferenceEvaluator(ob.build(graph, "NCHW", weights)).run(None, {"x": x})
    assert reference.relative_error(got, expected) <= TOLERANCE


def test_max_pool_padding_never_wins() -> None:
    graph = Graph(
        "pool", (Input("x", 1),), (MaxPool2d("pool", "x", kernel=3, stride=2, padding=1),), ("pool",)
    )
    x = -1.0 - np.random.default_rng(0).random((1, 1, 5, 5)).astype(np.float32)
    got = ort_run(ob.build(graph), x)
    assert got.max() < -1.0
    np.testing.assert_array_equal(got, reference.run(graph, {}, x).astype(np.float32))


def test_model_structure(case) -> None:
    graph, weights, _, _ = case
    model = ob.build(graph, "NCHW", weights)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ob.OPSET)]
    assert ob.OPSET >= 17 and model.ir_version == ob.IR_VERSION
    assert model.producer_name == "multires" and model.graph.name == "traps"
    ops = {node.name: node.op_type for node in model.graph.node}
    assert [node.name for node in model.graph.node if "/" not in node.name] == [n.name for n in graph.nodes]
    assert {name: ops[name] for name in ("stem.bn", "block.add", "block.sum", "flat", "fc")} == {
        "stem.bn": "BatchNormalization", "block.add": "Add", "block.sum": "Sum", "flat": "Flatten", "fc": "Gemm",
    }  # fmt: skip
    assert [t.name for t in model.graph.initializer] == list(weight_shapes(graph, SHAPE))
    bn = attributes(model, "stem.bn")
    assert bn["momentum"] == pytest.approx(0.7) and bn["epsilon"] == pytest.approx(1e-3)
    assert attributes(model, "stem.conv")["pads"] == [1, 0, 0, 1]  # top, left, bottom, right
    # Asymmetric pool padding: an explicit Pad (-inf for max, zeros for a counted average) and an
    # unpadded pool, except for an average that leaves padding out of its divisor.
    assert ops["stem.pool/pad"] == "Pad" and attributes(model, "stem.pool")["pads"] == [0, 0, 0, 0]
    assert ops["block.avg_pad/pad"] == "Pad" and attributes(model, "block.avg_pad")["pads"] == [0, 0, 0, 0]
    assert "block.avg/pad" not in ops
    assert attributes(model, "block.avg") == {
        "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 1], "count_include_pad": 0
    }  # fmt: skip
    (x_info,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in x_info.type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert ob.model_graph(model) == graph and ob.model_layout(model) == "NCHW"


def test_nhwc_adds_only_transposes(case) -> None:
    graph, weights, _, _ = case
    model = ob.build(graph, "NHWC", weights)
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert ops[0] == "Transpose" and ops.count("Transpose") == 1  # the output is 2-D
    (x_info,) = model.graph.input
    assert [d.dim_param or d.dim_value for d in x_info.type.tensor_type.shape.dim] == ["N", "H", "W", 3]


def test_nhwc_transposes_a_4d_output_back() -> None:
    graph = Graph(
        "map", (Input("x", 2),), (Conv2d("conv", "x", out_channels=4, kernel=3, padding=1),), ("conv",)
    )
    weights = random_weights(graph)
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 6)).astype(np.float32)
    model = ob.build(graph, "NHWC", weights)
    assert [o.name for o in model.graph.output] == ["conv"]
    got = ort_run(model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    expected = reference.run(graph, weights, x).transpose(0, 2, 3, 1)
    assert reference.relative_error(got, expected) <= TOLERANCE


def test_one_model_runs_any_batch_size() -> None:
    graph = multires.spec("resnet18", num_classes=7)
    weights = random_weights(graph, 1)
    session = ob.inference_session(ob.build(graph, "NCHW", weights))
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = reference.run(graph, weights, x)
    for batch in (1, 3):
        (got,) = session.run(None, {graph.inputs[0].name: x[:batch]})
        assert got.shape == (batch, 7)
        assert reference.relative_error(got, expected[:batch]) <= 1e-4


def test_zoo_model_matches_the_reference() -> None:
    graph = multires.spec("d2l_resnet18")
    weights = random_weights(graph, 5)
    x = np.random.default_rng(6).standard_normal((2, 1, 48, 48)).astype(np.float32)
    model = multires.build(graph, backend="onnx", weights=weights)
    onnx.checker.check_model(model, full_check=True)
    assert reference.relative_error(ort_run(model, x), reference.run(graph, weights, x)) <= 1e-4


def test_weights_round_trip_through_the_registry(case) -> None:
    graph, weights, _, _ = case
    model = ob.build(graph, "NCHW", weights)
    assert backend_of(model) is ob
    exported = multires.weights.export(model)
    assert list(exported) == list(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(exported[name], value)
    other = random_weights(graph, 9, SHAPE)
    model = multires.weights.load(model, other)  # rebuilt: this graph's Dense width follows the image
    np.testing.assert_array_equal(ob.export_weights(model)["fc.weight"], other["fc.weight"])


def test_build_without_weights_uses_init_weights() -> None:
    graph = multires.spec("d2l_resnet18")
    exported = ob.export_weights(multires.build(graph, backend="onnx"))
    expected = init_weights(graph, seed=0)
    assert list(exported) == list(expected)
    assert all(np.array_equal(exported[name], expected[name]) for name in expected)


def test_load_weights_reports_every_mismatch(case) -> None:
    graph, weights, _, _ = case
    model = ob.build(graph, "NCHW", weights)
    bad = dict(weights)
    del bad["stem.bn.running_var"]
    bad["fc.weight"] = np.zeros((5, 3), np.float32)
    bad["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(WeightsError) as error:
        ob.load_weights(model, bad)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "missing stem.bn.running_var" in message and "fc.weight: shape (5, 3)" in message
    assert "unexpected extra.weight" in message
    np.testing.assert_array_equal(ob.export_weights(model)["fc.weight"], weights["fc.weight"])


def test_image_size_dependent_dense_gets_its_width_from_the_weights(case) -> None:
    graph, weights, x, expected = case
    placeholder = {t.name: tuple(t.dims) for t in ob.build(graph).graph.initializer}["fc.weight"]
    assert placeholder == (weights["fc.weight"].shape[0], 0)
    model = ob.load_weights(ob.build(graph), weights)
    assert (
        reference.relative_error(ob.make_runner(graph, weights, "NCHW", multires.SGD()).forward(x), expected)
        <= 1e-4
    )
    np.testing.assert_array_equal(ob.export_weights(model)["fc.weight"], weights["fc.weight"])


def test_runner_is_inference_only(case) -> None:
    graph, weights, x, expected = case
    runner = multires.make_runner(
        multires.spec("resnet18", num_classes=4),
        random_weights(multires.spec("resnet18", num_classes=4)),
        "onnx",
    )
    assert runner.layout == "NCHW" and ob.TRAINING is False
    image = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(TrainingError, match="ONNX models are inference-only") as error:
        runner.forward(image, training=True)
    assert isinstance(error.value, MultiresError) and isinstance(error.value, NotImplementedError)
    with pytest.raises(ob.InferenceOnlyError, match="train_step"):
        runner.train_step(image, np.zeros(2, np.int64))
    with pytest.raises(ob.InferenceOnlyError, match="set_lr"):
        runner.set_lr(0.01)
    assert runner.optimizer_state() == {}
    runner.set_optimizer_state({})
    with pytest.raises(WeightsError, match="inference-only"):
        runner.set_optimizer_state({"fc.weight": np.zeros((4, 512), np.float32)})


def test_runner_forward_and_set_weights() -> None:
    graph = multires.spec("resnet18", num_classes=4)
    first, second = random_weights(graph, 0), random_weights(graph, 1)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    runner = multires.make_runner(graph, first, "onnx", layout="NHWC")
    nchw = x.transpose(0, 3, 1, 2)
    assert reference.relative_error(runner.forward(x), reference.run(graph, first, nchw)) <= 1e-4
    runner.set_weights(second)
    assert reference.relative_error(runner.forward(x), reference.run(graph, second, nchw)) <= 1e-4
    np.testing.assert_array_equal(runner.weights()["fc.bias"], second["fc.bias"])


def test_runner_rejects_a_wrong_input_shape() -> None:
    graph = multires.spec("resnet18", num_classes=4)
    runner = multires.make_runner(graph, random_weights(graph), "onnx")
    with pytest.raises(ShapeError, match=r"expects shape \(N, 3, H, W\) in NCHW; got \(1, 32, 32, 3\)"):
        runner.forward(np.zeros((1, 32, 32, 3), np.float32))


def test_export_cli_writes_a_loadable_file(tmp_path, capsys) -> None:
    graph = multires.spec("d2l_resnet18")
    weights = random_weights(graph, 2)
    save(weights, tmp_path / "w.safetensors", graph)
    out = tmp_path / "model.onnx"
    code = main(
        [
            "export",
            "d2l_resnet18",
            "--format",
            "onnx",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: d2l_resnet18, NCHW input, 11,178,378 parameters")
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert ob.model_graph(model) == graph
    x = np.random.default_rng(3).standard_normal((1, 1, 40, 40)).astype(np.float32)
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert reference.relative_error(got, reference.run(graph, weights, x)) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "w.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_export_cli_without_weights_uses_the_seed(tmp_path, capsys) -> None:
    out = tmp_path / "m.onnx"
    options = ["--option", "num_classes=3", "--layout", "NHWC", "--seed", "4"]
    assert main(["export", "resnet18", *options, "-o", str(out)]) == 0
    assert "init_weights(seed=4)" in capsys.readouterr().out
    model = onnx.load(out)
    assert ob.model_layout(model) == "NHWC"
    expected = init_weights(multires.spec("resnet18", num_classes=3), seed=4)
    np.testing.assert_array_equal(ob.export_weights(model)["fc.weight"], expected["fc.weight"])


def test_export_cli_reports_mismatched_weights(tmp_path, capsys) -> None:
    save(random_weights(multires.spec("resnet18", num_classes=3)), tmp_path / "w.npz")
    code = main(["export", "resnet18", "--weights", str(tmp_path / "w.npz"), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: weights do not match graph 'resnet18'")
    assert "fc.weight: shape (3, 512), expected (1000, 512)" in err
    assert not (tmp_path / "m.onnx").exists()


def test_compare_with_onnx(capsys) -> None:
    graph = multires.spec("resnet18", num_classes=5)
    result = compare(graph, (1, 3, 32, 32), ["onnx"], repeats=2)
    row = result.rows[1]
    assert (row.backend, row.status, row.layout, row.output_shape) == ("onnx", OK, "NCHW", (1, 5))
    assert row.params == multires.param_count(graph) and row.max_rel_diff <= 1e-4 and row.latency_ms > 0
    code = main(
        [
            "compare",
            "resnet18",
            "--option",
            "num_classes=5",
            "--input",
            "1,3,32,32",
            "--backends",
            "onnx",
            "--json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"] and [r["status"] for r in data["rows"]] == [OK, OK]


# TensorFlow/XLA SAME padding, Pad2d and the biased running variance. ---------------------------


def _single(node: Node) -> Graph:
    return Graph(node.name, (Input("x", 3),), (node,), (node.name,))


SAME_LAYERS = {
    "conv_strided": Conv2d("n", "x", out_channels=2, kernel=3, stride=2, padding="same", bias=True),
    "conv_dilated": Conv2d("n", "x", out_channels=2, kernel=3, stride=(2, 3), dilation=2, padding="same"),
    "conv_window_shorter_than_stride": Conv2d(
        "n", "x", out_channels=2, kernel=2, stride=(3, 4), padding="same"
    ),
    "conv_even_kernel_stride_1": Conv2d("n", "x", out_channels=2, kernel=(2, 4), padding="same"),
    "maxpool": MaxPool2d("n", "x", kernel=3, stride=2, padding="same"),
    "maxpool_window_shorter_than_stride": MaxPool2d("n", "x", kernel=(2, 3), stride=(3, 4), padding="same"),
    "avgpool_exclude_pad": AvgPool2d("n", "x", kernel=3, stride=2, padding="same", count_include_pad=False),
    "avgpool_include_pad": AvgPool2d("n", "x", kernel=(3, 2), stride=(2, 3), padding="same"),
    "avgpool_include_pad_window_shorter_than_stride": AvgPool2d(
        "n", "x", kernel=2, stride=(3, 4), padding="same"
    ),
    "pad2d": Pad2d("n", "x", padding=((1, 0), (2, 3))),
}


@pytest.mark.parametrize("name", list(SAME_LAYERS))
def test_same_padding_matches_the_reference_at_every_size_from_one_model(name: str) -> None:
    from onnx.reference import ReferenceEvaluator

    graph = _single(SAME_LAYERS[name])
    weights = random_weights(graph, 1)
    model = ob.build(graph, "NCHW", weights)
    onnx.checker.check_model(model, full_check=True)
    session, evaluator = ob.inference_session(model), ReferenceEvaluator(model)
    for size in ((7, 10), (8, 9), (9, 8), (12, 13)):
        x = np.random.default_rng(size[0]).standard_normal((2, 3, *size)).astype(np.float32) - 2.0
        expected = reference.run(graph, weights, x)
        for got in (session.run(None, {"x": x})[0], evaluator.run(None, {"x": x})[0]):
            assert got.shape == expected.shape
            assert reference.relative_error(got, expected) <= TOLERANCE, size


def test_same_padding_lowering() -> None:
    """Size-independent SAME is explicit pads; Conv and the excluding average use SAME_UPPER; a
    dilated Conv (onnxruntime has no dilated SAME_UPPER) and the other pools get a Pad computed
    from the input's shape."""

    def lowered(name: str) -> tuple[dict[str, str], dict[str, object]]:
        model = ob.build(_single(SAME_LAYERS[name]))
        return {node.name: node.op_type for node in model.graph.node}, attributes(model, "n")

    ops, conv = lowered("conv_strided")
    assert list(ops) == ["n"] and conv["auto_pad"] == b"SAME_UPPER" and "pads" not in conv
    ops, conv = lowered("conv_even_kernel_stride_1")
    assert list(ops) == ["n"] and conv["pads"] == [0, 1, 1, 2]
    ops, conv = lowered("conv_dilated")
    assert ops["n/same/size"] == "Shape" and ops["n/pad"] == "Pad" and conv["pads"] == [0, 0, 0, 0]
    assert "n/same/total_or_0" not in ops
    ops, pool = lowered("maxpool_window_shorter_than_stride")
    assert ops["n/same/total_or_0"] == "Max" and ops["n/pad"] == "Pad" and pool["pads"] == [0, 0, 0, 0]
    ops, pool = lowered("avgpool_exclude_pad")
    assert list(ops) == ["n"] and pool["auto_pad"] == b"SAME_UPPER" and pool["count_include_pad"] == 0
    ops, pool = lowered("avgpool_include_pad")
    assert ops["n/pad"] == "Pad" and pool["pads"] == [0, 0, 0, 0] and pool["count_include_pad"] == 1
    ops, _ = lowered("pad2d")
    assert ops["n"] == "Pad"
    assert ob.export_weights(ob.build(_single(SAME_LAYERS["pad2d"]))) == {}


def test_same_average_excluding_pads_with_a_window_shorter_than_the_stride_is_refused() -> None:
    graph = _single(AvgPool2d("n", "x", kernel=2, stride=(3, 4), padding="same", count_include_pad=False))
    with pytest.raises(SpecError, match=r"n \(AvgPool2d\): onnx cannot lower padding='same'"):
        ob.build(graph)


def test_the_tf_edition_matches_the_reference() -> None:
    graph = multires.spec("d2l_resnet18", edition="tf")
    weights = random_weights(graph, 5)
    model = ob.build(graph, "NCHW", weights)
    assert attributes(model, "b1.1")["epsilon"] == pytest.approx(1e-3)
    assert attributes(model, "b1.1")["momentum"] == pytest.approx(0.99)
    for size in ((45, 45), (28, 31)):
        x = np.random.default_rng(6).standard_normal((2, 1, *size)).astype(np.float32)
        assert reference.relative_error(ort_run(model, x), reference.run(graph, weights, x)) <= 1e-4
