"""MXNet backend: lowering of every node type against the NumPy reference (eager and hybridized),
SAME padding per input size (hybridized, exported, nested), BatchNorm semantics (and MXNet's own),
hybridize parity, export/import, the parameter name mapping, the Trainer step with PyTorch's SGD,
and input errors. The conformance suite covers the zoo models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from mxnet import autograd, gluon, nd  # noqa: E402

import multires  # noqa: E402
from multires import reference  # noqa: E402
from multires.errors import ShapeError, WeightsError  # noqa: E402
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
from multires.reference import relative_error  # noqa: E402
from multires.weights import random_weights  # noqa: E402

backend = pytest.importorskip("multires.backends.mxnet")
from multires.backends.mxnet import runner, weights  # noqa: E402

TOL = 1e-4


def _graph(nodes: list, channels: int = 3, head: bool = True) -> Graph:
    """`nodes` reading input `x`, then (with `head`) GlobalAvgPool, Flatten and a Dense to 5 classes."""
    last = nodes[-1].name
    if head:
        nodes = [
            *nodes,
            GlobalAvgPool("gap", last),
            Flatten("flat", "gap"),
            Dense("fc", "flat", out_features=5),
        ]
        last = "fc"
    return Graph("case", (Input("x", channels),), tuple(nodes), (last,))


CASES = {
    "conv_asymmetric_pad": [Conv2d("c", "x", out_channels=4, kernel=3, padding=((0, 2), (1, 0)))],
    "conv_groups_dilation_stride_bias": [
        Conv2d("c", "x", out_channels=6, kernel=3, stride=2, padding=2, dilation=2, groups=3, bias=True)
    ],
    "batchnorm_eps_momentum": [BatchNorm("b", "x", eps=1e-3, momentum=0.3)],
    "relu": [ReLU("r", "x")],
    "add3": [ReLU("r", "x"), Conv2d("c", "x", out_channels=3, kernel=1), Add("a", ("x", "r", "c"))],
    "maxpool_pad": [MaxPool2d("p", "x", kernel=3, stride=2, padding=1)],
    "maxpool_asymmetric_pad": [MaxPool2d("p", "x", kernel=3, stride=2, padding=((1, 0), (0, 1)))],
    "avgpool_include_pad": [AvgPool2d("p", "x", kernel=3, stride=2, padding=1)],
    "avgpool_exclude_pad": [AvgPool2d("p", "x", kernel=3, stride=2, padding=1, count_include_pad=False)],
    "avgpool_asymmetric_include": [AvgPool2d("p", "x", kernel=2, stride=1, padding=((1, 0), (0, 1)))],
    "avgpool_asymmetric_exclude": [
        AvgPool2d("p", "x", kernel=3, stride=2, padding=((1, 0), (0, 1)), count_include_pad=False)
    ],
    "conv_same_stride2": [Conv2d("c", "x", out_channels=4, kernel=3, stride=2, padding="same", bias=True)],
    "maxpool_same": [MaxPool2d("p", "x", kernel=3, stride=2, padding="same")],
    "avgpool_same_include": [AvgPool2d("p", "x", kernel=(3, 2), stride=2, padding="same")],
    "avgpool_same_exclude": [
        AvgPool2d("p", "x", kernel=3, stride=2, padding="same", count_include_pad=False)
    ],
    "zero_pad_then_maxpool": [
        Pad2d("pad", "x", padding=((1, 0), (2, 1))),
        MaxPool2d("p", "pad", kernel=3, stride=2),
    ],
    "batchnorm_biased": [BatchNorm("b", "x", eps=1e-3, momentum=0.3, running_variance="biased")],
    "stem_preact": [
        Conv2d("conv", "x", out_channels=4, kernel=3, padding=1),
        BatchNorm("bn", "conv"),
        MaxPool2d("pool", "bn", kernel=3, stride=2, padding=1),
    ],
}


def _batch(graph: Graph, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # An offset makes every value negative somewhere: padding must never win a max.
    x = (rng.standard_normal(shape) - 1.5).astype(np.float32)
    return x, rng.integers(0, 5, shape[0])


@pytest.fixture(params=[False, True], ids=["eager", "hybridized"])
def hybridize(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
def test_node_types_match_the_reference(case: str, hybridize: bool) -> None:
    graph = _graph(CASES[case])
    w = random_weights(graph, seed=3)
    x, labels = _batch(graph, (4, 3, 7, 6))
    opt = multires.SGD(lr=0.5, momentum=0.9, weight_decay=0.01)
    run = backend.make_runner(graph, w, "NCHW", opt, hybridize=hybridize)

    assert relative_error(run.forward(x), reference.run(graph, w, x)) <= TOL
    fwd = reference.forward(graph, w, x, training=True)
    assert relative_error(run.forward(x, training=True), fwd.outputs["fc"]) <= TOL
    for name, value in fwd.running.items():
        assert relative_error(run.weights()[name], value) <= TOL, name

    run.set_weights(w)
    loss, logits = run.train_step(x, labels)
    ref_loss, ref_weights, ref_state = reference.sgd_step(graph, w, x, labels, opt)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    assert relative_error(logits, fwd.outputs["fc"]) <= TOL
    new = run.weights()
    for name, value in ref_weights.items():
        assert relative_error(new[name], value) <= TOL, name
    state = run.optimizer_state()
    assert state.keys() == ref_state.keys()
    for name, value in ref_state.items():
        assert relative_error(state[name], value) <= TOL, name


def test_maxpool_padding_never_wins() -> None:
    graph = _graph([MaxPool2d("p", "x", kernel=3, stride=2, padding=((1, 1), (0, 1)))], head=False)
    x = -np.arange(1, 1 + 2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    model = backend.build(graph)
    out = model(nd.array(x)).asnumpy()
    assert out.max() < 0
    np.testing.assert_allclose(out, reference.run(graph, {}, x), rtol=1e-6)


@pytest.mark.parametrize("convention", ["unbiased", "biased"])
def test_batchnorm_running_variance_follows_the_spec_and_is_updated_in_forward(
    hybridize: bool, convention: str
) -> None:
    """MXNet's own BatchNorm updates in backward with the biased variance; the spec's updates in
    forward, with the unbiased or biased variance as the node says."""
    graph = _graph([BatchNorm("b", "x", eps=1e-3, momentum=0.25, running_variance=convention)], head=False)
    w = random_weights(graph, seed=1)
    x, _ = _batch(graph, (2, 3, 2, 2))
    model = backend.load_weights(backend.build(graph), w)
    if hybridize:
        model.hybridize()
    data = nd.array(x)
    data.attach_grad()
    with autograd.record(train_mode=True):
        y = model(data)
    after_forward = backend.export_weights(model)
    y.backward()
    after_backward = backend.export_weights(model)

    var = x.astype(np.float64).var(axis=(0, 2, 3))
    n = 2 * 2 * 2
    unbiased = 0.75 * w["b.running_var"] + 0.25 * var * n / (n - 1)
    biased = 0.75 * w["b.running_var"] + 0.25 * var
    expected, other = (unbiased, biased) if convention == "unbiased" else (biased, unbiased)
    assert relative_error(after_forward["b.running_var"], expected) <= 1e-6
    assert relative_error(after_forward["b.running_var"], other) > 1e-2
    expected_mean = 0.75 * w["b.running_mean"] + 0.25 * x.astype(np.float64).mean(axis=(0, 2, 3))
    assert relative_error(after_forward["b.running_mean"], expected_mean) <= 1e-6
    for name in ("b.running_mean", "b.running_var"):
        np.testing.assert_array_equal(after_backward[name], after_forward[name])


def test_mxnets_own_batchnorm_updates_in_backward_with_the_biased_variance(hybridize: bool) -> None:
    """Why the backend applies the update itself: Gluon's `nn.BatchNorm` (MXNet 1.9.1) leaves
    `running_var` alone in a training-mode forward pass and updates it in backward, with the
    biased batch variance (`momentum` is the weight of the old value)."""
    x, _ = _batch(_graph([ReLU("r", "x")]), (2, 3, 2, 2))
    bn = gluon.nn.BatchNorm(momentum=0.9, in_channels=3)
    bn.initialize()
    if hybridize:
        bn.hybridize()
    data = nd.array(x)
    data.attach_grad()
    with autograd.record(train_mode=True):
        y = bn(data)
    np.testing.assert_array_equal(bn.running_var.data().asnumpy(), np.ones(3, np.float32))
    y.backward()
    var = x.astype(np.float64).var(axis=(0, 2, 3))
    running = bn.running_var.data().asnumpy()
    assert relative_error(running, 0.9 + 0.1 * var) <= 1e-6
    assert relative_error(running, 0.9 + 0.1 * var * 8 / 7) > 1e-2


def _same_graph() -> Graph:
    """SAME convolution and pooling whose pads change with the input size."""
    return _graph(
        [
            Conv2d("c", "x", out_channels=4, kernel=3, stride=2, padding="same"),
            MaxPool2d("p", "c", kernel=3, stride=2, padding="same"),
            AvgPool2d("a", "p", kernel=2, padding="same", count_include_pad=False),
        ]
    )


def test_same_padding_follows_the_input_size(hybridize: bool) -> None:
    """SAME pads are set for each input size; hybridized, the graph is rebuilt only when they change."""
    graph = _same_graph()
    w = random_weights(graph, seed=5)
    model = backend.load_weights(backend.build(graph), w)
    if hybridize:
        model.hybridize(static_alloc=True)
    ops = []
    for size in ((9, 9), (10, 11), (9, 9), (17, 17)):  # 9 and 17 give the same pads, 10 and 11 others
        x, _ = _batch(graph, (2, 3, *size))
        assert relative_error(model(nd.array(x)).asnumpy(), reference.run(graph, w, x)) <= TOL, size
        ops.append(model._cached_op)
    if hybridize:
        assert ops[0] is not ops[1] and ops[1] is not ops[2] and ops[2] is ops[3]


@pytest.mark.filterwarnings("ignore:Cannot decide type")
def test_same_padding_export_fixes_the_pads_of_the_last_input(tmp_path) -> None:
    graph = multires.spec("d2l_resnet18", edition="tf")
    w = random_weights(graph, seed=6)
    model = backend.load_weights(backend.build(graph), w)
    with pytest.raises(ShapeError, match=r"b1\.0 \(Conv2d\): padding='same' depends on the input size.*once"):
        model.export(tmp_path / "early")
    x, _ = _batch(graph, (2, 1, 45, 45))
    model.hybridize()
    expected = model(nd.array(x)).asnumpy()
    symbol_file, params_file = model.export(tmp_path / "tf")
    imported = gluon.SymbolBlock.imports(symbol_file, ["data"], params_file)
    np.testing.assert_allclose(imported(nd.array(x)).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    assert relative_error(expected, reference.run(graph, w, x)) <= TOL


def test_same_padding_inside_another_hybridized_block() -> None:
    """A Symbol has no size: nested in another block's graph, SAME needs one NDArray call first."""
    graph = _same_graph()
    w = random_weights(graph, seed=5)
    x, _ = _batch(graph, (2, 3, 9, 10))
    model = backend.load_weights(backend.build(graph), w)
    outer = gluon.nn.HybridSequential()
    outer.add(model)
    outer.hybridize()
    with pytest.raises(ShapeError, match=r"c \(Conv2d\): padding='same'.*NDArray"):
        outer(nd.array(x))
    model(nd.array(x))
    outer.hybridize()
    assert relative_error(outer(nd.array(x)).asnumpy(), reference.run(graph, w, x)) <= TOL


