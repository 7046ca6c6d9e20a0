"""Lowering a spec Graph to a `torch.fx.GraphModule`: one small function per node type.

`build` walks the graph once and emits an `fx.Graph`: a `call_module` node per layer (the
module sits at the node's dotted name, so `model.layer1[0].conv1` is an `nn.Conv2d`) and a
`call_function` node for additions, flattening and explicit padding. `fx` generates a plain
Python `forward` from it (`print(model.code)`), so the model has no per-call interpreter loop
and works with `torch.compile`, `torch.export`, `torch.jit.script` and `channels_last` like a
hand-written one.

How spec semantics map onto PyTorch:

- Symmetric padding is the layer's own `padding`; asymmetric per-side padding is an explicit
  `F.pad` before the layer: zeros for convolution and average pooling, -inf for max pooling
  (so padding never wins the max).
- Average pooling with asymmetric padding and `count_include_pad=False` divides window sums by
  the number of real pixels in each window (`AsymmetricAvgPool2d`).
- TensorFlow/XLA SAME padding (`padding="same"`): where it does not depend on the input size
  (stride 1, or a one-pixel window, on both axes) it is resolved at build time and lowered as
  the explicit padding above, so a stride-1 3x3 convolution is `Conv2d(..., padding=(1, 1))`.
  Otherwise the layer is `Conv2dSame`, `MaxPool2dSame` or `AvgPool2dSame` (timm's names): the
  PyTorch layer with its pads computed from the input's size in `forward` (`same_pads`), which
  traces with `torch.fx` and exports with dynamic H and W. PyTorch's own `padding='same'` is a
  different thing: stride 1 only (where it equals TF's), and a copy with a warning for even kernels.
- Pad2d is `nn.ZeroPad2d`.
- BatchNorm's eps and momentum are PyTorch's convention already and are copied unchanged. The
  default running variance (unbiased) is `nn.BatchNorm2d`; the biased one (Keras, Flax, MXNet)
  is `BiasedVarianceBatchNorm2d`, which differs only in its training-mode running-variance update.
- ReLU and Add work in place where that cannot change any other value or gradient
  (`LoweringContext.can_overwrite`), as torchvision's `ReLU(inplace=True)` and `out += identity`.
- `layout="NHWC"`: the input is permuted to NCHW at entry and 4-D outputs back at exit; the
  weights are unchanged. A strided 1x1 convolution takes its input NCHW-contiguous (a no-op
  unless it is channels_last): PyTorch 2.13's CPU weight gradient of that layer is racy on
  channels_last inputs. Flatten is always channel-major, as the spec defines it.
- Each input first passes an `InputCheck` module: a wrong rank, channel count or layout raises
  `multires.ShapeError` naming the expected shape.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from multires.backend import LoweringTable
from multires.errors import ShapeError
from multires.graph import (
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    MaxPool2d,
    Node,
    Pad2d,
    Padding,
    Pair,
    ReLU,
    static_padding,
    symmetric_padding,
)
from multires.shapes import Shape, check_layout, infer_shapes

LAYOUTS = ("NCHW", "NHWC")

_FRESH_OUTPUT = (Conv2d, BatchNorm, Add, MaxPool2d, AvgPool2d, Pad2d, GlobalAvgPool, Dense)
"""Node types whose output is a new tensor that their own backward does not need."""


class LoweringContext:
    """What a lowering function needs: the fx graph being emitted, the modules made so far and
    the spec's shapes (NCHW; spatial sizes unknown)."""

    def __init__(self, graph: Graph) -> None:
        self.spec = graph
        self.fx_graph = fx.Graph()
        self.modules: dict[str, nn.Module] = {}
        self.shapes: dict[str, Shape] = infer_shapes(graph)

    def channels(self, name: str) -> int | None:
        """Channels (or features) of the value named `name`; None for a Flatten of unknown size."""
        return self.shapes[name][1]

    def call_module(self, node: Node, module: nn.Module, *args: fx.Node) -> fx.Node:
        """Install `module` at the node's dotted name and call it."""
        self.modules[node.name] = module
        return self.fx_graph.call_module(node.name, args)

    def call_function(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        """Call a torch function; `name` (dots allowed) names its result in the generated code."""
        return self.fx_graph.create_node("call_function", function, args, kwargs, name=name)

    def pad(
        self, node: Conv2d | MaxPool2d | AvgPool2d, padding: Padding, x: fx.Node, value: float
    ) -> tuple[tuple[int, int], fx.Node]:
        """The layer padding `(ph, pw)` to use and its input: symmetric `padding` stays on the
        layer, asymmetric padding becomes an explicit `F.pad` with `value`."""
        symmetric = symmetric_padding(padding)
        if symmetric is not None:
            return symmetric, x
        (top, bottom), (left, right) = padding
        x = self.call_function(f"{node.name}.pad", F.pad, x, (left, right, top, bottom), value=value)
        return (0, 0), x

    def can_overwrite(self, name: str) -> bool:
        """True if the value `name` may be modified in place by its (only) consumer.

        It must be a node's fresh output (not a graph input, which is the caller's tensor, nor a
        view such as Flatten's), read by nothing else, not a graph output, and not saved by its
        producer's backward (ReLU's is).
        """
        producer = self.spec.by_name.get(name)
        return (
            isinstance(producer, _FRESH_OUTPUT)
            and len(self.spec.consumers[name]) == 1
            and name not in self.spec.outputs
        )


Lowering = Callable[[LoweringContext, Node, list[fx.Node]], fx.Node]
LOWERINGS = LoweringTable("torch")
"""Spec node type -> the function that emits it into the fx graph."""
lowers = LOWERINGS.register


@lowers(Conv2d)
def _conv2d(ctx: LoweringContext, node: Conv2d, inputs: list[fx.Node]) -> fx.Node:
    fixed = static_padding(node)
    if fixed is None:
        conv = Conv2dSame(
            ctx.channels(node.inputs[0]),
            node.out_channels,
            node.kernel,
            stride=node.stride,
            dilation=node.dilation,
            groups=node.groups,
            bias=node.bias,
        )
        return ctx.call_module(node, conv, inputs[0])
    padding, x = ctx.pad(node, fixed, inputs[0], 0.0)
    if node.kernel == (1, 1) and node.stride != (1, 1):
        # PyTorch 2.13's CPU (oneDNN, 2+ threads) weight gradient of a strided 1x1 convolution is
        # racy on channels_last inputs (NHWC layout, or a model moved to channels_last): off by
        # O(1) in some runs. NCHW-contiguous input avoids it; for NCHW input this is a no-op.
        x = ctx.fx_graph.call_method("contiguous", (x,))
    conv = nn.Conv2d(
        ctx.channels(node.inputs[0]),
        node.out_channels,
        node.kernel,
        stride=node.stride,
        padding=padding,
        dilation=node.dilation,
        groups=node.groups,
        bias=node.bias,
    )
    return ctx.call_module(node, conv, x)


@lowers(BatchNorm)
def _batchnorm(ctx: LoweringContext, node: BatchNorm, inputs: list[fx.Node]) -> fx.Node:
    kind = nn.BatchNorm2d if node.running_variance == "unbiased" else BiasedVarianceBatchNorm2d
    bn = kind(ctx.channels(node.inputs[0]), eps=node.eps, momentum=node.momentum)
    return ctx.call_module(node, bn, inputs[0])


@lowers(ReLU)
def _relu(ctx: LoweringContext, node: ReLU, inputs: list[fx.Node]) -> fx.Node:
    return ctx.call_module(node, nn.ReLU(inplace=ctx.can_overwrite(node.inputs[0])), inputs[0])


@lowers(Add)
def _add(ctx: LoweringContext, node: Add, inputs: list[fx.Node]) -> fx.Node:
    # Accumulate in place into the first input nothing else reads (torchvision's `out += identity`),
    # which saves allocating a new map per block.
    first = next((i for i, name in enumerate(node.inputs) if ctx.can_overwrite(name)), None)
    if first is None:
        total, others, add = inputs[0], inputs[1:], operator.add
    else:
        total, others, add = inputs[first], inputs[:first] + inputs[first + 1 :], operator.iadd
    for other in others:
        total = ctx.call_function(node.name, add, total, other)
    return total


@lowers(MaxPool2d)
def _maxpool2d(ctx: LoweringContext, node: MaxPool2d, inputs: list[fx.Node]) -> fx.Node:
    fixed = static_padding(node)
    if fixed is None:
        return ctx.call_module(node, MaxPool2dSame(node.kernel, node.stride), inputs[0])
    padding, x = ctx.pad(node, fixed, inputs[0], float("-inf"))
    return ctx.call_module(node, nn.MaxPool2d(node.kernel, node.stride, padding), x)


@lowers(AvgPool2d)
def _avgpool2d(ctx: LoweringContext, node: AvgPool2d, inputs: list[fx.Node]) -> fx.Node:
    fixed = static_padding(node)
    if fixed is None:
        pool = AvgPool2dSame(node.kernel, node.stride, count_include_pad=node.count_include_pad)
        return ctx.call_module(node, pool, inputs[0])
    if not node.count_include_pad and symmetric_padding(fixed) is None:
        return ctx.call_module(node, AsymmetricAvgPool2d(node.kernel, node.stride, fixed), inputs[0])
    padding, x = ctx.pad(node, fixed, inputs[0], 0.0)
    pool = nn.AvgPool2d(node.kernel, node.stride, padding, count_include_pad=node.count_include_pad)
    return ctx.call_module(node, pool, x)


@lowers(Pad2d)
def _pad2d(ctx: LoweringContext, node: Pad2d, inputs: list[fx.Node]) -> fx.Node:
    (top, bottom), (left, right) = node.padding
    return ctx.call_module(node, nn.ZeroPad2d((left, right, top, bottom)), inputs[0])


@lowers(GlobalAvgPool)
def _global_avgpool(ctx: LoweringContext, node: GlobalAvgPool, inputs: list[fx.Node]) -> fx.Node:
    return ctx.call_module(node, nn.AdaptiveAvgPool2d((1, 1)), inputs[0])


@lowers(Flatten)
def _flatten(ctx: LoweringContext, node: Flatten, inputs: list[fx.Node]) -> fx.Node:
    return ctx.call_function(node.name, torch.flatten, inputs[0], 1)


@lowers(Dense)
def _dense(ctx: LoweringContext, node: Dense, inputs: list[fx.Node]) -> fx.Node:
    features = ctx.channels(node.inputs[0])
    # A Flatten of a spatial map has an image-size-dependent width: LazyLinear takes it from the
    # first input or from the loaded weights.
    linear = (
        nn.LazyLinear(node.out_features, node.bias)
        if features is None
        else nn.Linear(features, node.out_features, node.bias)
    )
    return ctx.call_module(node, linear, inputs[0])


def same_pads(x: torch.Tensor, kernel: int | Pair, stride: int | Pair, dilation: int | Pair = 1) -> list[int]:
    """`F.pad`'s `[left, right, top, bottom]` for TensorFlow/XLA SAME padding of `x` (N, C, H, W).

    Per axis `total = (size - 1) // s * s + (k - 1) * d + 1 - size`, which is
    `multires.graph.same_padding`'s `(k - 1) * d - (size - 1) % s`, the smaller half before. It is
    integer arithmetic on the size (no ceil), so `torch.fx` traces it and `torch.export` keeps H and W
    symbolic; written this way the padded size is a multiple of the stride plus the window, so
    the output size is `(size - 1) // s + 1`, the very expression of an unpadded strided layer,
    and export can prove a SAME branch and a strided 1x1 shortcut agree. `max(total, 0)` only
    where the window spans fewer than `s - 1` pixels (only then can the total be negative).
    """
    kernel, stride, dilation = (v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, dilation))
    pads: list[int] = []
    for axis in (1, 0):  # width first: F.pad takes the last dimension first
        span, s, size = (kernel[axis] - 1) * dilation[axis], stride[axis], x.shape[axis + 2]
        total = (size - 1) // s * s + span + 1 - size
        if span < s - 1:
            total = torch.sym_max(total, 0)
        before = total // 2
        pads += [before, total - before]
    return pads


