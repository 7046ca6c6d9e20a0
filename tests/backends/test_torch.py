"""PyTorch backend: what the conformance suite does not cover.

The built module reads like a hand-written one (module tree, state_dict keys, printed form,
generated forward); torchvision and d2l checkpoints map over by the documented rename table
(checked against hand-written torchvision-style and d2l-book models); `torch.export`,
`torch.compile` and `channels_last` work and agree; NHWC is exact; BatchNorm counters, lazy
Dense widths, in-place ReLU, copies and pickles; errors. SAME padding: the `*Same` layers trace
with `torch.fx` and the book's TF edition exports with a dynamic image size; static SAME is the
layer's own padding; Pad2d and the biased running variance.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import multires  # noqa: E402
from multires import (  # noqa: E402
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    Graph,
    Input,
    MaxPool2d,
    Pad2d,
    ReLU,
)
from multires.backend import SGD, get_backend  # noqa: E402
from multires.errors import ShapeError, WeightsError  # noqa: E402

tb = get_backend("torch")
from multires.backends.torch.weights import CHECKPOINT_RENAMES, from_state_dict  # noqa: E402


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    graph = multires.spec("resnet18", num_classes=10)
    return tb.load_weights(tb.build(graph), multires.random_weights(graph)).eval()


# A hand-written torchvision ResNet-18 (torchvision.models.resnet, trimmed to BasicBlock). -------


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchvisionResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            setattr(self, f"layer{i + 1}", layer)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# The d2l book's ResNet-18 (d2l.ai, "Residual Networks", PyTorch), module paths included. --------


class Residual(nn.Module):
    def __init__(
        self, in_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, num_channels, 3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, 3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, num_channels, 1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return torch.relu(y + x)


class D2lResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        b1 = nn.Sequential(nn.Conv2d(1, 64, 7, 2, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.net = nn.Sequential(b1)
        in_channels = 64
        for i, channels in enumerate((64, 128, 256, 512)):
            first = i > 0
            blocks = [Residual(in_channels, channels, use_1x1conv=first, strides=2 if first else 1)]
            blocks.append(Residual(channels, channels))
            self.net.add_module(f"b{i + 2}", nn.Sequential(*blocks))
            in_channels = channels
        self.net.add_module(
            "last", nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm parameters and statistics, so a mixed-up BN shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.running_var):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                for tensor in (module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model


# The module reads like a hand-written one. -----------------------------------------------------


def test_the_module_tree_mirrors_the_spec_hierarchy(resnet18: nn.Module) -> None:
    assert isinstance(resnet18, nn.Module)
    assert isinstance(resnet18.conv1, nn.Conv2d)
    assert isinstance(resnet18.layer1, nn.ModuleList)
    assert isinstance(resnet18.layer1[0].conv1, nn.Conv2d)
    assert isinstance(resnet18.layer2[0].downsample[0], nn.Conv2d)
    assert isinstance(resnet18.layer2[0].downsample[1], nn.BatchNorm2d)
    assert isinstance(resnet18.fc, nn.Linear)
    preact = tb.build(multires.spec("preact_resnet18"))
    assert isinstance(preact.stages[3].blocks[0].downsample.conv, nn.Conv2d)
    assert isinstance(preact.head.fc, nn.Linear)
    d2l = tb.build(multires.spec("d2l_resnet18"))
    assert isinstance(d2l.b1[0], nn.Conv2d) and d2l.b1[0].bias is not None
    assert isinstance(d2l.b3[0].conv3, nn.Conv2d)


def test_print_shows_the_layers_and_code_shows_the_generated_forward(resnet18: nn.Module) -> None:
    text = str(resnet18)
    assert text == repr(resnet18) and "def forward" not in text
    assert text.startswith("resnet18(")
    assert "(layer1): ModuleList(" in text
    assert "(conv1): Conv2d(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)" in text
    assert "(bn1): BatchNorm2d(64, eps=1e-05, momentum=0.1" in text
    code = resnet18.code
    assert "def forward(self, input):" in code
    assert 'getattr(self.layer1, "0").conv1(' in code
    assert "layer1_0_bn2 += maxpool;  layer1_0_add = layer1_0_bn2" in code
    assert "torch.flatten(avgpool, 1)" in code


def test_state_dict_keys_are_canonical_names_plus_batchnorm_counters(resnet18: nn.Module) -> None:
    graph = multires.spec("resnet18", num_classes=10)
    canonical = set(multires.weights.weight_shapes(graph))
    keys = set(resnet18.state_dict())
    counters = {k for k in keys if k.endswith(".num_batches_tracked")}
    assert keys - counters == canonical
    assert {k.rsplit(".", 1)[0] for k in counters} == {
        n.name for n in graph.nodes if isinstance(n, BatchNorm)
    }


def test_symmetric_padding_stays_on_the_layer_and_asymmetric_becomes_f_pad() -> None:
    def graph(padding: object) -> Graph:
        return Graph(
            "g", Input("x", 3), (Conv2d("conv", "x", out_channels=2, kernel=3, padding=padding),), "conv"
        )

    symmetric = tb.build(graph(1))
    assert symmetric.conv.padding == (1, 1) and "pad" not in symmetric.code
    asymmetric = tb.build(graph(((0, 1), (2, 1))))
    assert asymmetric.conv.padding == (0, 0)
    assert "torch.nn.functional.pad(x_check, (2, 1, 0, 1), value = 0.0)" in asymmetric.code


def test_batchnorm_eps_and_momentum_are_carried_exactly() -> None:
    graph = Graph(
        "bn",
        Input("x", 3),
        (Conv2d("conv", "x", out_channels=4, kernel=1), BatchNorm("bn", "conv", eps=1.25e-3, momentum=0.03)),
        "bn",
    )
    bn = tb.build(graph).bn
    assert (bn.eps, bn.momentum) == (1.25e-3, 0.03)


# torchvision and d2l checkpoints. --------------------------------------------------------------


def test_torchvision_state_dicts_load_unchanged_and_compute_the_same() -> None:
    handwritten = _randomise_bn(TorchvisionResNet18()).eval()
    model = tb.build(multires.spec("resnet18", num_classes=10)).eval()
    reference_keys = {k: tuple(v.shape) for k, v in handwritten.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_keys
    assert CHECKPOINT_RENAMES["torchvision"] == ()
    model.load_state_dict(handwritten.state_dict(), strict=True)
    x = _x((2, 3, 64, 64))
    with torch.no_grad():
        assert torch.equal(model(x), handwritten(x))
    exported = tb.export_weights(model)
    canonical = from_state_dict(handwritten.state_dict(), CHECKPOINT_RENAMES["torchvision"])
    assert sorted(exported) == sorted(canonical)
    assert all(np.array_equal(exported[k], v) for k, v in canonical.items())


def test_d2l_state_dicts_map_over_by_the_rename_table() -> None:
    handwritten = _randomise_bn(D2lResNet18()).eval()
    model = tb.build(multires.spec("d2l_resnet18")).eval()
    weights = from_state_dict(handwritten.state_dict(), CHECKPOINT_RENAMES["d2l"])
    assert "b1.0.weight" in weights and "b2.0.conv1.weight" in weights and "last.2.weight" in weights
    tb.load_weights(model, weights)
    x = _x((2, 1, 96, 96))
    with torch.no_grad():
        assert torch.equal(model(x), handwritten(x))


def test_from_state_dict_renames_by_the_first_matching_prefix_and_drops_counters() -> None:
    state = {
        "net.0.0.weight": torch.ones(2, dtype=torch.float64),
        "net.b2.0.conv1.bias": torch.ones(1),
        "extra.weight": torch.ones(1),
        "net.0.1.num_batches_tracked": torch.tensor(3),
    }
    weights = from_state_dict(state, CHECKPOINT_RENAMES["d2l"])
    assert list(weights) == ["b1.0.weight", "b2.0.conv1.bias", "extra.weight"]
    assert weights["b1.0.weight"].dtype == np.float32


# BatchNorm counters, lazy widths, copies. ------------------------------------------------------


def test_batchnorm_counters_are_not_weights_and_reset_on_load() -> None:
    graph = multires.spec("resnet18", num_classes=10)
    weights = multires.random_weights(graph)
    model = tb.load_weights(tb.build(graph), weights).train()
    model(_x((2, 3, 32, 32)))
    assert int(model.bn1.num_batches_tracked) == 1
    assert not any(k.endswith("num_batches_tracked") for k in tb.export_weights(model))
    tb.load_weights(model, weights)
    assert int(model.bn1.num_batches_tracked) == 0


def test_a_dense_after_a_spatial_flatten_takes_its_width_from_the_weights() -> None:
    graph = Graph(
        "flat",
        Input("x", 3),
        (
            Conv2d("conv", "x", out_channels=2, kernel=3),
            Flatten("flatten", "conv"),
            Dense("fc", "flatten", out_features=4),
        ),
        "fc",
    )
    model = tb.build(graph)
    with pytest.raises(WeightsError, match="fc: its shape depends on the image size"):
        tb.export_weights(model)
    weights = multires.random_weights(graph, input_shape=(1, 3, 6, 5))
    tb.load_weights(model, weights)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 2 * 4 * 3
    assert all(np.array_equal(v, weights[k]) for k, v in tb.export_weights(model).items())


def test_relu_is_in_place_only_where_nothing_else_reads_its_input() -> None:
    graph = Graph(
        "relus",
        Input("x", 3),
        (
            ReLU("on_input", "x"),
            Conv2d("conv", "on_input", out_channels=3, kernel=1),
            ReLU("sole_reader", "conv"),
            ReLU("after_relu", "sole_reader"),
            Conv2d("shared", "after_relu", out_channels=3, kernel=1),
            ReLU("one_of_two", "shared"),
            Flatten("flatten", "shared"),
            Flatten("flatten2", "one_of_two"),
            multires.Add("sum", ("flatten", "flatten2")),
        ),
        "sum",
    )
    model = tb.build(graph)
    assert model.sole_reader.inplace
    assert not model.on_input.inplace
    assert not model.after_relu.inplace
    assert not model.one_of_two.inplace
    x = _x((2, 3, 4, 4))
    before = x.clone()
    model(x)
    assert torch.equal(x, before), "the caller's input was modified"


def test_add_accumulates_in_place_into_an_input_nothing_else_reads() -> None:
    graph = Graph(
        "adds",
        Input("x", 3),
        (
            Conv2d("a", "x", out_channels=3, kernel=1),
            Conv2d("b", "a", out_channels=3, kernel=1),
            multires.Add("sum", ("a", "b")),
            multires.Add("with_input", ("x", "sum")),
        ),
        "with_input",
    )
    model = tb.build(graph)
    assert "b += a;  sum_1 = b" in model.code
    assert "sum_1 += x_check;  with_input = sum_1" in model.code
    weights = multires.random_weights(graph)
    tb.load_weights(model, weights)
    x = _x((2, 3, 4, 4))
    expected = multires.reference.run(graph, weights, x.numpy())
    with torch.no_grad():
        assert multires.reference.relative_error(model(x).numpy(), expected) <= 1e-6


def test_deepcopy_and_pickle_keep_the_module_tree_and_the_function(resnet18: nn.Module) -> None:
    x = _x((2, 3, 32, 32))
    with torch.no_grad():
        expected = resnet18(x)
        for clone in (copy.deepcopy(resnet18), pickle.loads(pickle.dumps(resnet18))):
            assert isinstance(clone.layer1, nn.ModuleList)
            assert isinstance(clone.layer1[0].conv1, nn.Conv2d)
            assert torch.equal(clone(x), expected)


# Compilers, memory formats and layouts. --------------------------------------------------------


def test_torch_export_succeeds_and_agrees(resnet18: nn.Module) -> None:
    x = _x((2, 3, 32, 32))
    exported = torch.export.export(resnet18, (x,))
    with torch.no_grad():
        assert _rel(exported.module()(x), resnet18(x)) <= 1e-6


def test_torch_compile_captures_the_whole_forward_without_graph_breaks(resnet18: nn.Module) -> None:
    x = _x((2, 3, 32, 32))
    compiled = torch.compile(resnet18, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert _rel(compiled(x), resnet18(x)) <= 1e-6


@pytest.mark.filterwarnings("ignore:The TorchScript type system")  # raised on torch.fx internals
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_jit_script_compiles_the_generated_forward(resnet18: nn.Module) -> None:
    scripted = torch.jit.script(resnet18)
    x = _x((2, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(scripted(x), resnet18(x))
    with pytest.raises(torch.jit.Error, match="_reject"):
        scripted(_x((2, 32, 32, 3)))


@pytest.mark.parametrize("training", [False, True])
def test_channels_last_gives_the_same_outputs(training: bool) -> None:
    graph = multires.spec("resnet18", num_classes=10)
    weights = multires.random_weights(graph)
    x = _x((4, 3, 32, 32))
    plain = tb.load_weights(tb.build(graph), weights).train(training)
    fast = tb.load_weights(tb.build(graph), weights).train(training).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _rel(fast(x.to(memory_format=torch.channels_last)), plain(x)) <= 1e-5
    for name, value in tb.export_weights(fast).items():
        assert multires.reference.relative_error(value, tb.export_weights(plain)[name]) <= 1e-5, name


def test_nhwc_is_the_nchw_model_on_transposed_arrays() -> None:
    graph = Graph(
        "spatial",
        Input("x", 3),
        (
            Conv2d("conv", "x", out_channels=4, kernel=3, stride=2, padding=((1, 0), (0, 1))),
            BatchNorm("bn", "conv"),
            ReLU("relu", "bn"),
        ),
        "relu",
    )
    weights = multires.random_weights(graph)
    nchw = tb.load_weights(tb.build(graph, "NCHW"), weights).eval()
    nhwc = tb.load_weights(tb.build(graph, "NHWC"), weights).eval()
    x = _x((2, 3, 7, 9))
    with torch.no_grad():
        out = nhwc(x.permute(0, 2, 3, 1).contiguous())
        assert out.shape == (2, 3, 4, 4)
        assert _rel(out.permute(0, 3, 1, 2), nchw(x)) <= 1e-6
    assert all(np.array_equal(v, weights[k]) for k, v in tb.export_weights(nhwc).items())


# Errors. ---------------------------------------------------------------------------------------


def test_the_generated_forward_checks_the_input_shape(resnet18: nn.Module) -> None:
    with pytest.raises(ShapeError, match=r"expects shape \(N, 3, H, W\) in NCHW.*It looks like NHWC"):
        resnet18(_x((2, 32, 32, 3)))
    with pytest.raises(ShapeError, match=r"expects shape \(N, 3, H, W\) in NCHW; got \(2, 1, 32, 32\)\.$"):
        resnet18(_x((2, 1, 32, 32)))
    nhwc = tb.build(multires.spec("resnet18"), "NHWC")
    with pytest.raises(ShapeError, match=r"expects shape \(N, H, W, 3\) in NHWC.*It looks like NCHW"):
        nhwc(_x((2, 3, 32, 32)))


def test_runner_rejects_bad_labels_and_optimizer_state() -> None:
    graph = multires.spec("resnet18", num_classes=10)
    runner = multires.make_runner(graph, multires.random_weights(graph), "torch", optimizer=SGD(momentum=0.9))
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(ShapeError, match=r"labels must lie in \[0, 10\)"):
        runner.train_step(x, np.array([0, 10]))
    with pytest.raises(ShapeError, match="labels must be 2 integer class indices"):
        runner.train_step(x, np.array([0.0, 1.0]))
    with pytest.raises(WeightsError, match="unexpected nope.weight"):
        runner.set_optimizer_state({"nope.weight": np.zeros(1, np.float32)})
    with pytest.raises(WeightsError, match=r"fc.bias: shape \(3,\), expected \(10,\)"):
        runner.set_optimizer_state({"fc.bias": np.zeros(3, np.float32)})


def test_load_weights_names_every_problem() -> None:
    graph = multires.spec("resnet18", num_classes=10)
    weights = multires.random_weights(graph)
    del weights["fc.bias"]
    weights["bn1.weight"] = np.zeros(3, np.float32)
    weights["bn1.num_batches_tracked"] = np.zeros((), np.float32)
    with pytest.raises(WeightsError) as info:
        tb.load_weights(tb.build(graph), weights)
    message = str(info.value)
    assert "(3 problem(s))" in message
    assert "missing fc.bias (10,)" in message
    assert "bn1.weight: shape (3,), expected (64,)" in message
    assert "unexpected bn1.num_batches_tracked" in message


def test_strided_1x1_conv_gradients_are_exact_in_nhwc() -> None:
    """PyTorch 2.13's CPU weight gradient of a strided 1x1 convolution is racy on channels_last
    input (the NHWC layout); the lowering feeds it NCHW-contiguous input, so every repetition
    gives the reference's gradient."""
    graph = multires.Graph(
        "strided_1x1",
        multires.Input("x", 3),
        (
            multires.Conv2d("conv3x3", "x", out_channels=4, kernel=3, stride=2, padding=1),
            multires.Conv2d("conv1x1", "conv3x3", out_channels=4, kernel=1, stride=2),
            multires.Flatten("flatten", "conv1x1"),
            multires.Dense("fc", "flatten", out_features=5),
        ),
        "fc",
    )
    weights = multires.random_weights(graph, seed=0, input_shape=(4, 3, 8, 12))
    x = np.random.default_rng(0).standard_normal((4, 8, 12, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    model = tb.load_weights(tb.build(graph, "NHWC"), weights)
    grads = []
    for _ in range(200):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels))
        loss.backward()
        grads.append(model.conv1x1.weight.grad.double().numpy())
    _, expected, _ = multires.reference.loss_and_grads(graph, weights, x.transpose(0, 3, 1, 2), labels)
    scale = np.abs(expected["conv1x1.weight"]).max()
    for grad in grads:
        assert np.abs(grad - expected["conv1x1.weight"]).max() <= 1e-4 * scale