def test_same_and_pad2d_print_as_the_spec_says() -> None:
    model = backend.build(multires.spec("d2l_resnet18", edition="tf"))
    model(nd.zeros((1, 1, 45, 45)))
    assert repr(model.b1[0]) == "Conv2D(1 -> 64, kernel_size=(7, 7), stride=(2, 2), padding='same')"
    assert repr(model.b1[3]).endswith("spec_padding='same')")
    pad = backend.build(_graph([Pad2d("pad", "x", padding=((1, 0), (2, 1)))], head=False))
    assert repr(pad.pad) == "ZeroPad2D(padding=((1, 0), (2, 1)))"


def test_eval_mode_matches_use_global_stats() -> None:
    graph = _graph([BatchNorm("b", "x", eps=1e-3, momentum=0.25)], head=False)
    w = random_weights(graph, seed=1)
    x, _ = _batch(graph, (2, 3, 4, 4))
    ours = backend.load_weights(backend.build(graph), w)
    plain = gluon.nn.BatchNorm(epsilon=1e-3, use_global_stats=True, in_channels=3)
    plain.initialize()
    for kind, gluon_kind in backend.GLUON_KINDS[BatchNorm].items():
        getattr(plain, gluon_kind).set_data(nd.array(w[f"b.{kind}"]))
    with autograd.train_mode():
        frozen = plain(nd.array(x)).asnumpy()
    np.testing.assert_allclose(ours(nd.array(x)).asnumpy(), frozen, rtol=1e-5, atol=1e-6)


