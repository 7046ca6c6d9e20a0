"""Hugging Face transformers' ResNet (`ResNetModel`, `ResNetForImageClassification`), any config.

`hf_resnet` builds what `transformers.models.resnet.modeling_resnet` computes for a
`ResNetConfig`, with torchvision's node names (HF's `stages.{i}.layers.{j}` is `layer{i+1}.{j}`),
so that the default config with 1000 labels is node for node `resnet50`, and microsoft/resnet-18,
-34, -101 and -152 are `resnet18` ... `resnet152`:

- stem: `ResNetEmbeddings`, conv 7x7/2 pad 3 + BN + activation, max-pool 3x3/2 pad 1;
- stage `i` has `depths[i]` layers of output width `hidden_sizes[i]`; its first layer has stride 2,
  except in stage 0 unless `downsample_in_first_stage`;
- `basic` layer: torchvision's BasicBlock; `bottleneck` layer: 1x1 to `hidden_size // 4`, 3x3,
  1x1 to `hidden_size`, stride on the 3x3 (torchvision's v1.5) or, with `downsample_in_bottleneck`,
  on the first 1x1 (v1); the shortcut is a 1x1 conv + BN where the shape changes;
- every conv is bias-free with `kernel // 2` padding, every BN PyTorch's default (eps 1e-5,
  momentum 0.1); head: global average pool, flatten, `nn.Linear` (the `classifier.1` of HF).

Not registered in the zoo: the importer builds it from a config (`multires.interchange.from_transformers`).
"""

from __future__ import annotations

from collections.abc import Sequence

from multires.errors import SpecError
from multires.graph import Graph
from multires.zoo.blocks import _projection, residual_block, stem
from multires.zoo.builder import GraphBuilder, join

LAYER_TYPES = ("basic", "bottleneck")
"""`ResNetConfig.layer_type` values."""


def hf_bottleneck_block(
    b: GraphBuilder,
    prefix: str,
    x: str,
    out_channels: int,
    stride: int = 1,
    reduction: int = 4,
    downsample_in_bottleneck: bool = False,
) -> str:
    """HF's `ResNetBottleNeckLayer`: 1x1 to `out_channels // reduction`, 3x3, 1x1 to `out_channels`.

    The stride sits on the 3x3 (as torchvision's `bottleneck_block`, whose nodes and names this
    gives when `out_channels` is a multiple of 4) or, with `downsample_in_bottleneck`, on the first 1x1.
    """
    width = out_channels // reduction
    stride1, stride2 = (stride, 1) if downsample_in_bottleneck else (1, stride)
    y = b.conv(join(prefix, "conv1"), x, width, 1, stride=stride1)
    y = b.relu(join(prefix, "relu1"), b.bn(join(prefix, "bn1"), y))
    y = b.conv(join(prefix, "conv2"), y, width, 3, stride=stride2, padding=1)
    y = b.relu(join(prefix, "relu2"), b.bn(join(prefix, "bn2"), y))
    y = b.bn(join(prefix, "bn3"), b.conv(join(prefix, "conv3"), y, out_channels, 1))
    shortcut = _projection(b, join(prefix, "downsample"), x, out_channels, stride)
    return b.relu(join(prefix, "relu3"), b.add(join(prefix, "add"), y, shortcut))


def hf_resnet(
    depths: Sequence[int] = (3, 4, 6, 3),
    hidden_sizes: Sequence[int] = (256, 512, 1024, 2048),
    layer_type: str = "bottleneck",
    embedding_size: int = 64,
    downsample_in_first_stage: bool = False,
    downsample_in_bottleneck: bool = False,
    num_classes: int = 1000,
    in_channels: int = 3,
    name: str = "hf_resnet",
) -> Graph:
    """transformers' `ResNetForImageClassification(ResNetConfig(...))`, exactly (ReLU activation).

    `num_classes=0` is the headless model: the output is `flatten` of the global average pool,
    i.e. `ResNetModel`'s `pooler_output.flatten(1)` (and the logits of a zero-label classifier).
    """
    if layer_type not in LAYER_TYPES:
        raise SpecError(f"{name}: layer_type must be one of {LAYER_TYPES}; got {layer_type!r}.")
    if (
        not depths
        or len(depths) != len(hidden_sizes)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (*depths, *hidden_sizes))
    ):
        raise SpecError(
            f"{name}: depths and hidden_sizes must be equally long, non-empty lists of positive ints; "
            f"got depths={list(depths)!r}, hidden_sizes={list(hidden_sizes)!r}."
        )
    b = GraphBuilder(name, in_channels)
    x = stem(b, "", b.input, embedding_size)
    for i, (depth, size) in enumerate(zip(depths, hidden_sizes, strict=True)):
        for j in range(depth):
            stride = 2 if j == 0 and (i > 0 or downsample_in_first_stage) else 1
            prefix = f"layer{i + 1}.{j}"
            if layer_type == "basic":
                x = residual_block(b, prefix, x, size, stride)
            else:
                x = hf_bottleneck_block(b, prefix, x, size, stride, 4, downsample_in_bottleneck)
    x = b.flatten("flatten", b.gap("avgpool", x))
    if num_classes:
        x = b.dense("fc", x, num_classes)
    settings = (
        f"layer_type={layer_type!r}, depths={list(depths)}, hidden_sizes={list(hidden_sizes)}, "
        f"embedding_size={embedding_size}, downsample_in_first_stage={downsample_in_first_stage}, "
        f"downsample_in_bottleneck={downsample_in_bottleneck}, hidden_act='relu'"
    )
    head = f"ResNetForImageClassification with {num_classes} labels" if num_classes else "ResNetModel"
    description = (
        f"transformers {head} (ResNetConfig({settings})), exactly; node names are torchvision's "
        "(HF stages.{i}.layers.{j} is layer{i+1}.{j})."
        + ("" if num_classes else " Output: pooler_output flattened to (N, C).")
    )
    return b.graph(x, description)