# TensorFlow/XLA SAME padding, Pad2d and the biased running variance. ---------------------------


def _single(node: multires.graph.Node, channels: int = 3) -> Graph:
    return Graph(node.name, Input("x", channels), (node,), node.name)


SAME_LAYERS = {
    "conv_strided": Conv2d("n", "x", out_channels=2, kernel=3, stride=2, padding="same", bias=True),
    "conv_dilated": Conv2d("n", "x", out_channels=2, kernel=3, stride=(2, 3), dilation=2, padding="same"),
    "conv_window_shorter_than_stride": Conv2d(
        "n", "x", out_channels=2, kernel=2, stride=(3, 4), padding="same"
    ),
    "maxpool": MaxPool2d("n", "x", kernel=3, stride=2, padding="same"),
    "avgpool_exclude_pad": AvgPool2d("n", "x", kernel=3, stride=2, padding="same", count_include_pad=False),
    "avgpool_include_pad": AvgPool2d("n", "x", kernel=(3, 2), stride=(2, 3), padding="same"),
    "avgpool_window_shorter_than_stride": AvgPool2d(
        "n", "x", kernel=2, stride=(3, 4), padding="same", count_include_pad=False
    ),
}


@pytest.mark.parametrize("name", list(SAME_LAYERS))
def test_same_layers_trace_with_fx_and_match_the_reference_at_even_and_odd_sizes(name: str) -> None:
    graph = _single(SAME_LAYERS[name])
    weights = multires.random_weights(graph, seed=1)
    layer = tb.load_weights(tb.build(graph), weights).n
    assert type(layer).__name__.endswith("Same") and "padding=SAME" in repr(layer)
    traced = torch.fx.symbolic_trace(layer)
    for size in ((7, 10), (8, 9), (9, 8), (12, 13)):
        x = _x((2, 3, *size), seed=size[0]) - 2.0  # negative: max-pool padding must not win
        expected = multires.reference.run(graph, weights, x.numpy())
        with torch.no_grad():
            got = traced(x)
            assert torch.equal(got, layer(x))
        assert got.shape == expected.shape
        assert multires.reference.relative_error(got.numpy(), expected) <= 1e-5, size