def test_training_with_one_value_per_channel_is_a_shape_error() -> None:
    graph = multires.spec("resnet18", num_classes=5)
    run = backend.make_runner(graph, random_weights(graph), "NCHW", multires.SGD())
    with pytest.raises(ShapeError, match=r"layer4\.0\.bn1 \(BatchNorm\).*batch of 2"):
        run.forward(np.zeros((1, 3, 32, 32), np.float32), training=True)
    assert run.forward(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 5)


def test_dense_width_from_a_spatial_flatten() -> None:
    graph = Graph(
        "flat",
        (Input("x", 2),),
        (Conv2d("c", "x", out_channels=3, kernel=3), Flatten("f", "c"), Dense("fc", "f", out_features=4)),
        ("fc",),
    )
    x, _ = _batch(graph, (2, 2, 6, 5))
    model = backend.build(graph)
    assert model(nd.array(x)).shape == (2, 4)
    w = random_weights(graph, input_shape=x.shape)
    assert backend.export_weights(model).keys() == w.keys()
    backend.load_weights(model, w)
    assert relative_error(model(nd.array(x)).asnumpy(), reference.run(graph, w, x)) <= TOL


@pytest.fixture(scope="module")
def d2l() -> tuple[Graph, dict[str, np.ndarray], np.ndarray]:
    graph = multires.spec("d2l_resnet18")
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    return graph, random_weights(graph, seed=2), x


