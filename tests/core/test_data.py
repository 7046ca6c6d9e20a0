"""Fashion-MNIST loading (real Debian files and generated IDX files, corrupt ones included),
downloads from a local file:// server, bilinear resizing, seeded batching."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from multires import data
from multires.data import (
    CLASSES,
    FILES,
    Dataset,
    batch_indices,
    epoch_order,
    fashion_mnist,
    find_file,
    num_batches,
    parse_idx,
    read_idx,
    resize_images,
    to_input,
)
from multires.errors import DataError, MultiresError, ShapeError

REAL = all((data.SYSTEM_DIR / f"{name}.gz").is_file() for names in FILES.values() for name in names)
REQUIRE_REAL = "MULTIRES_REQUIRE_REAL_DATA"
"""Set to 1 (CI's .ci/run does), a missing real file fails these tests instead of skipping them:
they are what checks the shipped SHA-256 constants against the official data."""


@pytest.fixture
def real_files() -> None:
    if not REAL:
        message = (
            f"the real Fashion-MNIST files are not in {data.SYSTEM_DIR}: apt-get install "
            "dataset-fashion-mnist (Debian/Ubuntu) to run these tests"
        )
        if os.environ.get(REQUIRE_REAL) == "1":
            pytest.fail(f"${REQUIRE_REAL}=1 and {message}")
        pytest.skip(message)


needs_real = pytest.mark.usefixtures("real_files")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 00 00 08 <ndim>, big-endian sizes, the values."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_split(n: int, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_dataset(
    folder: Path, n_train: int = 20, n_test: int = 8, gz: bool = True, seed: int = 0
) -> dict[str, bytes]:
    """Write the four files of a small generated Fashion-MNIST into `folder`; returns their payloads."""
    folder.mkdir(parents=True, exist_ok=True)
    payloads = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = make_split(n, seed=seed + (split == "test"))
        for name, array in zip(FILES[split], (images, labels), strict=True):
            payloads[name] = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payloads[name]))
            else:
                (folder / name).write_bytes(payloads[name])
    return payloads


def trust(monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes]) -> None:
    """Make the loader's checksums those of the generated payloads."""
    monkeypatch.setattr(data, "SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in payloads.items()})


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $MULTIRES_DATA, a private cache folder, no system folder and no network address."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "URL", (tmp_path / "no-server").as_uri() + "/")
    return tmp_path


# IDX parsing.


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_generated_files(tmp_path: Path, gz: bool) -> None:
    images, labels = make_split(5)
    for array, name in ((images, "img"), (labels, "lab")):
        payload = idx_bytes(array)
        path = tmp_path / name
        path.write_bytes(gzip.compress(payload) if gz else payload)
        out = read_idx(path)
        assert out.dtype == np.uint8 and out.flags.writeable
        np.testing.assert_array_equal(out, array)


def test_parse_idx_reads_big_endian_types() -> None:
    values = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=">f4")
    payload = bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 2, 2) + values.tobytes()
    out = parse_idx(payload)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values.astype(np.float32))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not an IDX file"),
        (b"\x08\x03\x00\x00" + bytes(16), "not an IDX file"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "truncated IDX header"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(9), "truncated or corrupt"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(11), "truncated or corrupt"),
    ],
)
def test_parse_idx_rejects_malformed_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_idx(payload, "some-file")


# Finding and checking the files.