def test_same_padding_that_no_size_changes_is_the_layers_own_or_an_explicit_f_pad() -> None:
    odd = tb.build(_single(Conv2d("n", "x", out_channels=2, kernel=3, dilation=2, padding="same")))
    assert type(odd.n) is nn.Conv2d and odd.n.padding == (2, 2) and "pad" not in odd.code
    even = tb.build(_single(Conv2d("n", "x", out_channels=2, kernel=(2, 4), padding="same")))
    assert type(even.n) is nn.Conv2d and even.n.padding == (0, 0)
    assert "torch.nn.functional.pad(x_check, (1, 2, 0, 1), value = 0.0)" in even.code
    pointwise = tb.build(_single(Conv2d("n", "x", out_channels=2, kernel=1, stride=2, padding="same")))
    assert type(pointwise.n) is nn.Conv2d and pointwise.n.padding == (0, 0) and "pad(" not in pointwise.code
    pool = tb.build(_single(MaxPool2d("n", "x", kernel=3, stride=1, padding="same")))
    assert type(pool.n) is nn.MaxPool2d and pool.n.padding == (1, 1)


def test_the_tf_edition_reads_like_a_hand_written_port_with_the_pytorch_editions_keys() -> None:
    tf_edition = tb.build(multires.spec("d2l_resnet18", edition="tf"))
    text = str(tf_edition)
    assert "(0): Conv2dSame(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=SAME)" in text
    assert "(3): MaxPool2dSame(kernel_size=(3, 3), stride=(2, 2), padding=SAME)" in text
    assert "(conv1): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))" in text
    assert "(conv1): Conv2dSame(64, 128, kernel_size=(3, 3), stride=(2, 2), padding=SAME)" in text
    assert "(conv3): Conv2d(64, 128, kernel_size=(1, 1), stride=(2, 2))" in text
    assert "(bn1): BiasedVarianceBatchNorm2d(64, eps=0.001, momentum=0.01," in text
    assert isinstance(tf_edition.b1[0], nn.Conv2d) and isinstance(tf_edition.b1[1], nn.BatchNorm2d)
    pytorch_edition = tb.build(multires.spec("d2l_resnet18"))
    shapes = {k: tuple(v.shape) for k, v in tf_edition.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in pytorch_edition.state_dict().items()}


