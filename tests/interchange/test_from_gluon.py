"""Gluon interchange against the real MXNet 1.9.1 model zoo and the book's MXNet code: outputs of
the Gluon models themselves vs the reference and the mxnet backend (eager and hybridized) at an
odd size, parameter counts, round trips, files, and the errors for what does not map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from mxnet import init, npx  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
from mxnet.gluon.model_zoo import vision  # noqa: E402

import multires  # noqa: E402
from multires.errors import InterchangeError, WeightsError  # noqa: E402
from multires.interchange.gluon import from_gluon, read, to_gluon, write  # noqa: E402
from multires.reference import relative_error  # noqa: E402

TOL = 1e-5
SIZE = 45  # odd: every stride-2 layer sees an odd input somewhere
CLASSES = 7


def _randomise(net: mx.gluon.Block, seed: int) -> None:
    """Random weights and random BatchNorm statistics (variance positive) in place; the input
    BatchNorm of v2 keeps its fixed zero beta (its gamma is ignored by MXNet's fix_gamma)."""
    rng = np.random.default_rng(seed)
    array = mx.np.array if mx.util.is_np_array() else mx.nd.array
    for path, param in net._collect_params_with_prefix().items():
        kind, shape = path.rsplit(".", 1)[-1], param.shape
        if kind in ("gamma", "running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif kind in ("beta", "running_mean", "bias"):
            value = rng.normal(0.0, 0.2, shape)
        else:
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        if param.grad_req == "null" and kind == "beta":
            value = np.zeros(shape)
        param.set_data(array(value.astype(np.float32)))


def _zoo(name: str, seed: int = 0, thumbnail: bool = False) -> mx.gluon.HybridBlock:
    net = vision.get_model(name, pretrained=False, classes=CLASSES, thumbnail=thumbnail)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))  # shapes the deferred first conv
    _randomise(net, seed)
    return net


def _batch(channels: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, channels, SIZE, SIZE)).astype(np.float32)


def _check_outputs(graph: multires.Graph, weights: dict, x: np.ndarray, expected: np.ndarray) -> None:
    """`expected` (the Gluon model's own output) vs the reference and the mxnet backend."""
    assert relative_error(multires.reference.run(graph, weights, x), expected) < TOL
    model = multires.build(graph, backend="mxnet", weights=weights)
    assert relative_error(model(mx.nd.array(x)).asnumpy(), expected) < TOL
    model.hybridize()
    assert relative_error(model(mx.nd.array(x)).asnumpy(), expected) < TOL


@pytest.mark.parametrize(
    "name", ["resnet18_v1", "resnet50_v1", "resnet18_v2", "resnet50_v2", "resnet18_v1+thumbnail"]
)
def test_zoo_model_outputs(name: str) -> None:
    name, _, thumbnail = name.partition("+")
    net = _zoo(name, thumbnail=bool(thumbnail))
    x = _batch()
    expected = net(mx.nd.array(x)).asnumpy()
    graph, weights = from_gluon(net)
    assert graph.name == f"gluon_{name}"
    assert graph == multires.spec(graph.name, num_classes=CLASSES, thumbnail=bool(thumbnail))
    _check_outputs(graph, weights, x, expected)
    net.hybridize()
    assert relative_error(net(mx.nd.array(x)).asnumpy(), expected) < TOL
    _, traced = from_gluon(net, graph=graph)  # the generic mapping (traced, hybridized) agrees with the table
    assert all(np.array_equal(weights[k], traced[k]) for k in weights)


ZOO = [f"resnet{depth}_v{version}" for version in (1, 2) for depth in (18, 34, 50, 101, 152)]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_param_counts_and_recognition(name: str) -> None:
    """Gluon's own count, without the running statistics (buffers, as multires.param_count leaves
    them out); v2's input BatchNorm has a fixed gamma and beta (grad_req 'null'), which multires
    counts as BatchNorm parameters like any other: 2 * 3 more than Gluon's trainable count."""
    net = vision.get_model(name, pretrained=False)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    params = net._collect_params_with_prefix()
    count = sum(p.data().size for path, p in params.items() if "running_" not in path)
    trainable = sum(p.data().size for p in params.values() if p.grad_req != "null")
    graph = multires.spec(f"gluon_{name}")
    assert multires.param_count(graph) == count == trainable + (6 if name.endswith("v2") else 0)
    assert from_gluon(net)[0] == graph
    assert f"resnet{name[6:].split('_')[0]}_{name[-2:]}" in graph.description


