"""Canonical weights: a flat name -> float32 `numpy.ndarray` mapping, the lingua franca of backends.

Names are `<node name>.<kind>` with torchvision's kinds and layouts: convolution `weight`
OIHW `(out, in/groups, kh, kw)` and `bias`; BatchNorm `weight`, `bias`, `running_mean`,
`running_var`; Dense `weight` `(out, in)` and `bias`. Files are `.safetensors` or `.npz`, both
loaded without pickle.

A weight file is untrusted input (checkpoints come from strangers): reading one raises nothing but
`WeightsError`, and allocates no more than the file holds, since every size is checked against the
file before anything is read. `.safetensors` is read and written by this module's own codec rather
than the `safetensors` package: the core depends on NumPy and rich alone, and the package is a
compiled (Rust) wheel per platform and Python version. The codec applies the format's own rules
(those of the package's `validate`): a header of at most `MAX_HEADER` bytes that is a JSON object,
known dtypes, non-negative integer dimensions, data offsets that are contiguous, do not overlap
and cover the data exactly, and `__metadata__` mapping strings to strings. A fuzz test holds it to
the package's decisions (tests/core/test_hostile_files.py).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from multires.errors import SpecError, WeightsError
from multires.files import atomic_write
from multires.graph import BatchNorm, Conv2d, Dense, Graph
from multires.shapes import Shape, infer_shapes, known_size

CanonicalWeights = dict[str, np.ndarray]
"""Name -> float32 array, in the layouts above."""

BUFFER_KINDS = ("running_mean", "running_var")
"""Weight kinds that are statistics, not trainable parameters."""


def is_buffer(name: str) -> bool:
    """True for running statistics, which optimizers do not update."""
    return name.rsplit(".", 1)[-1] in BUFFER_KINDS


def weight_shapes(
    graph: Graph, input_shape: Shape | None = None, partial: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every canonical weight name of `graph` with its shape, in graph order.

    A Dense whose input size depends on the image size needs `input_shape`; with `partial` its
    weight gets shape `(out_features, -1)` instead (any input size).
    """
    shapes = infer_shapes(graph, input_shape)
    expected: dict[str, tuple[int, ...]] = {}
    for node in graph.nodes:
        c_in = shapes[node.inputs[0]][1]
        if isinstance(node, Conv2d):
            expected[f"{node.name}.weight"] = (
                node.out_channels,
                known_size(c_in, node) // node.groups,
                *node.kernel,
            )
            if node.bias:
                expected[f"{node.name}.bias"] = (node.out_channels,)
        elif isinstance(node, BatchNorm):
            for kind in ("weight", "bias", *BUFFER_KINDS):
                expected[f"{node.name}.{kind}"] = (known_size(c_in, node),)
        elif isinstance(node, Dense):
            if c_in is None and not partial:
                raise WeightsError(
                    f"{node.name} (Dense): its input size depends on the image size; pass input_shape."
                )
            c_in = -1 if c_in is None else c_in
            expected[f"{node.name}.weight"] = (node.out_features, c_in)
            if node.bias:
                expected[f"{node.name}.bias"] = (node.out_features,)
    return expected


def init_weights(graph: Graph, seed: int = 0, input_shape: Shape | None = None) -> CanonicalWeights:
    """Initial weights as torchvision initialises a ResNet, reproducible from `seed`.

    Convolutions: Kaiming-normal, fan-out, ReLU gain (`std = sqrt(2 / (out * kh * kw))`), bias
    uniform in +-1/sqrt(fan_in); BatchNorm weight 1, bias 0, running mean 0, variance 1; Dense
    weight and bias uniform in +-1/sqrt(in_features) (PyTorch's `nn.Linear` default).
    """
    rng = np.random.default_rng(seed)
    weights: CanonicalWeights = {}
    for name, shape in weight_shapes(graph, input_shape).items():
        node_name, kind = name.rsplit(".", 1)
        node = graph[node_name]
        if isinstance(node, Conv2d) and kind == "weight":
            fan_out = shape[0] * shape[2] * shape[3]
            value = rng.normal(0.0, math.sqrt(2.0 / fan_out), shape)
        elif isinstance(node, Conv2d):
            bound = 1.0 / math.sqrt(math.prod(weights[f"{node_name}.weight"].shape[1:]))
            value = rng.uniform(-bound, bound, shape)
        elif isinstance(node, BatchNorm):
            value = np.ones(shape) if kind in ("weight", "running_var") else np.zeros(shape)
        else:
            fan_in = weights[f"{node_name}.weight"].shape[1] if kind == "bias" else shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        weights[name] = value.astype(np.float32)
    return weights