def test_loads_generated_gz_and_plain_files(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for gz in (True, False):
        folder = isolated / f"root-{gz}"
        trust(monkeypatch, write_dataset(folder, n_train=20, n_test=8, gz=gz))
        train = fashion_mnist(folder, "train")
        test = fashion_mnist(folder, "test")
        assert isinstance(train, Dataset)
        assert train.images.shape == (20, 6, 6) and train.images.dtype == np.uint8
        assert train.labels.shape == (20,) and train.labels.dtype == np.uint8
        assert len(test) == 8 and train.classes == CLASSES and len(CLASSES) == 10
        np.testing.assert_array_equal(train.images, make_split(20)[0])
        images, labels, classes = test
        np.testing.assert_array_equal(labels, make_split(8, seed=1)[1])


def test_search_order_root_env_cache_system(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = FILES["train"][0]
    root, env = isolated / "root", isolated / "env"
    cache, system = isolated / "cache" / "multires" / "fashion-mnist", isolated / "system"
    assert data.cache_dir() == cache
    for folder in (root, env, cache, system):
        folder.mkdir(parents=True)
        (folder / f"{name}.gz").write_bytes(b"x")
    monkeypatch.setenv(data.ENV_VAR, str(env))
    assert find_file(name, root) == root / f"{name}.gz"
    assert find_file(name) == env / f"{name}.gz"
    monkeypatch.delenv(data.ENV_VAR)
    assert find_file(name) == cache / f"{name}.gz"
    (cache / f"{name}.gz").unlink()
    assert find_file(name) == system / f"{name}.gz"
    (system / name).write_bytes(b"x")
    assert find_file(name) == system / name, "an uncompressed file is preferred within a folder"
    assert data.search_dirs(root) == [root, cache, system]


def test_cache_dir_defaults_to_home_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "multires" / "fashion-mnist"


def test_unknown_split(isolated: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'validation'"):
        fashion_mnist(split="validation")


def test_wrong_checksum_is_an_error_naming_the_file(isolated: Path) -> None:
    write_dataset(isolated / "root")
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte.gz: the decompressed data has SHA-256 \w+, expected c59f468a",
    ):
        fashion_mnist(isolated / "root")


def test_truncated_gzip_is_an_error(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = isolated / "root"
    trust(monkeypatch, write_dataset(folder))
    path = folder / f"{FILES['train'][0]}.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        fashion_mnist(folder)


def test_truncated_plain_file_fails_its_checksum(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = isolated / "root"
    trust(monkeypatch, write_dataset(folder, gz=False))
    path = folder / FILES["test"][1]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated, corrupt or not the official"):
        fashion_mnist(folder, "test")


def test_wrong_magic_is_reported_even_with_a_matching_checksum(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = isolated / "root"
    payloads = write_dataset(folder)
    name = FILES["train"][1]
    payloads[name] = b"\x00\x01" + payloads[name][2:]
    (folder / f"{name}.gz").write_bytes(gzip.compress(payloads[name]))
    trust(monkeypatch, payloads)
    with pytest.raises(DataError, match="not an IDX file"):
        fashion_mnist(folder)


def test_images_and_labels_that_do_not_belong_together(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = isolated / "root"
    payloads = write_dataset(folder)
    name = FILES["train"][1]
    payloads[name] = idx_bytes(np.zeros(19, np.uint8))
    (folder / name).write_bytes(payloads[name])
    trust(monkeypatch, payloads)
    with pytest.raises(DataError, match="20 images but 19 labels"):
        fashion_mnist(folder)
    payloads[name] = idx_bytes(np.full(20, 10, np.uint8))
    (folder / name).write_bytes(payloads[name])
    trust(monkeypatch, payloads)
    with pytest.raises(DataError, match="label 10 is not one of the 10 classes"):
        fashion_mnist(folder)


def test_a_corrupt_file_is_never_used_nor_skipped_silently(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = isolated / "good", isolated / "bad"
    trust(monkeypatch, write_dataset(good))
    write_dataset(bad, seed=5)
    monkeypatch.setenv(data.ENV_VAR, str(good))
    with pytest.raises(DataError, match=str(bad)):
        fashion_mnist(bad)
    assert len(fashion_mnist()) == 20


def test_data_errors_are_multires_value_errors() -> None:
    assert issubclass(DataError, MultiresError) and issubclass(DataError, ValueError)


# Downloads (from a file:// folder standing in for the official server).


@pytest.fixture
def server(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bytes]]:
    folder = isolated / "server"
    payloads = write_dataset(folder, n_train=12, n_test=4)
    trust(monkeypatch, payloads)
    monkeypatch.setattr(data, "URL", folder.as_uri() + "/")
    return folder, payloads


def test_download_into_root_then_reuse(server: tuple[Path, dict[str, bytes]], isolated: Path) -> None:
    root = isolated / "root"
    train = fashion_mnist(root, "train", progress=False)
    assert len(train) == 12
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in FILES["train"])
    for name in FILES["train"]:
        assert (root / f"{name}.gz").read_bytes() == (server[0] / f"{name}.gz").read_bytes()
    for name in FILES["train"]:
        (server[0] / f"{name}.gz").unlink()
    assert len(fashion_mnist(root, "train", progress=False)) == 12, "the second load reads the local copy"


def test_download_goes_to_env_folder_else_cache(
    server: tuple[Path, dict[str, bytes]], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fashion_mnist(split="test", progress=False)
    assert {p.name for p in data.cache_dir().iterdir()} == {f"{n}.gz" for n in FILES["test"]}
    monkeypatch.setenv(data.ENV_VAR, str(isolated / "env"))
    fashion_mnist(split="train", progress=False)
    assert {p.name for p in (isolated / "env").iterdir()} == {f"{n}.gz" for n in FILES["train"]}


def test_download_with_a_progress_bar(server: tuple[Path, dict[str, bytes]], isolated: Path) -> None:
    path = data.fetch(FILES["test"][0], isolated / "root", progress=True)
    assert read_idx(path).shape == (4, 6, 6)


def test_a_corrupt_download_is_rejected_and_leaves_nothing(
    server: tuple[Path, dict[str, bytes]], isolated: Path
) -> None:
    name = FILES["train"][0]
    served = server[0] / f"{name}.gz"
    served.write_bytes(served.read_bytes()[:-30])
    root = isolated / "root"
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        fashion_mnist(root, progress=False)
    assert list(root.iterdir()) == []
    served.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x07"))
    with pytest.raises(DataError, match="SHA-256"):
        fashion_mnist(root, progress=False)
    assert list(root.iterdir()) == []


def test_an_unreachable_server_is_a_clear_error(isolated: Path) -> None:
    with pytest.raises(DataError, match="could not download .*install Debian's dataset-fashion-mnist"):
        fashion_mnist(isolated / "root", progress=False)
    assert list((isolated / "root").iterdir()) == []


def test_no_download_when_disabled(isolated: Path) -> None:
    with pytest.raises(DataError, match="not found in"):
        fashion_mnist(isolated / "root", download=False)


def test_the_official_address() -> None:
    assert data.URL == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


# The real files (Debian's dataset-fashion-mnist).


@needs_real
def test_real_files_load_and_match_the_official_data(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_DIR", Path("/usr/share/datasets/fashion-mnist"))
    train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == np.uint8 and test.labels.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    np.testing.assert_array_equal(train.labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    np.testing.assert_array_equal(test.labels[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])


@needs_real
def test_real_files_resized_like_pillow(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    monkeypatch.setattr(data, "SYSTEM_DIR", Path("/usr/share/datasets/fashion-mnist"))
    test = fashion_mnist(split="test", resize=96)
    assert test.images.shape == (10000, 96, 96)
    raw = fashion_mnist(split="test").images
    for i in (0, 1, 4999, 9999):
        expected = np.asarray(image_module.fromarray(raw[i]).resize((96, 96), image_module.BILINEAR))
        np.testing.assert_array_equal(test.images[i], expected)


# Resizing.


def test_resize_hand_computed_values() -> None:
    row = np.array([[[0, 255]]], np.uint8)
    for antialias in (True, False):
        np.testing.assert_array_equal(resize_images(row, (1, 4), antialias), [[[0, 64, 191, 255]]])
    wide = np.array([[[0, 100, 200, 255]]], np.uint8)
    # Pillow widens the triangle filter to 2 pixels when halving: (0*.75 + 100*.75 + 200*.25) / 1.75.
    np.testing.assert_array_equal(resize_images(wide, (1, 2)), [[[71, 209]]])
    # Plain bilinear samples at 0.5 and 2.5: 50 and 227.5, rounded half to even.
    np.testing.assert_array_equal(resize_images(wide, (1, 2), antialias=False), [[[50, 228]]])


@pytest.mark.parametrize("size", [96, (28, 28), (14, 14), (56, 40), (224, 224), (5, 5), (31, 13)])
def test_resize_matches_pillow_bit_for_bit(size: int | tuple[int, int]) -> None:
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    height, width = (size, size) if isinstance(size, int) else size
    expected = np.stack(
        [
            np.asarray(image_module.fromarray(im).resize((width, height), image_module.BILINEAR))
            for im in images
        ]
    )
    np.testing.assert_array_equal(resize_images(images, size, chunk=4), expected)


def test_resize_keeps_constants_and_shapes() -> None:
    images = np.full((3, 28, 28), 77, np.uint8)
    for antialias in (True, False):
        out = resize_images(images, (40, 17), antialias)
        assert out.shape == (3, 40, 17) and out.dtype == np.uint8
        assert (out == 77).all()
    same = resize_images(images, 28)
    assert same is not images and np.array_equal(same, images)


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ShapeError, match="uint8 images"):
        resize_images(np.zeros((2, 3, 4, 1), np.uint8), 8)
    with pytest.raises(ShapeError, match="positive"):
        resize_images(np.zeros((2, 3, 4), np.uint8), (0, 3))
    with pytest.raises(ShapeError, match="an int or"):
        resize_images(np.zeros((2, 3, 4), np.uint8), "big")  # type: ignore[arg-type]


def test_fashion_mnist_resize(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trust(monkeypatch, write_dataset(isolated / "root"))
    out = fashion_mnist(isolated / "root", "test", resize=(9, 12))
    assert out.images.shape == (8, 9, 12)


# Batching.


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    first = epoch_order(100, seed=3, epoch=2)
    np.testing.assert_array_equal(first, epoch_order(100, seed=3, epoch=2))
    np.testing.assert_array_equal(np.sort(first), np.arange(100))
    assert not np.array_equal(first, epoch_order(100, seed=3, epoch=3))
    assert not np.array_equal(first, epoch_order(100, seed=4, epoch=2))
    with pytest.raises(DataError, match="seed must be a non-negative int"):
        epoch_order(10, seed=-1, epoch=0)


def test_batches_cover_each_example_once_and_resume_mid_epoch() -> None:
    batches = list(batch_indices(10, 4, seed=1, epoch=0))
    assert [len(b) for b in batches] == [4, 4, 2] and num_batches(10, 4) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(10))
    np.testing.assert_array_equal(np.concatenate(batches), epoch_order(10, 1, 0))
    rest = list(batch_indices(10, 4, seed=1, epoch=0, start=1))
    assert len(rest) == 2 and all(np.array_equal(a, b) for a, b in zip(rest, batches[1:], strict=True))
    np.testing.assert_array_equal(np.concatenate(list(batch_indices(5, 2))), np.arange(5))
    with pytest.raises(DataError, match="batch_size"):
        list(batch_indices(5, 0))


def test_to_input_scales_like_to_tensor_in_either_layout() -> None:
    images = np.array([[[0, 255], [51, 102]]], np.uint8)
    nchw, nhwc = to_input(images, "NCHW"), to_input(images, "nhwc")
    assert nchw.shape == (1, 1, 2, 2) and nhwc.shape == (1, 2, 2, 1) and nchw.dtype == np.float32
    np.testing.assert_allclose(nchw[0, 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-7)
    np.testing.assert_array_equal(nchw[:, 0], nhwc[..., 0])
    with pytest.raises(ShapeError):
        to_input(images, "CHWN")


def test_dataset_head() -> None:
    images, labels = make_split(10)
    subset = Dataset(images, labels, CLASSES).head(3)
    assert len(subset) == 3 and subset.images.shape == (3, 6, 6)
    with pytest.raises(DataError, match="positive int"):
        Dataset(images, labels, CLASSES).head(0)