def test_build_gives_a_named_hybridblock(d2l: tuple) -> None:
    graph, _, _ = d2l
    model = multires.build("resnet18", backend="mxnet", num_classes=7)
    assert isinstance(model, gluon.HybridBlock)
    assert isinstance(model.layer1[0].conv1, gluon.nn.Conv2D)
    assert model["layer2"]["0"]["downsample"]["1"] is model.layer2[0].downsample[1]
    assert model.fc.weight.shape == (7, 512)
    assert "(layer1): Scope(" in repr(model) and "(0): Scope(" in repr(model)
    canonical = multires.weights.export(model)
    np.testing.assert_array_equal(
        canonical["conv1.weight"],
        multires.init_weights(multires.spec("resnet18", num_classes=7))["conv1.weight"],
    )


def test_hybridize_gives_the_same_outputs(d2l: tuple) -> None:
    """Eager and hybridized agree in eval and training mode. At 64 x 64, so that every
    training-mode BatchNorm sees 4 or more values per channel: at 32 x 32 the last stage's 2
    values per channel amplify rounding, and the two (whose shifted batch statistics round
    differently) differ by 4.6e-4, each within 1.9e-4 of the reference. Running means (batch
    mean = shift + mean of the shifted values) agree to 2e-7 absolute."""
    graph, w, _ = d2l
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)
    eager = backend.load_weights(backend.build(graph), w)
    hybrid = backend.load_weights(backend.build(graph), w)
    hybrid.hybridize(static_alloc=True)
    np.testing.assert_allclose(
        hybrid(nd.array(x)).asnumpy(), eager(nd.array(x)).asnumpy(), rtol=1e-5, atol=1e-6
    )
    with autograd.record(train_mode=True):
        y_eager, y_hybrid = eager(nd.array(x)), hybrid(nd.array(x))
    np.testing.assert_allclose(y_hybrid.asnumpy(), y_eager.asnumpy(), rtol=1e-5, atol=1e-6)
    a, b = backend.export_weights(eager), backend.export_weights(hybrid)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.filterwarnings("ignore:Cannot decide type")