def random_weights(graph: Graph, seed: int = 0, input_shape: Shape | None = None) -> CanonicalWeights:
    """Initial weights with random BatchNorm affine parameters and running statistics.

    `init_weights` leaves BatchNorm at identity, which hides mistakes in how a backend applies
    it; equivalence tests and `multires compare` use these instead.
    """
    weights = init_weights(graph, seed, input_shape)
    rng = np.random.default_rng(seed + 1)
    for name, value in weights.items():
        node_name, kind = name.rsplit(".", 1)
        if isinstance(graph[node_name], BatchNorm):
            shape = value.shape
            value = {
                "weight": rng.uniform(0.5, 1.5, shape),
                "bias": rng.normal(0.0, 0.2, shape),
                "running_mean": rng.normal(0.0, 0.2, shape),
                "running_var": rng.uniform(0.5, 1.5, shape),
            }[kind]
            weights[name] = value.astype(np.float32)
    return weights


def check_weights(graph: Graph, weights: Mapping[str, Any], input_shape: Shape | None = None) -> None:
    """Raise one WeightsError listing every missing, unexpected, misshapen or mistyped entry.

    Without `input_shape`, the input size of a Dense that depends on the image size is not checked.
    """
    expected = weight_shapes(graph, input_shape, partial=True)
    problems = []
    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"missing {name} {shape}")
            continue
        value = weights[name]
        if not isinstance(value, np.ndarray):
            problems.append(f"{name}: expected a numpy array, got {type(value).__name__}")
        elif len(value.shape) != len(shape) or any(
            e not in (-1, v) for v, e in zip(value.shape, shape, strict=True)
        ):
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {shape}")
        elif value.dtype != np.float32:
            problems.append(f"{name}: dtype {value.dtype}, expected float32")
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    if problems:
        raise WeightsError(
            f"weights do not match graph {graph.name!r} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )


def as_weights(source: Mapping[str, Any] | str | os.PathLike, graph: Graph) -> CanonicalWeights:
    """Checked float32 canonical weights from a mapping or a weight file."""
    if isinstance(source, (str, os.PathLike)):
        weights = load_file(source)
    else:
        weights = {
            k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
            for k, v in source.items()
        }
    check_weights(graph, weights)
    return weights


_ST_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def save(weights: Mapping[str, np.ndarray], path: str | os.PathLike, graph: Graph | None = None) -> Path:
    """Write weights atomically as `.safetensors` (with the graph's JSON as metadata) or `.npz`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda handle: _write_safetensors(handle, weights, graph))
    if path.suffix == ".npz":
        return atomic_write(
            path, lambda handle: np.savez(handle, **{k: cast(Any, np.asarray(v)) for k, v in weights.items()})
        )
    raise WeightsError(f"{path}: use a .safetensors or .npz file name.")


def _write_safetensors(handle: Any, weights: Mapping[str, np.ndarray], graph: Graph | None) -> None:
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name, value in weights.items():
        array = np.ascontiguousarray(value)
        dtype = array.dtype.newbyteorder("<")
        if dtype not in _ST_NAMES:
            raise WeightsError(f"{name}: dtype {array.dtype} cannot be written to safetensors.")
        array = array.astype(dtype, copy=False)
        header[name] = {
            "dtype": _ST_NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    meta = {"format": "np", "producer": "multires"}
    if graph is not None:
        meta["multires.graph"] = graph.to_json(indent=None)
    header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    handle.write(struct.pack("<Q", len(text)))
    handle.write(text)
    for array in arrays:
        handle.write(array.tobytes())


def load_file(path: str | os.PathLike, graph: Graph | None = None) -> CanonicalWeights:
    """Read a `.safetensors` or `.npz` weight file without pickle; check it against `graph` if given."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file.")
    if path.suffix == ".safetensors":
        weights = _read_safetensors(path)
    elif path.suffix == ".npz":
        weights = _read_npz(path)
    else:
        raise WeightsError(f"{path}: use a .safetensors or .npz file.")
    if graph is not None:
        check_weights(graph, weights)
    return weights


