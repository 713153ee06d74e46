"""Loaders for MNIST, Fashion-MNIST and CIFAR-10 on small files in the exact upstream formats,
and every kind of bad file: each must give DataFormatError naming the file, never a stray
struct/zlib/pickle error, and hostile files must neither run code nor allocate what they claim."""

from __future__ import annotations

import gzip
import os
import pickle
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from datasets_helpers import (
    META,
    cifar_pickle,
    gz,
    idx_bytes,
    idx_header,
    md5,
    py2_style_pickle,
    random_cifar,
    random_mnist,
    rows,
    tar_gz,
    write_mnist,
)

from xpcnn.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    SHAPES_CLASSES,
    class_names,
    default_data_dir,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
)
from xpcnn.datasets import cifar as cifar_mod
from xpcnn.datasets import idx as idx_mod
from xpcnn.datasets.cifar import parse_batch
from xpcnn.datasets.download import resolve_data_dir
from xpcnn.datasets.idx import read_idx_file
from xpcnn.errors import DataFormatError, DownloadError, InputError

# Read before the autouse fixture below clears it for every test: the slow tests need it.
REAL_DATA_DIR = os.environ.get("XPCNN_DATA_DIR")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    # Tests choose their folders and servers explicitly; the developer's settings must not leak in.
    for var in ("DATA_DIR", "MNIST_URL", "FASHION_MNIST_URL", "CIFAR10_URL"):
        monkeypatch.delenv(f"XPCNN_{var}", raising=False)


def _check_mnist(result, arrays):
    (x, y), (xt, yt) = result
    assert x.dtype == np.uint8 and x.shape == (len(arrays["train_images"]), 28, 28, 1)
    assert y.dtype == np.int64 and y.shape == (len(arrays["train_labels"]),)
    np.testing.assert_array_equal(x[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(y, arrays["train_labels"])
    np.testing.assert_array_equal(xt[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(yt, arrays["test_labels"])


# -- MNIST / IDX: good files ------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("sub", ["", "mnist"])
def test_load_mnist_round_trip(tmp_path, rng, gzipped, sub):
    arrays = random_mnist(rng)
    write_mnist(tmp_path / sub if sub else tmp_path, arrays, gzipped=gzipped)
    _check_mnist(load_mnist(tmp_path, download=False), arrays)


@pytest.mark.parametrize("gzipped", [True, False])
def test_load_mnist_dotted_spelling(tmp_path, rng, gzipped):
    arrays = random_mnist(rng)
    paths = write_mnist(tmp_path, arrays, gzipped=gzipped, dotted=True)
    assert paths["train_images"].name.startswith("train-images.idx3-ubyte")
    _check_mnist(load_mnist(tmp_path, download=False), arrays)


def test_load_mnist_gz_detected_by_content(tmp_path, rng):
    arrays = random_mnist(rng)
    paths = write_mnist(tmp_path, arrays, gzipped=True)
    # A gzipped file without the .gz suffix (as some browsers save it) still reads.
    paths["train_images"].rename(tmp_path / "train-images-idx3-ubyte")
    _check_mnist(load_mnist(tmp_path, download=False), arrays)


def test_mnist_subfolder_preferred(tmp_path, rng):
    top, sub = random_mnist(rng), random_mnist(rng)
    write_mnist(tmp_path, top)
    write_mnist(tmp_path / "mnist", sub)
    _check_mnist(load_mnist(tmp_path, download=False), sub)


def test_load_fashion_mnist(tmp_path, rng):
    mnist, fashion = random_mnist(rng), random_mnist(rng)
    write_mnist(tmp_path, mnist)
    write_mnist(tmp_path / "fashion-mnist", fashion)
    _check_mnist(load_fashion_mnist(tmp_path, download=False), fashion)
    _check_mnist(load_mnist(tmp_path, download=False), mnist)


def test_fashion_mnist_top_level(tmp_path, rng):
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays)
    _check_mnist(load_fashion_mnist(tmp_path, download=False), arrays)


def test_fashion_mnist_refuses_mnist_files(tmp_path, rng, monkeypatch):
    # The official MNIST label files are recognised by checksum, so a folder holding MNIST is not
    # read as Fashion-MNIST (both use the same file names). Pretend our fake labels are MNIST's.
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays)
    fake = md5(idx_bytes(arrays["train_labels"]))
    monkeypatch.setattr(idx_mod, "_MNIST_LABEL_MD5", {fake})
    with pytest.raises(DownloadError, match="holds MNIST") as e:
        load_fashion_mnist(tmp_path, download=False)
    assert str(tmp_path / "fashion-mnist") in str(e.value)
    _check_mnist(load_mnist(tmp_path, download=False), arrays)


def test_data_dir_from_env(tmp_path, rng, monkeypatch):
    arrays = random_mnist(rng)
    write_mnist(tmp_path, arrays)
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path))
    _check_mnist(load_mnist(download=False), arrays)
    _check_mnist(load_dataset("mnist", download=False), arrays)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "xpcnn"
    assert resolve_data_dir() == tmp_path / "cache" / "xpcnn"
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "xpcnn"