def test_the_tf_edition_exports_with_a_dynamic_image_size() -> None:
    graph = multires.spec("d2l_resnet18", edition="tf")
    weights = multires.random_weights(graph, seed=2)
    model = tb.load_weights(tb.build(graph), weights).eval()
    # From 33 on, the last stage's map is 2x2 or larger (at 32 it is 1x1, which export specialises).
    h, w = torch.export.Dim("h", min=33, max=512), torch.export.Dim("w", min=33, max=512)
    exported = torch.export.export(model, (_x((1, 1, 45, 45)),), dynamic_shapes=({2: h, 3: w},)).module()
    for size in ((45, 45), (48, 37)):
        x = _x((1, 1, *size), seed=size[1])
        with torch.no_grad():
            got = exported(x).numpy()
        assert (
            multires.reference.relative_error(got, multires.reference.run(graph, weights, x.numpy())) <= 1e-4
        )


def test_a_same_layer_whose_window_is_shorter_than_its_stride_exports_with_a_dynamic_size() -> None:
    graph = _single(SAME_LAYERS["conv_window_shorter_than_stride"])
    weights = multires.random_weights(graph, seed=3)
    model = tb.load_weights(tb.build(graph), weights)
    # From 9 on the output is at least 3x3 (a size-1 output is specialised by export).
    h, w = torch.export.Dim("h", min=9, max=64), torch.export.Dim("w", min=9, max=64)
    exported = torch.export.export(model, (_x((1, 3, 9, 9)),), dynamic_shapes=({2: h, 3: w},)).module()
    for size in ((9, 9), (10, 13), (11, 14)):
        x = _x((1, 3, *size))
        with torch.no_grad():
            got = exported(x).numpy()
        assert (
            multires.reference.relative_error(got, multires.reference.run(graph, weights, x.numpy())) <= 1e-5
        )