_DEFLATE_RATIO = 1032
"""The most bytes one compressed byte inflates to (zlib's limit): a bound on a member's true size."""

_NPZ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)
"""What zipfile and NumPy's `.npy` header reader raise on a damaged archive (RuntimeError: an
encrypted member; NotImplementedError: an unknown compression method)."""


def _read_npz(path: Path) -> CanonicalWeights:
    """Named arrays of an `.npz` archive (as `numpy.savez` writes it), never unpickled.

    Each member's `.npy` header is checked against the member's size, and that size against the
    archive's, before its data is read, so a hostile header cannot make the reader allocate more
    than the file can hold.
    """
    with path.open("rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise WeightsError(
            f"{path}: holds a single unnamed .npy array, not an .npz archive of named weights."
        )
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise WeightsError(f"{path}: not a readable .npz weight file (it does not start as a zip archive).")
    try:
        with zipfile.ZipFile(path) as archive:
            return _npz_members(path, archive, path.stat().st_size)
    except _NPZ_ERRORS as error:
        raise WeightsError(f"{path}: not a readable .npz weight file ({error}).") from None


def _npz_members(path: Path, archive: zipfile.ZipFile, size: int) -> CanonicalWeights:
    weights: CanonicalWeights = {}
    for info in archive.infolist():
        name = info.filename.removesuffix(".npy")
        if not info.filename.endswith(".npy") or name in weights:
            raise WeightsError(
                f"{path}: member {info.filename!r} is not a (unique) .npy array; an .npz weight file holds "
                "one NAME.npy per weight, as numpy.savez writes it."
            )
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_RATIO
        if info.compress_size > size or info.file_size > info.compress_size * ratio:
            raise WeightsError(
                f"{path}: {info.filename} claims {info.file_size} bytes ({info.compress_size} stored) in a "
                f"{size}-byte archive: the archive is corrupt."
            )
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise WeightsError(
                    f"{path}: {info.filename} is a .npy file of version {version}; 1.0 or 2.0 expected."
                )
            if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype:
                raise WeightsError(
                    f"{path}: {info.filename} holds {dtype} values; weights are plain numbers (object arrays "
                    "are refused, since loading them would need pickle)."
                )
            nbytes = math.prod(shape) * dtype.itemsize
            offset = member.tell()
            if offset + nbytes != info.file_size:
                raise WeightsError(
                    f"{path}: {info.filename} claims shape {shape} of {dtype} ({nbytes} bytes) in a member "
                    f"of {info.file_size} bytes ({info.compress_size} stored): the archive is corrupt."
                )
            buffer = bytearray(nbytes)
            if cast(zipfile.ZipExtFile, member).readinto(buffer) != nbytes or member.read(1):
                raise WeightsError(f"{path}: {info.filename} is truncated: the archive is corrupt.")
        array = np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        weights[name] = array if dtype.isnative else array.astype(dtype.newbyteorder("="))
    return weights


