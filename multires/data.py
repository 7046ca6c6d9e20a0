"""Fashion-MNIST in NumPy: find or download the official IDX files, check them, batch and resize.

`fashion_mnist()` looks for the four official files (gzipped or plain, under their official
names) in `root`, then `$MULTIRES_DATA`, then the user cache directory
(`$XDG_CACHE_HOME/multires/fashion-mnist`, by default `~/.cache/multires/fashion-mnist`), then
`/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist` package), and otherwise
downloads them from the official address into the first of `root`, `$MULTIRES_DATA` and the cache
directory. Every file is checked against the SHA-256 of its *decompressed* IDX payload (Debian
re-compresses the archives, so the `.gz` bytes differ), so a truncated, corrupt or foreign file is
reported and never used.

Batching, seeded shuffling and bilinear resizing are framework-neutral NumPy, so every backend
trains on exactly the same batches.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from multires.errors import DataError, ShapeError
from multires.shapes import check_layout

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The official Fashion-MNIST address (the one torchvision and d2l download from)."""

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package installs the files."""

ENV_VAR = "MULTIRES_DATA"
"""Environment variable naming a folder that holds the Fashion-MNIST files."""

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Official file names (without `.gz`) of each split: images, then labels."""

SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
"""SHA-256 of each decompressed IDX file."""

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The ten class names, indexed by label."""

MAX_IDX_BYTES = 2**30
"""The largest IDX payload decompressed from a `.gz` (1 GiB; Fashion-MNIST's largest holds 47 MB)."""

_CHUNK = 2**20
"""Bytes decompressed at a time."""

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Dataset(NamedTuple):
    """One split: `images` (N, H, W) uint8, `labels` (N,) uint8 and the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> Dataset:
        """The first `n` examples (all of them when `n` is None)."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"a subset size must be a positive int; got {n!r}.")
        return Dataset(self.images[:n], self.labels[:n], self.classes)


def cache_dir() -> Path:
    """The user cache folder for Fashion-MNIST, honouring `$XDG_CACHE_HOME`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "multires" / "fashion-mnist"


def search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for the files, in order."""
    dirs = [Path(root)] if root is not None else []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    return [*dirs, cache_dir(), SYSTEM_DIR]


def download_dir(root: str | os.PathLike | None = None) -> Path:
    """Where missing files are downloaded: `root`, else `$MULTIRES_DATA`, else the cache folder."""
    if root is not None:
        return Path(root)
    return Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else cache_dir()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or plain) into an array, checking its header and length."""
    path = Path(path)
    return parse_idx(_decompressed(path), str(path))


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes: magic `00 00 <type> <ndim>`, big-endian uint32 sizes, then the values."""
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{source}: not an IDX file (magic bytes {data[:4].hex(' ') or 'missing'}; expected "
            "00 00 <type> <ndim>). Replace it with the official file."
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes for {ndim} dimensions).")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    # Zero-size arrays too: NumPy refuses shapes whose nonzero sizes multiply past its index range.
    if len(data) != expected or math.prod(d for d in shape if d) > np.iinfo(np.intp).max // dtype.itemsize:
        raise DataError(
            f"{source}: IDX header promises shape {shape} ({expected} bytes) but the file holds "
            f"{len(data)} bytes: it is truncated or corrupt. Replace it with the official file."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(
    root: str | os.PathLike | None = None,
    split: str = "train",
    resize: int | tuple[int, int] | None = None,
    *,
    antialias: bool = True,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """The Fashion-MNIST `split` ("train" or "test") as uint8 arrays, checked against its SHA-256.

    `resize` (an int for a square, or `(height, width)`) resizes bilinearly as `resize_images`
    does. Missing files are downloaded (with a progress bar unless `progress=False`) when
    `download` is true; see the module docstring for where files are looked for.
    """
    if split not in FILES:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'.")
    images_name, labels_name = FILES[split]
    images = _load(images_name, root, download, progress)
    labels = _load(labels_name, root, download, progress)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"Fashion-MNIST {split}: expected uint8 images (N, H, W) and labels (N,); got "
            f"{images.dtype} {images.shape} and {labels.dtype} {labels.shape}."
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels; the files "
            "do not belong together."
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"Fashion-MNIST {split}: label {int(labels.max())} is not one of the 10 classes.")
    if resize is not None:
        images = resize_images(images, resize, antialias=antialias)
    return Dataset(images, labels, CLASSES)


def find_file(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The first existing `name` or `name.gz` in `search_dirs(root)`, or None."""
    for folder in search_dirs(root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load(name: str, root: str | os.PathLike | None, download: bool, progress: bool) -> np.ndarray:
    path = find_file(name, root)
    if path is None:
        if not download:
            raise DataError(
                f"Fashion-MNIST file {name}(.gz) not found in {', '.join(map(str, search_dirs(root)))}. "
                f"Install Debian's dataset-fashion-mnist, set ${ENV_VAR}, or allow the download."
            )
        path = fetch(name, download_dir(root), progress=progress)
    return parse_idx(_verified(path, name), str(path))


def _decompressed(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is gzipped. Decompression runs in chunks and stops past
    the size the IDX header promises (`MAX_IDX_BYTES` when there is no IDX header), so a gzip bomb
    is refused, naming the file, after costing no more memory than the file it claims to be."""
    with path.open("rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raw.seek(0)
            return raw.read()
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                data = bytearray(stream.read(4))
                if len(data) == 4 and data[:2] == b"\x00\x00" and data[2] in _IDX_DTYPES:
                    data += stream.read(4 * data[3])
                limit, promise = _gzip_limit(bytes(data), path)
                while len(data) <= limit and (chunk := stream.read(min(_CHUNK, limit + 1 - len(data)))):
                    data += chunk
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"{path}: corrupt or truncated gzip file ({error}). Delete it and fetch it again."
            ) from None
    if len(data) > limit:
        raise DataError(
            f"{path}: the gzip data expands past {promise} (a gzip bomb or a corrupt file). Delete it "
            "and fetch it again."
        )
    return bytes(data)


def _gzip_limit(head: bytes, path: Path) -> tuple[int, str]:
    """The most bytes to decompress for a payload starting with `head`, and why: the size of the
    IDX file whose header `head` is (refused when over `MAX_IDX_BYTES`), else `MAX_IDX_BYTES`."""
    if len(head) < 4 or len(head) < 4 + 4 * head[3] or head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
        return MAX_IDX_BYTES, f"the {MAX_IDX_BYTES} bytes multires decompresses"
    shape = struct.unpack(f">{head[3]}I", head[4:])
    size = len(head) + math.prod(shape) * _IDX_DTYPES[head[2]].itemsize
    if size > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: its IDX header promises shape {shape} ({size} bytes), over the {MAX_IDX_BYTES} "
            "bytes multires decompresses. Replace it with the official file."
        )
    return size, f"the {size} bytes its IDX header promises (shape {shape})"


def _verified(path: Path, name: str) -> bytes:
    data = _decompressed(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise DataError(
            f"{path}: the decompressed data has SHA-256 {digest}, expected {SHA256[name]}: the file "
            f"is truncated, corrupt or not the official Fashion-MNIST {name}. Delete it; multires then "
            "uses the next location or downloads it again."
        )
    return data


def fetch(name: str, folder: str | os.PathLike, progress: bool = True) -> Path:
    """Download `name.gz` from `URL` into `folder`, verify it, and move it into place atomically."""
    folder = Path(folder)
    url = f"{URL}{name}.gz"
    final = folder / f"{name}.gz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.gz.", suffix=".part")
    except OSError as error:
        raise DataError(
            f"cannot write the download of {name}.gz to {folder} ({error.strerror}). Pass a writable "
            f"root or set ${ENV_VAR}."
        ) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                _copy_url(url, handle, f"{name}.gz", progress)
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", None) or error
                raise DataError(
                    f"could not download {url} ({reason}). Without network access, install Debian's "
                    f"dataset-fashion-mnist or put the four files in a folder named by ${ENV_VAR}."
                ) from None
            handle.flush()
            os.fsync(handle.fileno())
        _verified(Path(tmp), name)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return final


def _copy_url(url: str, handle: BinaryIO, label: str, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with urllib.request.urlopen(url, timeout=60) as response:
        length = response.headers.get("Content-Length")
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
            task = bar.add_task(f"downloading {label}", total=int(length) if length else None)
            while chunk := response.read(1 << 16):
                handle.write(chunk)
                bar.advance(task, len(chunk))


# Resizing.

_PIL_BITS = 22
"""Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c)."""


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    items = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    try:
        height, width = (int(s) for s in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ShapeError(f"resize takes an int or (height, width); got {size!r}.") from None
    if height < 1 or width < 1:
        raise ShapeError(f"resize needs positive sizes; got {size!r}.")
    return height, width


def _pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's bilinear weights as an (out, in) matrix of its fixed-point integers."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale
    inverse = 1.0 / filterscale
    matrix = np.zeros((out_size, in_size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = [max(0.0, 1.0 - abs(((x - center) + 0.5) * inverse)) for x in range(lo, hi)]
        total = 0.0
        for w in weights:
            total += w
        for offset, w in enumerate(weights):
            matrix[out, lo + offset] = np.floor(0.5 + (w / total if total else w) * (1 << _PIL_BITS))
    return matrix


def _plain_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Half-pixel bilinear weights without antialiasing (`align_corners=False`), (out, in)."""
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def resize_images(
    images: np.ndarray, size: int | tuple[int, int], antialias: bool = True, chunk: int = 2048
) -> np.ndarray:
    """Bilinearly resize uint8 images (N, H, W) to `size` (an int for a square, or (h, w)).

    `antialias=True` reproduces Pillow's `Image.resize(..., BILINEAR)` bit for bit (its
    fixed-point weights, horizontal pass first, rounding to uint8 between passes), which is what
    the book's `transforms.Resize` applies to Fashion-MNIST's PIL images; when shrinking, Pillow
    widens the filter (antialiasing). Pillow 13 runs the vertical pass first for some sizes that
    shrink the height more than the width, which moves some pixels by one grey level; square and
    enlarging resizes (the book's) are identical in every Pillow version.

    `antialias=False` is the plain half-pixel bilinear of `torch.nn.functional.interpolate(
    mode="bilinear", align_corners=False)` (torchvision's `Resize(antialias=False)` on uint8
    tensors), rounded half to even; it matches to within one grey level at exact ties. Both modes
    agree when enlarging, up to rounding. Works in chunks of `chunk` images to bound memory.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ShapeError(f"resize_images takes uint8 images (N, H, W); got {images.dtype} {images.shape}.")
    n, in_h, in_w = images.shape
    out_h, out_w = _size(size)
    if (out_h, out_w) == (in_h, in_w):
        return images.copy()
    out = np.empty((n, out_h, out_w), dtype=np.uint8)
    if antialias:
        rows, cols = _pil_coefficients(in_h, out_h), _pil_coefficients(in_w, out_w)
    else:
        rows, cols = _plain_coefficients(in_h, out_h), _plain_coefficients(in_w, out_w)
    for start in range(0, n, chunk):
        block = images[start : start + chunk].astype(np.float64)
        m = block.shape[0]
        if antialias:
            if in_w != out_w:
                block = _pil_round(block.reshape(m * in_h, in_w) @ cols.T).reshape(m, in_h, out_w)
            if in_h != out_h:
                block = _pil_round(rows @ block.transpose(1, 0, 2).reshape(in_h, -1))
                block = block.reshape(out_h, m, out_w).transpose(1, 0, 2)
        else:
            block = (block.reshape(m * in_h, in_w) @ cols.T).reshape(m, in_h, out_w)
            block = (rows @ block.transpose(1, 0, 2).reshape(in_h, -1)).reshape(out_h, m, out_w)
            block = np.clip(np.rint(block.transpose(1, 0, 2)), 0, 255)
        out[start : start + m] = block
    return out


def _pil_round(sums: np.ndarray) -> np.ndarray:
    """Pillow's `clip8`: the fixed-point sum plus one half, shifted down, clipped to 0..255."""
    return np.clip(np.floor((sums + (1 << (_PIL_BITS - 1))) / (1 << _PIL_BITS)), 0, 255)


# Batching.


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `n` examples in `epoch`: a pure function of `(seed, epoch)`, so a
    run resumed mid-epoch replays the same batches."""
    for what, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"{what} must be a non-negative int; got {value!r}.")
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_indices(
    n: int, batch_size: int, seed: int | None = None, epoch: int = 0, start: int = 0
) -> Iterator[np.ndarray]:
    """Index arrays of the batches of one epoch, from batch number `start` on.

    Shuffled by `epoch_order(n, seed, epoch)` when `seed` is given, in order otherwise; the last
    batch holds the remainder (as PyTorch's DataLoader with `drop_last=False`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int; got {batch_size!r}.")
    order = np.arange(n) if seed is None else epoch_order(n, seed, epoch)
    for begin in range(start * batch_size, n, batch_size):
        yield order[begin : begin + batch_size]


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch for `n` examples (the last one may be partial)."""
    return -(-n // batch_size)


def to_input(images: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    """uint8 images (N, H, W) as a float32 batch in [0, 1] with one channel, in `layout`, as
    torchvision's `ToTensor` scales them."""
    layout = check_layout(layout)
    x = images.astype(np.float32) / np.float32(255)
    return x[:, None] if layout == "NCHW" else x[..., None]