def test_the_tf_edition_compiles_without_graph_breaks() -> None:
    model = tb.build(multires.spec("d2l_resnet18", edition="tf")).eval()
    x = _x((1, 1, 45, 47))
    with torch.no_grad():
        assert _rel(torch.compile(model, fullgraph=True, backend="eager")(x), model(x)) <= 1e-6


def test_pad2d_is_zero_pad2d() -> None:
    model = tb.build(_single(Pad2d("pad", "x", padding=((1, 0), (2, 3)))))
    assert type(model.pad) is nn.ZeroPad2d and model.pad.padding == (2, 3, 1, 0)


def test_biased_batchnorm_updates_the_running_variance_without_bessels_correction() -> None:
    biased = tb.build(_single(BatchNorm("n", "x", momentum=0.3, running_variance="biased"))).n
    unbiased = tb.build(_single(BatchNorm("n", "x", momentum=0.3))).n
    assert type(unbiased) is nn.BatchNorm2d and isinstance(biased, nn.BatchNorm2d)
    assert "running_variance=biased" in repr(biased)
    assert list(biased.state_dict()) == list(unbiased.state_dict())
    x = _x((2, 3, 2, 3)) * 3 + 1
    with torch.no_grad():
        assert torch.equal(biased.train()(x), unbiased.train()(x))
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(biased.running_mean, 0.3 * mean)
    torch.testing.assert_close(biased.running_var, 0.7 + 0.3 * var)
    torch.testing.assert_close(unbiased.running_var, 0.7 + 0.3 * var * 12 / 11)
    assert int(biased.num_batches_tracked) == 1
    with torch.no_grad():
        assert torch.equal(biased.eval()(x), nn.functional.batch_norm(
            x, biased.running_mean, biased.running_var, biased.weight, biased.bias, eps=biased.eps
        ))  # fmt: skip