def file_graph(path: str | os.PathLike) -> Graph | None:
    """The graph stored in a multires `.safetensors` file's metadata, if any."""
    path = Path(path)
    meta = _safetensors_header(path)[0].get("__metadata__") or {}
    if "multires.graph" not in meta:
        return None
    try:
        return Graph.from_json(meta["multires.graph"])
    except SpecError as error:
        raise WeightsError(
            f"{path}: the graph in its metadata is not a valid multires graph: {error}"
        ) from None


MAX_HEADER = 100_000_000
"""The largest safetensors header read, in bytes (the `safetensors` package's own limit)."""


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The checked header of a safetensors file and the offset of its data."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file (no header length).")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > MAX_HEADER:
            raise WeightsError(
                f"{path}: corrupt safetensors file (header of {length} bytes in a {size}-byte file; "
                f"at most {MAX_HEADER} bytes are read)."
            )
        text = handle.read(length)
    if not text.startswith(b"{"):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object).")
    try:
        header = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise WeightsError(f"{path}: corrupt safetensors header (JSON nested too deeply).") from None
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError, or an int of over 4300 digits
        raise WeightsError(f"{path}: corrupt safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object).")
    meta = header.get("__metadata__")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings).")
    return header, 8 + length


def _entry(path: Path, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """An entry's dtype, shape and data offsets, checked for type and consistency."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64

    if (
        not isinstance(info, dict)
        or not isinstance(info.get("dtype"), str)
        or info["dtype"] not in _ST_DTYPES
        or not isinstance(info.get("shape"), list)
        or not all(count(d) for d in info["shape"])
        or not isinstance(info.get("data_offsets"), list)
        or len(info["data_offsets"]) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
    ):
        raise WeightsError(
            f"{path}: corrupt or unsupported entry {name!r}: {str(info)[:200]}; expected dtype one of "
            f"{', '.join(_ST_DTYPES)}, shape a list of non-negative ints and data_offsets [begin, end]."
        )
    dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    return dtype, shape, begin, end


def _read_safetensors(path: Path) -> CanonicalWeights:
    header, start = _safetensors_header(path)
    size = path.stat().st_size - start
    entries = {name: _entry(path, name, info) for name, info in header.items() if name != "__metadata__"}
    for name, (dtype, shape, begin, end) in entries.items():
        if not 0 <= begin <= end <= size or end - begin != math.prod(shape) * dtype.itemsize:
            raise WeightsError(
                f"{path}: entry {name!r} claims bytes {begin}..{end} for shape {shape} of {dtype}, "
                f"but the data holds {size} bytes: the file is truncated or corrupt."
            )
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != covered:
            raise WeightsError(
                f"{path}: entry {name!r} starts at byte {begin} of the data, expected {covered}: the "
                "entries must be contiguous and must not overlap. The file is corrupt."
            )
        covered = end
    if covered != size:
        raise WeightsError(
            f"{path}: the entries cover {covered} of the {size} data bytes; the file is corrupt or "
            "holds data no entry describes."
        )
    weights: CanonicalWeights = {}
    with path.open("rb") as handle:
        for name, (dtype, shape, begin, end) in entries.items():
            buffer = bytearray(end - begin)
            handle.seek(start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise WeightsError(f"{path}: the file changed while it was read; read it again.")
            array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
            weights[name] = array if dtype.isnative else array.astype(dtype.newbyteorder("="))
    return weights


def export(model: Any) -> CanonicalWeights:
    """Canonical weights of a native model built by any installed backend."""
    from multires.backend import backend_of

    return backend_of(model).export_weights(model)


def load(model: Any, weights: Mapping[str, Any] | str | os.PathLike) -> Any:
    """Load canonical weights (a mapping or a file) into a native model; returns the model."""
    from multires.backend import backend_of

    backend = backend_of(model)
    if isinstance(weights, (str, os.PathLike)):
        weights = load_file(weights)
    return backend.load_weights(model, weights)


_FLAX_STATS = {"running_mean": "mean", "running_var": "var"}
"""BatchNorm statistics: canonical kind -> leaf in Flax's `batch_stats` collection."""


def to_variables(weights: Mapping[str, Any], graph: Graph | None = None) -> dict[str, dict[str, Any]]:
    """Canonical weights as Flax linen variables `{'params': ..., 'batch_stats': ...}` of NumPy arrays.

    The trees nest by the dot-separated node name (`layer1.0.conv1.weight` becomes
    `params['layer1']['0']['conv1']['kernel']`) with flax.linen's leaf names: convolution `kernel`
    HWIO and `bias`, dense `kernel` `(in, out)` and `bias`, BatchNorm `scale` and `bias` in params,
    `mean` and `var` in batch_stats. The kind and rank of each entry decide its leaf, so the mapping
    is one-to-one without the graph; given a graph, the weights are checked against it first.
    Needs no framework: `jax.tree.map(jnp.asarray, ...)` makes device arrays of the result.
    """
    if graph is not None:
        check_weights(graph, weights)
    variables: dict[str, dict[str, Any]] = {}
    for name, value in weights.items():
        node, _, kind = name.rpartition(".")
        array = np.asarray(value, dtype=np.float32)
        collection, leaf = "params", kind
        if kind == "weight" and array.ndim == 4:
            leaf, array = "kernel", array.transpose(2, 3, 1, 0)
        elif kind == "weight" and array.ndim == 2:
            leaf, array = "kernel", array.T
        elif kind == "weight" and array.ndim == 1:
            leaf = "scale"
        elif kind in _FLAX_STATS:
            collection, leaf = "batch_stats", _FLAX_STATS[kind]
        if not node or kind not in ("weight", "bias", *BUFFER_KINDS) or leaf == "weight":
            raise WeightsError(
                f"{name}: not a canonical weight name with a Flax equivalent; expected '<node>.weight' "
                f"(1-, 2- or 4-D) or '<node>.bias|running_mean|running_var', got shape {array.shape}."
            )
        tree = variables.setdefault(collection, {})
        for segment in node.split("."):
            tree = tree.setdefault(segment, {})
        tree[leaf] = np.ascontiguousarray(array)
    return variables


def from_variables(variables: Mapping[str, Any], graph: Graph | None = None) -> CanonicalWeights:
    """Canonical weights from Flax linen variables (the inverse of `to_variables`).

    Reads the `params` and `batch_stats` collections (others, such as `intermediates`, are
    ignored); leaves may be NumPy or JAX arrays. Given a graph, the result is checked against it
    and ordered as the graph's weights.
    """
    stats_kinds = {leaf: kind for kind, leaf in _FLAX_STATS.items()}
    weights: CanonicalWeights = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flat_tree(variables.get(collection, {}), ()):
            array = np.asarray(value, dtype=np.float32)
            node, leaf = ".".join(path[:-1]), path[-1]
            kind = None
            if collection == "params" and leaf == "kernel" and array.ndim == 4:
                kind, array = "weight", array.transpose(3, 2, 0, 1)
            elif collection == "params" and leaf == "kernel" and array.ndim == 2:
                kind, array = "weight", array.T
            elif collection == "params" and leaf in ("scale", "bias"):
                kind = "weight" if leaf == "scale" else "bias"
            elif collection == "batch_stats" and leaf in stats_kinds:
                kind = stats_kinds[leaf]
            if kind is None or not node:
                raise WeightsError(
                    f"{collection}/{'/'.join(path)}: no canonical weight corresponds to this Flax "
                    f"variable of shape {array.shape}; expected <node>/kernel|scale|bias in params and "
                    "<node>/mean|var in batch_stats."
                )
            weights[f"{node}.{kind}"] = np.ascontiguousarray(array)
    if graph is None:
        return weights
    check_weights(graph, weights)
    return {name: weights[name] for name in weight_shapes(graph, partial=True)}


def _flat_tree(tree: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        return [item for key, sub in tree.items() for item in _flat_tree(sub, (*path, str(key)))]
    return [(path, tree)]
