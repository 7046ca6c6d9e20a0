"""`GraphBuilder`: append nodes one call at a time, the way a model's forward pass reads.

Each method adds one node and returns its name, which the next call takes as input, so a block
is written as straight-line code (`y = b.relu("relu1", b.bn("bn1", b.conv("conv1", x, 64, 3)))`).
The builder tracks the channel count of every tensor so blocks can decide, as torchvision's do,
whether a shortcut needs a projection; `.graph(outputs)` freezes the result into a `Graph`,
which checks everything else.
"""

from __future__ import annotations

from typing import Any

from multires.errors import SpecError
from multires.graph import (
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
    Node,
    Pad2d,
    ReLU,
)

__all__ = ["GraphBuilder", "join"]


def join(*parts: str) -> str:
    """A hierarchical name from its non-empty parts: `join("layer1.0", "conv1") == "layer1.0.conv1"`.

    An empty prefix adds nothing, so `join("", "conv1") == "conv1"` (torchvision's top-level names).
    """
    return ".".join(part for part in parts if part)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """`3` as `(3, 3)`; anything else as given (the node checks it and names itself in the error)."""
    return (value, value) if isinstance(value, int) else value


class GraphBuilder:
    """Accumulates the nodes of one graph with a single image input of `in_channels` channels."""

    def __init__(self, name: str, in_channels: int, input_name: str = "input") -> None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise SpecError(f"{name}: in_channels must be a positive int; got {in_channels!r}.")
        self.name = name
        self.input = Input(input_name, in_channels).name
        self._in_channels = in_channels
        self._nodes: list[Node] = []
        self._channels: dict[str, int | None] = {self.input: in_channels}
        self._pooled: set[str] = set()

    def channels(self, x: str) -> int:
        """Channels of tensor `x` (features, for a flattened globally pooled map)."""
        if x not in self._channels:
            raise SpecError(
                f"{x!r}: no such tensor in {self.name!r}. Pass a name returned by a builder call."
            )
        count = self._channels[x]
        if count is None:
            raise SpecError(
                f"{x}: its feature count depends on the image size (a Flatten not fed by a global "
                "pool); global-pool before flattening."
            )
        return count

    def conv(
        self,
        name: str,
        x: str,
        out_channels: int,
        kernel: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Any = 0,
        groups: int = 1,
        bias: bool = False,
    ) -> str:
        """2-D convolution; `padding` is an int, `(ph, pw)`, `((top, bottom), (left, right))` or
        "same" (TensorFlow/XLA SAME)."""
        node = Conv2d(name, (x,), out_channels, _pair(kernel), _pair(stride), padding, (1, 1), groups, bias)
        return self._append(node, node.out_channels)

    def bn(
        self,
        name: str,
        x: str,
        eps: float = 1e-5,
        momentum: float = 0.1,
        running_variance: str = "unbiased",
    ) -> str:
        """Batch normalisation (`momentum` is PyTorch's: the weight of the new batch statistic;
        `running_variance` "unbiased" as PyTorch or "biased" as Keras and Flax)."""
        return self._append(BatchNorm(name, (x,), eps, momentum, running_variance))

    def pad(self, name: str, x: str, padding: Any) -> str:
        """Zero padding per side (`p`, `(ph, pw)` or `((top, bottom), (left, right))`)."""
        return self._append(Pad2d(name, (x,), padding))

    def relu(self, name: str, x: str) -> str:
        """Elementwise max(x, 0)."""
        return self._append(ReLU(name, (x,)))

    def add(self, name: str, *xs: str) -> str:
        """Elementwise sum of two or more tensors of the same shape."""
        return self._append(Add(name, xs))

    def maxpool(
        self, name: str, x: str, kernel: int | tuple[int, int], stride: Any = None, padding: Any = 0
    ) -> str:
        """Max pooling (padding never wins the max); `stride` defaults to the kernel."""
        return self._append(MaxPool2d(name, (x,), _pair(kernel), stride, padding))

    def avgpool(
        self,
        name: str,
        x: str,
        kernel: int | tuple[int, int],
        stride: Any = None,
        padding: Any = 0,
        count_include_pad: bool = True,
    ) -> str:
        """Average pooling; `stride` defaults to the kernel."""
        node = AvgPool2d(name, (x,), _pair(kernel), stride, padding, count_include_pad)
        return self._append(node)

    def gap(self, name: str, x: str) -> str:
        """Global average pooling to (N, C, 1, 1)."""
        out = self._append(GlobalAvgPool(name, (x,)))
        self._pooled.add(out)
        return out

    def flatten(self, name: str, x: str) -> str:
        """(N, C, H, W) -> (N, C*H*W), channel-major."""
        flat = self._append(Flatten(name, (x,)))
        if x not in self._pooled:
            self._channels[flat] = None
        return flat

    def dense(self, name: str, x: str, out_features: int, bias: bool = True) -> str:
        """Fully connected layer `y = x W^T + b`."""
        node = Dense(name, (x,), out_features, bias)
        return self._append(node, node.out_features)

    def graph(self, outputs: str | tuple[str, ...], description: str = "") -> Graph:
        """Freeze the nodes added so far into a validated `Graph`."""
        return Graph(
            self.name,
            (Input(self.input, self._in_channels),),
            tuple(self._nodes),
            (outputs,) if isinstance(outputs, str) else outputs,
            description,
        )

    def _append(self, node: Node, channels: int | None = None) -> str:
        """Add `node` with output channel count `channels` (None: its first input's)."""
        where = f"{node.name} ({type(node).__name__})"
        for source in node.inputs:
            if source not in self._channels:
                raise SpecError(f"{where}: unknown input {source!r}. Pass a name returned by a builder call.")
        if node.name in self._channels:
            raise SpecError(f"{where}: duplicate name. Give every node a unique name.")
        self._nodes.append(node)
        self._channels[node.name] = self._channels[node.inputs[0]] if channels is None else channels
        return node.name
