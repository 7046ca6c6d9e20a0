"""`multires.interchange.keras` against the real Keras models: `keras.applications` ResNets (v1 and
v2) and the book's TensorFlow ResNet-18, with random weights and random BatchNorm statistics, at
an odd input size. Each imported graph must compute the Keras model's own output (in the reference
and in every installed backend), in training mode too (running statistics), and give its weights
back bit for bit through `to_keras`."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import multires  # noqa: E402
from multires.errors import InterchangeError, SpecError, WeightsError  # noqa: E402
from multires.graph import Graph, MaxPool2d, Pad2d  # noqa: E402
from multires.interchange import keras as interchange  # noqa: E402
from multires.interchange.keras import from_keras, to_keras  # noqa: E402

TOLERANCE = 1e-5
SIZE = 45
"""An odd input size: every stride-2 layer sees odd and even sizes on the way down (45, 23, 12, 6, 3)."""


def _randomise(model: Any, seed: int) -> Any:
    """Random BatchNorm affine parameters and running statistics (variance positive); Keras'
    own initialisers already randomise the kernels and leave the biases at zero, so give those
    random values too."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        leaf = variable.path.rsplit("/", 1)[-1]
        shape = tuple(variable.shape)
        if leaf in ("gamma", "moving_variance"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif leaf in ("beta", "moving_mean", "bias"):
            variable.assign(rng.normal(0.0, 0.2, shape).astype(np.float32))
    return model


def _input(channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, SIZE, SIZE, channels), dtype=np.float32)


def _nchw(y: np.ndarray) -> np.ndarray:
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y


@cache
def _application(name: str, **options: Any) -> Any:
    """A `keras.applications` model with random weights, built once per test session."""
    model = getattr(keras.applications, name)(weights=None, **options)
    return _randomise(model, seed=len(name) + len(options))


# The two models whose outputs are compared: v1 with its classifier at a fixed odd size, v2
# without a top at any size (the pre-activation stem max-pool, where zero padding can win).
CASES: dict[str, tuple[Callable[[], Any], str, dict[str, Any]]] = {
    "ResNet50": (
        lambda: _application("ResNet50", input_shape=(SIZE, SIZE, 3), classifier_activation=None),
        "keras_resnet50",
        {},
    ),
    "ResNet50V2": (
        lambda: _application("ResNet50V2", input_shape=(None, None, 3), include_top=False),
        "keras_resnet50v2",
        {"include_top": False},
    ),
}