def idx_file(tmp_path: Path, data: bytes) -> Path:
    """``data`` as a file for read_idx_file: raw, or gzipped where it starts as gzip data does
    (raw, it would be read as a damaged gzip stream, not checked as an IDX header)."""
    path = tmp_path / "some-idx-ubyte"
    path.write_bytes(gz(data) if data[:2] == b"\x1f\x8b" else data)
    return path


def test_read_idx_file_values(rng, tmp_path):
    images = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = read_idx_file(idx_file(tmp_path, idx_bytes(images)), kind="images")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, images)
    labels = read_idx_file(idx_file(tmp_path, idx_bytes(np.array([0, 9, 3], np.uint8))),
                           kind="labels")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [0, 9, 3])
    assert read_idx_file(idx_file(tmp_path, idx_header("labels", 0)),
                         kind="labels").shape == (0,)
    assert not hasattr(idx_mod, "parse_idx")  # (was used by the tests alone)


# -- MNIST / IDX: bad files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind", "match"),
    [
        (b"", "images", "too short"),
        (b"\x00\x00\x08", "labels", "too short"),
        (b"\x00\x00\x08\x03\x00\x00", "images", "truncated IDX header"),
        (b"\x1f\x8b\x08\x03" + b"\x00" * 12, "images", "not an IDX file"),
        (idx_header("labels", 3) + b"\x01\x02\x03", "images", "is not IDX images"),
        (idx_header("images", 1, 2, 2) + b"\x00" * 4, "labels", "is not IDX labels"),
        (b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4, "labels", "data type 0x0d"),
        (idx_header("images", 2, 28, 28) + b"\x00" * 1000, "images", "truncated"),
        (idx_header("images", 1, 2, 2) + b"\x00" * 5, "images", "1 extra bytes"),
        (idx_header("images", 3, 0, 28), "images", "image size 0x28"),
        (idx_header("labels", 3) + bytes([1, 10, 2]), "labels", "label 10 at index 1"),
    ],
)
def test_read_idx_file_rejects(tmp_path, data, kind, match):
    path = idx_file(tmp_path, data)
    with pytest.raises(DataFormatError, match=match) as caught:
        read_idx_file(path, kind=kind)
    assert str(path) in str(caught.value)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("count", [4_000_000_000, 2_000_000])
def test_huge_claim_fails_fast_without_allocating(tmp_path, count):
    # 4e9 images exceed the limit outright; 2e6 (1.5 GB) is allowed by the limit but the file is
    # tiny, so it must be found truncated without ever holding more than the bytes read.
    data = idx_header("images", count, 28, 28) + b"\x00" * 784
    raw, packed = tmp_path / "raw-idx3-ubyte", tmp_path / "packed-idx3-ubyte.gz"
    raw.write_bytes(data)
    packed.write_bytes(gz(data))
    match = "limit" if count > 2**31 else "truncated"

    def attempt(fn):
        def run():
            with pytest.raises(DataFormatError, match=match):
                fn()

        return run

    for fn in (
        lambda: read_idx_file(raw, kind="images"),
        lambda: read_idx_file(packed, kind="images"),
    ):
        assert _peak_bytes(attempt(fn)) < 4 * 2**20


def test_gzip_bomb_refused_by_loader_cap(tmp_path, rng):
    # Within the general limit but far beyond any MNIST file: the loaders refuse it unread.
    arrays = random_mnist(rng)
    paths = write_mnist(tmp_path, arrays)
    paths["train_images"].write_bytes(gz(idx_header("images", 1_000_000, 28, 28)))
    with pytest.raises(DataFormatError, match="limit"):
        load_mnist(tmp_path, download=False)


def _mnist_with(tmp_path, rng, key, content: bytes) -> Path:
    arrays = random_mnist(rng)
    paths = write_mnist(tmp_path, arrays)
    paths[key].write_bytes(content)
    return paths[key]


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_of_no_image_is_refused(tmp_path, rng, split):
    """IDX files of 0 items are valid IDX, but MNIST's split of none is refused as it is read
    (was: loaded, then a bare traceback from the training command's label checks)."""
    arrays = random_mnist(rng)
    arrays[f"{split}_images"] = arrays[f"{split}_images"][:0]
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:0]
    write_mnist(tmp_path, arrays)
    with pytest.raises(DataFormatError, match=f"MNIST {split} split: .* holds no images"):
        load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("gzipped", [True, False])