def test_round_trip_is_bit_exact() -> None:
    for name in ("gluon_resnet50_v1", "gluon_resnet18_v2", "d2l_resnet18"):
        graph = multires.spec(name)
        weights = multires.random_weights(graph, seed=3)
        if name.endswith("v2"):
            weights["data_bn.weight"][:] = 1.0
            weights["data_bn.bias"][:] = 0.0
        model = to_gluon(graph, weights)
        zoo = name.startswith("gluon")
        assert type(model).__name__ == ("ResNetV1" if "v1" in name else "ResNetV2" if zoo else "GraphBlock")
        back_graph, back = from_gluon(model)
        assert back_graph == graph and list(back) == list(weights)
        assert all(np.array_equal(back[k], weights[k]) for k in weights)


def test_to_gluon_refuses_a_data_bn_gluon_cannot_hold() -> None:
    graph = multires.spec("gluon_resnet18_v2")
    weights = multires.random_weights(graph)
    with pytest.raises(WeightsError, match=r"data_bn.weight must be all 1 and data_bn.bias must be all 0"):
        to_gluon(graph, weights)


def test_unrecognised_block() -> None:
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3), nn.Dense(2))
    net.initialize()
    with pytest.raises(InterchangeError, match=r"resnet\{18,34,50,101,152\}_v1.*graph=multires.spec"):
        from_gluon(net)
    with pytest.raises(InterchangeError, match="Gluon Block"):
        from_gluon("resnet18_v1")


def test_mismatched_graph_lists_every_mismatch() -> None:
    net = _zoo("resnet18_v1")
    with pytest.raises(WeightsError) as error:
        from_gluon(net, graph=multires.spec("d2l_resnet18", in_channels=3))
    message = str(error.value)
    for line in (
        "missing b1.0.bias (64,)",
        "missing b2.0.conv1.bias (64,)",
        "missing b5.1.conv2.bias (512,)",
        "last.2.weight: shape (7, 512), graph expects (10, 512)",
        "last.2.bias: shape (7,), graph expects (10,)",
        "unexpected Gluon layer features.7.0.downsample.1 (BatchNorm)",
    ):
        assert line in message


def test_files(tmp_path: Path) -> None:
    net = _zoo("resnet18_v2", seed=5)
    x = _batch()
    expected = net(mx.nd.array(x)).asnumpy()
    path = write(net, tmp_path / "net.params")
    assert np.array_equal(read(path, model="resnet18_v2")(mx.nd.array(x)).asnumpy(), expected)
    assert np.array_equal(read(path, model="gluon_resnet18_v2")(mx.nd.array(x)).asnumpy(), expected)
    with pytest.raises(InterchangeError, match="needs the zoo model's name"):
        read(path)
    with pytest.raises(WeightsError, match="resnet18_v1"):
        read(path, model="resnet18_v1")
    net.hybridize()
    net(mx.nd.array(x))
    net.export(str(tmp_path / "exported"))
    for file in ("exported-symbol.json", "exported-0000.params"):
        loaded = read(tmp_path / file, model="resnet18_v2")
        assert np.array_equal(loaded(mx.nd.array(x)).asnumpy(), expected)
    with pytest.raises(WeightsError, match="not Gluon's resnet34_v2"):
        read(tmp_path / "exported-symbol.json", model="resnet34_v2")
    fresh = vision.get_model("resnet18_v1")
    fresh.initialize()  # deferred: nothing to save yet
    with pytest.raises(Exception):  # noqa: B017  (MXNet's own error)
        write(fresh, tmp_path / "failed.params")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "exported-0000.params",
        "exported-symbol.json",
        "net.params",
    ]


# The book's MXNet ResNet-18, verbatim: Dive into Deep Learning, chapter "Residual Networks (ResNet)
# and ResNeXt", MXNet tab (d2l.ai, d2l-ai/d2l-en chapter_convolutional-modern/resnet.md). The book
# runs it with `npx.set_np()`. -------------------------------------------------------------------


class d2l:  # noqa: N801  (the two helpers of the book's `d2l` package this code uses, stood in)
    class Classifier(nn.Block):
        def save_hyperparameters(self) -> None:
            pass

        def forward(self, X):  # noqa: N803
            return self.net(X)

    @staticmethod
    def add_to_class(Class):  # noqa: N803
        def wrapper(obj):
            setattr(Class, obj.__name__, obj)

        return wrapper


