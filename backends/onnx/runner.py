"""The ONNX `Runner`: a built model in an onnxruntime session, for inference only.

ONNX is an exchange format for inference: a model built here holds BatchNorm in inference mode
and no optimizer, so eval-mode `forward` is the whole of it. Training-mode calls raise
`InferenceOnlyError`, which tells the user to train in a framework backend and export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from multires.backend import SGD, Execution, HostTotals, unknown_device
from multires.errors import DeviceError, TrainingError, WeightsError
from multires.graph import Graph
from multires.shapes import check_input_shape

from .. import input_array
from .lowering import build
from .weights import export_weights, load_weights


class InferenceOnlyError(TrainingError, NotImplementedError):
    """A training-mode call on the ONNX backend, which runs inference only."""


def _inference_only(what: str) -> InferenceOnlyError:
    return InferenceOnlyError(
        f"onnx: {what} is not available: ONNX models are inference-only (BatchNorm uses its running "
        "statistics and there is no optimizer). Train with a framework backend (torch, tf, flax, mxnet), "
        "then export its weights to ONNX with `multires export NAME --format onnx --weights FILE`."
    )


def inference_session(
    model: onnx.ModelProto, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    """An onnxruntime session for `model` with full graph optimisation; `threads` sets the
    intra-op thread count (default: onnxruntime's, one per physical core)."""
    return ort.InferenceSession(model.SerializeToString(), _options(threads), providers=list(providers))


def _options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
"""onnxruntime's execution provider for each device kind."""


def available_devices() -> list[str]:
    """`cpu`, and `cuda` where this onnxruntime build has the CUDA provider."""
    have = set(ort.get_available_providers())
    return [kind for kind, provider in PROVIDERS.items() if provider in have]


def providers(execution: Execution) -> list[str | tuple[str, dict[str, str]]]:
    """The session providers for `execution`'s device (`cpu`, `cuda` or `cuda:N`), or a DeviceError:
    ONNX runs one device in float32 (inference; no data parallelism or mixed precision here)."""
    if execution.devices != 1 or execution.precision != "fp32":
        raise DeviceError(
            f"onnx runs inference on one device in float32; got devices={execution.devices}, precision="
            f"{execution.precision!r}. Use a framework backend for data parallelism and mixed precision."
        )
    kind, _, index = (execution.device or "cpu").lower().partition(":")
    if kind not in available_devices() or (index and (kind != "cuda" or not index.isdigit())):
        raise unknown_device("onnx", str(execution.device), available_devices())
    if kind == "cuda":
        return [(PROVIDERS["cuda"], {"device_id": index or "0"}), PROVIDERS["cpu"]]
    return [PROVIDERS["cpu"]]


class OnnxRunner(HostTotals):
    """A `multires.Runner` over a model from `build`, run by onnxruntime in float32 (on the CPU, or
    a GPU through the CUDA provider where the onnxruntime build has it)."""

    is_main = True

    def __init__(
        self, graph: Graph, weights: Mapping[str, np.ndarray], layout: str, execution: Execution | None = None
    ) -> None:
        self.graph = graph
        self.layout = layout
        self.execution = execution or Execution()
        chosen = providers(self.execution)
        self.model = build(graph, layout, weights)
        self.session = ort.InferenceSession(self.model.SerializeToString(), _options(), providers=chosen)

    def _feed(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(x, Mapping):
            return {name: input_array(self.graph, value) for name, value in x.items()}
        x = input_array(self.graph, x)
        check_input_shape(self.graph, x.shape, self.layout)
        return {self.graph.inputs[0].name: x}

    def forward(
        self, x: np.ndarray | Mapping[str, np.ndarray], training: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The float32 output(s) for a batch in `layout` (a dict by name for several outputs).

        `training=True` raises InferenceOnlyError: ONNX models are inference-only.
        """
        if training:
            raise _inference_only("training-mode forward (batch statistics)")
        outputs = self.session.run(list(self.graph.outputs), self._feed(x))
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.graph.outputs, outputs, strict=True))

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Raises InferenceOnlyError: ONNX models are inference-only."""
        raise _inference_only("train_step")

    def set_lr(self, lr: float) -> None:
        """Raises InferenceOnlyError: ONNX models are inference-only."""
        raise _inference_only("set_lr")

    def weights(self) -> dict[str, np.ndarray]:
        """The model's canonical weights."""
        return export_weights(self.model)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the weights (a full canonical mapping) and reopen the session on them."""
        load_weights(self.model, weights)
        self.session = inference_session(self.model)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Always empty: an inference-only runner has no optimizer."""
        return {}

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Accepts only the empty state `optimizer_state` returns."""
        if state:
            raise WeightsError(
                f"onnx: cannot restore optimizer state ({len(state)} buffer(s)) on an inference-only "
                "runner; ONNX models have no optimizer."
            )


def make_runner(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    layout: str,
    optimizer: SGD,
    execution: Execution | None = None,
) -> OnnxRunner:
    """A `multires.Runner` for `graph` with canonical `weights`, inputs in `layout`, on `execution`'s device.

    `optimizer` is accepted for the backend contract and unused: the runner is inference-only.
    """
    return OnnxRunner(graph, weights, layout, execution)