def test_truncated_idx_file(tmp_path, rng, gzipped):
    data = idx_bytes(rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))[:-100]
    path = _mnist_with(tmp_path, rng, "train_images", gz(data) if gzipped else data)
    with pytest.raises(DataFormatError, match="truncated") as e:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(e.value)


def test_truncated_gzip_stream(tmp_path, rng):
    packed = gz(idx_bytes(rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)))
    path = _mnist_with(tmp_path, rng, "train_images", packed[: len(packed) // 2])
    with pytest.raises(DataFormatError, match="gzip") as e:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("where", ["crc", "middle"])
def test_corrupt_gzip(tmp_path, rng, where):
    packed = bytearray(gz(idx_bytes(rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))))
    pos = len(packed) - 8 if where == "crc" else len(packed) // 2
    packed[pos] ^= 0xFF
    path = _mnist_with(tmp_path, rng, "train_images", bytes(packed))
    with pytest.raises(DataFormatError) as e:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(e.value)


def test_a_gzip_stream_damaged_inside_is_reported_damaged_not_as_a_lying_header(tmp_path, rng):
    """One byte flipped at places across the deflate stream of compressible images: every one
    is reported as a damaged file, to download again (was: about half as "more data than the
    header's ... declares", read no further than one byte past the claim, so the CRC at the
    end of the stream was never checked)."""
    images = np.zeros((200, 28, 28), np.uint8)
    for im in images:  # (a rectangle each: compressed by Huffman codes, not stored blocks)
        (r, c), (h, w) = rng.integers(2, 20, 2), rng.integers(3, 9, 2)
        im[r:r + h, c:c + w] = rng.integers(100, 256)
    raw = idx_bytes(images)
    packed = gz(raw)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    longer, messages = 0, []
    for pos in range(len(packed) // 4, len(packed) - 20, len(packed) // 60):
        damaged = bytearray(packed)
        damaged[pos] ^= 0xFF
        path.write_bytes(damaged)
        with pytest.raises(DataFormatError) as e:
            read_idx_file(path, kind="images")
        messages.append(str(e.value))
        try:  # (what the damaged stream inflates to, its CRC unchecked: raw deflate)
            inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(damaged[10:]))
        except zlib.error:
            continue
        longer += len(inflated) > len(raw)
    assert longer  # (some inflate past the header's claim: the case that blamed the header)
    assert [m for m in messages if "header" in m] == []
    for message in messages:
        assert message.startswith(f"{path}: the file is damaged: corrupt or truncated gzip "
                                  "data (") and message.endswith(
            "; delete it and download it again"), message


def test_an_intact_gzip_stream_longer_than_its_header_still_blames_the_header(tmp_path):
    path = tmp_path / "some-idx-ubyte.gz"
    path.write_bytes(gz(idx_header("images", 1, 2, 2) + b"\x00" * 5))
    with pytest.raises(DataFormatError, match=r"more data than the header's 1x2x2 declares") \
            as e:
        read_idx_file(path, kind="images")
    assert "damaged" not in str(e.value)


def test_not_gzip_at_all(tmp_path, rng):
    path = _mnist_with(tmp_path, rng, "test_labels", b"\x1f\x8bthis is not gzip data at all")
    with pytest.raises(DataFormatError, match="gzip") as e:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(e.value)


def test_wrong_magic_in_loader(tmp_path, rng):
    # Labels and images swapped: each file's magic tells it is the wrong kind.
    labels = idx_bytes(rng.integers(0, 10, 30, dtype=np.uint8))
    path = _mnist_with(tmp_path, rng, "train_images", gz(labels))
    with pytest.raises(DataFormatError, match="magic number 0x00000801") as e:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(e.value)


def test_dims_disagree_with_size(tmp_path, rng):
    data = idx_header("images", 31, 28, 28) + b"\x00" * (30 * 784)
    _mnist_with(tmp_path, rng, "train_images", data)
    with pytest.raises(DataFormatError, match=r"31x28x28 needs 24304 bytes.* 23520 follow"):
        load_mnist(tmp_path, download=False)


def test_image_label_count_mismatch(tmp_path, rng):
    _mnist_with(tmp_path, rng, "test_labels", gz(idx_bytes(np.zeros(11, np.uint8))))
    with pytest.raises(DataFormatError, match="12 images but .* 11 labels"):
        load_mnist(tmp_path, download=False)


def test_labels_out_of_range(tmp_path, rng):
    path = _mnist_with(tmp_path, rng, "train_labels", gz(idx_bytes(np.full(30, 200, np.uint8))))
    with pytest.raises(DataFormatError, match="label 200 at index 0 is out of range") as e:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(e.value)


def test_wrong_image_size(tmp_path, rng):
    _mnist_with(tmp_path, rng, "train_images", idx_bytes(np.zeros((30, 27, 28), np.uint8)))
    with pytest.raises(DataFormatError, match="27x28, expected 28x28"):
        load_mnist(tmp_path, download=False)


# -- CIFAR-10: good files ---------------------------------------------------------------------


def _official_tar(batches: dict[str, bytes], meta: bool = True) -> bytes:
    members = {f"cifar-10-batches-py/{name}": data for name, data in batches.items()}
    if meta:
        members["cifar-10-batches-py/batches.meta"] = META
    return tar_gz(members)


def test_parse_batch_transposes_chw_to_hwc():
    # One image whose planes are distinguishable: R = 1, G = 2, B = 3 plus the pixel index.
    plane = np.arange(1024, dtype=np.uint16).reshape(32, 32) % 200
    row = np.concatenate([(plane + c).ravel() for c in (1, 2, 3)]).astype(np.uint8)
    x, y = parse_batch(cifar_pickle(np.zeros((1, 32, 32, 3), np.uint8), [4], data=row[None]))
    assert x.shape == (1, 32, 32, 3) and x.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(x[0, :, :, c], plane + c + 1)
    assert y.tolist() == [4]


@pytest.mark.parametrize("style", ["py3", "py3-str-keys", "py2", "bytes-data", "array-labels"])
def test_parse_batch_styles(rng, style):
    x, y = random_cifar(rng, 7)
    data = {
        "py3": lambda: cifar_pickle(x, y),
        "py3-str-keys": lambda: cifar_pickle(x, y, str_keys=True),
        "py2": lambda: py2_style_pickle(x, y),
        "bytes-data": lambda: cifar_pickle(x, y, data=rows(x).tobytes()),
        "array-labels": lambda: cifar_pickle(x, y, label_list=np.asarray(y, np.int32)),
    }[style]()
    xi, yi = parse_batch(data)
    assert xi.dtype == np.uint8 and yi.dtype == np.int64
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yi, y)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("style", ["bytes-keys", "str-keys", "array-labels", "fortran-data"])
def test_a_batch_saved_again_by_python_3_loads_as_the_original(tmp_path, rng, protocol, style):
    """The dict of a batch (as read with encoding="bytes" or "latin1") written again with
    pickle.dump at protocols 2 to 5, which write an array in other ways (from 5: a
    _frombuffer of its bytes, which was refused as possibly unsafe), read as the original is,
    by parse_batch and from a folder."""
    x, y = random_cifar(rng, 5)
    data = {"fortran-data": np.asfortranarray(rows(x)), "array-labels": None}.get(style)
    labels = np.asarray(y, np.int64) if style == "array-labels" else None
    original = cifar_pickle(x, y, str_keys=style == "str-keys", data=data, label_list=labels)
    again = pickle.dumps(pickle.loads(original, encoding="bytes"), protocol=protocol)
    for xi, yi in (parse_batch(again), load_cifar10(_saved_batch(tmp_path, again),
                                                    download=False)[0]):
        assert xi.dtype == np.uint8 and yi.dtype == np.int64 and type(yi) is np.ndarray
        np.testing.assert_array_equal(xi, x)
        np.testing.assert_array_equal(yi, y)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 5])