# fmt: off
class Residual(nn.Block):  #@save
    """The Residual block of ResNet models."""
    def __init__(self, num_channels, use_1x1conv=False, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = nn.Conv2D(num_channels, kernel_size=3, padding=1,
                               strides=strides)
        self.conv2 = nn.Conv2D(num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2D(num_channels, kernel_size=1,
                                   strides=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm()
        self.bn2 = nn.BatchNorm()

    def forward(self, X):
        Y = npx.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        return npx.relu(Y + X)


class ResNet(d2l.Classifier):
    def b1(self):
        net = nn.Sequential()
        net.add(nn.Conv2D(64, kernel_size=7, strides=2, padding=3),
                nn.BatchNorm(), nn.Activation('relu'),
                nn.MaxPool2D(pool_size=3, strides=2, padding=1))
        return net


@d2l.add_to_class(ResNet)
def block(self, num_residuals, num_channels, first_block=False):
    blk = nn.Sequential()
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.add(Residual(num_channels, use_1x1conv=True, strides=2))
        else:
            blk.add(Residual(num_channels))
    return blk


@d2l.add_to_class(ResNet)
def __init__(self, arch, lr=0.1, num_classes=10):
    super(ResNet, self).__init__()
    self.save_hyperparameters()
    self.net = nn.Sequential()
    self.net.add(self.b1())
    for i, b in enumerate(arch):
        self.net.add(self.block(*b, first_block=(i==0)))
    self.net.add(nn.GlobalAvgPool2D(), nn.Dense(num_classes))
    self.net.initialize(init.Xavier())


class ResNet18(ResNet):
    def __init__(self, lr=0.1, num_classes=10):
        super().__init__(((2, 64), (2, 128), (2, 256), (2, 512)),
                       lr, num_classes)


def classic_edition_resnet18():
    """The book's earlier (0.x) MXNet edition of the same chapter, module-level code verbatim:
    `net` built with `resnet_block` functions and `nn.Sequential`."""
    net = nn.Sequential()
    net.add(nn.Conv2D(64, kernel_size=7, strides=2, padding=3),
            nn.BatchNorm(), nn.Activation('relu'),
            nn.MaxPool2D(pool_size=3, strides=2, padding=1))

    def resnet_block(num_channels, num_residuals, first_block=False):
        blk = nn.Sequential()
        for i in range(num_residuals):
            if i == 0 and not first_block:
                blk.add(Residual(num_channels, use_1x1conv=True, strides=2))
            else:
                blk.add(Residual(num_channels))
        return blk

    net.add(resnet_block(64, 2, first_block=True),
            resnet_block(128, 2),
            resnet_block(256, 2),
            resnet_block(512, 2))
    net.add(nn.GlobalAvgPool2D(), nn.Dense(10))
    net.initialize(init.Xavier())
    return net
# fmt: on


@pytest.mark.parametrize("size", [96, 28, SIZE])
@pytest.mark.parametrize("edition", ["current", "classic"])
def test_book_resnet18_is_the_mxnet_edition(edition: str, size: int) -> None:
    graph = multires.spec("d2l_resnet18", edition="mxnet")
    x = np.random.default_rng(size).standard_normal((1 if size > 64 else 2, 1, size, size)).astype(np.float32)
    npx.set_np()
    try:
        net = ResNet18() if edition == "current" else classic_edition_resnet18()
        net(mx.np.array(x))  # shapes the lazily initialised layers
        _randomise(net, seed=7)
        expected = net(mx.np.array(x)).asnumpy()
        imported_graph, weights = from_gluon(net, graph=graph)
    finally:
        npx.reset_np()
    assert imported_graph == graph
    _check_outputs(graph, weights, x, expected)


def test_book_resnet18_training_step_updates_statistics_as_the_mxnet_edition() -> None:
    """Training mode: batch statistics, and MXNet's running update (Gluon momentum 0.9, biased
    variance, applied when the gradient is computed)."""
    graph = multires.spec("d2l_resnet18", edition="mxnet")
    x = np.random.default_rng(3).standard_normal((4, 1, 28, 28)).astype(np.float32)
    npx.set_np()
    try:
        net = ResNet18()
        net(mx.np.array(x))
        _randomise(net, seed=8)
        _, weights = from_gluon(net, graph=graph)
        with mx.autograd.record():
            out = net(mx.np.array(x))
        out.backward()
        expected = out.asnumpy()
        _, updated = from_gluon(net, graph=graph)
    finally:
        npx.reset_np()
    forward = multires.reference.forward(graph, weights, x, training=True)
    assert relative_error(forward.outputs[graph.outputs[0]], expected) < 1e-4
    for name, value in forward.running.items():
        assert relative_error(value, updated[name]) < 1e-5, name
