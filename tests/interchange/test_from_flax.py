"""The book's JAX ResNet-18 (its own code, below) against multires' JAX edition, through
`from_flax` / `to_flax`: eval and training mode, at 96x96, 28x28 and an odd size."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")

import multires  # noqa: E402
from multires.errors import InterchangeError, WeightsError  # noqa: E402
from multires.interchange import from_flax, to_flax  # noqa: E402
from multires.reference import relative_error  # noqa: E402

# Dive into Deep Learning, chapter "Residual Networks (ResNet) and ResNeXt", JAX edition, verbatim
# but for the base class (the book's d2l.Classifier is an nn.Module with training utilities).


class Residual(nn.Module):  # @save
    """The Residual block of ResNet models."""

    num_channels: int
    use_1x1conv: bool = False
    strides: tuple = (1, 1)
    training: bool = True

    def setup(self):
        self.conv1 = nn.Conv(self.num_channels, kernel_size=(3, 3), padding="same", strides=self.strides)
        self.conv2 = nn.Conv(self.num_channels, kernel_size=(3, 3), padding="same")
        if self.use_1x1conv:
            self.conv3 = nn.Conv(self.num_channels, kernel_size=(1, 1), strides=self.strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm(not self.training)
        self.bn2 = nn.BatchNorm(not self.training)

    def __call__(self, X):
        Y = nn.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return nn.relu(Y)


class ResNet(nn.Module):
    arch: tuple
    lr: float = 0.1
    num_classes: int = 10
    training: bool = True

    def setup(self):
        self.net = self.create_net()

    def b1(self):
        return nn.Sequential(
            [
                nn.Conv(64, kernel_size=(7, 7), strides=(2, 2), padding="same"),
                nn.BatchNorm(not self.training),
                nn.relu,
                lambda x: nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="same"),
            ]
        )

    def block(self, num_residuals, num_channels, first_block=False):
        blk = []
        for i in range(num_residuals):
            if i == 0 and not first_block:
                blk.append(Residual(num_channels, use_1x1conv=True, strides=(2, 2), training=self.training))
            else:
                blk.append(Residual(num_channels, training=self.training))
        return nn.Sequential(blk)

    def create_net(self):
        net = nn.Sequential([self.b1()])
        for i, b in enumerate(self.arch):
            net.layers.extend([self.block(*b, first_block=(i == 0))])
        net.layers.extend(
            [
                nn.Sequential(
                    [
                        # Flax does not provide a GlobalAvg2D layer
                        lambda x: nn.avg_pool(
                            x, window_shape=x.shape[1:3], strides=x.shape[1:3], padding="valid"
                        ),
                        lambda x: x.reshape((x.shape[0], -1)),
                        nn.Dense(self.num_classes),
                    ]
                )
            ]
        )
        return net

    def __call__(self, X):
        return self.net(X)


class ResNet18(ResNet):
    arch: tuple = ((2, 64), (2, 128), (2, 256), (2, 512))
    lr: float = 0.1
    num_classes: int = 10
    training: bool = True


# -------------------------------------------------------------------------------------------------


def book_variables(size: int, seed: int = 0) -> dict:
    """The book's ResNet18 initialised at `size`, every parameter and statistic then randomised
    (positive variances), as NumPy arrays."""
    variables = ResNet18(training=False).init(
        jax.random.PRNGKey(seed), np.zeros((1, size, size, 1), np.float32)
    )
    rng = np.random.default_rng(seed)

    def randomise(path, leaf):
        shape = np.shape(leaf)
        if path[-1].key == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.5
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(randomise, jax.tree_util.tree_map(np.asarray, dict(variables)))


GRAPH = multires.spec("d2l_resnet18", edition="jax")


@pytest.mark.parametrize("size", [96, 28, 45])
def test_the_books_jax_resnet18_is_the_jax_edition_in_every_backend(size: int) -> None:
    variables = book_variables(size)
    x = np.random.default_rng(size).standard_normal((1 if size > 64 else 2, size, size, 1)).astype(np.float32)
    expected = np.asarray(ResNet18(training=False).apply(variables, x))
    graph, weights = from_flax(variables, GRAPH)
    assert graph == GRAPH
    x_nchw = x.transpose(0, 3, 1, 2)
    assert relative_error(multires.reference.run(graph, weights, x_nchw), expected) < 1e-5
    for backend in multires.available_backends():
        layout = multires.backend.resolve_layout(multires.get_backend(backend), None)
        runner = multires.make_runner(graph, backend=backend, weights=weights, layout=layout)
        got = runner.forward(x_nchw if layout == "NCHW" else x, training=False)
        assert relative_error(got, expected) < 1e-5, (backend, layout)


def test_the_books_training_step_updates_statistics_as_the_jax_edition() -> None:
    """Training mode: batch statistics, and Flax's running update (momentum 0.99, biased variance)."""
    variables = book_variables(28, seed=1)
    x = np.random.default_rng(1).standard_normal((4, 28, 28, 1)).astype(np.float32)
    out, updated = ResNet18(training=True).apply(variables, x, mutable=["batch_stats"])
    graph, weights = from_flax(variables, GRAPH)
    forward = multires.reference.forward(graph, weights, x.transpose(0, 3, 1, 2), training=True)
    # Whole-model budget: Flax's float32 batch variance is E[x^2] - E[x]^2, over 4 values in b5.
    assert relative_error(forward.outputs[graph.outputs[0]], np.asarray(out)) < 1e-4
    _, book_running = from_flax({**variables, "batch_stats": updated["batch_stats"]}, GRAPH)
    for name, value in forward.running.items():
        assert relative_error(value, book_running[name]) < 1e-5, name
    unbiased = multires.spec("d2l_resnet18", edition="pytorch")
    other = multires.reference.forward(unbiased, weights, x.transpose(0, 3, 1, 2), training=True).running
    assert relative_error(other["b1.1.running_var"], book_running["b1.1.running_var"]) > 1e-3