def test_a_batch_with_an_empty_bytes_loads(tmp_path, rng, protocol):
    """Python 3 writes an empty bytes (here an empty batch_label) as ``__builtin__.bytes()``
    below protocol 3: a valid batch, which was refused as a code-execution threat."""
    x, y = random_cifar(rng, 3)
    batch = pickle.loads(cifar_pickle(x, y), encoding="bytes")
    batch[b"batch_label"] = b""
    data = pickle.dumps(batch, protocol=protocol)
    for xi, yi in (parse_batch(data), load_cifar10(_saved_batch(tmp_path, data),
                                                   download=False)[0]):
        np.testing.assert_array_equal(xi, x)
        np.testing.assert_array_equal(yi, y)


@pytest.mark.parametrize("module", ["__builtin__", "builtins"])
@pytest.mark.parametrize("args", [b"K\x05\x85", b"J\x00\xca\x9a;\x85", b"U\x03abc\x85"])
def test_bytes_in_a_batch_takes_no_argument(module, args):
    """(bytes(n) would allocate n bytes of the file's choosing)"""
    payload = b"\x80\x02c" + module.encode() + b"\nbytes\n" + args + b"R."
    with pytest.raises(DataFormatError, match="calls bytes with arguments"):
        parse_batch(payload, source="batch")
    empty = b"\x80\x02c" + module.encode() + b"\nbytes\n)R."
    with pytest.raises(DataFormatError, match="holds a bytes, expected a dict"):
        parse_batch(empty, source="batch")  # (b"" made, then refused as not a batch)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("data", [np.zeros((0, 3072), np.uint8), b""])
