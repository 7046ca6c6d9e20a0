"""TensorFlow/Keras backend: what the conformance suite does not cover.

The lowering of every node against the reference on two graphs that hit each porting trap: one
with explicit padding (asymmetric and stride-2 padding, max pooling over negative input, average
pooling without the padding in the divisor, stride with dilation, grouped convolution, the
unbiased running variance, Flatten of a spatial map), one with the TF edition's settings (SAME
windows, a strided dilated SAME convolution, zero padding before a max pool over negative input,
the biased running variance); the models inside `tf.function` and XLA, trained by `model.fit`,
saved and loaded; the NCHW lowering (run under XLA, as TensorFlow's CPU kernels are NHWC only);
SAME pads following each input's size; the book's TF stem as stock Keras layers; layer names;
errors.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import multires  # noqa: E402
from multires import reference  # noqa: E402
from multires.backend import SGD, backend_of, get_backend  # noqa: E402
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

tfb = get_backend("tf")
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
TOLERANCE = 1e-5


def traps() -> Graph:
    """Every node type, with the settings frameworks disagree on."""
    nodes = [
        Conv2d("stem.conv", "x", out_channels=8, kernel=3, stride=2, padding=((1, 0), (0, 1)), bias=True),
        BatchNorm("stem.bn", "stem.conv", momentum=0.3, eps=1e-3),
        MaxPool2d("stem.pool", "stem.bn", kernel=3, stride=2, padding=1),
        Conv2d("block.conv", "stem.pool", out_channels=8, kernel=3, padding=2, dilation=2, groups=4),
        Conv2d("block.strided", "stem.pool", out_channels=8, kernel=3, stride=2, padding=2, dilation=2),
        ReLU("block.relu", "block.conv"),
        Add("block.add", ("block.relu", "stem.pool")),
        AvgPool2d(
            "block.avg", "block.add", kernel=3, stride=2, padding=((1, 0), (1, 1)), count_include_pad=False
        ),
        AvgPool2d("block.avg_pad", "block.add", kernel=3, stride=2, padding=1),
        Add("block.sum", ("block.avg", "block.avg_pad", "block.strided")),
        Flatten("flat", "block.sum"),
        Dense("fc", "flat", out_features=5),
    ]
    return Graph("traps", (Input("x", 3),), nodes, ("fc",))


def same_traps() -> Graph:
    """The TF edition's settings: zero padding before a max pool over negative input, a stride-2
    SAME convolution and the biased running variance, then SAME windows in parallel (max and
    average pooling with and without the pads in the divisor, a strided dilated convolution)."""
    nodes = [
        Pad2d("pad", "x", padding=((1, 0), (0, 1))),
        MaxPool2d("zero_pool", "pad", kernel=3, stride=2),
        Conv2d("stem.conv", "zero_pool", out_channels=8, kernel=7, stride=2, padding="same", bias=True),
        BatchNorm("stem.bn", "stem.conv", eps=1e-3, momentum=0.3, running_variance="biased"),
        MaxPool2d("stem.pool", "stem.bn", kernel=3, stride=2, padding="same"),
        Conv2d("block.conv", "stem.bn", out_channels=8, kernel=3, stride=2, dilation=2, padding="same"),
        BatchNorm("block.bn", "block.conv", momentum=0.2),
        AvgPool2d("block.avg", "stem.bn", kernel=3, stride=2, padding="same", count_include_pad=False),
        AvgPool2d("block.avg_pad", "stem.bn", kernel=(2, 3), stride=2, padding="same"),
        Add("block.sum", ("stem.pool", "block.bn", "block.avg", "block.avg_pad")),
        GlobalAvgPool("pool", "block.sum"),
        Flatten("flat", "pool"),
        Dense("fc", "flat", out_features=5),
    ]
    return Graph("same_traps", (Input("x", 3),), nodes, ("fc",))


def tiny(classes: int = 4) -> Graph:
    """A small residual network with a global-pool head."""
    nodes = [
        Conv2d("conv1", "x", out_channels=8, kernel=3, padding=1),
        BatchNorm("bn1", "conv1"),
        ReLU("relu1", "bn1"),
        Conv2d("block.conv", "relu1", out_channels=8, kernel=3, padding=1),
        BatchNorm("block.bn", "block.conv"),
        Add("block.add", ("block.bn", "relu1")),
        ReLU("block.relu", "block.add"),
        GlobalAvgPool("pool", "block.relu"),
        Flatten("flatten", "pool"),
        Dense("fc", "flatten", out_features=classes),
    ]
    return Graph("tiny", (Input("x", 3),), nodes, ("fc",))


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=[traps, same_traps], ids=["traps", "same_traps"])
def case(request) -> tuple[Graph, dict[str, np.ndarray], np.ndarray]:
    graph = request.param()
    # Shifted negative so that zero padding would win the first max pooling.
    x = np.random.default_rng(0).normal(-1.0, 1.0, size=(4, 3, 17, 15)).astype(np.float32)
    return graph, multires.random_weights(graph, seed=3, input_shape=x.shape), x


def test_lowering_matches_reference(case) -> None:
    graph, weights, x = case
    runner = tfb.make_runner(graph, weights, "NHWC", SGD(lr=0.1, momentum=0.9, weight_decay=1e-3))
    assert reference.relative_error(runner.forward(nhwc(x)), reference.run(graph, weights, x)) <= TOLERANCE
    expected = reference.forward(graph, weights, x, training=True)
    assert (
        reference.relative_error(runner.forward(nhwc(x), training=True), expected.outputs["fc"]) <= TOLERANCE
    )
    current = runner.weights()
    for name, value in expected.running.items():
        assert reference.relative_error(current[name], value) <= TOLERANCE, name

    runner.set_weights(weights)
    labels = np.array([0, 1, 4, 2])
    state: dict[str, np.ndarray] = {}
    expected_weights = weights
    for _ in range(2):
        loss, _ = runner.train_step(nhwc(x), labels)
        expected_loss, expected_weights, state = reference.sgd_step(
            graph, expected_weights, x, labels, SGD(lr=0.1, momentum=0.9, weight_decay=1e-3), state
        )
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        current = runner.weights()
        for name, value in expected_weights.items():
            assert reference.relative_error(current[name], value) <= TOLERANCE, name


def test_max_pool_padding_never_wins() -> None:
    graph = Graph(
        "pool", (Input("x", 2),), (MaxPool2d("pool", "x", kernel=3, stride=2, padding=1),), ("pool",)
    )
    x = -1.0 - np.random.default_rng(1).random((2, 2, 6, 6), dtype=np.float32)
    out = tfb.build(graph, "NHWC")(nhwc(x)).numpy()
    assert out.max() < -1.0
    assert np.array_equal(out, nhwc(reference.run(graph, {}, x).astype(np.float32)))


@pytest.mark.parametrize(
    ("convention", "ddof", "layer"),
    [("unbiased", 1, tfb.layers.BatchNorm), ("biased", 0, tfb.layers.BatchNorm)],
)
def test_running_variance_conventions(convention: str, ddof: int, layer: type) -> None:
    bn = BatchNorm("bn", "x", momentum=1.0, running_variance=convention)
    graph = Graph("bn", (Input("x", 3),), (bn,), ("bn",))
    x = np.random.default_rng(2).normal(size=(2, 3, 2, 2)).astype(np.float32)
    model = tfb.build(graph, "NHWC")
    assert type(model.get_layer("bn")) is layer
    model(nhwc(x), training=True)
    var = tfb.export_weights(model)["bn.running_var"]
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3), ddof=ddof), rtol=1e-5)


def test_same_pads_follow_each_input_size() -> None:
    """One model, built for any image size, pads each size as TensorFlow's SAME does (even and
    odd sizes differ at stride 2), also under XLA."""
    graph = same_traps()
    weights = multires.random_weights(graph, seed=4)
    model = tfb.load_weights(tfb.build(graph, "NHWC", weights), weights)
    xla = tf.function(lambda t: model(t, training=False), jit_compile=True)
    rng = np.random.default_rng(4)
    for size in [(16, 16), (17, 13), (18, 21), (23, 20)]:
        x = rng.normal(-1.0, 1.0, size=(2, 3, *size)).astype(np.float32)
        expected = reference.run(graph, weights, x)
        assert reference.relative_error(model(nhwc(x), training=False).numpy(), expected) <= TOLERANCE, size
        assert reference.relative_error(xla(nhwc(x)).numpy(), expected) <= TOLERANCE, size


def test_the_books_tf_stem_is_stock_keras() -> None:
    """The book's TF edition is the function of its own Keras code: the lowered stem is the same
    stock layers (no helper layers) but for BatchNorm, a `BatchNormalization` with more accurate
    batch statistics, so hand-written Keras takes its weights as they are and agrees in eval and
    training mode, running statistics included, at an odd size."""
    graph = Graph(
        "stem",
        (Input("x", 1),),
        (
            Conv2d("conv", "x", out_channels=8, kernel=7, stride=2, padding="same", bias=True),
            BatchNorm("bn", "conv", eps=1e-3, momentum=0.01, running_variance="biased"),
            ReLU("relu", "bn"),
            MaxPool2d("pool", "relu", kernel=3, stride=2, padding="same"),
        ),
        ("pool",),
    )
    weights = multires.random_weights(graph, seed=8)
    lowered = tfb.load_weights(tfb.build(graph, "NHWC"), weights)
    book = keras.Sequential(
        [
            keras.Input((None, None, 1)),
            keras.layers.Conv2D(8, kernel_size=7, strides=2, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.MaxPool2D(pool_size=3, strides=2, padding="same"),
        ]
    )
    stock = [
        keras.layers.Conv2D,
        tfb.layers.BatchNorm,
        keras.layers.ReLU,
        keras.layers.MaxPooling2D,
    ]
    assert [type(layer) for layer in lowered.layers[1:]] == stock
    book.set_weights(lowered.get_weights())
    x = nhwc(np.random.default_rng(8).normal(size=(4, 1, 45, 45)).astype(np.float32))
    for training in (False, True):
        np.testing.assert_allclose(
            lowered(x, training=training), book(x, training=training), rtol=1e-5, atol=1e-6
        )
    for a, b in zip(lowered.get_weights(), book.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    edition = multires.build(multires.spec("d2l_resnet18", edition="tf"), backend="tf")
    assert all(
        type(layer).__module__.startswith("keras.") or type(layer) is tfb.layers.BatchNorm
        for layer in edition.layers
    )


def test_tf_function_and_xla_give_the_same_outputs(case) -> None:
    graph, weights, x = case
    model = tfb.build(graph, "NHWC", weights)
    tfb.load_weights(model, weights)
    eager = model(nhwc(x), training=False).numpy()
    graph_mode = tf.function(lambda t: model(t, training=False))(nhwc(x)).numpy()
    xla = tf.function(lambda t: model(t, training=False), jit_compile=True)(nhwc(x)).numpy()
    # Grouped convolutions run through XLA in eager mode (TensorFlow's CPU kernel lacks groups).
    assert reference.relative_error(graph_mode, eager) <= TOLERANCE
    assert reference.relative_error(xla, eager) <= TOLERANCE
    train_xla = tf.function(lambda t: model(t, training=True), jit_compile=True)(nhwc(x)).numpy()
    expected = reference.forward(graph, weights, x, training=True)
    assert reference.relative_error(train_xla, expected.outputs["fc"]) <= TOLERANCE
    current = tfb.export_weights(model)
    for name, value in expected.running.items():
        assert reference.relative_error(current[name], value) <= TOLERANCE, name


def test_nchw_lowering_under_xla(case) -> None:
    graph, weights, x = case
    model = tfb.load_weights(tfb.build(graph, "NCHW", weights), weights)
    assert model.input_shape == (None, 3, None, None)
    run = tf.function(lambda t, training: model(t, training=training), jit_compile=True)
    assert reference.relative_error(run(x, False).numpy(), reference.run(graph, weights, x)) <= TOLERANCE
    expected = reference.forward(graph, weights, x, training=True)
    assert reference.relative_error(run(x, True).numpy(), expected.outputs["fc"]) <= TOLERANCE
    assert (
        reference.relative_error(
            tfb.export_weights(model)["stem.bn.running_var"], expected.running["stem.bn.running_var"]
        )
        <= TOLERANCE
    )


def test_model_fit_reduces_the_loss() -> None:
    graph = tiny()
    keras.utils.set_random_seed(0)
    model = multires.build(graph, backend="keras", weights=multires.init_weights(graph, seed=0))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=16)
    history = model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.85 * losses[0], losses


def test_save_and_load_round_trip(case, tmp_path) -> None:
    graph, weights, x = case
    model = tfb.load_weights(tfb.build(graph, "NHWC", weights), weights)
    path = tmp_path / "traps.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_array_equal(loaded(nhwc(x)).numpy(), model(nhwc(x)).numpy())
    exported = multires.weights.export(loaded)
    assert exported.keys() == weights.keys()
    assert all(np.array_equal(exported[k], weights[k]) for k in weights)
    # Training mode still folds the running variance by its convention after a reload.
    np.testing.assert_allclose(
        loaded(nhwc(x), training=True).numpy(), model(nhwc(x), training=True).numpy(), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(
        loaded.get_layer("stem.bn").moving_variance.numpy(),
        model.get_layer("stem.bn").moving_variance.numpy(),
    )


def test_layer_names_are_the_spec_names() -> None:
    graph = multires.spec("resnet18")
    model = multires.build("resnet18", backend="tf")
    names = {layer.name for layer in model.layers}
    assert {node.name for node in graph.nodes} <= names
    # The other layers are the input and helpers named `<node>.<role>` (explicit padding).
    inputs = {spec.name for spec in graph.inputs}
    assert all(n in inputs or n in graph.by_name or n.rsplit(".", 1)[0] in graph.by_name for n in names)
    assert isinstance(model.get_layer("layer1.0.conv1"), keras.layers.Conv2D)
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=150)
    text = "\n".join(lines)
    for name in ("conv1", "layer1.0.conv1", "layer4.1.bn2", "layer2.0.downsample.0", "avgpool", "fc"):
        assert f"{name} (" in text
    assert model.output_shape == (None, 1000)
    assert backend_of(model) is tfb


def test_weights_round_trip_and_mismatch_report() -> None:
    graph = tiny()
    weights = multires.random_weights(graph, seed=5)
    model = multires.build(graph, backend="tf", weights=weights)
    exported = multires.weights.export(model)
    assert list(exported) == list(weights)
    assert all(exported[k].dtype == np.float32 and np.array_equal(exported[k], weights[k]) for k in weights)
    assert model.get_layer("conv1").kernel.shape == (3, 3, 3, 8)
    assert model.get_layer("fc").kernel.shape == (8, 4)
    bad = dict(weights)
    del bad["bn1.running_var"]
    bad["conv1.weight"] = bad["conv1.weight"].transpose(2, 3, 1, 0)
    bad["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as error:
        tfb.load_weights(model, bad)
    message = str(error.value)
    assert "missing bn1.running_var" in message
    assert "conv1.weight: shape (3, 3, 3, 8), expected (8, 3, 3, 3)" in message
    assert "unexpected extra.weight" in message


def test_optimizer_state_resumes_exactly() -> None:
    graph = tiny()
    weights = multires.random_weights(graph, seed=6)
    optimizer = SGD(lr=0.05, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=4)
    first = multires.make_runner(graph, weights, "tf", optimizer=optimizer)
    assert first.optimizer_state() == {}
    first.train_step(x, labels)
    second = multires.make_runner(graph, first.weights(), "tf", optimizer=optimizer)
    second.set_optimizer_state(first.optimizer_state())
    first.train_step(x, labels)
    second.train_step(x, labels)
    a, b = first.weights(), second.weights()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_input_shape_errors() -> None:
    graph = tiny()
    runner = multires.make_runner(graph, multires.init_weights(graph), "tf")
    with pytest.raises(ShapeError, match=r"expects shape \(N, H, W, 3\) in NHWC.*looks like NCHW"):
        runner.forward(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ShapeError, match="bn1 \\(BatchNorm\\): training mode needs more than one value"):
        runner.forward(np.zeros((1, 1, 1, 3), np.float32), training=True)
    with pytest.raises(ShapeError, match=r"labels must lie in \[0, 4\)"):
        runner.train_step(np.zeros((2, 4, 4, 3), np.float32), np.array([0, 4]))
    spatial = Graph("spatial", (Input("x", 3),), (Conv2d("conv", "x", out_channels=2, kernel=1),), ("conv",))
    spatial_runner = multires.make_runner(spatial, multires.init_weights(spatial), "tf")
    assert spatial_runner.forward(np.zeros((2, 4, 5, 3), np.float32)).shape == (2, 4, 5, 2)
    with pytest.raises(ShapeError, match="cross-entropy needs \\(N, classes\\) logits"):
        spatial_runner.train_step(np.zeros((2, 4, 5, 3), np.float32), np.array([0, 1]))


def test_flatten_of_a_spatial_map_takes_the_dense_width_from_the_weights() -> None:
    nodes = (
        Conv2d("conv", "x", out_channels=2, kernel=1),
        Flatten("flatten", "conv"),
        Dense("fc", "flatten", out_features=3),
    )
    graph = Graph("flat", (Input("x", 3),), nodes, ("fc",))
    x = np.random.default_rng(7).normal(size=(2, 3, 4, 5)).astype(np.float32)
    weights = multires.random_weights(graph, seed=7, input_shape=x.shape)
    placeholder = tfb.build(graph, "NHWC")
    assert isinstance(placeholder.get_layer("fc"), tfb.layers.DeferredDense)
    with pytest.raises(WeightsError, match=r"fc \(Dense\): its input width depends on the image size"):
        placeholder(nhwc(x))
    model = multires.weights.load(placeholder, weights)
    assert model.get_layer("fc").kernel.shape == (40, 3)
    assert reference.relative_error(model(nhwc(x)).numpy(), reference.run(graph, weights, x)) <= TOLERANCE
    runner = tfb.make_runner(graph, weights, "NHWC", SGD())
    with pytest.raises(
        ShapeError, match=r"fc \(Dense\): an input of shape .* gives it 48 features.* take 40"
    ):
        runner.forward(np.zeros((2, 4, 6, 3), np.float32))


@pytest.mark.skipif(HAS_GPU, reason="NCHW is supported with a GPU")
def test_nchw_without_gpu_says_why() -> None:
    assert tfb.LAYOUTS == ("NHWC",)
    with pytest.raises(
        ShapeError, match=r"not 'NCHW'.*CPU kernels.*only run channels-last.*no GPU.*layout='NHWC'"
    ):
        multires.build(tiny(), backend="tensorflow", layout="NCHW")