@cache
def _imported(case: str) -> tuple[Any, Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(Keras model, graph, weights, input NHWC, Keras' own output) of a case."""
    build, _, _ = CASES[case]
    model = build()
    graph, weights = from_keras(model)
    x = _input(3)
    return model, graph, weights, x, np.asarray(model(x, training=False))


# keras.applications: recognition and parameter counts ---------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_recognised_as_its_zoo_entry(case: str) -> None:
    _, entry, options = CASES[case]
    _, graph, weights, _, _ = _imported(case)
    assert graph == multires.spec(entry, **options)
    assert f"keras.applications.{case}, exactly" in graph.description
    assert list(weights) == list(multires.weights.weight_shapes(graph))


KERAS_PARAMS = {
    "ResNet50": 25_636_712,
    "ResNet101": 44_707_176,
    "ResNet152": 60_419_944,
    "ResNet50V2": 25_613_800,
    "ResNet101V2": 44_675_560,
    "ResNet152V2": 60_380_648,
}
"""`count_params()` of each `keras.applications` model with its 1000-class top (trainable
weights plus the BatchNorm moving statistics)."""

TOP = 2048 * 1000 + 1000
"""Parameters of the 1000-class classifier."""


def _deep(name: str) -> Any:
    return _application(name, input_shape=(32, 32, 3), classifier_activation=None)


@pytest.mark.parametrize("name", sorted(KERAS_PARAMS))
def test_param_count_equals_keras(name: str) -> None:
    """Trainable parameters equal Keras' own; `count_params()` adds the moving statistics."""
    model = CASES[name][0]() if name in CASES else _deep(name)
    graph, _ = from_keras(model)
    full = multires.spec(f"keras_{name.lower()}")
    top = 0 if "predictions" in {layer.name for layer in model.layers} else TOP
    assert model.count_params() + top == KERAS_PARAMS[name]
    moving = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    assert multires.param_count(graph) == model.count_params() - moving
    assert multires.param_count(full) == KERAS_PARAMS[name] - moving
    if top == 0:
        assert graph == full


def test_the_name_table_reads_as_documented() -> None:
    assert interchange.node_name("conv2_block1_1_conv", 1) == "layer1.0.conv1"
    assert interchange.node_name("conv3_block1_0_bn", 1) == "layer2.0.downsample.1"
    assert interchange.node_name("conv5_block3_preact_bn", 2) == "stages.3.blocks.2.norm1"
    assert interchange.node_name("conv2_block1_2_bn", 2) == "stages.0.blocks.0.norm3"
    assert interchange.node_name("post_bn", 2) == "norm"
    assert interchange.node_name("predictions", 1) == "fc"
    assert interchange.node_name("conv2_block1_out", 1) is None


# Outputs: Keras' own against the reference and every backend --------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_computes_the_keras_output(case: str) -> None:
    _, graph, weights, x, expected = _imported(case)
    actual = multires.reference.run(graph, weights, x.transpose(0, 3, 1, 2))
    assert multires.reference.relative_error(actual, _nchw(expected)) < TOLERANCE


def test_v2_stem_zero_padding_matters() -> None:
    """The pre-activation stem pools raw conv outputs: with the pool's own padding (which never
    wins the max) in place of Keras' zero padding the output differs, so the test above sees it."""
    _, graph, weights, x, expected = _imported("ResNet50V2")
    nodes = []
    for node in graph.nodes:
        if isinstance(node, Pad2d):
            continue
        if isinstance(node, MaxPool2d) and node.name == "stem.pool":
            node = dataclasses.replace(node, inputs=("stem.conv",), padding=1)
        nodes.append(node)
    wrong = Graph("no_zero_pad", graph.inputs, tuple(nodes), graph.outputs)
    actual = multires.reference.run(wrong, weights, x.transpose(0, 3, 1, 2))
    assert multires.reference.relative_error(actual, _nchw(expected)) > 1e-3


def _backend_cases() -> list[Any]:
    cases = []
    for backend in multires.available_backends():
        for layout in multires.get_backend(backend).LAYOUTS:
            cases.append(pytest.param(backend, layout, id=f"{backend}-{layout}"))
    return cases


def _run_backend(
    graph: Graph, weights: dict[str, np.ndarray], x_nhwc: np.ndarray, backend: str, layout: str
) -> Any:
    try:
        runner = multires.make_runner(graph, weights, backend, layout)
    except SpecError as error:
        if "has no lowering" in str(error):
            pytest.skip(f"backend {backend} does not lower every node of {graph.name} yet: {error}")
        raise
    y = runner.forward(x_nhwc if layout == "NHWC" else x_nhwc.transpose(0, 3, 1, 2))
    return _nchw(y) if layout == "NHWC" else y


@pytest.mark.parametrize(("backend", "layout"), _backend_cases())
@pytest.mark.parametrize("case", sorted(CASES))
def test_backends_compute_the_keras_output(case: str, backend: str, layout: str) -> None:
    _, graph, weights, x, expected = _imported(case)
    actual = _run_backend(graph, weights, x, backend, layout)
    assert multires.reference.relative_error(actual, _nchw(expected)) < TOLERANCE


TRAINING_TOLERANCE = 1e-4
"""Training mode normalises the last stage over 2 x 2 x 2 = 8 values per channel at this size,
which amplifies float32 rounding (measured: 6e-5 on the output): the whole-model budget."""

STATISTICS_TOLERANCE = 1e-3
"""The batch statistics recovered from a running update are divided by momentum 0.01, which
multiplies float32 rounding by 100; a wrong convention is off by far more: the unbiased
variance by 1/7 in the last stage, momentum 0.01 for 0.99 by O(1)."""


def _check_training(model: Any, graph: Graph, weights: dict[str, np.ndarray], x: np.ndarray) -> None:
    """One Keras training-mode call on `model` (which holds `weights`) against the reference's:
    outputs, and the batch statistics each running statistic took in, recovered from the
    update `running = 0.99 * running + 0.01 * batch` (the update itself is 100 times smaller)."""
    y = np.asarray(model(x, training=True))
    forward = multires.reference.forward(graph, weights, x.transpose(0, 3, 1, 2), training=True)
    assert multires.reference.relative_error(forward.outputs[graph.outputs[0]], _nchw(y)) < TRAINING_TOLERANCE
    _, updated = from_keras(model, graph=graph)
    assert forward.running.keys() == {n for n in weights if n.endswith(("running_mean", "running_var"))}
    for name, value in forward.running.items():
        momentum = graph[name.rsplit(".", 1)[0]].momentum
        old = weights[name].astype(np.float64)
        expected, actual = ((v - (1 - momentum) * old) / momentum for v in (value, updated[name]))
        assert multires.reference.relative_error(actual, expected) < STATISTICS_TOLERANCE, name


def test_training_mode_updates_the_running_statistics_as_keras() -> None:
    """Batch statistics, and the running mean and *biased* variance with Keras' momentum 0.99."""
    _, graph, weights, x, _ = _imported("ResNet50")
    _check_training(to_keras(graph, weights), graph, weights, x)


# Round trips and files -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_for_bit(case: str) -> None:
    _, graph, weights, x, expected = _imported(case)
    model = to_keras(graph, weights)
    assert isinstance(model, keras.Model) and model.get_layer("conv2_block1_1_conv") is not None
    assert model.input_shape[1:3] == (None, None)
    again, back = from_keras(model)
    assert again == graph and list(back) == list(weights)
    assert all(np.array_equal(back[name], weights[name]) for name in weights)
    assert np.array_equal(np.asarray(model(x, training=False)), expected)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras' save
def test_write_and_read_a_keras_file(tmp_path: Path) -> None:
    _, graph, weights, x, expected = _imported("ResNet50V2")
    path = interchange.write(to_keras(graph, weights), tmp_path / "resnet50v2.keras")
    assert [p.name for p in tmp_path.iterdir()] == ["resnet50v2.keras"]
    again, back = from_keras(interchange.read(path))
    assert again == graph and all(np.array_equal(back[name], weights[name]) for name in weights)


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])

    def broken_save(path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        interchange.write(model, tmp_path / "model.keras")
    with pytest.raises(InterchangeError, match=r"\.keras"):
        interchange.write(model, tmp_path / "model.txt")
    assert list(tmp_path.iterdir()) == []


# Bad input ------------------------------------------------------------------------------------------------


def test_an_unrecognised_model_says_what_is_supported_and_how_to_pass_a_graph() -> None:
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Dense(2)])
    with pytest.raises(InterchangeError) as caught:
        from_keras(model)
    message = str(caught.value)
    assert all(v in message for v in ("ResNet50", "ResNet152V2", "classifier_activation=None", "graph="))
    with pytest.raises(InterchangeError, match="keras.Model"):
        from_keras({"conv1": np.zeros(3)})