def test_a_batch_of_no_images_is_refused_clearly(tmp_path, protocol, data):
    """(an empty split fails far from its cause; and the empty array's data was refused as a
    code-execution threat at protocol 2)"""
    batch = pickle.dumps({b"data": data, b"labels": [], b"batch_label": b""}, protocol=protocol)
    with pytest.raises(DataFormatError, match="^batch: holds no images$"):
        parse_batch(batch, source="batch")
    folder = _saved_batch(tmp_path, batch)
    with pytest.raises(DataFormatError, match="data_batch_1: holds no images"):
        load_cifar10(folder, download=False)


def _saved_batch(root: Path, data: bytes) -> Path:
    """``root`` with ``data`` as its extracted folder's data_batch_1."""
    (root / "cifar-10-batches-py").mkdir(exist_ok=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(data)
    return root


def test_load_cifar10_official_archive(tmp_path, rng):
    parts = [random_cifar(rng, n) for n in (5, 6, 7)]
    test = random_cifar(rng, 4)
    batches = {f"data_batch_{i + 1}": cifar_pickle(*p) for i, p in enumerate(parts)}
    batches["test_batch"] = cifar_pickle(*test)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_official_tar(batches))
    before = sorted(tmp_path.rglob("*"))
    (x, y), (xt, yt) = load_cifar10(tmp_path, download=False)
    assert x.shape == (18, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))
    np.testing.assert_array_equal(xt, test[0])
    np.testing.assert_array_equal(yt, test[1])
    assert sorted(tmp_path.rglob("*")) == before  # read from the archive, nothing extracted


def test_load_cifar10_subset_archive_without_test(tmp_path, rng):
    x, y = random_cifar(rng, 9)
    data = _official_tar({"data_batch_1": py2_style_pickle(x, y)})
    (tmp_path / "cifar-10-subset-python.tar.gz").write_bytes(data)
    (tmp_path / "unrelated.tar.gz").write_bytes(tar_gz({"other/file": b"x"}))
    (xi, yi), test = load_cifar10(tmp_path, download=False)
    assert test is None
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yi, y)
    (xi, yi), test = load_dataset("cifar-10", tmp_path, download=False)
    assert test is None and len(xi) == 9


def test_load_cifar10_reads_the_extracted_folder_given_itself(tmp_path, rng):
    """data_dir=.../cifar-10-batches-py, as MNIST's folder holds its files: was not found (a
    download into it, or offline a DownloadError)."""
    x, y = random_cifar(rng, 5)
    xt, yt = random_cifar(rng, 3)
    (tmp_path / "data_batch_1").write_bytes(cifar_pickle(x, y))
    (tmp_path / "test_batch").write_bytes(cifar_pickle(xt, yt))
    (xi, yi), (xti, yti) = load_cifar10(tmp_path, download=False)
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yti, yt)
    (tmp_path / "data_batch_1").unlink()
    with pytest.raises(DataFormatError, match=r"holds no training batch: expected data_batch_1 "
                                              r"\(to data_batch_5\), found \['test_batch'\]"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("stray", ["test_batch", "cifar-10-batches-py/test_batch"])
def test_a_stray_test_batch_does_not_hide_the_archive_beside_it(tmp_path, rng, stray):
    """A data folder holding a test_batch (at its top, or alone in an extracted folder) but no
    data_batch_* was read as the dataset, a DataFormatError, instead of the archive beside it."""
    x, y = random_cifar(rng, 5)
    xt, yt = random_cifar(rng, 3)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_official_tar(
        {"data_batch_1": cifar_pickle(x, y), "test_batch": cifar_pickle(xt, yt)}))
    (tmp_path / stray).parent.mkdir(exist_ok=True)
    (tmp_path / stray).write_bytes(cifar_pickle(*random_cifar(rng, 2)))
    (xi, yi), (xti, yti) = load_cifar10(tmp_path, download=False)
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yi, y)
    np.testing.assert_array_equal(xti, xt)
    np.testing.assert_array_equal(yti, yt)


def test_load_cifar10_extracted_folder(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x, y = random_cifar(rng, 5)
    xt, yt = random_cifar(rng, 3)
    (folder / "data_batch_2").write_bytes(cifar_pickle(x, y))
    (folder / "test_batch").write_bytes(cifar_pickle(xt, yt))
    (folder / "batches.meta").write_bytes(META)
    (xi, yi), (xti, yti) = load_cifar10(tmp_path, download=False)
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yti, yt)