def test_to_flax_writes_the_books_layout_and_round_trips_bit_for_bit() -> None:
    weights = multires.random_weights(GRAPH, seed=3)
    for layout in ("d2l", "multires"):
        variables = to_flax(GRAPH, weights, layout=layout)
        graph, again = from_flax(variables, GRAPH)
        assert list(again) == list(weights)
        assert all(np.array_equal(again[k], weights[k]) for k in weights)
    book = to_flax(GRAPH, weights, layout="d2l")
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 1)).astype(np.float32)
    y = np.asarray(ResNet18(training=False).apply(book, x))
    assert relative_error(y, multires.reference.run(GRAPH, weights, x.transpose(0, 3, 1, 2))) < 1e-5


def test_variables_of_another_model_name_the_supported_layouts() -> None:
    variables = to_flax(multires.spec("resnet18"), multires.random_weights(multires.spec("resnet18")))
    with pytest.raises(InterchangeError, match=r"known layout.*'multires', 'd2l'.*Pass the graph"):
        from_flax(variables, GRAPH)
    with pytest.raises(InterchangeError, match="variables tree"):
        from_flax([1, 2], GRAPH)


def test_wrong_shapes_are_listed_at_once() -> None:
    variables = to_flax(GRAPH, multires.random_weights(GRAPH), layout="d2l")
    params = variables["params"]["net"]
    params["layers_0"]["layers_0"]["kernel"] = np.zeros((7, 7, 3, 64), np.float32)
    params["layers_5"]["layers_2"]["bias"] = np.zeros(11, np.float32)
    with pytest.raises(WeightsError, match=r"(?s)2 mismatches.*b1\.0\.weight.*last\.2\.bias") as error:
        from_flax(variables, GRAPH)
    assert "(64, 3, 7, 7)" in str(error.value) and "(11,)" in str(error.value)


def test_convert_reads_written_flax_variables_into_a_safetensors_file(tmp_path) -> None:
    from multires.cli import main
    from multires.interchange.flax import write

    weights = multires.random_weights(GRAPH, seed=4)
    source = write(to_flax(GRAPH, weights, layout="d2l"), tmp_path / "book.msgpack")
    out = tmp_path / "book.safetensors"
    argv = ["convert", str(source), "--from", "flax", "--graph", "d2l_resnet18", "--option", "edition=jax"]
    assert main([*argv, "--to", "safetensors", "-o", str(out)]) == 0
    assert multires.weights.file_graph(out) == GRAPH
    converted = multires.weights.load_file(out, GRAPH)
    assert all(np.array_equal(converted[name], weights[name]) for name in weights)