@pytest.mark.parametrize("hybridized", [False, True], ids=["fresh", "after-hybridized-forward"])
def test_export_and_symbolblock_import_round_trip(d2l: tuple, tmp_path, hybridized: bool) -> None:
    graph, w, x = d2l
    model = backend.load_weights(backend.build(graph), w)
    expected = model(nd.array(x)).asnumpy()
    if hybridized:
        model.hybridize()
        model(nd.array(x))
    symbol_file, params_file = model.export(tmp_path / "d2l", epoch=3)
    assert params_file.endswith("d2l-0003.params")
    imported = gluon.SymbolBlock.imports(symbol_file, ["data"], params_file)
    np.testing.assert_allclose(imported(nd.array(x)).asnumpy(), expected, rtol=1e-5, atol=1e-6)

    nodes = json.loads(Path(symbol_file).read_text())["nodes"]
    batchnorms = {n["name"]: n["attrs"] for n in nodes if n["op"] == "BatchNorm"}
    assert len(batchnorms) == sum(isinstance(n, BatchNorm) for n in graph.nodes)
    for node in graph.nodes:
        if isinstance(node, BatchNorm):
            attrs = batchnorms[f"{node.name}.fwd"]
            assert float(attrs["momentum"]) == 1 - node.momentum
            assert float(attrs["eps"]) == node.eps
            assert "output_mean_var" not in attrs
    saved = nd.load(params_file)
    assert "arg:b2.0.bn1.gamma" in saved and "aux:b2.0.bn1.running_var" in saved
    np.testing.assert_array_equal(saved["arg:b2.0.bn1.gamma"].asnumpy(), w["b2.0.bn1.weight"])


def test_parameter_name_mapping(tmp_path) -> None:
    graph = multires.spec("resnet18", num_classes=10)
    names = weights.name_map(graph)
    assert names["layer1.0.bn1.weight"] == "layer1.0.bn1.gamma"
    assert names["layer1.0.bn1.bias"] == "layer1.0.bn1.beta"
    assert names["layer1.0.bn1.running_var"] == "layer1.0.bn1.running_var"
    assert names["layer2.0.downsample.0.weight"] == "layer2.0.downsample.0.weight"
    assert names["fc.bias"] == "fc.bias"
    assert weights.canonical_name(graph, weights.gluon_name(graph, "bn1.weight")) == "bn1.weight"
    with pytest.raises(WeightsError, match="no weight 'bn1.gamma'"):
        weights.gluon_name(graph, "bn1.gamma")

    model = backend.build(graph, initialize=False)
    assert set(model.collect_params().keys()) == set(names.values())
    w = random_weights(graph, seed=4)
    backend.load_weights(model, w)
    model.save_parameters(str(tmp_path / "p.params"))
    saved = nd.load(str(tmp_path / "p.params"))
    assert set(saved) == set(names.values())
    for canonical, gluon_name in names.items():
        np.testing.assert_array_equal(saved[gluon_name].asnumpy(), w[canonical])
    exported = backend.export_weights(model)
    assert list(exported) == list(w)
    for name, value in w.items():
        assert exported[name].dtype == np.float32
        np.testing.assert_array_equal(exported[name], value)


def test_load_weights_reports_every_problem() -> None:
    graph = multires.spec("d2l_resnet18")
    w = random_weights(graph)
    del w["b1.0.weight"]
    w["b1.1.weight"] = np.ones(3, np.float32)
    w["b1.1.gamma"] = np.ones(64, np.float32)
    w["last.2.bias"] = np.zeros(10, np.int64)
    with pytest.raises(WeightsError) as error:
        backend.load_weights(backend.build(graph), w)
    message = str(error.value)
    assert "4 problem(s)" in message
    for part in (
        "missing b1.0.weight",
        "b1.1.weight: shape (3,), expected (64,)",
        "unexpected b1.1.gamma",
        "last.2.bias: dtype int64",
    ):
        assert part in message