def _with_top(layer: Any) -> Any:
    """The v2 case's model with one of the tops `keras.applications.resnet.ResNet` appends
    (same layer names), sharing its layers: cheaper than building another ResNet-50."""
    base = CASES["ResNet50V2"][0]()
    return keras.Model(base.inputs[0], layer(base.outputs[0]))


def test_a_softmax_classifier_is_refused_unless_dropped_on_purpose() -> None:
    pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
    dense = keras.layers.Dense(5, activation="softmax", name="predictions")
    model = _with_top(lambda x: dense(pool(x)))
    with pytest.raises(InterchangeError, match="classifier_activation=None"):
        from_keras(model)
    graph, weights = from_keras(model, drop_softmax=True)
    assert graph == multires.spec("keras_resnet50v2", num_classes=5)
    _, _, _, x, _ = _imported("ResNet50V2")
    logits = multires.reference.run(graph, weights, x.transpose(0, 3, 1, 2))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert multires.reference.relative_error(probabilities, np.asarray(model(x, training=False))) < TOLERANCE


def test_global_max_pooling_is_refused_and_average_pooling_maps() -> None:
    model = _with_top(keras.layers.GlobalMaxPooling2D(name="max_pool"))
    with pytest.raises(InterchangeError, match="pooling='max'.*GlobalMaxPooling2D"):
        from_keras(model)
    avg, _ = from_keras(_with_top(keras.layers.GlobalAveragePooling2D(name="avg_pool")))
    assert avg == multires.spec("keras_resnet50v2", include_top=False, pooling="avg")