# -- CIFAR-10: bad files ----------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "data", "label"])
def test_malicious_pickle_is_not_run(tmp_path, rng, where):
    marker = tmp_path / "pwned"
    x, y = random_cifar(rng, 2)
    evil = _Evil(marker)
    if where == "top":
        data = pickle.dumps(evil, protocol=2)
    elif where == "data":
        data = cifar_pickle(x, y, data=evil)
    else:
        data = cifar_pickle(x, y, label_list=[evil, 1])
    with pytest.raises(DataFormatError, match=r"refers to (posix|nt|os)\.system"):
        parse_batch(data)
    # And through the loader, from an archive.
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_official_tar({"data_batch_1": data}))
    with pytest.raises(DataFormatError, match="system") as e:
        load_cifar10(tmp_path, download=False)
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        # numpy.ndarray((10**12,)) would allocate what the file asks for.
        (b"\x80\x02cnumpy\nndarray\n(L1000000000000L\ntR.", "not a valid pickle"),
        # _reconstruct with a non-empty shape, ditto.
        (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nL1000000000000L\n"
         b"\x85U\x01b\x87R.", "shape"),
        # Object arrays hold arbitrary Python objects.
        (b"\x80\x02cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R.", "dtype"),
        (b"\x80\x02c_codecs\nencode\nU\x03abcU\x06rot_13\x86R.", "_codecs.encode"),
        (b"\x80\x02cbuiltins\neval\nU\x041+1\x85R.", "builtins.eval"),
        (b"\x80\x02c__builtin__\ngetattr\n.", "__builtin__.getattr"),
        (b"\x80\x04\x8c\x02os\x8c\x06system\x93.", r"refers to os\.system"),
    ],
)
def test_restricted_unpickler_hardening(payload, match):
    with pytest.raises(DataFormatError, match=match):
        parse_batch(payload, source="batch")


class _Reduced:
    """Pickles as ``function(*args)``, then ``__setstate__(state)`` where a state is given:
    what numpy writes for an array or a dtype, with other arguments."""

    def __init__(self, function, args, state=None) -> None:
        self.reduced = (function, args) if state is None else (function, args, state)

    def __reduce__(self):
        return self.reduced


def _tampered_uint8():
    """numpy.dtype("u1") whose state the pickle sets to "holds Python objects" (numpy takes
    any flags)."""
    return _Reduced(np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63))


def _array(shape, dtype, raw):
    from numpy._core.multiarray import _reconstruct

    return _Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))


def _frombuffer(*args):
    from numpy._core.numeric import _frombuffer

    return _Reduced(_frombuffer, args)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        # An array of a dtype marked as holding objects, from a list: was made (numpy wrote
        # each item's uint8 into it), then read as references to objects: internal errors,
        # or worse, at its first copy and when freed. And from bytes, from a _frombuffer.
        (lambda: _array((1, 3072), _tampered_uint8(), [7] * 3072),
         "pickle sets the flags of numpy dtype '|u1' to 63, which numpy writes as 0"),
        (lambda: _array((1, 3072), _tampered_uint8(), b"\x00" * 3072), "flags .* to 63"),
        (lambda: _frombuffer(b"\x00" * 3072, _tampered_uint8(), (1, 3072), "C"),
         "flags .* to 63"),
        (lambda: _array((1, 3072), np.dtype("u1"), [7] * 3072), "as a list, expected bytes"),
        # (protocol 5) an allocation of the file's choosing, an object dtype, not bytes
        (lambda: _frombuffer(b"\x00" * 3072, np.dtype("u1"), (10**12, 3072), "C"),
         r"3072 bytes for shape \(1000000000000, 3072\)"),
        (lambda: _frombuffer(b"\x00" * 3072, np.dtype("O"), (1, 3072), "C"), "numpy dtype 'O8'"),
        (lambda: _frombuffer([0] * 3072, np.dtype("u1"), (1, 3072), "C"), "with a list"),
        (lambda: _frombuffer(b"\x00" * 3072, np.dtype("u1"), (1, 3072), "A"), "order 'A'"),
        (lambda: _frombuffer(b"\x00" * 3072, np.dtype("u1"), (1, 3072), "K", (0, 0)),
         r"order 'K', axes \(0, 0\)"),
    ],
)
def test_arrays_are_made_only_as_numpy_writes_them(rng, data, match):
    _, y = random_cifar(rng, 1)
    with pytest.raises(DataFormatError, match=match):
        parse_batch(pickle.dumps({b"data": data(), b"labels": [int(y[0])]}, protocol=2))


def test_an_array_stored_with_its_axes_in_another_order_is_read(rng):
    """(what newer numpy writes at protocol 5 for an array contiguous only so: its bytes in the
    order of the axes given, transposed back)"""
    x, y = random_cifar(rng, 3)
    data = _frombuffer(rows(x).T.tobytes(), np.dtype("u1"), (3072, 3), "K", (1, 0))
    xi, yi = parse_batch(pickle.dumps({b"data": data, b"labels": y.tolist()}, protocol=5))
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yi, y)


