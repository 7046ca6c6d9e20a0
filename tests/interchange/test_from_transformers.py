"""Hugging Face transformers' ResNet in and out, against the real transformers models.

Every model here is transformers' own `ResNetForImageClassification` / `ResNetModel`, built from a
`ResNetConfig` with seeded random weights and random BatchNorm statistics, in eval mode; its output
is the truth that the reference and every installed backend must reproduce at an odd input size.
"""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import multires  # noqa: E402
from multires.backend import available_backends, get_backend, make_runner  # noqa: E402
from multires.errors import InterchangeError, WeightsError  # noqa: E402
from multires.interchange import transformers as hf  # noqa: E402
from multires.interchange.transformers import from_transformers, to_transformers  # noqa: E402

TOLERANCE = 1e-5
SIZE = 45  # odd: every stride-2 layer meets an odd size somewhere

BASIC = dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[8, 16, 32, 64], embedding_size=8)
"""ResNet-18-like (microsoft/resnet-18's layout) with small widths."""

CONFIGS = {
    "basic": dict(BASIC, num_labels=7),
    "bottleneck": dict(depths=[2, 1, 2], hidden_sizes=[16, 32, 64], embedding_size=8, num_labels=5),
    "bottleneck_v1_first_stage": dict(
        depths=[1, 2],
        hidden_sizes=[12, 30],  # 30 is no multiple of 4: the inner width is 30 // 4
        embedding_size=6,
        downsample_in_first_stage=True,
        downsample_in_bottleneck=True,
        num_labels=3,
    ),
    "basic_2_channels": dict(BASIC, depths=[1, 1], hidden_sizes=[8, 12], num_channels=2, num_labels=4),
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with seeded random conv/linear weights and random BatchNorm affine and statistics, in eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def rand(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(rand(module.weight.shape, 0.5, 1.5))
                module.bias.copy_(rand(module.bias.shape, -0.3, 0.3))
                module.running_mean.copy_(rand(module.running_mean.shape, -0.3, 0.3))
                module.running_var.copy_(rand(module.running_var.shape, 0.5, 1.5))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(rand(module.weight.shape, -1, 1) * (3 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(rand(module.bias.shape, -0.1, 0.1))
    return model.eval()


def hf_model(headless: bool = False, seed: int = 0, **config: object) -> torch.nn.Module:
    cls = transformers.ResNetModel if headless else transformers.ResNetForImageClassification
    return randomized(cls(transformers.ResNetConfig(**config)), seed)


def images(channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, channels, SIZE, SIZE)).astype(np.float32)


def hf_output(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    if isinstance(model, transformers.ResNetModel):
        return out.pooler_output.flatten(1).numpy()
    return out.logits.numpy()


def errors_everywhere(
    graph: multires.Graph, weights: dict, x: np.ndarray, expected: np.ndarray, backends: list | None = None
) -> dict:
    """Relative error against `expected` of the reference and of every layout of `backends` (default:
    every installed backend)."""
    reference = multires.reference.run(graph, weights, x)
    errors = {"reference": multires.reference.relative_error(reference, expected)}
    for name in available_backends() if backends is None else backends:
        for layout in get_backend(name).LAYOUTS:
            x_in = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x
            output = make_runner(graph, weights, name, layout).forward(x_in)
            errors[f"{name}/{layout}"] = multires.reference.relative_error(np.asarray(output), expected)
    return errors


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32
        assert np.array_equal(a[name], b[name]), name


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The function -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50() -> torch.nn.Module:
    return hf_model(num_labels=1000)  # ResNetConfig()'s defaults are microsoft/resnet-50's layout


def test_hf_resnet50_is_the_zoo_resnet50(resnet50: torch.nn.Module) -> None:
    """The graph IS the zoo's resnet50, whose every backend the conformance suite checks against the
    reference; here the reference and torch (the source's framework) meet HF's output, and the small
    configs below run in every backend (a ResNet-50 in each would cost the combined session ~40 s)."""
    graph, weights = from_transformers(resnet50)
    assert graph == multires.spec("resnet50")
    assert multires.param_count(graph) == parameters(resnet50) == 25_557_032
    x = images()
    errors = errors_everywhere(graph, weights, x, hf_output(resnet50, x), backends=["torch"])
    assert max(errors.values()) < TOLERANCE, errors


def test_hf_resnet50_weights_move_to_torchvision(resnet50: torch.nn.Module) -> None:
    from multires.interchange.torchvision import to_torchvision

    graph, weights = from_transformers(resnet50)
    model = multires.build(graph, backend="torch").eval()
    model.load_state_dict(to_torchvision(graph, weights), strict=True)
    x = images(seed=1)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    assert multires.reference.relative_error(y, hf_output(resnet50, x)) < TOLERANCE


@pytest.mark.parametrize("name", CONFIGS)
def test_import_computes_the_models_function(name: str) -> None:
    config = CONFIGS[name]
    model = hf_model(**config)
    graph, weights = from_transformers(model)
    assert graph.name == "hf_resnet"
    assert multires.param_count(graph) == parameters(model)
    x = images(config.get("num_channels", 3))
    errors = errors_everywhere(graph, weights, x, hf_output(model, x))
    assert max(errors.values()) < TOLERANCE, errors


def test_basic_config_with_torchvision_widths_is_the_zoo_resnet18() -> None:
    model = hf_model(**dict(BASIC, hidden_sizes=[64, 128, 256, 512], embedding_size=64, num_labels=10))
    graph, _ = from_transformers(model)
    assert graph == multires.spec("resnet18", num_classes=10)


def test_headless_model_outputs_the_flattened_pooler_output() -> None:
    model = hf_model(headless=True, **CONFIGS["bottleneck"])
    graph, weights = from_transformers(model)
    assert graph.outputs == ("flatten",) and "fc" not in graph.by_name
    x = images()
    expected = hf_output(model, x)
    assert expected.shape == (2, 64)
    errors = errors_everywhere(graph, weights, x, expected)
    assert max(errors.values()) < TOLERANCE, errors
    exported = to_transformers(graph, weights)
    assert type(exported) is transformers.ResNetModel and not exported.training
    np.testing.assert_array_equal(hf_output(exported, x), expected)


def test_zero_labels_is_headless() -> None:
    model = hf_model(**dict(CONFIGS["basic"], num_labels=0))
    graph, weights = from_transformers(model)
    assert graph.outputs == ("flatten",)
    x = images()
    errors = errors_everywhere(graph, weights, x, hf_output(model, x))
    assert max(errors.values()) < TOLERANCE, errors


# Round trips and checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_bit_for_bit(name: str) -> None:
    model = hf_model(**CONFIGS[name])
    graph, weights = from_transformers(model)
    exported = to_transformers(graph, weights)
    assert type(exported) is transformers.ResNetForImageClassification and not exported.training
    again_graph, again = from_transformers(exported)
    assert again_graph == graph
    assert_same_weights(again, weights)
    for key, tensor in model.state_dict().items():
        assert torch.equal(exported.state_dict()[key], tensor) or key.endswith("num_batches_tracked"), key


def test_zoo_graph_exports_to_transformers() -> None:
    graph = multires.spec("resnet18", num_classes=3)
    weights = multires.random_weights(graph)
    model = to_transformers(graph, weights)
    assert model.config.layer_type == "basic" and list(model.config.depths) == [2, 2, 2, 2]
    assert model.config.num_labels == 3
    x = images()
    expected = multires.reference.run(graph, weights, x)
    assert multires.reference.relative_error(hf_output(model, x), expected) < TOLERANCE
    assert_same_weights(from_transformers(model)[1], weights)


def test_state_dict_with_config_or_its_dict() -> None:
    model = hf_model(**CONFIGS["bottleneck_v1_first_stage"])
    graph, weights = from_transformers(model)
    numpy_state = {key: tensor.numpy() for key, tensor in model.state_dict().items()}
    for state, config in ((model.state_dict(), model.config), (numpy_state, model.config.to_dict())):
        got_graph, got = from_transformers(state, config=config)
        assert got_graph == graph
        assert_same_weights(got, weights)
    headless_graph, _ = from_transformers(model.resnet.state_dict(), config=model.config.to_dict())
    assert headless_graph.outputs == ("flatten",)


def test_key_table() -> None:
    assert hf.canonical_name("resnet.encoder.stages.2.layers.3.layer.1.normalization.running_var") == (
        "layer3.3.bn2.running_var"
    )
    assert hf.canonical_name("encoder.stages.0.layers.0.shortcut.convolution.weight") == (
        "layer1.0.downsample.0.weight"
    )
    shortcut_bn = "resnet.encoder.stages.3.layers.0.shortcut.normalization"
    assert hf.hf_key("layer4.0.downsample.1.bias") == f"{shortcut_bn}.bias"
    assert hf.hf_key("fc.weight") == "classifier.1.weight"
    assert hf.hf_key("bn1.weight", prefix="") == "embedder.embedder.normalization.weight"


def test_write_and_read_a_model_folder(tmp_path) -> None:
    model = hf_model(**CONFIGS["basic"])
    graph, weights = from_transformers(model)
    folder = hf.write(to_transformers(graph, weights), tmp_path / "model")
    assert (folder / "config.json").is_file()
    assert_same_weights(from_transformers(hf.read(folder))[1], weights)
    headless = hf.write(hf_model(headless=True, **CONFIGS["basic"]), tmp_path / "headless")
    assert type(hf.read(headless)) is transformers.ResNetModel


def test_failed_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    model = hf_model(**CONFIGS["basic"])
    original = model.save_pretrained

    def failing(folder, **kwargs):
        original(folder, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", failing)
    with pytest.raises(OSError, match="disk full"):
        hf.write(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# Bad input -----------------------------------------------------------------------------------------


def test_unsupported_activation_is_an_interchange_error() -> None:
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(**BASIC, hidden_act="gelu"))
    with pytest.raises(InterchangeError, match=r"hidden_act 'gelu' is not supported.*'relu'"):
        from_transformers(model)


@pytest.mark.parametrize("source", [torch.nn.Linear(2, 2), "microsoft/resnet-50"])
def test_unrecognised_model_lists_what_is_supported(source: object) -> None:
    supported = r"not a transformers ResNet.*Supported: .*ResNetModel.*graph="
    with pytest.raises(InterchangeError, match=supported):
        from_transformers(source)


def test_state_dict_without_config_asks_for_one() -> None:
    with pytest.raises(InterchangeError, match=r"needs its config: pass config="):
        from_transformers(hf_model(**CONFIGS["basic"]).state_dict())


@pytest.mark.parametrize("name", ["preact_resnet18", "d2l_resnet18", "resnext50_32x4d"])
def test_graph_that_transformers_cannot_express(name: str) -> None:
    graph = multires.spec(name)
    with pytest.raises(InterchangeError, match=rf"graph '{name}' is not a transformers ResNet.*Supported"):
        to_transformers(graph, multires.init_weights(graph))


def test_every_mismatch_is_listed_at_once_with_hf_keys() -> None:
    model = hf_model(**CONFIGS["basic"])
    state = dict(model.state_dict())
    del state["resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"]
    state["resnet.embedder.embedder.convolution.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(WeightsError) as caught:
        from_transformers(state, config=model.config)
    message = str(caught.value)
    assert "(2 mismatches)" in message
    assert "missing layer2.0.downsample.1.running_var [resnet.encoder.stages.1.layers.0.shortcut" in message
    assert "conv1.weight [resnet.embedder.embedder.convolution.weight]: shape (8, 3, 3, 3)" in message