def test_a_graph_that_does_not_fit_lists_every_mismatch() -> None:
    model, _, _, _, _ = _imported("ResNet50")
    with pytest.raises(WeightsError) as caught:
        from_keras(model, graph=multires.spec("keras_resnet50", num_classes=7, in_channels=1))
    message = str(caught.value)
    assert "(4 mismatches)" in message
    assert "fc (Dense) <- Keras predictions (Dense 'predictions'): units 1000 (graph: 7)" in message
    assert "fc.weight: shape (1000, 2048), graph expects (7, 2048)" in message
    assert "fc.bias: shape (1000,), graph expects (7,)" in message
    assert "conv1.weight: shape (64, 3, 7, 7), graph expects (64, 1, 7, 7)" in message


# The book's TensorFlow ResNet-18 through graph= ---------------------------------------------------------
#
# Dive into Deep Learning, chapter "Residual Networks (ResNet) and ResNeXt", TensorFlow edition,
# verbatim but for two things Keras 3 requires: the `d2l` package is not installed, so
# `d2l.Classifier` and `d2l.add_to_class` are the minimal stand-ins below (the book's Classifier
# is a `tf.keras.Model` whose `call` returns `self.net(X)`), and Keras 3's `Sequential` takes a
# list of layers, so `Sequential(self.b1())` becomes `Sequential([self.b1()])`.


class _Classifier(tf.keras.Model):
    def save_hyperparameters(self) -> None:
        pass

    def call(self, X: Any) -> Any:
        return self.net(X)


def _add_to_class(Class: type) -> Callable[[Callable[..., Any]], None]:
    def wrapper(obj: Callable[..., Any]) -> None:
        setattr(Class, obj.__name__, obj)

    return wrapper


d2l = types.SimpleNamespace(Classifier=_Classifier, add_to_class=_add_to_class)

# fmt: off