def test_a_batch_saved_at_protocol_5_with_its_arrays_out_of_band_is_refused(rng):
    """(pickle.dump writes them in the file; a buffer_callback leaves them out of it)"""
    x, y = random_cifar(rng, 2)
    batch = pickle.loads(cifar_pickle(x, y), encoding="bytes")
    with pytest.raises(DataFormatError, match="not a valid pickle .*out-of-band"):
        parse_batch(pickle.dumps(batch, protocol=5, buffer_callback=lambda b: False))
    batch[b"data"] = _Evil(Path("unused"))
    with pytest.raises(DataFormatError, match=r"refers to (posix|nt|os)\.system"):
        parse_batch(pickle.dumps(batch, protocol=5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data": np.zeros((3, 3000), np.uint8)}, r"shape \(3, 3000\)"),
        ({"data": np.zeros((3, 3072), np.int16)}, "int16"),
        ({"data": np.zeros((4, 3072), np.uint8)}, "4 images but 3 labels"),
        ({"data": b"\x00" * 3071}, "whole number"),
        ({"data": b"\x00" * 3072 * 2}, "2 images but 3 labels"),
        ({"data": "text"}, "data is a str"),
        ({"label_list": [0, 10, 1]}, "label 10 at index 1"),
        ({"label_list": [0, -1, 1]}, "label -1 at index 1"),
        ({"label_list": [0, 1.0, 1]}, "integers"),
        ({"label_list": np.array([0, 12, 1])}, "label 12 at index 1"),
        ({"label_list": "abc"}, "labels are a str"),
    ],
)
def test_parse_batch_rejects_bad_content(rng, kwargs, match):
    x, y = random_cifar(rng, 3)
    with pytest.raises(DataFormatError, match=match):
        parse_batch(cifar_pickle(x, y, **kwargs), source="batch")


def test_parse_batch_rejects_wrong_structure(rng):
    x, y = random_cifar(rng, 2)
    with pytest.raises(DataFormatError, match="holds a list"):
        parse_batch(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataFormatError, match="no 'labels' entry"):
        parse_batch(pickle.dumps({b"data": rows(x)}, protocol=2))
    good = cifar_pickle(x, y)
    for cut in (1, len(good) // 2, len(good) - 1):
        with pytest.raises(DataFormatError, match="not a valid pickle"):
            parse_batch(good[:cut])
    with pytest.raises(DataFormatError, match="not a valid pickle"):
        parse_batch(b"")


def test_parse_batch_size_cap(rng, monkeypatch):
    monkeypatch.setattr(cifar_mod, "MAX_MEMBER_BYTES", 1000)
    x, y = random_cifar(rng, 1)
    with pytest.raises(DataFormatError, match="limit"):
        parse_batch(cifar_pickle(x, y))


def test_tar_member_size_cap(tmp_path, rng, monkeypatch):
    x, y = random_cifar(rng, 1)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(
        _official_tar({"data_batch_1": cifar_pickle(x, y)})
    )
    monkeypatch.setattr(cifar_mod, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(DataFormatError, match="member cifar-10-batches-py/data_batch_1 is .*limit"):
        load_cifar10(tmp_path, download=False)


def test_cifar_corrupt_gzip(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 100)
    with pytest.raises(DataFormatError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, download=False)


def test_cifar_not_gzip(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataFormatError, match="corrupt or truncated archive"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.99])
def test_cifar_truncated_archive(tmp_path, rng, fraction):
    x, y = random_cifar(rng, 30)
    data = _official_tar({"data_batch_1": cifar_pickle(x, y)})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DataFormatError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, download=False)


def test_cifar_corrupt_crc(tmp_path, rng):
    x, y = random_cifar(rng, 3)
    data = bytearray(_official_tar({"data_batch_1": cifar_pickle(x, y)}))
    data[-6] ^= 0xFF  # the gzip CRC: every tar member parses, only the trailer is wrong
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="CRC"):
        load_cifar10(tmp_path, download=False)


def test_cifar_tar_missing_member(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_official_tar({}, meta=True))
    with pytest.raises(DataFormatError, match="no training batch"):
        load_cifar10(tmp_path, download=False)


def test_cifar_tar_only_test_batch(tmp_path, rng):
    data = _official_tar({"test_batch": cifar_pickle(*random_cifar(rng, 2))})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data)
    with pytest.raises(DataFormatError, match="no training batch.*test_batch"):
        load_cifar10(tmp_path, download=False)


def test_cifar_tar_link_refused(tmp_path):
    data = tar_gz(
        {"cifar-10-batches-py/batches.meta": META},
        links={"cifar-10-batches-py/data_batch_1": "/etc/passwd"},
    )
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data)
    with pytest.raises(DataFormatError, match="not a regular file"):
        load_cifar10(tmp_path, download=False)


