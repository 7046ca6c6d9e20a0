"""torchvision's ResNets in and out.

The limit of this test: torchvision cannot be imported on this project's machine (its compiled
ops fail to register with this torch wheel), so torchvision's own models cannot be built here.
The stand-in for them is (a) the zoo graph built by the torch backend, whose module tree and
`state_dict()` keys are torchvision's (tests/backends/test_torch.py checks that against a
hand-written torchvision ResNet), and (b) torchvision's documented parameter counts, below.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import multires  # noqa: E402
from multires.errors import InterchangeError, WeightsError  # noqa: E402
from multires.interchange import torchvision as tv  # noqa: E402
from multires.interchange.torchvision import from_torchvision, to_torchvision  # noqa: E402
from multires.weights import weight_shapes  # noqa: E402

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "wide_resnet50_2": 68_883_240,
}
"""`num_params` of torchvision.models' ImageNet weights (1000 classes), from torchvision's docs."""


def torch_model(name: str, seed: int = 0, **options: int) -> tuple[torch.nn.Module, dict]:
    graph = multires.spec(name, **options)
    weights = multires.random_weights(graph, seed)
    return multires.build(graph, backend="torch", weights=weights).eval(), weights


def zero_state_dict(name: str, **options: int) -> dict[str, np.ndarray]:
    """A state dict with the keys and shapes of zoo model `name`, as zero-stride zero arrays (no memory)."""
    shapes = weight_shapes(multires.spec(name, **options))
    return {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("name", TORCHVISION_PARAMS)
def test_every_architecture_is_recognised_from_keys_and_shapes(name: str) -> None:
    assert tv.recognise(zero_state_dict(name)) == multires.spec(name)
    assert multires.param_count(multires.spec(name)) == TORCHVISION_PARAMS[name]
    assert tv.recognise(zero_state_dict(name, num_classes=10)) == multires.spec(name, num_classes=10)


def test_module_and_state_dict_import_the_same() -> None:
    model, weights = torch_model("resnet18", num_classes=10)
    for source in (model, model.state_dict()):
        graph, got = from_torchvision(source)
        assert graph == multires.spec("resnet18", num_classes=10)
        assert_same_weights(got, weights)
    x = np.random.default_rng(0).standard_normal((2, 3, 45, 45)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert multires.reference.relative_error(multires.reference.run(graph, got, x), expected) < 1e-5


def test_export_is_a_torchvision_state_dict_and_round_trips_bit_for_bit() -> None:
    model, weights = torch_model("resnet50", num_classes=5)
    graph = multires.spec("resnet50", num_classes=5)
    state = to_torchvision(graph, weights)
    assert list(state) == list(model.state_dict())  # torchvision's keys, in its order, counters included
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == torch.long
    model.load_state_dict(state, strict=True)
    again_graph, again = from_torchvision(state)
    assert again_graph == graph
    assert_same_weights(again, weights)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_write_and_read(tmp_path, suffix: str) -> None:
    graph = multires.spec("resnet18", num_classes=4)
    weights = multires.random_weights(graph)
    path = tv.write(to_torchvision(graph, weights), tmp_path / f"resnet18{suffix}")
    got_graph, got = from_torchvision(tv.read(path))
    assert got_graph == graph
    assert_same_weights(got, weights)


class Unpicklable:
    def __reduce__(self) -> tuple:
        raise RuntimeError("cannot be pickled")


def test_failed_write_leaves_nothing(tmp_path) -> None:
    with pytest.raises(WeightsError, match="cannot be written"):
        tv.write({"fc.weight": np.array(["text"])}, tmp_path / "bad.safetensors")
    with pytest.raises(RuntimeError, match="cannot be pickled"):
        tv.write({"fc.weight": Unpicklable()}, tmp_path / "bad.pth")
    assert list(tmp_path.iterdir()) == []


def test_read_refuses_what_is_not_a_state_dict(tmp_path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        tv.read(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        tv.read(tmp_path / "list.pth")


# Bad input -----------------------------------------------------------------------------------------


def test_unrecognised_state_dict_lists_what_is_supported() -> None:
    with pytest.raises(InterchangeError, match=r"not a torchvision ResNet.*Supported: .*resnet18.*graph="):
        from_torchvision(zero_state_dict("preact_resnet18"))
    with pytest.raises(InterchangeError, match=r"not a torchvision model or state dict"):
        from_torchvision(42)


def test_graph_maps_any_model_by_name() -> None:
    graph = multires.spec("preact_resnet18", num_classes=3)
    weights = multires.random_weights(graph)
    got_graph, got = from_torchvision({k: torch.from_numpy(v) for k, v in weights.items()}, graph=graph)
    assert got_graph is graph
    assert_same_weights(got, weights)


def test_every_mismatch_is_listed_at_once() -> None:
    state = dict(torch_model("resnet18")[0].state_dict())
    del state["layer3.1.bn2.running_mean"]
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(WeightsError) as caught:
        from_torchvision(state)
    message = str(caught.value)
    assert "(2 mismatches)" in message
    assert "missing layer3.1.bn2.running_mean (256,)" in message
    assert "layer2.0.conv1.weight: shape (128, 64, 1, 1), graph expects (128, 64, 3, 3)" in message


@pytest.mark.parametrize(("name", "options"), [("d2l_resnet18", {}), ("resnet18", {"in_channels": 1})])
def test_export_refuses_graphs_torchvision_does_not_have(name: str, options: dict) -> None:
    graph = multires.spec(name, **options)
    with pytest.raises(InterchangeError, match=rf"graph '{name}' is not a torchvision model.*Supported"):
        to_torchvision(graph, multires.init_weights(graph))