def test_pytorch_sgd_keeps_pytorchs_buffer_across_learning_rate_changes() -> None:
    rng = np.random.default_rng(0)
    w0, grads = rng.standard_normal(5).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    param = gluon.Parameter("w", shape=(5,))
    param.initialize()
    param.set_data(nd.array(w0))
    sgd = runner.PyTorchSGD(0.1, momentum=0.9, wd=0.01)
    trainer = gluon.Trainer([param], sgd, kvstore=None)
    w, buf = w0.astype(np.float64), None
    for step, (lr, g) in enumerate(zip((0.1, 0.05, 0.2), grads, strict=True)):
        trainer.set_learning_rate(lr)
        with autograd.record():
            loss = (param.data() * nd.array(g * 4)).sum()  # gradient 4 g
        loss.backward()
        trainer.step(4)  # rescale_grad = 1/4
        d = g + 0.01 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - lr * buf
        np.testing.assert_allclose(param.data().asnumpy(), w, rtol=1e-6, err_msg=f"step {step}")
        np.testing.assert_allclose(sgd.buffers[mx.cpu()][0].asnumpy(), buf, rtol=1e-6)


def test_trainer_steps_resume_exactly_from_saved_state(d2l: tuple) -> None:
    graph, w, x = d2l
    labels = np.array([1, 8])
    opt = multires.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
    straight = backend.make_runner(graph, w, "NCHW", opt)
    assert straight.optimizer_state() == {}
    for _ in range(2):
        straight.train_step(x, labels)
    first = backend.make_runner(graph, w, "NCHW", opt)
    first.train_step(x, labels)
    resumed = backend.make_runner(graph, first.weights(), "NCHW", opt)
    resumed.set_optimizer_state(first.optimizer_state())
    resumed.train_step(x, labels)
    end, expected = resumed.weights(), straight.weights()
    for name in expected:
        np.testing.assert_array_equal(end[name], expected[name], err_msg=name)
    with pytest.raises(WeightsError, match="b1.1.running_mean: not a trainable parameter"):
        resumed.set_optimizer_state({"b1.1.running_mean": np.zeros(64, np.float32)})


def test_input_errors_name_the_expected_shape(d2l: tuple) -> None:
    graph, w, x = d2l
    run = backend.make_runner(graph, w, "NCHW", multires.SGD())
    with pytest.raises(ShapeError, match=r"expects shape \(N, 1, H, W\) in NCHW; got \(2, 32, 32, 1\).*NHWC"):
        run.forward(x.transpose(0, 2, 3, 1))
    with pytest.raises(ShapeError, match="expects shape"):
        run.forward(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ShapeError, match="labels must lie in"):
        run.train_step(x, np.array([0, 10]))
    with pytest.raises(ShapeError, match="labels must be 2 integer"):
        run.train_step(x, np.array([0.0, 1.0]))
    with pytest.raises(ShapeError, match="expects shape"):
        backend.build(graph)(nd.zeros((2, 3, 32, 32)))
    with pytest.raises(ShapeError, match="transpose"):
        multires.build(graph, backend="mxnet", layout="NHWC")
    valid = _graph([Conv2d("c", "x", out_channels=2, kernel=3)])
    with pytest.raises(ShapeError, match=r"too small: c \(Conv2d\)"):
        backend.make_runner(valid, random_weights(valid), "NCHW", multires.SGD()).forward(
            np.zeros((2, 3, 2, 2), np.float32)
        )


def test_hybridize_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch, d2l: tuple) -> None:
    graph, w, _ = d2l
    monkeypatch.setenv(runner.HYBRIDIZE_ENV, "0")
    assert not backend.make_runner(graph, w, "NCHW", multires.SGD()).hybridized
    monkeypatch.setenv(runner.HYBRIDIZE_ENV, "1")
    assert backend.make_runner(graph, w, "NCHW", multires.SGD()).hybridized
    monkeypatch.setenv(runner.HYBRIDIZE_ENV, "maybe")
    with pytest.raises(ValueError, match="must be 0 or 1; got 'maybe'"):
        runner.hybridize_default()