class Conv2dSame(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow/XLA SAME padding: zeros per side from the input size, the
    larger half after (PyTorch's own `padding='same'` only supports stride 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_pads(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding=SAME"


class MaxPool2dSame(nn.MaxPool2d):
    """`nn.MaxPool2d` with TensorFlow/XLA SAME padding from the input size; the pads are -inf,
    so they never win the max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_pads(x, self.kernel_size, self.stride)
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME"


class AvgPool2dSame(nn.AvgPool2d):
    """`nn.AvgPool2d` with TensorFlow/XLA SAME padding from the input size. TensorFlow's own SAME
    average leaves the pads out of the divisor (`count_include_pad=False`); with True they count
    as zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_pads(x, self.kernel_size, self.stride)
        if self.count_include_pad:
            return F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride)
        return _real_pixel_average(x, pads, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME, "
            f"count_include_pad={self.count_include_pad}"
        )


def _real_pixel_average(x: torch.Tensor, pads: list[int], kernel: Pair, stride: Pair) -> torch.Tensor:
    """Average pooling of `x` zero-padded by `pads` (F.pad order) whose divisor counts only the
    real pixels of each window: the window sums of the padded input over those of a padded mask."""
    sums = F.avg_pool2d(F.pad(x, pads), kernel, stride, divisor_override=1)
    ones = x.new_ones((1, 1, x.shape[2], x.shape[3]))
    counts = F.avg_pool2d(F.pad(ones, pads), kernel, stride, divisor_override=1)
    return sums / counts


class AsymmetricAvgPool2d(nn.Module):
    """Average pooling with per-side padding whose divisor counts only real (unpadded) pixels.

    `nn.AvgPool2d` pads symmetrically, and padding explicitly first would make the padded zeros
    count; this divides the window sums of the padded input by those of a padded mask of ones.
    """

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int], padding: Padding) -> None:
        super().__init__()
        self.kernel_size = kernel
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = self.padding
        return _real_pixel_average(x, [left, right, top, bottom], self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, count_include_pad=False"


class BiasedVarianceBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode running variance takes the *biased* batch variance,
    as Keras, Flax and MXNet do (PyTorch's takes the unbiased one, `n / (n - 1)` times larger).

    Normalisation, eval mode, parameters and state_dict keys are `nn.BatchNorm2d`'s; in training
    mode the running statistics are updated here, from `torch.var_mean` of the batch, and the
    output is `F.batch_norm` on the batch statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, running_variance=biased"


class InputCheck(nn.Module):
    """Raises multires.ShapeError unless the input is 4-D with the right channel count in `layout`.

    A cheap guard in the generated forward, so a model used outside a Runner still fails with a
    message naming the expected shape instead of a convolution error deep inside the network.
    """

    def __init__(self, graph_name: str, input_name: str, channels: int, layout: str) -> None:
        super().__init__()
        self.graph_name = graph_name
        self.input_name = input_name
        self.channels = channels
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = 1 if self.layout == "NCHW" else 3
        if x.dim() != 4 or x.shape[axis] != self.channels:
            self._reject(x)
        return x

    @torch.jit.unused
    def _reject(self, x):  # unannotated: TorchScript then reads it as a Tensor
        """Raise the ShapeError (Python only: scripted models raise TorchScript's own error)."""
        shape = tuple(x.shape)
        expected = f"(N, {self.channels}, H, W)" if self.layout == "NCHW" else f"(N, H, W, {self.channels})"
        hint = ""
        other_axis = 3 if self.layout == "NCHW" else 1
        if len(shape) == 4 and shape[other_axis] == self.channels:
            other = "NHWC" if self.layout == "NCHW" else "NCHW"
            hint = f" It looks like {other}: transpose it or build the model with layout={other!r}."
        raise ShapeError(
            f"{self.graph_name}: input {self.input_name!r} expects shape {expected} in {self.layout}; "
            f"got {shape}.{hint}"
        )

    def extra_repr(self) -> str:
        expected = "(N, C, H, W)" if self.layout == "NCHW" else "(N, H, W, C)"
        return f"{expected}, C={self.channels}"


class SpecModule(fx.GraphModule):
    """The built model: an `fx.GraphModule` that prints as its module tree, like a hand-written
    `nn.Module` (fx's own `__str__` appends the generated code, which is `model.code`)."""

    def __str__(self) -> str:
        return self.__repr__()


def build(graph: Graph, layout: str = "NCHW") -> SpecModule:
    """A `torch.nn.Module` computing `graph` on `layout` inputs, with freshly initialised weights.

    The result is an `fx.GraphModule` whose submodules mirror the spec's dotted names (numeric
    segments become `nn.ModuleList` entries, as torchvision's `layer1[0]`); its state_dict keys
    are the canonical weight names plus BatchNorm's `num_batches_tracked` counters.
    """
    layout = check_layout(layout)
    ctx = LoweringContext(graph)
    values: dict[str, fx.Node] = {}
    for spec_input in graph.inputs:
        x = ctx.fx_graph.placeholder(spec_input.name)
        check = _free_name(graph, f"{spec_input.name}_check")
        ctx.modules[check] = InputCheck(graph.name, spec_input.name, spec_input.channels, layout)
        x = ctx.fx_graph.call_module(check, (x,))
        if layout == "NHWC":
            x = ctx.fx_graph.call_method("permute", (x, 0, 3, 1, 2))
        values[spec_input.name] = x
    for node in graph.nodes:
        values[node.name] = LOWERINGS[type(node)](ctx, node, [values[s] for s in node.inputs])
    outputs = []
    for name in graph.outputs:
        value = values[name]
        if layout == "NHWC" and len(ctx.shapes[name]) == 4:
            value = ctx.fx_graph.call_method("permute", (value, 0, 2, 3, 1))
        outputs.append(value)
    ctx.fx_graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    root = _assemble(ctx.modules)
    model = SpecModule(root, ctx.fx_graph, class_name=_class_name(graph.name))
    # GraphModule re-creates intermediate containers as bare Modules; keep ours (ModuleLists).
    for name, child in root.named_children():
        setattr(model, name, child)
    return model


def _free_name(graph: Graph, name: str) -> str:
    """`name`, with underscores appended until no spec node uses it as its first segment."""
    taken = {node.name.split(".")[0] for node in graph.nodes} | {i.name for i in graph.inputs}
    while name in taken:
        name += "_"
    return name


def _assemble(modules: dict[str, nn.Module]) -> nn.Module:
    """A module tree with each module at its dotted path; containers whose children are
    numbered 0..n-1 are `nn.ModuleList`s."""
    tree: dict[str, Any] = {}
    for path, module in modules.items():
        *parents, leaf = path.split(".")
        branch = tree
        for part in parents:
            branch = branch.setdefault(part, {})
        branch[leaf] = module

    def make(branch: dict[str, Any]) -> nn.Module:
        children = {k: v if isinstance(v, nn.Module) else make(v) for k, v in branch.items()}
        if all(k.isdigit() for k in children) and sorted(map(int, children)) == list(range(len(children))):
            return nn.ModuleList(children[str(i)] for i in range(len(children)))
        container = nn.Module()
        for key, child in children.items():
            container.add_module(key, child)
        return container

    return make(tree)


def _class_name(graph_name: str) -> str:
    """The graph's name as a Python identifier, shown by `print(model)`."""
    name = re.sub(r"\W", "_", graph_name)
    return name if name.isidentifier() else f"Net_{name}"