def test_cifar_tar_odd_paths_ignored(tmp_path, rng):
    # Absolute and parent-relative members are never read, not even as a batch.
    good = cifar_pickle(*random_cifar(rng, 2))
    data = tar_gz(
        {
            "/cifar-10-batches-py/data_batch_1": good,
            "../cifar-10-batches-py/data_batch_2": good,
            "cifar-10-batches-py/sub/data_batch_3": good,
        }
    )
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data)
    with pytest.raises(DataFormatError, match="no training batch"):
        load_cifar10(tmp_path, download=False)


def test_cifar_tar_duplicate_member(tmp_path, rng):
    buf = _official_tar({"data_batch_1": cifar_pickle(*random_cifar(rng, 2))}, meta=False)
    raw = gzip.decompress(buf)
    # Two copies of the archive body, back to back: the second data_batch_1 repeats the first.
    body = raw.rstrip(b"\x00")
    body += b"\x00" * (-len(body) % 512)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(gz(body + raw))
    with pytest.raises(DataFormatError, match="twice"):
        load_cifar10(tmp_path, download=False)


def test_cifar_bad_batch_names_file(tmp_path, rng):
    x, y = random_cifar(rng, 3)
    data = cifar_pickle(x, y, label_list=[1, 2, 99])
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_official_tar({"data_batch_1": data}))
    with pytest.raises(DataFormatError, match=r"cifar-10-python.tar.gz.*data_batch_1.*label 99"):
        load_cifar10(tmp_path, download=False)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(data[:-10])
    with pytest.raises(DataFormatError, match="data_batch_1"):
        load_cifar10(tmp_path, download=False)


# -- registry ---------------------------------------------------------------------------------


def test_class_names_and_dispatch():
    assert len(MNIST_CLASSES) == len(FASHION_MNIST_CLASSES) == len(CIFAR10_CLASSES) == 10
    assert len(SHAPES_CLASSES) == 10
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[9] == "truck"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert class_names("cifar10") is CIFAR10_CLASSES
    assert class_names("Fashion_MNIST") is FASHION_MNIST_CLASSES
    assert class_names("shapes") is SHAPES_CLASSES
    with pytest.raises(InputError, match="unknown dataset 'imagenet'"):
        class_names("imagenet")
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("svhn")
    (x, y), (xt, yt) = load_dataset("shapes", n_train=20, n_test=10, seed=3)
    assert x.shape == (20, 32, 32, 3) and xt.shape == (10, 32, 32, 3)


# -- the real files ---------------------------------------------------------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_SUBSET_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


def _real_data_dir() -> Path:
    # conftest skips slow tests when XPCNN_DATA_DIR is unset; when it is set, missing files fail
    assert REAL_DATA_DIR, "XPCNN_DATA_DIR is not set"
    return Path(REAL_DATA_DIR)


@pytest.mark.slow
def test_real_mnist():
    folder = _real_data_dir()
    assert idx_mod._find_in(folder / "mnist") is not None or idx_mod._find_in(folder) is not None, (
        f"XPCNN_DATA_DIR={folder} holds no MNIST files")
    (x, y), (xt, yt) = load_mnist(folder, download=False)
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(yt, minlength=10).tolist() == MNIST_TEST_COUNTS


@pytest.mark.slow
def test_real_cifar10():
    folder = _real_data_dir()
    assert cifar_mod._find(folder) is not None, f"XPCNN_DATA_DIR={folder} holds no CIFAR-10 files"
    (x, y), test = load_cifar10(folder, download=False)
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == CIFAR_SUBSET_COUNTS
    assert test is None
    # Spot values from the data's README: first three R of image 0, last three B of image 9999.
    assert x[0, 0, :3, 0].tolist() == [61, 48, 56]
    assert x[9999, 31, -3:, 2].tolist() == [136, 141, 134]


@pytest.mark.slow
def test_real_cifar10_batch_saved_again_at_protocols_2_to_5(tmp_path):
    """The real data_batch_1, its dict read with bytes keys and with str keys (as torchvision
    reads it), saved by pickle.dump at each protocol: read as the original is."""
    import tarfile

    folder = _real_data_dir()
    (x, y), _ = load_cifar10(folder, download=False)
    with tarfile.open(folder / "cifar-10-subset-python.tar.gz") as tar:
        raw = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    for encoding in ("bytes", "latin1"):
        batch = pickle.loads(raw, encoding=encoding)
        assert (b"data" in batch) == (encoding == "bytes")
        for protocol in (2, 3, 4, 5):
            root = tmp_path / f"{encoding}-{protocol}"
            root.mkdir()
            (xi, yi), test = load_cifar10(
                _saved_batch(root, pickle.dumps(batch, protocol=protocol)), download=False)
            assert test is None
            np.testing.assert_array_equal(xi, x)
            np.testing.assert_array_equal(yi, y)