class Residual(tf.keras.Model):  #@save
    """The Residual block of ResNet models."""
    def __init__(self, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = tf.keras.layers.Conv2D(num_channels, padding='same',
                                            kernel_size=3, strides=strides)
        self.conv2 = tf.keras.layers.Conv2D(num_channels, kernel_size=3,
                                            padding='same')
        self.conv3 = None
        if use_1x1conv:
            self.conv3 = tf.keras.layers.Conv2D(num_channels, kernel_size=1,
                                                strides=strides)
        self.bn1 = tf.keras.layers.BatchNormalization()
        self.bn2 = tf.keras.layers.BatchNormalization()

    def call(self, X):
        Y = tf.keras.activations.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = self.conv3(X)
        Y += X
        return tf.keras.activations.relu(Y)


class ResNet(d2l.Classifier):
    def b1(self):
        return tf.keras.models.Sequential([
            tf.keras.layers.Conv2D(64, kernel_size=7, strides=2,
                                   padding='same'),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.Activation('relu'),
            tf.keras.layers.MaxPool2D(pool_size=3, strides=2,
                                      padding='same')])


@d2l.add_to_class(ResNet)
def block(self, num_residuals, num_channels, first_block=False):
    blk = tf.keras.models.Sequential()
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.add(Residual(num_channels, use_1x1conv=True, strides=2))
        else:
            blk.add(Residual(num_channels))
    return blk


@d2l.add_to_class(ResNet)
def __init__(self, arch, lr=0.1, num_classes=10):
    super(ResNet, self).__init__()  # noqa: UP008
    self.save_hyperparameters()
    self.net = tf.keras.models.Sequential([self.b1()])  # Keras 3: a list (the book: Sequential(self.b1()))
    for i, b in enumerate(arch):
        self.net.add(self.block(*b, first_block=(i==0)))
    self.net.add(tf.keras.models.Sequential([
        tf.keras.layers.GlobalAvgPool2D(),
        tf.keras.layers.Dense(units=num_classes)]))


class ResNet18(ResNet):
    def __init__(self, lr=0.1, num_classes=10):
        super().__init__(((2, 64), (2, 128), (2, 256), (2, 512)),
                       lr, num_classes)
# fmt: on


@cache
def _book(size: int = SIZE) -> tuple[Any, Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The book's TF ResNet-18 (1 channel in, 10 classes) mapped onto its TF-edition graph."""
    model = ResNet18()
    x = np.random.default_rng(size).standard_normal((2, size, size, 1), dtype=np.float32)
    model(x)
    _randomise(model, seed=3)
    graph, weights = from_keras(model, graph=multires.spec("d2l_resnet18", edition="tf"))
    return model, graph, weights, x, np.asarray(model(x, training=False))


@pytest.mark.parametrize("size", [96, 28, SIZE])
def test_book_tf_resnet18_maps_onto_its_edition(size: int) -> None:
    model, graph, weights, x, expected = _book(size)
    assert len(weights) == len(model.weights)
    actual = multires.reference.run(graph, weights, x.transpose(0, 3, 1, 2))
    assert multires.reference.relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize(("backend", "layout"), _backend_cases())
def test_book_tf_resnet18_in_every_backend(backend: str, layout: str) -> None:
    _, graph, weights, x, expected = _book()
    actual = _run_backend(graph, weights, x, backend, layout)
    assert multires.reference.relative_error(actual, expected) < TOLERANCE


def test_book_tf_resnet18_trains_as_the_reference() -> None:
    """Training mode on a copy of the book's model: eps 1e-3, momentum 0.99, biased variance."""
    original, graph, weights, x, _ = _book()
    model = ResNet18()
    model(x)
    model.set_weights(original.get_weights())
    _check_training(model, graph, weights, x)


def test_book_tf_resnet18_round_trip_and_the_pytorch_edition_mismatch() -> None:
    model, graph, weights, x, expected = _book()
    exported = to_keras(graph, weights)
    again, back = from_keras(exported, graph=graph)
    assert all(np.array_equal(back[name], weights[name]) for name in weights)
    with pytest.raises(WeightsError) as caught:
        from_keras(model, graph=multires.spec("d2l_resnet18"))
    message = str(caught.value)
    # One error lists every layer that differs: SAME padding where the PyTorch edition pads 3
    # (or 1), and each of the 17 BatchNorms' eps, momentum and variance convention.
    assert "b1.0 (Conv2d) <- Keras net.0.0 (Conv2D" in message and "padding 'same'" in message
    assert message.count("epsilon 0.001 (graph: 1e-05)") == 17
    assert "b5.1.bn2 (BatchNorm) <- Keras net.4.1.bn2" in message
